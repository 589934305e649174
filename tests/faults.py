"""A fault-injecting HTTP proxy for S3 tests: SlowDown every Nth request, 500s, bodies cut mid-way, PUTs delivered
late, a store that hangs (for every request or one database's), conditional writes ignored."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class Faults:
    slowdown_every: int = 0  # every Nth request answers 503 SlowDown
    down: bool = False  # every request answers 500 InternalError
    cut_gets: int = 0  # this many GETs with a body are cut...
    cut_after: int = 100  # ...after this many bytes
    put_latency: float = 0.0  # seconds every PUT waits before it is forwarded (a slow store)
    hold_puts: str = ""  # PUTs whose path contains this wait, whole, until `release` is set (a late delivery)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    hang: bool = False  # every request waits, whole, until `release` is set (a store or server that hangs)
    hang_on: str = ""  # requests whose path and query contain this wait, whole, until `release` is set (one database's)
    held: int = 0  # requests waiting now
    # Writes (PUT, POST) lose If-None-Match and If-Match on the way, as an endpoint that ignores them: moto checks no
    # signature by default, so dropping a signed header is not noticed.
    strip_conditions: bool = False


class FaultProxy:
    """Forwards to `upstream` (moto) on 127.0.0.1, injecting `faults`; counts requests."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = Faults()
        self.requests = 0
        self.injected = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A stop does not wait for its clients' keep-alive connections (aiohttp waits 60 s by default).
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self.url

    async def stop(self) -> None:
        if self._session:
            await self._session.close()
        if self._runner:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        f = self.faults
        if f.down:
            self.injected += 1
            return web.Response(status=500, body=SLOWDOWN.replace(b"SlowDown", b"InternalError"),
                                content_type="application/xml")
        if f.slowdown_every and self.requests % f.slowdown_every == 0:
            self.injected += 1
            return web.Response(status=503, body=SLOWDOWN, content_type="application/xml")
        body = await request.read()
        if request.method == "PUT" and f.put_latency:
            await asyncio.sleep(f.put_latency)
        if f.hang or (f.hang_on and f.hang_on in request.path_qs) or \
                (request.method == "PUT" and f.hold_puts and f.hold_puts in request.path):
            f.held += 1
            await f.release.wait()  # forwarded even if its client has given up: the store gets it late
            f.held -= 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        if f.strip_conditions and request.method in ("PUT", "POST"):
            headers = {k: v for k, v in headers.items() if k.lower() not in ("if-none-match", "if-match")}
        assert self._session is not None
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body) as resp:
            data = await resp.read()
            out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
        if request.method == "GET" and f.cut_gets > 0 and len(data) > f.cut_after and resp.status < 300:
            f.cut_gets -= 1
            self.injected += 1
            stream = web.StreamResponse(status=resp.status, headers=out_headers)
            stream.content_length = len(data)
            await stream.prepare(request)
            await stream.write(data[:f.cut_after])
            assert request.transport is not None
            request.transport.close()  # the connection drops mid-body
            return stream
        return web.Response(status=resp.status, headers=out_headers, body=data)
