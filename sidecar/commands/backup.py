"""`litefs-sidecar restore | ls | verify URL`: read one database's backup straight from the store.

URL names one database: `file:///root/<cluster>/<db>`, `s3://bucket/prefix/<cluster>/<db>`, or a
Litestream 0.5 replica URL (same layout). The index is rebuilt from the store on each call: one LIST
and one 100-byte read per file. `ls` also counts the copies of its files set aside at the store's root
(`.litefs-sidecar/quarantine/<cluster>/<db>/`, docs/format.md): one more LIST.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from sidecar.commands import args as argtypes
from sidecar.engine.index import DbIndex, chain, scan
from sidecar.engine.restore import plan_restore, restore, side_files
from sidecar.errors import NotFound, RestoreError, SidecarError, StorageError
from sidecar.ltx import ChecksumMismatch, LTXError, Version, format_timestamp
from sidecar.ltx.checksum import database_checksum
from sidecar.ltx.decoder import Decoder
from sidecar.storage import open_storage
from sidecar.storage.base import Storage
from sidecar.storage.layout import parse_set_aside, set_aside_prefix

EXAMPLES = """\
examples:
  litefs-sidecar restore -o app.db file:///var/lib/litefs-sidecar/backups/default/app.db
  litefs-sidecar restore --timestamp 2026-11-24T09:00:00Z -o app.db s3://bucket/backups/default/app.db
  litefs-sidecar restore --txid 00000000000004d2 --dry-run -o app.db file:///backups/default/app.db

URL names one database's backup: file:///ROOT/<cluster>/<db>, s3://BUCKET/PREFIX/<cluster>/<db>, or a
Litestream 0.5 replica; a plain path (./backups/default/app.db) is a file:// URL. `litefs-sidecar ls ROOT`
lists the backups under a store's root.
"""

LS_EXAMPLES = """\
examples:
  litefs-sidecar ls file:///var/lib/litefs-sidecar/backups/default/app.db
  litefs-sidecar ls ./backups/default/app.db                  a path is a file:// URL
  litefs-sidecar ls file:///var/lib/litefs-sidecar/backups    the backups in a store
"""

VERIFY_EXAMPLES = """\
examples:
  litefs-sidecar verify s3://bucket/backups/default/app.db
  litefs-sidecar verify file:///var/lib/litefs-sidecar/backups/default/app.db
"""


def register(sub: Any) -> None:
    """Add `restore`, `ls` and `verify`."""
    p = sub.add_parser("restore", help="restore a database to the latest state, a time or a TXID",
                       description="Restore one database from its backup into a new SQLite file.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--timestamp", metavar="T", type=argtypes.timestamp, help=argtypes.TIMESTAMP_HELP)
    target.add_argument("--txid", metavar="HEX", type=argtypes.txid, help=argtypes.TXID_HELP)
    p.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    p.add_argument("--integrity-check", action="store_true", help="run PRAGMA integrity_check on the result")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="SQLite file to write (replaced atomically)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT even with a -wal, -shm or -journal beside it (they are removed with it)")
    _storage_flags(p)
    p.add_argument("url", metavar="URL")
    p.set_defaults(func=lambda a: asyncio.run(cmd_restore(a)))

    p = sub.add_parser("ls", help="list restore points per level (TXID ranges and times)", epilog=LS_EXAMPLES,
                       description="List one database's backup files per level: TXID range, time, size, and "
                                   "whether a restore can reach it.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _storage_flags(p)
    p.add_argument("url", metavar="URL")
    p.set_defaults(func=lambda a: asyncio.run(cmd_ls(a)))

    p = sub.add_parser("verify", help="replay the whole backup and check every checksum", epilog=VERIFY_EXAMPLES,
                       description="Check one database's backup: every file's checksums, each level's chain, "
                                   "and a full restore of the latest state with PRAGMA integrity_check.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _storage_flags(p)
    p.add_argument("url", metavar="URL")
    p.set_defaults(func=lambda a: asyncio.run(cmd_verify(a)))


def _storage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--s3-endpoint", metavar="URL", type=argtypes.s3_endpoint,
                   help="S3-compatible endpoint (env AWS_ENDPOINT_URL_S3 too)")
    p.add_argument("--s3-region", metavar="REGION")
    p.add_argument("--s3-force-path-style", action="store_true")


def _open(args: argparse.Namespace) -> Storage:
    return open_storage(url_of(args.url), endpoint_url=args.s3_endpoint, region=args.s3_region,
                        force_path_style=args.s3_force_path_style or None)


def url_of(text: str) -> str:
    """A URL as given, or a plain path (relative ones too, as every Unix tool takes them) as a file:// URL."""
    return text if "://" in text else f"file://{os.path.abspath(text)}"


async def backups_under(storage: Storage, url: str) -> list[str]:
    """The URL of every database backup below `url` (a store's root, or a cluster's directory)."""
    prefixes = {parsed.prefix for obj in await storage.list("") if (parsed := storage.layout.parse(obj.key))}
    base = url_of(url).rstrip("/")
    return [f"{base}/{prefix}" for prefix in sorted(prefixes) if prefix]


async def _scan_one(storage: Storage, url: str, verb: str) -> DbIndex:
    """The index of the backup at `url`; RestoreError naming the backups below it if `url` is a store's root."""
    index = await scan(storage, "")
    if len(index):
        return index
    below = await backups_under(storage, url)
    if below:
        raise RestoreError(f"{url} is not one database's backup; {verb} one of the {len(below)} it holds:\n  "
                           + "\n  ".join(below))
    raise RestoreError(f"{url}: no backup files found")


class _Bar:
    """A one-line progress bar on stderr, drawn only at a TTY."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.tty or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\rrestoring [{bar:<30}] {frac * 100:5.1f}% {done / 1e6:8.1f} MB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def cmd_restore(args: argparse.Namespace) -> int:
    txid, ts = args.txid, args.timestamp
    out = argtypes.check_output(args.output)
    sides = side_files(out)
    if sides and not args.force and not args.dry_run:
        names = ", ".join(p.name for p in sides)
        failed = SidecarError(f"-o {args.output}: {names} beside it would be applied by SQLite to the restored "
                              "file (another state); nothing was written")
        failed.hint = "stop what uses it, then add --force to replace the database and remove them"  # type: ignore[attr-defined]
        raise failed
    storage = _open(args)
    try:
        index = await _scan_one(storage, args.url, "restore")
        plan = plan_restore(index, txid=txid, timestamp=ts)
        if args.dry_run:
            for e in plan:
                print(f"L{e.level}  {e.min_txid:016x}-{e.max_txid:016x}  {format_timestamp(e.timestamp)}  {e.size}")
            last = plan[-1]
            print(f"would restore TXID {last.max_txid:016x} at {format_timestamp(last.timestamp)} from "
                  f"{len(plan)} files")
            return 0
        t0 = time.perf_counter()
        result = await restore(storage, "", plan, args.output, integrity_check=args.integrity_check, progress=_Bar(),
                               replace=sides)
        seconds = time.perf_counter() - t0
    finally:
        await storage.close()
    size = result.pages * result.page_size
    check = "checksum verified" if result.verified else "no stored checksum to verify"
    print(f"restored TXID {result.txid:016x} at {format_timestamp(result.timestamp)} to {args.output}: "
          f"{size} bytes from {result.files} files in {seconds:.2f}s, checksum {result.checksum:016x} ({check})"
          + (", integrity_check ok" if args.integrity_check else ""))
    return 0


async def cmd_ls(args: argparse.Namespace) -> int:
    storage = _open(args)
    try:
        index = await scan(storage, "")
        below = [] if len(index) else await backups_under(storage, args.url)
    finally:
        await storage.close()
    if below:
        print(f"{args.url} is not one database's backup; it holds {len(below)}:")
        for url in below:
            print(f"  {url}")
        return 0
    if not len(index):
        raise RestoreError(f"{args.url}: no backup files found")
    print_index(index)
    try:
        copies = await _set_aside_times(args)
    except StorageError as err:  # a key allowed to read only the backup's own prefix, say
        print(f"set aside: not known ({err})", file=sys.stderr)
        return 0
    if copies:
        print(f"set aside: {len(copies)} file{'s' if len(copies) > 1 else ''} (oldest "
              f"{format_timestamp(min(copies))})")
    return 0


def _store_root(url: str) -> tuple[str, str] | None:
    """The URL of the store holding the backup at `url`, and the backup's prefix in it (`<cluster>/<db>`: the last
    two parts of the path); None if the path has fewer."""
    parsed = urlparse(url_of(url))
    parts = [p for p in parsed.path.split("/") if p]
    if len(parts) < 2:
        return None
    return urlunparse(parsed._replace(path="/" + "/".join(parts[:-2]))), "/".join(parts[-2:])


async def _set_aside_times(args: argparse.Namespace) -> list[int]:
    """When each copy of the backup's files was set aside (epoch ms): one LIST of its quarantine prefix at the
    store's root; empty if the URL names no `<cluster>/<db>` under a root."""
    where = _store_root(args.url)
    if where is None:
        return []
    root, prefix = where
    storage = open_storage(root, endpoint_url=args.s3_endpoint, region=args.s3_region,
                           force_path_style=args.s3_force_path_style or None)
    try:
        listed = await storage.list(set_aside_prefix(prefix))
    finally:
        await storage.close()
    return [copy.ms for o in listed if (copy := parse_set_aside(o.key)) is not None]


def print_index(index: DbIndex) -> None:
    reach = set(chain(index)[0])
    print(f"{'level':<6}{'min_txid':<18}{'max_txid':<18}{'timestamp':<26}{'size':>12}  restorable")
    for level in sorted(index.levels):
        for e in index.level(level):
            print(f"{'L' + str(level):<6}{e.min_txid:016x}  {e.max_txid:016x}  "
                  f"{format_timestamp(e.timestamp):<26}{e.size:>12}  {'yes' if e in reach else 'no'}")


def _verify_file(data: bytes) -> None:
    """Decode one stored file, checking its checksums, and a snapshot's pages against the database checksum it
    carries (our header extension, which the decoder leaves alone under Litestream's no-checksum flag)."""
    dec = Decoder(data, Version.V3)
    sums = dec.header.db_checksums if dec.header.is_snapshot else None
    if sums is None:
        dec.close()
        return
    got = database_checksum(dec.pages(), dec.header.page_size)
    dec.close()
    if got != sums[1]:
        raise ChecksumMismatch(f"post-apply checksum in header extension ({sums[1]:016x}) does not match the "
                               f"snapshot's pages ({got:016x})", field="ext_post_apply_checksum", offset=88)


async def cmd_verify(args: argparse.Namespace) -> int:
    """Every file decodes with valid checksums, each level's chain is contiguous, and the latest restores."""
    storage = _open(args)
    problems: list[str] = []
    gone = 0
    try:
        index = await _scan_one(storage, args.url, "verify")
        for e in index:
            key = e.key(storage.layout, "")
            try:
                data = await storage.get_bytes(key)
            except NotFound:
                gone += 1  # deleted since the listing (retention, compaction of a live backup): nothing is lost
                continue
            try:
                _verify_file(data)
            except LTXError as err:
                problems.append(f"{key}: {err}")
        for level, files in sorted(index.levels.items()):
            # Compared with everything before it in the level, not just the file sorted before it: a snapshot in
            # L0 (a new page size) spans TXIDs the next files in min_txid order do not.
            high = 0  # the highest TXID the level's files reach so far
            posts: dict[int, int] = {}  # the post-apply checksum at each file's end
            for cur in files:
                post = posts.get(cur.min_txid - 1)
                if cur.is_snapshot or not high:
                    pass
                elif cur.min_txid > high + 1:
                    problems.append(f"L{level}: gap between {high:016x} and {cur.min_txid:016x}")
                elif cur.pre and post and cur.pre != post:
                    problems.append(f"L{level}: {cur.min_txid:016x} pre-apply checksum {cur.pre:016x} != "
                                    f"previous post-apply {post:016x}")
                high = max(high, cur.max_txid)
                if cur.post:
                    posts[cur.max_txid] = cur.post
        with tempfile.TemporaryDirectory() as tmp:
            try:
                result = await restore(storage, "", plan_restore(index), Path(tmp) / "verify.db",
                                       integrity_check=True)
            except RestoreError as err:
                problems.append(f"restore of the latest state: {err}")
                result = None
    finally:
        await storage.close()
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{args.url}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    assert result is not None
    print(f"{args.url}: ok: {len(index) - gone} files, latest TXID {result.txid:016x} at "
          f"{format_timestamp(result.timestamp)}, checksum {result.checksum:016x}"
          + (" (verified)" if result.verified else "")
          + (f"; {gone} deleted by retention or compaction while checking" if gone else ""))
    return 0
