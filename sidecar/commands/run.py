"""`litefs-sidecar run`: the daemon beside a LiteFS node that ships its LTX files upstream and prunes under the HWM."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from sidecar import config as cfgmod
from sidecar.errors import ConfigError, SidecarError

EXAMPLES = """\
examples:
  litefs-sidecar run --data-dir /var/lib/litefs --mount-dir /litefs --upstream file:///var/lib/litefs-sidecar/backups
  litefs-sidecar run --upstream s3://my-bucket/litefs --cluster prod
  LITEFS_SIDECAR_TOKEN=… litefs-sidecar run --upstream https://backups.internal:20203
  litefs-sidecar run --config /etc/litefs-sidecar/sidecar.toml

LiteFS must not prune on its own beside the sidecar: set `data.retention: 0s` (or a negative value) and leave
`backup:` unset in litefs.yml. The sidecar is then the only pruner, and it deletes a local LTX file only when it
is older than --retention and upstream holds it durably (its TXID is at or below the high-water mark).
"""

ENGINE_FIELDS = ["l0_interval", "l1_interval", "l2_interval", "snapshot_interval", "l0_retention", "l1_retention",
                 "l2_retention", "snapshot_retention", "s3_endpoint", "s3_region", "s3_force_path_style",
                 "lease_ttl", "lease_skew", "verify_checksums"]


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run the sidecar beside a LiteFS node", epilog=EXAMPLES,
                       description="Watch a LiteFS data directory, ship one compacted LTX file per database per "
                                   "batch interval upstream, and prune local files under the high-water mark.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML configuration file ([sidecar], [engine], [log] tables)")
    cfgmod.add_flags(p, "sidecar")
    p.add_argument("--mount", dest="sidecar.mount_dir", metavar="DIR", default=None, help="the same as --mount-dir")
    cfgmod.add_flags(p.add_argument_group("engine (file:// and s3:// upstreams)"), "engine", ENGINE_FIELDS)
    cfgmod.add_flags(p.add_argument_group("logging"), "log")
    p.set_defaults(func=cmd_run)


def load(args: argparse.Namespace) -> cfgmod.Config:
    """The configuration of `run` from defaults, --config, the environment and flags; ConfigError lists all."""
    flags = {**cfgmod.flags_from_args(args, "sidecar"), **cfgmod.flags_from_args(args, "engine"),
             **cfgmod.flags_from_args(args, "log")}
    return cfgmod.load(["sidecar", "engine", "log"], config_file=args.config, flags=flags)


def cmd_run(args: argparse.Namespace) -> int:
    from sidecar.sdnotify import Notifier

    problems = []
    try:
        config = load(args)
    except ConfigError as err:
        problems += err.problems
    try:  # systemd's variables, read again when READY=1 is sent: checked before anything starts, as `serve` does
        Notifier.from_env()
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ConfigError(problems)
    from sidecar import log as logmod
    from sidecar.daemon import Sidecar

    logmod.setup(config.log.level, config.log.format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sidecar = await Sidecar.open(config.sidecar, config.engine)
        await sidecar.run(stop)

    try:
        asyncio.run(main())
    except OSError as err:  # a directory it cannot create or write, say: one line, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        raise SidecarError(f"{where}{(err.strerror or str(err)).lower()}") from err
    return 0
