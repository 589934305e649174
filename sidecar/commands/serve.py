"""`litefs-sidecar serve`: the backup server (LiteFS Cloud protocol + operator API) over the engine.

Settings come from the `[server]`, `[engine]` and `[log]` sections (`sidecar.config`): defaults, then
`--config FILE`, then `LITEFS_SIDECAR_SERVER_*`/`_ENGINE_*`/`_LOG_*` variables, then flags. Cluster tokens
come from `tokens_file` and LITEFS_SIDECAR_SERVER_TOKENS, the admin token only from the environment.

Lifecycle, as systemd sees it with `Type=notify`: READY=1 once the port is open, WATCHDOG=1 while the loop
runs (with `WatchdogSec=`), STOPPING=1 at the first SIGTERM or SIGINT. Then the server stops accepting and
waits up to `shutdown_grace` for in-flight uploads before flushing; a second signal stops waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar import log as logmod
from sidecar.config import Config, EngineConfig, ServeConfig, add_flags, flags_from_args, load, section_fields
from sidecar.engine import Engine, Levels
from sidecar.errors import ConfigError, SidecarError
from sidecar.sdnotify import Notifier
from sidecar.server import ServerConfig, parse_tokens, serve
from sidecar.storage import open_storage
from sidecar.storage.base import Storage

SECTIONS = ("server", "engine", "log")

EXAMPLES = """\
examples:
  litefs-sidecar serve --tokens-file /etc/litefs-sidecar/tokens --storage s3://bucket/backups
  LITEFS_SIDECAR_SERVER_TOKENS="default $(openssl rand -hex 24)" litefs-sidecar serve --storage file:///srv/backups
  litefs-sidecar serve --config /etc/litefs-sidecar/sidecar.toml --log-level debug
  litefs-sidecar serve --insecure-no-auth --addr 127.0.0.1:20203     # local testing only

tokens: one '<cluster> <token>' per line; LiteFS sends it as backup.auth-token (or LITEFS_CLOUD_TOKEN),
verbatim, 'FlyV1 <token>' or 'Bearer <token>'. The operator API's token: LITEFS_SIDECAR_SERVER_ADMIN_TOKEN.
'<cluster> <token> read' is a read-only token, for readers (`query`, `replicate`): GET requests only.
Every flag has a TOML key in its section and an environment variable: see docs/configuration.md.
"""


def register(sub: Any) -> None:
    """Add `serve`, with a flag for every setting of its sections."""
    p = sub.add_parser("serve", help="run the backup server (LiteFS Cloud protocol)", epilog=EXAMPLES,
                       description="Serve the LiteFS Cloud backup protocol and the operator API.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML file with [server], [engine] and [log] tables")
    # The three sections share no field names, so each adds all of its flags without a clash.
    server = p.add_argument_group("server")
    add_flags(server, "server")
    # --tokens predates the configuration layer; scripts and docs use it.
    server.add_argument("--tokens", dest="server.tokens_file", metavar="FILE", default=None,
                        help="the same as --tokens-file")
    add_flags(p.add_argument_group("engine"), "engine")
    add_flags(p.add_argument_group("log"), "log")
    p.set_defaults(func=cmd_serve)


@dataclass(frozen=True)
class Setup:
    """Everything `serve` needs, checked before anything starts."""

    config: Config
    server: ServerConfig
    host: str
    port: int
    levels: Levels
    notifier: Notifier
    storage: Storage


def levels_of(engine: EngineConfig) -> Levels:
    """The engine section's intervals and retentions (the same names as Levels' fields)."""
    return Levels(l0_interval=engine.l0_interval, l1_interval=engine.l1_interval, l2_interval=engine.l2_interval,
                  snapshot_interval=engine.snapshot_interval, l0_retention=engine.l0_retention,
                  l1_retention=engine.l1_retention, l2_retention=engine.l2_retention,
                  snapshot_retention=engine.snapshot_retention)


def configure(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Setup:
    """Load the sections and check tokens and the notify socket; ConfigError names every problem at once."""
    given: dict[str, Any] = {"config_file": args.config}
    if env is not None:
        given["env"] = env
    flags = {k: v for s in SECTIONS for k, v in flags_from_args(args, s).items()}
    problems: list[str] = []
    cfg: Config | None = None
    server: Config | None = None  # the server section alone, for the token checks
    try:
        cfg = server = load(SECTIONS, flags=flags, **given)
    except ConfigError as err:
        problems += err.problems
        with contextlib.suppress(ConfigError):  # its problems are among those above
            server = load(["server"], flags={k: v for k, v in flags.items() if k.startswith("server.")}, **given)
    tokens: dict[str, str] = {}
    read_tokens: dict[str, str] = {}
    if server is not None:
        before, sc = len(problems), server.server
        tokens = _tokens(server, problems)
        read_tokens = _tokens(server, problems, read=True) if len(problems) == before else {}
        if len(problems) == before and not tokens and not read_tokens and not sc.admin_token \
                and not sc.insecure_no_auth:
            problems.append("no tokens configured: give --tokens-file FILE or LITEFS_SIDECAR_SERVER_TOKENS "
                            "(or --insecure-no-auth for local testing)")
    try:
        notifier = Notifier.from_env(env) if env is not None else Notifier.from_env()
    except ValueError as err:
        problems.append(str(err))
    storage = None
    if server is not None:
        try:
            storage = open_store(server.server, cfg.engine if cfg else EngineConfig())
        except ConfigError as err:
            problems += [f"server.storage (from {server.source('server.storage')}): {p}" for p in err.problems]
    if problems or cfg is None or storage is None:
        raise ConfigError(problems)
    sc = cfg.server
    host, _, port = sc.addr.rpartition(":")
    config = ServerConfig(tokens=tokens, read_tokens=read_tokens, insecure_no_auth=sc.insecure_no_auth,
                          admin_token=sc.admin_token, max_body_size=sc.max_body_size,
                          request_timeout=sc.request_timeout)
    return Setup(cfg, config, host.strip("[]"), int(port), levels_of(cfg.engine), notifier, storage)


def _tokens(cfg: Config, problems: list[str], read: bool = False) -> dict[str, str]:
    """token → cluster from `tokens_file` and then LITEFS_SIDECAR_SERVER_TOKENS (read-only ones with `read`);
    problems name their source."""
    tokens: dict[str, str] = {}
    path = cfg.server.tokens_file
    if path is not None:
        where = f"server.tokens_file = {str(path)!r} (from {cfg.source('server.tokens_file')})"
        try:
            tokens.update(parse_tokens(path.read_text(), str(path), read=read))
        except OSError as err:
            problems.append(f"{where}: {err.strerror or err}")
        except SidecarError as err:  # its message starts with the path
            problems.append(f"server.tokens_file (from {cfg.source('server.tokens_file')}): {err}")
    if cfg.server.tokens:
        try:
            tokens.update(parse_tokens(cfg.server.tokens, "LITEFS_SIDECAR_SERVER_TOKENS", read=read))
        except SidecarError as err:
            problems.append(f"server.tokens (from {cfg.source('server.tokens')}): {err}")
    return tokens


def open_store(server: ServeConfig, e: EngineConfig) -> Storage:
    """The store named by `server.storage`, with the engine section's S3 options."""
    return open_storage(server.storage, endpoint_url=e.s3_endpoint or None, region=e.s3_region or None,
                        force_path_style=e.s3_force_path_style, multipart_threshold=e.multipart_threshold)


def cmd_serve(args: argparse.Namespace) -> int:
    setup = configure(args)
    logmod.setup(setup.config.log.level, setup.config.log.format)
    log = logmod.get_logger("sidecar.server")
    if setup.server.insecure_no_auth:
        log.warning("authentication is off (--insecure-no-auth)")
    log.info("config_loaded", settings=overrides(setup.config))
    try:
        asyncio.run(_main(setup))
    except asyncio.CancelledError:
        print("litefs-sidecar: stopped without waiting for in-flight uploads (second signal); they are durable "
              "in engine.state_dir and flushed at the next start", file=sys.stderr)
        return 1
    return 0


def overrides(cfg: Config) -> dict[str, str]:
    """Every setting not at its default, as `value (source)`; secrets as `<secret>`: the startup log line."""
    out = {}
    for key, source in sorted(cfg.sources.items()):
        if source == "default":
            continue
        section, _, name = key.partition(".")
        secret = any(f.metadata["secret"] for f in section_fields(section) if f.name == name)
        value = "<secret>" if secret else str(getattr(cfg.sections[section], name))
        out[key] = f"{value} ({source})"
    return out


async def _main(setup: Setup) -> None:
    """Open the engine, serve until a signal, and tell systemd each step."""
    stop = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None
    notifier, cfg, storage = setup.notifier, setup.config, setup.storage
    listening = False

    def on_signal() -> None:
        if stop.is_set():
            main.cancel()  # second signal: stop waiting (uvicorn's force_exit)
        else:
            notifier.notify("STOPPING=1", "STATUS=stopping: finishing in-flight uploads")
            stop.set()

    def started(url: str) -> None:
        nonlocal listening
        listening = True
        print(f"litefs-sidecar serving on {url}", flush=True)
        notifier.notify("READY=1", f"STATUS=serving on {url}")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        try:
            engine = await Engine.open(storage, cfg.engine.state_dir, setup.levels)
        except OSError as err:
            raise SidecarError(f"engine.state_dir {cfg.engine.state_dir}: {err.strerror or err}") from err
        # Requests make short-lived objects by the thousand per second, and a collection scans every
        # tracked object: collect the young generation less often, and never rescan what startup made.
        gc.set_threshold(10_000, 10, 10)
        gc.freeze()
        # Owned here: awaited below whichever way serve() ends.
        watchdog = asyncio.create_task(notifier.watchdog(stop), name="watchdog")
        try:
            await serve(engine, setup.server, setup.host, setup.port, stop=stop, grace=cfg.server.shutdown_grace,
                        started=started)
        except OSError as err:
            if listening:
                raise
            raise SidecarError(f"listen on {cfg.server.addr}: {err.strerror or err}") from err
        finally:
            stop.set()
            await watchdog
    finally:
        await storage.close()


__all__ = ["Setup", "cmd_serve", "configure", "levels_of", "open_store", "overrides", "register"]
