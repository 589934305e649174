"""Connection hygiene: what aiohttp leaves to the application.

- A client that opens a connection and never finishes its request headers (slowloris) is closed after
  `header_timeout`; an idle keep-alive connection after aiohttp's `keepalive_timeout`.
- At most `max_connections` at once: one past the cap is closed at once, and counted.
- The event loop's "accept() out of system resource" errors (file descriptors exhausted) are logged once per
  `every` seconds with how many were suppressed, not thousands of times a second.
- A client's malformed request (a 20 KB header, a bad request line, a body that is not in its Content-Encoding)
  is answered 400; its log line is a warning without a traceback (also when aiohttp finds the bad body only while
  draining it after the answer).

`GuardedSite` is a `web.TCPSite` whose protocol factory wraps each aiohttp protocol in a `Guard`, which forwards
every callback and only watches the first request's bytes for the end of its headers. With a `route`, it holds
those bytes until the headers are in and lets the route hand the connection to another process (handoff.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from sidecar.server.handoff import MAX_HANDED

log = structlog.get_logger("sidecar.server")

HEADER_TIMEOUT = 20.0
ROUTE_WITHIN = 2.0  # seconds a new connection may wait to be routed (handoff.py) before it is served here
MAX_CONNECTIONS = 10_000


class Limits:
    """Shared by every connection of one site."""

    def __init__(self, header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0  # connections closed at the cap
        self.slow = 0  # connections closed for not finishing their headers


Route = Callable[[bytes, asyncio.Transport], Awaitable[bool]]


class Guard(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol; closes connections that stall before their first request.

    With `route`, the first request's bytes are held until its headers are in, and `route(bytes, transport)` is
    awaited: True means it handed the connection to another process (handoff.py), which then owns it; False, that
    aiohttp serves it here. `handed` is what another process read from a connection it handed here."""

    def __init__(self, inner: Any, limits: Limits, *, route: Route | None = None, handed: bytes = b"") -> None:
        self.inner = inner
        self.limits = limits
        self.route = route
        self.handed = handed
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""  # the last bytes seen, until the first request's headers end
        self.held: bytearray | None = bytearray() if route else None  # the first bytes, while not yet routed
        self.counted = False
        self.made = False  # whether aiohttp's protocol has the connection
        self.gone = False  # whether the connection is lost
        self._lost: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.limits.open >= self.limits.max_connections:
            self.limits.refused += 1
            transport.abort()
            return
        self.limits.open += 1
        self.counted = True
        if self.handed:  # its headers are in: the sibling routed it
            self._serve(self.handed)
            return
        self.timer = asyncio.get_running_loop().call_later(self.limits.header_timeout, self._stalled)
        if self.route is None:
            self._serve(b"")

    def _serve(self, data: bytes) -> None:
        self.made = True
        assert self.transport is not None
        self.inner.connection_made(self.transport)
        if data:
            self.inner.data_received(data)

    def _stalled(self) -> None:
        self.limits.slow += 1
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            seen = self.tail + data
            if b"\r\n\r\n" in seen:
                self.timer.cancel()
                self.timer = None
                self.tail = b""
            else:
                self.tail = seen[-3:]
        if self.held is None:
            self.inner.data_received(data)
            return
        self.held += data
        if self.timer is None or len(self.held) > MAX_HANDED:  # the headers are in (or too long to hand over)
            held, self.held = bytes(self.held), None
            assert self.transport is not None
            self.transport.pause_reading()
            task = asyncio.get_running_loop().create_task(self._route(held))
            _routing.add(task)
            task.add_done_callback(_routing.discard)

    async def _route(self, held: bytes) -> None:
        assert self.transport is not None and self.route is not None
        handed = False
        try:
            if len(held) <= MAX_HANDED:
                async with asyncio.timeout(ROUTE_WITHIN):  # a slow store read never holds a connection long
                    handed = await self.route(held, self.transport)
        except TimeoutError:
            log.warning("routing a connection took too long; serving it here", seconds=ROUTE_WITHIN)
        except Exception as exc:  # routing is an optimisation: serve the connection here
            log.warning("routing a connection failed", error=repr(exc))
        if self.transport.is_closing():
            return  # the client went away meanwhile
        if handed:
            self.transport.abort()  # closes this process's descriptor; the sibling has its own
            return
        self._serve(held)
        self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.made else None

    def lost(self) -> asyncio.Future[None]:
        """Done once the connection is lost. aiohttp does not cancel a handler whose client went away (a GET has no
        body to fail), so a handler that waits long (a long-poll) waits on this too."""
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
            if self.gone:
                self._lost.set_result(None)
        return self._lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if self.timer is not None:
            self.timer.cancel()
        if self.counted:
            self.limits.open -= 1
            if self.made:
                self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.made:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.made:
            self.inner.resume_writing()


_routing: set[asyncio.Task[None]] = set()


class GuardedSite(web.TCPSite):
    """A TCP site whose connections are guarded by `limits`; `route` (settable once started) applies to each new
    connection."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: Limits, *, route: Route | None = None,
                 **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.limits = limits
        self.route = route

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        self._server = await loop.create_server(
            lambda: Guard(server(), self.limits, route=self.route), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, every: float = 10.0) -> None:
    """Log the loop's accept() failures at most once per `every` seconds, with how many were suppressed."""
    previous = loop.get_exception_handler()
    last = [0.0]
    suppressed = [0]

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if "accept" in message and isinstance(context.get("exception"), OSError):
            now = time.monotonic()
            if now - last[0] < every:
                suppressed[0] += 1
                return
            log.error("cannot accept connections", error=str(context.get("exception")),
                      suppressed_since_last=suppressed[0])
            last[0], suppressed[0] = now, 0
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class ClientMistakes(logging.Filter):
    """aiohttp logs a client's malformed request at error level with a traceback: make it one warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError | RequestPayloadError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"malformed request: {record.exc_info[1]!s}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def install_client_mistakes_filter() -> Callable[[], None]:
    """Filter aiohttp.server's records; returns the undo."""
    f = ClientMistakes()
    logger = logging.getLogger("aiohttp.server")
    logger.addFilter(f)
    return lambda: logger.removeFilter(f)


__all__ = ["Guard", "GuardedSite", "Limits", "install_client_mistakes_filter", "quiet_accept_errors"]
