"""`litefs-sidecar ltx verify|list|dump|checksum|apply|encode-db|compact`: the Go `ltx` command's tools.

Files are LTX v2 (LiteFS) unless `--format v3` says otherwise; `--format auto` guesses from the bytes.
Every command names the file it failed on and exits 1, without a traceback.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.fsutil import atomic_output
from sidecar.ltx import HEADER_SIZE, LTXError, Version
from sidecar.ltx.compactor import compact
from sidecar.ltx.decoder import Decoder, detect_version
from sidecar.ltx.sqlite import Applier, database_checksum_of, encode_db
from sidecar.ltx.types import FLAG_COMPRESS_LZ4, FLAG_NO_CHECKSUM, Header, Pos

FORMATS = {"v2": Version.V2, "v3": Version.V3}

EXAMPLES = """examples:
  litefs-sidecar ltx verify /var/lib/litefs/dbs/app.db/ltx/*.ltx      check every file's checksums
  litefs-sidecar ltx list /var/lib/litefs/dbs/app.db/ltx/*.ltx        TXIDs, sizes, times, checksums
  litefs-sidecar ltx dump 0000000000000002-0000000000000002.ltx       every page of one file
  litefs-sidecar ltx checksum app.db                                   compare with LiteFS's position
  litefs-sidecar ltx apply --db app.db ltx/*.ltx                       replay files onto a database
  litefs-sidecar ltx encode-db --compress -o snap.ltx app.db           a snapshot LiteFS can import
  litefs-sidecar ltx compact -o merged.ltx ltx/*.ltx                   merge contiguous files"""


def _example(line: str) -> dict[str, Any]:
    return {"epilog": "example:\n  " + line, "formatter_class": argparse.RawDescriptionHelpFormatter}


def _described(help: str) -> dict[str, str]:
    """The one-line help, also as the subcommand's own description."""
    return {"help": help, "description": help[0].upper() + help[1:] + "."}


def register(sub: Any) -> None:
    """Add the `ltx` command group."""
    p = sub.add_parser("ltx", help="inspect, verify, apply, encode and compact LTX files",
                       description="Tools for LTX files, behaving like the Go `ltx` command.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_subparsers(dest="ltx_command", metavar="SUBCOMMAND", required=True)

    def fmt(q: argparse.ArgumentParser, default: str = "auto") -> None:
        q.add_argument("--format", choices=["auto", "v2", "v3"], default=default,
                       help="LTX flavour: v2 = LiteFS, v3 = Litestream 0.5 (default: %(default)s)")

    q = group.add_parser("verify", **_described("verify files; exit 1 naming the first problem of each bad file"),
                         **_example("litefs-sidecar ltx verify /var/lib/litefs/dbs/app.db/ltx/*.ltx"))
    q.add_argument("files", nargs="+", metavar="FILE")
    fmt(q)
    q.set_defaults(func=cmd_verify)

    q = group.add_parser("list", **_described("print header and trailer fields, one row per file"),
                         **_example("litefs-sidecar ltx list --format v3 replica/ltx/0/*.ltx"))
    q.add_argument("files", nargs="+", metavar="FILE")
    fmt(q)
    q.set_defaults(func=cmd_list)

    q = group.add_parser("dump", **_described("print a file's header, pages and trailer"),
                         **_example("litefs-sidecar ltx dump 00000000000004d2-00000000000004d2.ltx"))
    q.add_argument("file", metavar="FILE")
    fmt(q)
    q.set_defaults(func=cmd_dump)

    q = group.add_parser("checksum", **_described("print the LTX database checksum of a SQLite file"),
                         **_example("litefs-sidecar ltx checksum app.db"))
    q.add_argument("db", metavar="DBFILE")
    q.set_defaults(func=cmd_checksum)

    q = group.add_parser("apply", **_described("apply LTX files in order to a database, creating it if absent"),
                         **_example("litefs-sidecar ltx apply --db app.db ltx/*.ltx"))
    q.add_argument("--db", required=True, metavar="DBFILE")
    q.add_argument("files", nargs="+", metavar="FILE")
    fmt(q)
    q.set_defaults(func=cmd_apply)

    q = group.add_parser("encode-db", **_described("write a snapshot LTX file of a SQLite database"),
                         **_example("litefs-sidecar ltx encode-db --compress -o snap.ltx app.db"))
    q.add_argument("db", metavar="DBFILE")
    q.add_argument("-o", "--output", required=True, metavar="OUT")
    q.add_argument("--compress", "-c", action="store_true", help="v2: compress the page block with LZ4")
    q.add_argument("--txid", default="1", help="max TXID of the snapshot, hex (default 1)")
    fmt(q, "v2")
    q.set_defaults(func=cmd_encode_db)

    q = group.add_parser("compact", **_described("merge contiguous LTX files into one"),
                         **_example("litefs-sidecar ltx compact -o merged.ltx ltx/*.ltx"))
    q.add_argument("-o", "--output", required=True, metavar="OUT")
    q.add_argument("files", nargs="+", metavar="FILE")
    q.add_argument("--compress", "-c", action="store_true", help="v2 output: compress with LZ4")
    q.add_argument("--input-format", choices=["auto", "v2", "v3"], default="auto")
    fmt(q, "v2")
    q.set_defaults(func=cmd_compact)


@contextmanager
def _mapped(path: str) -> Iterator[memoryview | bytes]:
    """Map a file read-only (empty files become b"")."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mm)
    try:
        yield view
    finally:
        view.release()
        try:
            mm.close()
        except BufferError:
            pass  # a traceback still holds a page view; the map goes when it does


def _version(data: memoryview | bytes, fmt: str) -> Version:
    if fmt != "auto":
        return FORMATS[fmt]
    return detect_version(data[: HEADER_SIZE + 16], len(data))


def _fail(path: str, err: Exception) -> None:
    print(f"{path}: {err}", file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify every file; print `FILE: ok` or the problem; exit 1 if any is bad."""
    bad = 0
    for path in args.files:
        try:
            with _mapped(path) as data:
                dec = Decoder(data, _version(data, args.format))
                for _ in dec.pages():
                    pass
                dec.close()
                del dec
        except (LTXError, OSError) as err:
            _fail(path, err)
            bad += 1
        else:
            print(f"{path}: ok")
    return 1 if bad else 0


def _tabulate(rows: list[list[str]]) -> str:
    """Columns padded like Go's tabwriter (padding 2); the last column is not padded."""
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(rows[0]) - 1)]
    return "".join("".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + r[-1] + "\n" for r in rows)


def _go_time(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_list(args: argparse.Namespace) -> int:
    """Print Go `ltx list`'s columns for each file."""
    rows = [["min_txid", "max_txid", "commit", "pages", "preapply", "postapply", "timestamp", "wal_offset",
             "wal_size", "wal_salt"]]
    status = 0
    for path in args.files:
        try:
            with _mapped(path) as data:
                dec = Decoder(data, _version(data, args.format))
                for _ in dec.pages():
                    pass
                t = dec.close()
                h, n = dec.header, dec.page_count
                del dec
        except (LTXError, OSError) as err:
            _fail(path, err)
            status = 1
            continue
        rows.append([f"{h.min_txid:016x}", f"{h.max_txid:016x}", str(h.commit), str(n),
                     f"{h.pre_apply_checksum:016x}", f"{t.post_apply_checksum:016x}", _go_time(h.timestamp),
                     str(h.wal_offset), str(h.wal_size), f"{h.wal_salt1:08x} {h.wal_salt2:08x}"])
    sys.stdout.write(_tabulate(rows))
    return status


def cmd_dump(args: argparse.Namespace) -> int:
    """Print the header, one line per page frame, and the trailer."""
    path = args.file
    try:
        with _mapped(path) as data:
            version = _version(data, args.format)
            dec = Decoder(data, version)
            h = dec.header
            print("# HEADER")
            print(f"Version:    {version.name}")
            print(f"Flags:      0x{h.flags:08x}")
            print(f"Page size:  {h.page_size}")
            print(f"Commit:     {h.commit}")
            print(f"Min TXID:   {h.min_txid:016x} ({h.min_txid})")
            print(f"Max TXID:   {h.max_txid:016x} ({h.max_txid})")
            print(f"Timestamp:  {datetime.fromtimestamp(h.timestamp / 1000, tz=UTC).isoformat()} ({h.timestamp})")
            print(f"Pre-apply:  {h.pre_apply_checksum:016x}")
            print(f"WAL offset: {h.wal_offset}")
            print(f"WAL size:   {h.wal_size}")
            print(f"WAL salt:   {h.wal_salt1:08x} {h.wal_salt2:08x}")
            print(f"Node ID:    {h.node_id:016x}")
            print()
            print("# PAGE DATA")
            for pgno, page in dec.pages():
                print(f"Frame #{dec.page_count}: pgno={pgno} data={bytes(page[:16]).hex()}...")
            t = dec.close()
            del dec
    except BrokenPipeError:
        raise  # the reader of stdout went away (`| head`): not a problem of FILE
    except (LTXError, OSError) as err:
        _fail(path, err)
        return 1
    print()
    print("# TRAILER")
    print(f"Post-apply checksum: {t.post_apply_checksum:016x}")
    print(f"File checksum:       {t.file_checksum:016x}")
    return 0


def cmd_checksum(args: argparse.Namespace) -> int:
    """Print the 16-hex-digit database checksum."""
    try:
        with open(args.db, "rb") as f:
            checksum, _ = database_checksum_of(f)
    except (LTXError, OSError) as err:
        _fail(args.db, err)
        return 1
    print(f"{checksum:016x}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    """Apply files in order; all or nothing: the database changes only if every file applies."""
    target = Path(args.db)
    tmp = target.with_name(f".{target.name}.apply-tmp")
    try:
        if target.exists():
            with open(target, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        else:
            tmp.write_bytes(b"")
        with open(tmp, "r+b") as db:
            applier = Applier(db)
            if target.exists() and target.stat().st_size:
                # An existing database: its checksum is the position we continue from.
                checksum, _ = database_checksum_of(db)
                first = _first_header(args.files[0], args.format)
                if not first.is_snapshot:
                    applier.pos = Pos(first.min_txid - 1, checksum)
            for path in args.files:
                try:
                    with _mapped(path) as data:
                        applier.apply(data, _version(data, args.format))
                except LTXError as err:
                    raise LTXError(f"{path}: {err}") from err
            db.flush()
            os.fsync(db.fileno())
        if applier.page_size and applier.commit == 0:
            tmp.unlink()
            target.unlink(missing_ok=True)
        else:
            os.replace(tmp, target)
    except (LTXError, OSError) as err:
        tmp.unlink(missing_ok=True)
        print(f"{err}", file=sys.stderr)
        return 1
    print(f"{target}: position {applier.pos}")
    return 0


def _first_header(path: str, fmt: str) -> Header:
    with _mapped(path) as data:
        return Decoder(data, _version(data, fmt)).header


def cmd_encode_db(args: argparse.Namespace) -> int:
    """Write a snapshot of DBFILE; the output is replaced atomically (never left with old bytes)."""
    version = FORMATS.get(args.format, Version.V2)
    try:
        txid = int(args.txid, 16)
        with open(args.db, "rb") as db, atomic_output(Path(args.output)) as out:
            encode_db(db, out, version=version, compress=args.compress, txid=txid,
                      timestamp=int(time.time() * 1000))
    except ValueError:
        print(f"invalid --txid {args.txid!r}: want hex", file=sys.stderr)
        return 2
    except (LTXError, OSError) as err:
        _fail(args.db, err)
        return 1
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Merge FILEs (sorted by TXID) into OUT; nothing is written unless every input is valid."""
    out_version = FORMATS.get(args.format, Version.V2)
    try:
        with ExitStack() as stack:
            inputs = [stack.enter_context(_mapped(p)) for p in args.files]
            versions = {_version(d, args.input_format) for d in inputs}
            if len(versions) != 1:
                raise LTXError("input files mix LTX versions")
            version = versions.pop()
            order = sorted(range(len(inputs)), key=lambda i: Decoder(inputs[i], version).header.min_txid)
            first_flags = Decoder(inputs[order[0]], version).header.flags
            if out_version == Version.V2:
                flags = FLAG_COMPRESS_LZ4 if args.compress else 0
            else:
                flags = first_flags & FLAG_NO_CHECKSUM if version == Version.V3 else 0
            with atomic_output(Path(args.output)) as out:
                compact([inputs[i] for i in order], out, version=version, flags=flags, out_version=out_version)
    except (LTXError, OSError) as err:
        print(f"compact: {err}", file=sys.stderr)
        return 1
    return 0
