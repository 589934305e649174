"""`litefs-sidecar replicate URL -o FILE [--follow]`: a local SQLite copy of a backup, kept current.

The copy is written in place the way SQLite writes in rollback-journal mode, so applications reading FILE
(read-only) only ever see whole transactions, even if this process is killed (`sidecar.vfs.replica`).
URL is any backup URL `query` takes; a backup server's token comes from LITEFS_SIDECAR_TOKEN.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from sidecar import log as logmod
from sidecar.commands import args as argtypes
from sidecar.commands.backup import url_of
from sidecar.commands.query import s3_options, source_flags, token_for
from sidecar.ltx import format_timestamp
from sidecar.vfs import open_source
from sidecar.vfs.replica import Replica

EXAMPLES = """\
examples:
  litefs-sidecar replicate -o app.db file:///var/lib/litefs-sidecar/backups/default/app.db
  litefs-sidecar replicate --follow -o /data/app.db s3://bucket/backups/prod/app.db
  LITEFS_SIDECAR_TOKEN=… litefs-sidecar replicate --follow -o app.db http://backup-host:20203/app.db
"""


def register(sub: Any) -> None:
    """Add `replicate`."""
    p = sub.add_parser("replicate", help="keep a local SQLite copy of a backup current (whole transactions only)",
                       description="Copy one database's backup to a local SQLite file and, with --follow, apply "
                       "each new state as it is stored; readers of the file only see whole transactions.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the SQLite copy (read it read-only)")
    p.add_argument("--follow", action="store_true", help="keep applying new states until SIGINT or SIGTERM")
    p.add_argument("--poll-interval", metavar="SECONDS", type=argtypes.positive, default=1.0,
                   help="with a store URL, how often its head object is checked (default 1)")
    source_flags(p)
    p.add_argument("url", metavar="URL", type=url_of)
    p.set_defaults(func=lambda a: asyncio.run(cmd_replicate(a)))


async def cmd_replicate(args: argparse.Namespace) -> int:
    logmod.setup("info" if args.follow else "warning")
    argtypes.check_output(args.output)  # as restore -o: a missing directory is a typo, never created on a guess
    source = open_source(args.url, token=token_for(args.url), poll_interval=args.poll_interval,
                         **s3_options(args))
    try:
        replica = Replica(source, args.output)
        pos, files = await replica.sync()
        print(f"{args.output}: TXID {pos.txid:016x} at {format_timestamp(pos.timestamp)}"
              + (f", {files} files applied" if files else ", already current"), flush=True)
        if args.follow:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await replica.follow(stop)
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(ValueError, RuntimeError):
                        loop.remove_signal_handler(sig)
    finally:
        await source.close()
    return 0
