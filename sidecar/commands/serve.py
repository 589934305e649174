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
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar import log as logmod
from sidecar.config import Config, EngineConfig, ServeConfig, add_flags, flags_from_args, load, section_fields
from sidecar.engine import Engine, Levels
from sidecar.engine.engine import levels_of
from sidecar.errors import ConfigError, SidecarError
from sidecar.retry import Backoff
from sidecar.sdnotify import Notifier
from sidecar.server import Scope, ServerConfig, parse_tokens, serve
from sidecar.server.auth import MIN_TOKEN
from sidecar.storage import open_storage
from sidecar.storage.base import Storage

SECTIONS = ("server", "engine", "log")

EXAMPLES = """\
examples:
  litefs-sidecar serve --tokens-file /etc/litefs-sidecar/tokens --storage s3://bucket/backups
  LITEFS_SIDECAR_SERVER_TOKENS="default $(openssl rand -hex 24)" litefs-sidecar serve --storage file:///srv/backups
  litefs-sidecar serve --config /etc/litefs-sidecar/sidecar.toml --log-level debug
  litefs-sidecar serve --insecure-no-auth --addr 127.0.0.1:20203     # local testing only

tokens: one '<cluster> <token>' per line ('<cluster> <token> read': a read-only token, for `query` and
`replicate`: GET requests only); LiteFS sends it as backup.auth-token (or LITEFS_CLOUD_TOKEN),
verbatim, 'FlyV1 <token>' or 'Bearer <token>'. The operator API's token: LITEFS_SIDECAR_SERVER_ADMIN_TOKEN.
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
    argv: list[str] = field(default_factory=list)  # the command line as given (workers are started with it)


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
    tokens: dict[str, Scope] = {}
    if server is not None:
        before, sc = len(problems), server.server
        tokens = _tokens(server, problems)
        if sc.admin_token and len(sc.admin_token) < MIN_TOKEN:  # it grants every cluster: no weaker than theirs
            problems.append(f"server.admin_token (from {server.source('server.admin_token')}): shorter than "
                            f"{MIN_TOKEN} characters")
        if sc.advertise_url and sc.workers > 1 and not sc.worker:  # (a worker is started with its supervisor's)
            # Every worker would write the one address in its leases: a request forwarded there reaches any worker,
            # and one that does not hold the cluster answers 503.
            problems.append(f"server.advertise_url (from {server.source('server.advertise_url')}): one address "
                            f"cannot name each of the {sc.workers} workers (server.workers, from "
                            f"{server.source('server.workers')}), which forward to each other by it; leave it unset "
                            "(each worker then advertises a loopback port of its own), or run one process per address")
        if len(problems) == before and not tokens and not sc.admin_token and not sc.insecure_no_auth:
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
    config = ServerConfig(tokens=tokens, insecure_no_auth=sc.insecure_no_auth, admin_token=sc.admin_token,
                          max_body_size=sc.max_body_size, request_timeout=sc.request_timeout,
                          header_timeout=sc.header_timeout, idle_timeout=sc.idle_timeout,
                          max_connections=sc.max_connections)
    return Setup(cfg, config, host.strip("[]"), int(port), levels_of(cfg.engine), notifier, storage,
                 list(getattr(args, "argv", None) or ["serve"]))


def _tokens(cfg: Config, problems: list[str]) -> dict[str, Scope]:
    """token → scope from `tokens_file` and then LITEFS_SIDECAR_SERVER_TOKENS; problems name their source."""
    tokens: dict[str, Scope] = {}
    path = cfg.server.tokens_file
    if path is not None:
        where = f"server.tokens_file = {str(path)!r} (from {cfg.source('server.tokens_file')})"
        try:
            tokens.update(parse_tokens(path.read_text(), str(path)))
        except OSError as err:
            problems.append(f"{where}: {err.strerror or err}")
        except UnicodeDecodeError as err:
            line = err.object.count(b"\n", 0, err.start) + 1
            problems.append(f"{where}: not UTF-8: byte 0x{err.object[err.start]:02x} on line {line}")
        except SidecarError as err:  # its message starts with the path
            problems.append(f"server.tokens_file (from {cfg.source('server.tokens_file')}): {err}")
    if cfg.server.tokens:
        try:
            more = parse_tokens(cfg.server.tokens, "LITEFS_SIDECAR_SERVER_TOKENS")
        except SidecarError as err:
            problems.append(f"server.tokens (from {cfg.source('server.tokens')}): {err}")
            more = {}
        for token, scope in more.items():
            if tokens.get(token, scope) != scope:
                problems.append(f"server.tokens (from {cfg.source('server.tokens')}): a token for cluster "
                                f"{scope.cluster!r} is server.tokens_file's for cluster {tokens[token].cluster!r}")
        tokens.update(more)
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
    sc = cfg.server
    if sc.workers > 1 and sc.worker == 0:
        await storage.close()
        await supervise(setup.argv, sc.workers, stop, notifier)
        return
    state_dir = cfg.engine.state_dir / f"worker-{sc.worker}" if sc.worker else cfg.engine.state_dir
    try:
        try:
            engine = await Engine.from_config(storage, cfg.engine, state_dir)
        except OSError as err:
            raise SidecarError(f"engine.state_dir {state_dir}: {err.strerror or err}") from err
        # Requests make short-lived objects by the thousand per second, and a collection scans every
        # tracked object: collect the young generation less often, and never rescan what startup made.
        gc.set_threshold(10_000, 10, 10)
        gc.freeze()
        # Owned here: awaited below whichever way serve() ends.
        watchdog = asyncio.create_task(notifier.watchdog(stop), name="watchdog")
        try:
            await serve(engine, setup.server, setup.host, setup.port, stop=stop, grace=cfg.server.shutdown_grace,
                        started=started, reuse_port=sc.workers > 1, private=sc.worker > 0,
                        advertise=sc.advertise_url, peers=cfg.engine.state_dir if sc.worker else None)
        except OSError as err:
            if listening:
                raise
            raise SidecarError(f"listen on {cfg.server.addr}: {err.strerror or err}") from err
        finally:
            stop.set()
            await watchdog
    finally:
        await storage.close()


async def supervise(argv: list[str], n: int, stop: asyncio.Event, notifier: Notifier) -> None:
    """`serve --workers N`: run N copies of this command as worker processes on the same port, restart one that
    dies, pass SIGTERM on, and return once all have stopped. READY=1 once every worker serves. A worker that
    refuses its configuration (exit status 2) stops them all: ConfigError, never a restart loop."""
    log = logmod.get_logger("sidecar.server")
    procs: dict[int, asyncio.subprocess.Process] = {}
    ready: set[int] = set()
    relays: set[asyncio.Task[None]] = set()

    async def start(i: int) -> None:
        env = {**os.environ, "LITEFS_SIDECAR_SERVER_WORKER": str(i)}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sidecar", *argv, env=env,
                                                    stdout=asyncio.subprocess.PIPE)
        procs[i] = proc
        task = asyncio.create_task(relay(i, proc), name=f"worker {i} output")
        relays.add(task)
        task.add_done_callback(relays.discard)

    async def relay(i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            if line.startswith(b"litefs-sidecar serving on ") and i not in ready:
                ready.add(i)
                if len(ready) == n:
                    notifier.notify("READY=1", f"STATUS=serving with {n} workers")

    for i in range(1, n + 1):
        await start(i)
    restarts = Backoff(base=1.0, cap=30.0)
    while procs:
        waiters = {asyncio.create_task(p.wait()): i for i, p in procs.items()}
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*waiters, stopping], return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if stopping in done:
            for p in procs.values():
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
            await asyncio.gather(*(p.wait() for p in procs.values()))
            break
        stopping.cancel()
        refused = [i for w, i in waiters.items() if w in done and procs[i].returncode == 2]
        if refused:  # exit status 2 is a configuration error (cli.py): every restart would fail the same way
            for p in procs.values():
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
            await asyncio.gather(*(p.wait() for p in procs.values()))
            await asyncio.gather(*relays, return_exceptions=True)
            raise ConfigError([f"serve --workers {n}: worker {refused[0]} refused its configuration (exit status 2, "
                               "its error is above); every worker stopped"])
        for w in done:
            i = waiters[w]
            code = procs.pop(i).returncode
            ready.discard(i)
            delay = restarts.fail(time.monotonic())
            log.error("worker exited; restarting it", worker=i, code=code, restart_in=round(delay, 1))
            await asyncio.sleep(delay)
            if not stop.is_set():
                await start(i)
    await asyncio.gather(*relays, return_exceptions=True)


__all__ = ["Setup", "cmd_serve", "configure", "open_store", "overrides", "register", "supervise"]
