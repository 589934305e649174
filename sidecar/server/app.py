"""`litefs-sidecar serve`: the engine behind HTTP. This module assembles the parts; nothing imports it but the CLI.

    litefs_api.py   GET /pos, POST /db/tx, GET /db/snapshot, GET /db/hwm       (the LiteFS Cloud protocol)
    reads.py        GET /db/plan, /db/ltx, /db/pages, /db/head                 (reading backups in place)
    operator.py     /api/...                                                   (the operator API)
    ui.py           /ui                                                        (the dashboard)
    auth.py         tokens and scopes          http.py     request keys, errors, bodies
    metrics.py      GET /metrics               here        /healthz, /readyz, middlewares, serve()

Middlewares, outermost first: the access log (one line per request, with its id), errors (every refusal a JSON
`{code, error}`), authentication (a token reaches only its cluster; read-only tokens only read).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from yarl import URL

from sidecar.engine import Engine
from sidecar.errors import PosMismatch, SidecarError, StorageError, validate_cluster_name
from sidecar.log import debugging
from sidecar.ltx import LTXError
from sidecar.ltx.errors import ChecksumMismatch, InvalidHeader
from sidecar.protocol import INSTANCE_HEADER, REQUEST_ID_HEADER
from sidecar.server.auth import ADMIN_SCOPE, Scope, Tokens
from sidecar.server.guard import Guard, GuardedSite, Limits, install_client_mistakes_filter, quiet_accept_errors
from sidecar.server.handoff import Inbox, Peers, Siblings, head_of
from sidecar.server.http import ADMIN, CLUSTER, READONLY, Quota, error
from sidecar.server.litefs_api import MAX_SNAPSHOTS, LiteFSAPI
from sidecar.server.metrics import Metrics
from sidecar.server.operator import OperatorAPI
from sidecar.server.reads import Reads
from sidecar.server.router import NotHere, Router
from sidecar.server.ui import Dashboard, SessionError, SignedSessions

log = structlog.get_logger("sidecar.server")
_EVERY_SECOND = frozenset({("POST", "/db/tx"), ("GET", "/pos")})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/favicon.ico", "/ui"})
READ_METHODS = frozenset({"GET", "HEAD"})
CLIENT_CLOSED = 499  # the access log's status of a request whose client went away mid-answer (as nginx logs it)
GIVEN_SECONDS = 2.0  # how long a free cluster handed to a sibling counts as its lease


@dataclass
class ServerConfig:
    """What the HTTP layer needs; the CLI builds it from the configuration."""

    tokens: dict[str, Scope] = field(default_factory=dict)  # token -> scope
    insecure_no_auth: bool = False
    admin_token: str = ""
    max_body_size: int = 1 << 30
    request_timeout: float = 300.0  # seconds to receive an upload's body; for a download's client to take a chunk
    header_timeout: float = 20.0  # seconds for a new connection to send its request headers
    idle_timeout: float = 75.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 10_000
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


class Server:
    """The aiohttp application around one engine."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics or Metrics()
        self.tokens = Tokens(config.tokens, config.admin_token)
        engine.observe_builds(self.metrics.observe_build)
        self.metrics.watch(engine)
        self.ready = False
        self.siblings: Siblings | None = None  # set by serve() once this process has an address to advertise
        self.peers: Peers | None = None  # set by serve() for a worker of `serve --workers`
        self._placing = asyncio.Lock()
        self._given: list[tuple[float, str]] = []  # (when, sibling's address): free clusters handed lately
        self._requests = itertools.count()  # request ids: this instance's id + a counter (no syscall per request)
        self.router = Router(engine, config.instance_id, on_forward=self.metrics.forwarded.inc)
        self.reads = Reads(engine, config.request_timeout)
        # Per cluster, whatever the route: upload bytes in memory at once, snapshot downloads (temporary files) at once.
        receiving = Quota(config.max_body_size, "bytes of uploads in flight")
        snapshots = Quota(MAX_SNAPSHOTS, "snapshot downloads under way")
        self.litefs = LiteFSAPI(engine, self.metrics, max_body_size=config.max_body_size,
                                request_timeout=config.request_timeout, receiving=receiving, snapshots=snapshots)
        self.operator = OperatorAPI(engine, max_body_size=config.max_body_size, request_timeout=config.request_timeout,
                                    router=self.router, receiving=receiving, snapshots=snapshots)
        # Sessions signed with a key every process with these tokens derives alike: any worker reads them. Each
        # token's scope is in the key too: a token moved to another cluster or made read-only (then restarted) ends
        # the sessions signed in with it, which would otherwise keep its old scope for up to 12 h.
        secrets_ = ([*(f"{s.cluster} {'read' if s.readonly else 'write'} {t}" for t, s in config.tokens.items()),
                     f"{ADMIN_SCOPE} admin {config.admin_token}"] if (config.tokens or config.admin_token) else [])
        self.dashboard = Dashboard(self._sign_in, self.metrics,
                                   SignedSessions.from_secrets(secrets_) if secrets_ else None)

    @property
    def inflight(self) -> int:
        return self.litefs.inflight

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_size,
                              middlewares=[self._access_log, self._errors, self._auth])
        self.litefs.add_routes(app)
        self.operator.add_routes(app)
        self.dashboard.add_routes(app)
        self.reads.add_routes(app)
        r = app.router
        r.add_get("/metrics", self.get_metrics)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        return app

    # -- middlewares ----------------------------------------------------------------------------------

    @web.middleware
    async def _access_log(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID_HEADER) or f"{self.config.instance_id[:8]}{next(self._requests):08x}"
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            resp.headers[REQUEST_ID_HEADER] = rid
            resp.headers[INSTANCE_HEADER] = self.config.instance_id
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            seconds = time.perf_counter() - t0
            resource = request.match_info.route.resource
            route = resource.canonical if resource else "other"
            self.metrics.observe_request(route, seconds)
            # Every node's per-second traffic is counted in /metrics and logged only at debug level: a line
            # per database per second is noise, and at saturation it was about a sixth of the CPU per upload.
            # Below debug level its line is not even built (a tenth of the Python time of an upload's request).
            if status >= 400 or (request.method, route) not in _EVERY_SECOND:
                _access_line(log.info, request, rid, status, seconds)
            elif debugging("sidecar.server"):
                _access_line(log.debug, request, rid, status, seconds)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except PosMismatch as err:
            self.metrics.rejections.labels(err.code).inc()
            return error(409, err.code, err.reason, err.pos)
        except LTXError as err:
            status, code = ltx_refusal(err)
            self.metrics.rejections.labels(code).inc()
            return error(status, code, str(err))
        except StorageError as err:
            self.metrics.storage_errors.inc()
            self.metrics.rejections.labels(err.code).inc()
            log.error("storage error", error=str(err))
            return error(503, err.code, without_paths(str(err)), headers={"Retry-After": "1"})
        except (RequestPayloadError, HttpProcessingError) as err:  # a body that cannot be read as sent
            self.metrics.rejections.labels("EBADBODY").inc()
            encoding = request.headers.get("Content-Encoding", "")
            return error(400, "EBADBODY", f"request body unreadable{' as ' + encoding if encoding else ''}: "
                                          f"{err.__cause__ or err}")
        except SidecarError as err:
            self.metrics.rejections.labels(err.code).inc()
            retry = getattr(err, "retry_after", None)
            return error(err.http_status, err.code, str(err),
                         headers={"Retry-After": str(retry)} if retry is not None else None)
        except ConnectionError:
            if request.transport is not None and not request.transport.is_closing():
                raise
            # The client closed the connection while it was being answered (a download cut short): its doing, and
            # nothing more can reach it. Logged as the access log's one line, not as a server error.
            return web.Response(status=CLIENT_CLOSED)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or request.path.startswith("/ui/"):
            return await handler(request)  # the dashboard's own routes check its session themselves
        scope = None
        if "Authorization" not in request.headers and request.path.startswith("/api/"):
            try:
                scope = self.dashboard.scope(request)  # the dashboard's pages call the operator API
            except SessionError as err:
                self.metrics.rejections.labels(err.code).inc()
                return error(err.status, err.code, str(err))
        if scope is None:
            scope = self._authenticate(request)
        if scope is None:
            self.metrics.rejections.labels("EINVALIDAUTH").inc()
            return error(401, "EINVALIDAUTH", "missing or invalid Authorization")
        wanted = request.query.get("cluster")
        if wanted:
            try:
                validate_cluster_name(wanted)
            except SidecarError as err:
                return error(400, "EBADDB", f"?cluster=: {err}")
        if wanted and wanted != scope.cluster and not scope.admin:
            self.metrics.rejections.labels("EINVALIDAUTH").inc()
            return error(401, "EINVALIDAUTH", f"token does not grant cluster {wanted!r}")
        if scope.readonly and request.method not in READ_METHODS:
            self.metrics.rejections.labels("EREADONLY").inc()
            return error(403, "EREADONLY", f"{request.method} {request.path}: this token may only read")
        request[ADMIN] = scope.admin
        request[READONLY] = scope.readonly
        cluster = request[CLUSTER] = wanted if scope.admin and wanted else scope.cluster
        if cluster != ADMIN_SCOPE:
            holder = await self.router.holder(request, cluster)
            if holder is not None:
                return await self.router.forward(request, cluster, holder)  # another process writes it
        return await handler(request)

    def _authenticate(self, request: web.Request) -> Scope | None:
        """The caller's scope, or None."""
        return self._scope(request.headers.get("Authorization", ""), request.query.get("cluster"))

    def _scope(self, header: str, cluster: str | None) -> Scope | None:
        """The scope an Authorization header (and, without authentication, `?cluster=`) grants, or None."""
        if self.config.insecure_no_auth:
            if header.lower().startswith("cluster "):
                return Scope(validate_cluster_name(header[8:].strip()))
            return Scope(cluster or "default")
        return self.tokens.scope(Tokens.from_header(header))

    async def route(self, data: bytes, transport: asyncio.Transport) -> bool:
        """A new connection's first request is in `data`: hand the connection to the process on this machine that
        writes its cluster, if another does (handoff.py); False to serve it here. Only a routine token's cluster is
        looked at; everything else (refusals included) is served here, as the middlewares decide."""
        head = head_of(data)
        if head is None or self.siblings is None:  # (serve() routes only once siblings exist)
            return False
        target, headers = head
        url = URL(target)
        if url.path in OPEN_PATHS or url.path.startswith("/ui/") or "authorization" not in headers:
            return False
        try:
            scope = self._scope(headers["authorization"], url.query.get("cluster"))
        except SidecarError:
            return False
        if scope is None or scope.admin or url.query.get("cluster", scope.cluster) != scope.cluster:
            return False
        sock = transport.get_extra_info("socket")
        cluster = scope.cluster
        unplaced = self.peers is not None and not self.engine.owns(cluster) and self.router.cached(cluster) is None
        # Workers place clusters no process is known to hold one at a time, each seeing the leases the one before
        # took; a connection for a cluster already placed never waits behind them.
        async with self._placing if unplaced else contextlib.nullcontext():
            lighter = await self._lighter_sibling(cluster) if unplaced else None
            if lighter is not None and await self.siblings.hand(lighter, sock, data):
                self._given.append((time.monotonic(), lighter))
                self.metrics.handed.inc()
                return True
            try:
                doc = await self.router.writer(cluster)
            except NotHere:
                return False
        if doc is None or not doc.addr or not await self.siblings.hand(doc.addr, sock, data):
            return False
        self.metrics.handed.inc()
        return True

    async def _lighter_sibling(self, cluster: str) -> str | None:
        """With `serve --workers`, for a cluster neither held here nor seen held elsewhere within the last second:
        the address of a sibling holding fewer leases than this process, if the cluster's lease is free (so whoever
        serves this connection takes it); None otherwise (handoff.Peers)."""
        assert self.peers is not None
        now = time.monotonic()
        # A sibling's file counts a handed cluster only once it has taken the lease: count it here meanwhile.
        self._given = [(t, addr) for t, addr in self._given if now - t < GIVEN_SECONDS]
        lighter = self.peers.lightest(len(self.engine.leases.held), Counter(addr for _, addr in self._given))
        if lighter is None:
            return None
        try:
            doc, _ = await self.engine.leases.holder(cluster)
        except StorageError:
            return None
        if doc is not None and self.engine.leases.live(doc):
            self.router.remember(cluster, doc)
            return None
        return lighter

    def _sign_in(self, token: str) -> Scope | None:
        """The dashboard's sign-in: a token's scope (anything is admin without authentication). The dashboard acts
        (restores, uploads, deletes), so a read-only token cannot sign in."""
        if self.config.insecure_no_auth:
            return Scope(ADMIN_SCOPE)
        scope = self.tokens.scope(token)
        return None if scope is None or scope.readonly else scope

    # -- operations -----------------------------------------------------------------------------------

    async def get_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(self.engine),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return error(503, "ENOTREADY", "starting or stopping")
        if self.engine.disk_full:
            return error(503, "EDISKFULL", "the disk of the server's state directory is full: uploads are refused "
                                           "until space is freed")
        return web.json_response({"ready": True})


def _access_line(emit: Callable[..., Any], request: web.Request, rid: str, status: int, seconds: float) -> None:
    emit("request", request_id=rid, method=request.method, path=request.path, query=request.query_string,
         status=status, ms=round(seconds * 1000, 1), cluster=request.get(CLUSTER))


_LOCAL_PATH = re.compile(r"file://\S+|(?<![\w:/])/(?:[\w.@+-]+/)*[\w.@+-]+")


def without_paths(message: str) -> str:
    """A message for a client: local file paths (of the state directory, a local store) replaced by <path>."""
    return _LOCAL_PATH.sub("<path>", message)


# Header fields a well-formed upload can still get wrong for its database: 422, not 400.
SEMANTIC_FIELDS = frozenset({"page_size", "commit", "timestamp", "max_txid"})


def ltx_refusal(err: LTXError) -> tuple[int, str]:
    """The status and code an upload refused by the codec or the engine's checks gets."""
    if isinstance(err, ChecksumMismatch) and err.field == "post_apply_checksum":
        return 422, "EBADCHECKSUM"  # it claims a state its pages do not make
    if isinstance(err, InvalidHeader) and err.field in SEMANTIC_FIELDS:
        return 422, "EBADHEADER"
    return 400, "EBADLTX"


async def serve(engine: Engine, config: ServerConfig, host: str, port: int, *, stop: asyncio.Event,
                grace: float = 30.0, started: Callable[[str], None] | None = None,
                metrics: Metrics | None = None, reuse_port: bool = False, advertise: str = "",
                private: bool = False, peers: Path | None = None) -> None:
    """Run until `stop`: the engine's ticker, then graceful shutdown (finish in-flight uploads, flush).

    `advertise` is where other server processes reach this one (written into its leases); with `private`, a second
    listener on a free loopback port serves that purpose (workers share the public port, so it cannot). `peers`:
    the state directory whose `worker-<n>` subdirectories hold this process's and its siblings' (handoff.Peers)."""
    server = Server(engine, config, metrics)
    runner = web.AppRunner(server.make_app(), access_log=None, shutdown_timeout=grace,
                           keepalive_timeout=config.idle_timeout)
    await runner.setup()
    quiet_accept_errors(asyncio.get_running_loop())
    undo_filter = install_client_mistakes_filter()
    limits = Limits(config.header_timeout, config.max_connections)
    sites = [GuardedSite(runner, host, port, limits, reuse_port=reuse_port or None)]
    if private:
        sites.append(GuardedSite(runner, "127.0.0.1", 0, limits))
    try:
        for site in sites:
            await site.start()
    except BaseException:
        undo_filter()
        await runner.cleanup()
        raise
    addr = runner.addresses[0]
    url = f"http://{addr[0]}:{addr[1]}"
    if private:
        back = runner.addresses[-1]
        advertise = advertise or f"http://{back[0]}:{back[1]}"
    elif not advertise and addr[0] not in ("0.0.0.0", "::"):
        advertise = url
    engine.advertise(advertise)
    loop = asyncio.get_running_loop()
    adopting: set[asyncio.Task[Any]] = set()

    def adopt(sock: socket.socket, data: bytes) -> None:
        """Serve a connection a sibling handed over, from the bytes it had read."""
        task = loop.create_task(loop.connect_accepted_socket(
            lambda: Guard(runner.server(), limits, handed=data), sock))  # type: ignore[misc]
        adopting.add(task)
        task.add_done_callback(adopting.discard)

    inbox = Inbox(advertise, adopt) if advertise else None
    if inbox is not None and inbox.start():
        server.siblings = Siblings(advertise)
        sites[0].route = server.route  # without siblings, a new connection's first bytes need not wait for routing
        if peers is not None:
            server.peers = Peers(peers, engine.state_dir, advertise)
            server.peers.publish(len(engine.leases.held))
            engine.leases.on_change = server.peers.publish
    server.ready = True
    log.info("serving", url=url, advertise=advertise or None, clusters=server.tokens.clusters,
             insecure=config.insecure_no_auth)
    if started:
        started(url)
    ticker = asyncio.create_task(engine.run(stop), name="engine")
    stopping = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait([ticker, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.ready = False
        log.info("shutting down", inflight=server.inflight)
        if inbox is not None:
            inbox.close()
        if server.siblings is not None:
            server.siblings.close()
        await runner.cleanup()  # stops accepting, waits for in-flight requests up to the grace period
        await server.router.close()
        stop.set()
        await stopping
        if ticker.done() and not ticker.cancelled() and ticker.exception() is not None:
            # The engine's loop died: say why and let the supervisor restart the process.
            log.error("engine stopped", error=repr(ticker.exception()))
            await engine.close()
            raise SidecarError(f"engine stopped: {ticker.exception()!r}")
        await ticker
        await engine.close(within=grace)  # flush what was accepted; what the store does not take waits in the log
        undo_filter()
        log.info("stopped")


__all__ = ["Server", "ServerConfig", "serve"]
