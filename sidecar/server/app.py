"""`litefs-sidecar serve`: the engine behind HTTP, speaking the LiteFS Cloud protocol (spec/litefs.md §9).

    GET  /pos                      {db: {"txid", "postApplyChecksum"}} for the caller's cluster
    POST /db/tx?db=NAME            an LTX v2 upload (chunked); 200 with Litefs-Hwm, or 409 EPOSMISMATCH
    GET  /db/snapshot?db=NAME      an LTX v2 snapshot of the stored state
    GET  /db/hwm?db=NAME           extension: {"hwm", "txid"}, polled by sidecars on replica nodes
    GET  /db/plan|ltx|head?db=     reading backups in place, see `sidecar.server.reads`
    /api/...                       the operator API (JSON), see `sidecar.server.operator`
    GET  /metrics /healthz /readyz

Errors are JSON `{"code", "error"[, "pos"]}`. A token reaches only its own cluster; a read-only token
(`<cluster> <token> read` in the tokens file) only with GET and HEAD (anything else: 403 EREADONLY).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sidecar.engine import Engine
from sidecar.errors import PosMismatch, SidecarError, StorageError, validate_db_name
from sidecar.ltx import LTXError, Pos

log = structlog.get_logger("sidecar.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLUSTER = web.RequestKey("cluster", str)  # the caller's cluster, set by authentication
ADMIN = web.RequestKey("admin", bool)  # the caller holds the admin token
READ_ONLY = web.RequestKey("read_only", bool)  # the caller holds a read-only token: GET and HEAD only


@dataclass
class ServerConfig:
    """What the HTTP layer needs; the CLI builds it from the configuration."""

    tokens: dict[str, str] = field(default_factory=dict)  # token -> cluster
    read_tokens: dict[str, str] = field(default_factory=dict)  # token -> cluster, read-only (`<cluster> <token> read`)
    insecure_no_auth: bool = False
    admin_token: str = ""
    max_body_size: int = 1 << 30
    request_timeout: float = 300.0  # seconds to receive an upload's body
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


class Metrics:
    """Prometheus metrics of one server (its own registry, so tests can run many servers)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.uploads = Counter("lfsc_uploads", "Accepted LTX uploads", ["cluster"], registry=r)
        self.upload_bytes = Counter("lfsc_upload_bytes", "Bytes of accepted LTX uploads", ["cluster"], registry=r)
        self.rejections = Counter("lfsc_rejections", "Refused requests by error code", ["code"], registry=r)
        self.storage_errors = Counter("lfsc_storage_errors", "Object-store failures", registry=r)
        self.hwm_lag = Gauge("lfsc_hwm_lag_txids", "Accepted TXID minus HWM", ["cluster", "db"], registry=r)
        self.flush_seconds = Histogram("lfsc_request_seconds", "Request duration", ["route"], registry=r)
        self.build_seconds = Histogram("lfsc_build_seconds", "Engine flushes (level 0) and compactions, by level",
                                       ["level"], registry=r, buckets=(.005, .01, .05, .1, .5, 1, 5, 10, 60, 300))
        self.log_commits = Gauge("lfsc_upload_log_commits", "Group commits of the upload log (fdatasync calls)",
                                 registry=r)
        self.log_segments = Gauge("lfsc_upload_log_segments", "Upload log segments on disk (grows while the "
                                  "store is unreachable)", registry=r)
        self.pending_uploads = Gauge("lfsc_pending_uploads", "Accepted uploads not yet in the store", registry=r)


def error(status: int, code: str, message: str, pos: Pos | None = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "error": message}
    if pos is not None:
        body["pos"] = pos_json(pos)
    return web.json_response(body, status=status)


def pos_json(pos: Pos) -> dict[str, str]:
    return {"txid": f"{pos.txid:016x}", "postApplyChecksum": f"{pos.post_apply_checksum:016x}"}


def parse_tokens(text: str, source: str, *, read: bool = False) -> dict[str, str]:
    """`<cluster> <token>` per line, or `<cluster> <token> read` for a read-only token (or `;`-separated);
    `#` comments. Returns token -> cluster: of the read-write tokens, or with `read` of the read-only ones."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.replace(";", "\n").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or parts[2:] not in ([], ["read"]):
            raise SidecarError(f"{source}: line {n}: want '<cluster> <token>' or '<cluster> <token> read'")
        cluster, token = parts[:2]
        validate_db_name(cluster)
        if len(token) < 16:
            raise SidecarError(f"{source}: line {n}: token for cluster {cluster!r} is shorter than 16 characters")
        if (len(parts) == 3) == read:
            out[token] = cluster
    return out


class Server:
    """The aiohttp application around one engine."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = Metrics()
        self.ready = False
        self.inflight = 0
        self._tmp = engine.state_dir / ".tmp"
        engine.timed = lambda level, seconds: self.metrics.build_seconds.labels(str(level)).observe(seconds)
        self._requests = itertools.count()  # request ids: this instance's id + a counter (no syscall per request)
        from sidecar.server.ui import Dashboard
        self.dashboard = Dashboard(self)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_size,
                              middlewares=[self._access_log, self._errors, self._auth])
        r = app.router
        r.add_get("/pos", self.get_pos)
        r.add_post("/db/tx", self.post_tx)
        r.add_get("/db/snapshot", self.get_snapshot)
        r.add_get("/db/hwm", self.get_hwm)
        r.add_get("/metrics", self.get_metrics)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        from sidecar.server.operator import add_routes
        add_routes(self, app)
        from sidecar.server.reads import Reads
        Reads(self).add_routes(app)
        self.dashboard.add_routes(app)
        return app

    # -- middlewares ----------------------------------------------------------------------------------

    @web.middleware
    async def _access_log(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or f"{self.config.instance_id[:8]}{next(self._requests):08x}"
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            resp.headers["X-Request-Id"] = rid
            resp.headers["Lfsc-Instance-Id"] = self.config.instance_id
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            seconds = time.perf_counter() - t0
            route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
            self.metrics.flush_seconds.labels(route).observe(seconds)
            log.info("request", request_id=rid, method=request.method, path=request.path,
                     query=request.query_string, status=status, ms=round(seconds * 1000, 1),
                     cluster=request.get(CLUSTER))

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except PosMismatch as err:
            self.metrics.rejections.labels(err.code).inc()
            return error(409, err.code, str(err), err.pos)
        except LTXError as err:
            code = "EBADHEADER" if err.field == "page_size" else "EBADLTX"
            self.metrics.rejections.labels(code).inc()
            return error(422 if code == "EBADHEADER" else 400, code, str(err))
        except StorageError as err:
            self.metrics.storage_errors.inc()
            self.metrics.rejections.labels(err.code).inc()
            log.error("storage error", error=str(err))
            return error(503, err.code, str(err))
        except SidecarError as err:
            self.metrics.rejections.labels(err.code).inc()
            return error(err.http_status, err.code, str(err))
        except web.HTTPRequestEntityTooLarge:
            self.metrics.rejections.labels("ETOOLARGE").inc()
            return error(413, "ETOOLARGE", f"request body exceeds {self.config.max_body_size} bytes")
        except web.HTTPRequestTimeout:
            self.metrics.rejections.labels("ETIMEOUT").inc()
            return error(408, "ETIMEOUT", f"request body not received within {self.config.request_timeout:g}s")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ("/healthz", "/readyz", "/metrics", "/favicon.ico") or request.path == "/ui" \
                or request.path.startswith("/ui/"):
            return await handler(request)  # the dashboard's own routes check its session themselves
        cluster = None
        if "Authorization" not in request.headers and request.path.startswith("/api/"):
            from sidecar.server.ui import SessionError
            try:
                cluster = self.dashboard.scope(request)  # the dashboard's pages call the operator API
            except SessionError as err:
                self.metrics.rejections.labels(err.code).inc()
                return error(err.status, err.code, str(err))
        if cluster is None:
            cluster = self._authenticate(request)
        if cluster is None:
            self.metrics.rejections.labels("EINVALIDAUTH").inc()
            return error(401, "EINVALIDAUTH", "missing or invalid Authorization")
        if request.get(READ_ONLY) and request.method not in ("GET", "HEAD"):
            self.metrics.rejections.labels("EREADONLY").inc()
            return error(403, "EREADONLY", f"{request.method} {request.path}: a read-only token cannot write")
        wanted = request.query.get("cluster")
        if wanted and wanted != cluster and cluster != "*":
            self.metrics.rejections.labels("EINVALIDAUTH").inc()
            return error(401, "EINVALIDAUTH", f"token does not grant cluster {wanted!r}")
        request[ADMIN] = cluster == "*"
        request[CLUSTER] = wanted if cluster == "*" and wanted else cluster
        return await handler(request)

    def _authenticate(self, request: web.Request) -> str | None:
        """The caller's cluster ("*" for the admin token), or None."""
        header = request.headers.get("Authorization", "")
        if self.config.insecure_no_auth:
            if header.lower().startswith("cluster "):
                name = header[8:].strip()
                validate_db_name(name)
                return name
            return request.query.get("cluster") or "default"
        token = header
        for scheme in ("FlyV1 ", "Bearer "):
            if header.startswith(scheme):
                token = header[len(scheme):]
        scope = self.token_scope(token.strip())
        if scope is None:
            scope = _lookup(self.config.read_tokens, token.strip())
            request[READ_ONLY] = scope is not None
        return scope

    def token_scope(self, token: str) -> str | None:
        """The cluster a read-write token grants ("*" for the admin token), or None."""
        found = _lookup(self.config.tokens, token)
        if self.config.admin_token and hmac.compare_digest(self.config.admin_token.encode(), token.encode()):
            found = "*"
        return found

    # -- protocol -------------------------------------------------------------------------------------

    def _db(self, request: web.Request) -> tuple[str, str]:
        name = request.query.get("db", "")
        validate_db_name(name)
        cluster = request[CLUSTER]
        if cluster == "*":
            raise SidecarError("the admin token needs ?cluster=")
        return cluster, name

    async def get_pos(self, request: web.Request) -> web.Response:
        cluster = request[CLUSTER]
        return web.json_response({name: pos_json(pos) for name, pos in self.engine.positions(cluster).items()})

    async def post_tx(self, request: web.Request) -> web.Response:
        cluster, name = self._db(request)
        st = self.engine.get(cluster, name)
        if st is not None and st.uploading:
            self.metrics.rejections.labels("ECONFLICT").inc()
            return error(409, "EPOSMISMATCH", "another upload of this database is in progress", st.pos)
        self.inflight += 1
        try:
            data = await self._read_body(request)
            hwm = await self.engine.write_tx(cluster, name, data)
        finally:
            self.inflight -= 1
        self.metrics.uploads.labels(cluster).inc()
        self.metrics.upload_bytes.labels(cluster).inc(len(data))
        self.metrics.hwm_lag.labels(cluster, name).set(self.engine.pos(cluster, name).txid - hwm)
        return web.Response(status=200, headers={"Litefs-Hwm": f"{hwm:016x}"})

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_body_size
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        buf = bytearray()
        try:
            async with asyncio.timeout(self.config.request_timeout):  # a slow or stalled sender holds nothing
                async for chunk in request.content.iter_chunked(1 << 20):
                    buf += chunk
                    if len(buf) > limit:
                        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(buf))
        except TimeoutError:
            raise web.HTTPRequestTimeout() from None
        if not buf:
            raise LTXError("empty request body: want an LTX file")
        return bytes(buf)

    async def get_snapshot(self, request: web.Request) -> web.StreamResponse:
        cluster, name = self._db(request)
        if self.engine.get(cluster, name) is None or self.engine.pos(cluster, name).is_zero:
            return error(404, "ENODB", f"database {name!r} has no backup in cluster {cluster!r}")
        return await self.send_snapshot(request, cluster, name)

    async def send_snapshot(self, request: web.Request, cluster: str, name: str, *, timestamp: int | None = None,
                            txid: int | None = None, sqlite: bool = False) -> web.StreamResponse:
        self._tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="serve-", dir=self._tmp) as tmp:
            out = Path(tmp) / "out"
            if sqlite:
                result = await self.engine.restore_to(cluster, name, out, timestamp=timestamp, txid=txid)
                headers = {"Litefs-Txid": f"{result.txid:016x}", "Content-Type": "application/vnd.sqlite3",
                           "Content-Disposition": f'attachment; filename="{name}"'}
            else:
                header, _ = await self.engine.snapshot_file(cluster, name, out, timestamp=timestamp, txid=txid)
                headers = {"Litefs-Txid": f"{header.max_txid:016x}", "Content-Type": "application/octet-stream"}
            resp = web.StreamResponse(status=200, headers=headers)
            resp.content_length = out.stat().st_size
            await resp.prepare(request)
            with open(out, "rb") as f:
                while chunk := await asyncio.to_thread(f.read, 1 << 20):
                    await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def get_hwm(self, request: web.Request) -> web.Response:
        cluster, name = self._db(request)
        pos = self.engine.pos(cluster, name)
        return web.json_response({"hwm": f"{self.engine.hwm(cluster, name):016x}", **pos_json(pos)})

    # -- operations -----------------------------------------------------------------------------------

    async def get_metrics(self, request: web.Request) -> web.Response:
        m, log_ = self.metrics, self.engine.log
        m.log_commits.set(log_.commits)
        m.log_segments.set(log_.segments)
        m.pending_uploads.set(sum(len(st.pending) for st in self.engine.dbs.values()))
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return error(503, "ENOTREADY", "starting or stopping")
        return web.json_response({"ready": True})


def _lookup(tokens: dict[str, str], token: str) -> str | None:
    """The cluster of `token` in `tokens`, comparing with every one (constant time); None if absent."""
    found = None
    for candidate, cluster in tokens.items():
        if token and hmac.compare_digest(candidate.encode(), token.encode()):
            found = cluster
    return found


async def serve(engine: Engine, config: ServerConfig, host: str, port: int, *, stop: asyncio.Event,
                grace: float = 30.0, started: Callable[[str], None] | None = None) -> None:
    """Run until `stop`: the engine's ticker, then graceful shutdown (finish in-flight uploads, flush)."""
    server = Server(engine, config)
    runner = web.AppRunner(server.make_app(), access_log=None, shutdown_timeout=grace)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addr = runner.addresses[0]
    url = f"http://{addr[0]}:{addr[1]}"
    server.ready = True
    log.info("serving", url=url, clusters=sorted(set(config.tokens.values())), insecure=config.insecure_no_auth)
    if started:
        started(url)
    ticker = asyncio.create_task(engine.run(stop))
    try:
        await stop.wait()
    finally:
        server.ready = False
        log.info("shutting down", inflight=server.inflight)
        await runner.cleanup()  # stops accepting, waits for in-flight requests up to the grace period
        await ticker
        await engine.close()  # flush what was accepted
        log.info("stopped")


def token_sources(tokens_file: str, tokens_env: str) -> dict[str, str]:
    """Read-write tokens from a file and from the environment twin."""
    tokens: dict[str, str] = {}
    if tokens_file:
        tokens.update(parse_tokens(Path(tokens_file).read_text(), tokens_file))
    if tokens_env:
        tokens.update(parse_tokens(tokens_env, "LITEFS_SIDECAR_SERVER_TOKENS"))
    return tokens


__all__ = ["Server", "ServerConfig", "error", "parse_tokens", "pos_json", "serve", "token_sources"]
