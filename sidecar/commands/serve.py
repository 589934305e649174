"""`litefs-sidecar serve`: the backup server (LiteFS Cloud protocol + operator API) over the engine."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from sidecar.engine import Engine, Levels
from sidecar.errors import ConfigError, SidecarError
from sidecar.server import ServerConfig, serve
from sidecar.server.app import token_sources
from sidecar.storage import open_storage

EXAMPLES = """\
examples:
  litefs-sidecar serve --tokens /etc/litefs-sidecar/tokens --storage s3://bucket/backups
  LITEFS_SIDECAR_SERVER_TOKENS="default $(openssl rand -hex 24)" litefs-sidecar serve --storage file:///srv/backups
  litefs-sidecar serve --insecure-no-auth --addr 127.0.0.1:20203     # local testing only

tokens: one '<cluster> <token>' per line; LiteFS sends it as backup.auth-token (or LITEFS_CLOUD_TOKEN),
verbatim, 'FlyV1 <token>' or 'Bearer <token>'.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the backup server (LiteFS Cloud protocol)", epilog=EXAMPLES,
                       description="Serve the LiteFS Cloud backup protocol and the operator API.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", default="127.0.0.1:20203", help="host:port to listen on (default %(default)s)")
    p.add_argument("--storage", default="file:///var/lib/litefs-sidecar/backups",
                   help="file:///path or s3://bucket/prefix (default %(default)s)")
    p.add_argument("--state-dir", default="/var/lib/litefs-sidecar/engine", help="pending uploads and index cache")
    p.add_argument("--tokens", metavar="FILE", default="", help="cluster tokens file")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="accept any caller; the cluster comes from 'Authorization: cluster NAME'")
    p.add_argument("--max-body-size", type=int, default=1 << 30, help="bytes (default 1 GiB)")
    p.add_argument("--l0-interval", type=float, default=10.0, help="seconds between L0 flushes (default 10)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to finish in-flight uploads")
    p.add_argument("--s3-endpoint", metavar="URL")
    p.add_argument("--s3-region")
    p.add_argument("--s3-force-path-style", action="store_true")
    p.set_defaults(func=cmd_serve)


def build(args: argparse.Namespace) -> tuple[ServerConfig, str, int]:
    problems = []
    host, _, port_text = args.addr.rpartition(":")
    if not host or not port_text.isdigit():
        problems.append(f"--addr {args.addr!r}: want host:port")
    tokens: dict[str, str] = {}
    try:
        tokens = token_sources(args.tokens, os.environ.get("LITEFS_SIDECAR_SERVER_TOKENS", ""))
    except (OSError, SidecarError) as err:
        problems.append(f"--tokens: {err}")
    admin = os.environ.get("LITEFS_SIDECAR_SERVER_ADMIN_TOKEN", "")
    if not tokens and not admin and not args.insecure_no_auth and not problems:
        problems.append("no tokens configured: give --tokens FILE or LITEFS_SIDECAR_SERVER_TOKENS "
                        "(or --insecure-no-auth for local testing)")
    if problems:
        raise ConfigError(problems)
    config = ServerConfig(tokens=tokens, insecure_no_auth=args.insecure_no_auth, admin_token=admin,
                          max_body_size=args.max_body_size)
    return config, host, int(port_text)


def cmd_serve(args: argparse.Namespace) -> int:
    config, host, port = build(args)
    from sidecar import log as logmod
    logmod.setup()
    if config.insecure_no_auth:
        logmod.get_logger("sidecar.server").warning("authentication is off (--insecure-no-auth)")
    storage = open_storage(args.storage, endpoint_url=args.s3_endpoint, region=args.s3_region,
                           force_path_style=args.s3_force_path_style or None)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        engine = await Engine.open(storage, Path(args.state_dir), Levels(l0_interval=args.l0_interval))
        try:
            await serve(engine, config, host, port, stop=stop, grace=args.shutdown_grace,
                        started=lambda url: print(f"litefs-sidecar serving on {url}", flush=True))
        finally:
            await storage.close()
    asyncio.run(main())
    return 0
