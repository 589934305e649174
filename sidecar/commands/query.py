"""`litefs-sidecar query URL SQL`: a read-only query against a backup, at any moment, without restoring it.

URL names one database's backup as for `restore` (`file:///root/<cluster>/<db>`, `s3://bucket/prefix/
<cluster>/<db>`, a Litestream 0.5 replica, a plain path), or a backup server: `http(s)://host:port/<db>`, read with the
token in LITEFS_SIDECAR_TOKEN (a read-only token is enough; never a flag, which `ps` would show). Only the
pages the query touches are fetched (`sidecar.vfs`); `--stats` prints what that cost to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import apsw

from sidecar import log as logmod
from sidecar.commands import args as argtypes
from sidecar.commands.backup import url_of
from sidecar.config import load
from sidecar.errors import SidecarError
from sidecar.vfs import BackupVFS
from sidecar.vfs.vfs import Target

EXAMPLES = """\
examples:
  litefs-sidecar query file:///var/lib/litefs-sidecar/backups/default/app.db "SELECT count(*) FROM users"
  litefs-sidecar query --timestamp 2026-11-24T09:00:00Z --json s3://bucket/backups/default/app.db "SELECT * FROM t"
  LITEFS_SIDECAR_TOKEN=… litefs-sidecar query --stats http://backup-host:20203/app.db "SELECT 1"
"""


def register(sub: Any) -> None:
    """Add `query`."""
    p = sub.add_parser("query", help="run a read-only SQL query on a backup, at any moment, without restoring it",
                       description="Query one database's backup in place: only the pages the query needs are "
                       "fetched.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--timestamp", metavar="T", type=argtypes.timestamp, help=argtypes.TIMESTAMP_HELP)
    target.add_argument("--txid", metavar="HEX", type=argtypes.txid, help=argtypes.TXID_HELP)
    p.add_argument("--json", action="store_true", help="print {txid, timestamp, columns, rows} as JSON")
    p.add_argument("--stats", action="store_true", help="print pages fetched, bytes read and requests to stderr")
    source_flags(p)
    p.add_argument("--cache-size", metavar="BYTES", type=int, default=10 << 20,
                   help="page cache size in bytes (default 10 MiB)")
    p.add_argument("url", metavar="URL", type=url_of)
    p.add_argument("sql", metavar="SQL")
    p.set_defaults(func=cmd_query)


def source_flags(p: argparse.ArgumentParser) -> None:
    """Flags of every command that reads a backup by URL."""
    p.add_argument("--s3-endpoint", metavar="URL", type=argtypes.s3_endpoint,
                   help="S3-compatible endpoint (env AWS_ENDPOINT_URL_S3 too)")
    p.add_argument("--s3-region", metavar="REGION")
    p.add_argument("--s3-force-path-style", action="store_true")


def s3_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"endpoint_url": args.s3_endpoint, "region": args.s3_region,
            "force_path_style": args.s3_force_path_style or None}


def token_for(url: str) -> str:
    """For a backup server URL, the token in LITEFS_SIDECAR_TOKEN (never a flag: `ps` shows flags)."""
    return load(["sidecar"]).sidecar.token if url.startswith(("http://", "https://")) else ""


def open_vfs(args: argparse.Namespace) -> BackupVFS:
    """A VFS with the command's S3 options and, for server URLs, the token from LITEFS_SIDECAR_TOKEN."""
    return BackupVFS(cache_bytes=args.cache_size, token=token_for(args.url), **s3_options(args))


def cmd_query(args: argparse.Namespace) -> int:
    logmod.setup("warning")  # stdout is for rows; what the reader does goes to stderr, and only when it matters
    target = Target(args.txid, args.timestamp)
    t0 = time.perf_counter()
    with open_vfs(args) as vfs:
        con = vfs.connect(args.url, txid=target.txid, timestamp=target.timestamp)
        try:
            cur = con.cursor()
            cur.execute(args.sql)
            try:
                columns = [d[0] for d in cur.getdescription()]
            except apsw.ExecutionCompleteError:
                columns = []  # a statement without result columns
            rows = [list(r) for r in cur] if columns else []
            state = {k: con.execute(f"PRAGMA litefs_{k}").fetchall()[0][0] for k in ("txid", "timestamp")}
        except apsw.Error as err:  # SQLite's own errors: one line, like ours
            raise SidecarError(f"{args.url}: {err}") from None
        finally:
            con.close()
        stats = vfs.stats(args.url).snapshot()
    ms = (time.perf_counter() - t0) * 1000
    if args.json:
        json.dump({**state, "columns": columns, "rows": [[_json(v) for v in r] for r in rows]}, sys.stdout)
        sys.stdout.write("\n")
    else:
        _table(columns, rows)
    if args.stats:
        print(f"TXID {state['txid']} at {state['timestamp']}: {stats['pages_fetched']} pages fetched, "
              f"{stats['bytes']} bytes read in {stats['requests']} requests ({stats['lists']} LIST), "
              f"{stats['cache_hits']} cache hits, {ms:.0f} ms", file=sys.stderr)
    return 0


def _json(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else value


def _table(columns: list[str], rows: list[list[Any]]) -> None:
    if not columns:
        return
    text = [[_text(v) for v in r] for r in rows]
    widths = [max([len(c), *(len(r[i]) for r in text)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in text:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _text(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return "X'" + value.hex() + "'"
    return str(value)

