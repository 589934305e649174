"""The part of LiteFS's node HTTP API a sidecar can use (docs/litefs.md §7), served over an EmulatedNode.

    GET  /info            {"clusterID", "isPrimary", "candidate", "path", "primary": {"hostname"}}, indented
    GET  /export?name=    the raw SQLite file; 404 `database not found`
    POST /import?name=    body = a SQLite file → the next TXID; 503 `lease expired` on a replica
    GET  /events          NDJSON: `init`, then `tx` and `primaryChange` events

As in LiteFS every response carries `Litefs-Id` (and `Litefs-Cluster-Id` once known), and errors are Go's
`http.Error`: `text/plain; charset=utf-8`, the message and a newline. Not emulated: `/stream` (HTTP/2
only), `/halt`, `/tx`, `/promote`, `/handoff`, `/metrics`, `/debug/*`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from sidecar.emulator.node import DatabaseNotFound, EmulatedNode, EmulatorError, Event

NODE = web.AppKey("node", EmulatedNode)
_STREAMS: web.AppKey[set[asyncio.Queue[bytes | None]]] = web.AppKey("event_streams")
_EVENT_BUFFER = 1024  # LiteFS disconnects a consumer that falls this far behind

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(message: str, status: int) -> web.Response:
    """Go's `http.Error`."""
    return web.Response(status=status, text=message + "\n", content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


@web.middleware
async def _go_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The router's own refusals, worded as LiteFS's `ServeHTTP` words them."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed:
        return _error("method not allowed", 405)
    except web.HTTPNotFound:
        return _error("404 page not found", 404)


async def _litefs_headers(request: web.Request, response: web.StreamResponse) -> None:
    node = request.app[NODE]
    response.headers["Litefs-Id"] = f"{node.node_id:016X}"
    if node.cluster_id:
        response.headers["Litefs-Cluster-Id"] = node.cluster_id


async def get_info(request: web.Request) -> web.Response:
    body = json.dumps(request.app[NODE].info(), indent=2) + "\n"
    return web.Response(text=body, content_type="text/plain", charset="utf-8")  # Go sniffs JSON as text


async def get_export(request: web.Request) -> web.Response:
    name = request.query.get("name", "")
    if not name:
        return _error("name required", 400)
    try:
        data = await asyncio.to_thread(request.app[NODE].export, name)
    except DatabaseNotFound as err:
        return _error(str(err), 404)
    return web.Response(body=data, content_type="application/octet-stream")


async def post_import(request: web.Request) -> web.Response:
    node = request.app[NODE]
    name = request.query.get("name", "")
    if not name:
        return _error("name required", 400)
    if not node.is_primary:
        return _error("lease expired", 503)  # the primary context is already cancelled on a replica
    body = bytearray()
    async for chunk in request.content.iter_chunked(1 << 20):
        body += chunk
    try:
        await asyncio.to_thread(node.import_db, name, body)
    except EmulatorError as err:
        return _error(str(err), 500)
    return web.Response()


async def get_events(request: web.Request) -> web.StreamResponse:
    """Stream the node's events as NDJSON until the client leaves, falls behind, or the server stops."""
    node = request.app[NODE]
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def put(event: Event) -> None:
        if queue.qsize() >= _EVENT_BUFFER:
            queue.put_nowait(None)  # "event stream buffer exceeded, disconnecting"
        else:
            queue.put_nowait((json.dumps(event, separators=(",", ":")) + "\n").encode())

    def deliver(event: Event) -> None:  # called from whichever thread committed
        loop.call_soon_threadsafe(put, event)

    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    request.app[_STREAMS].add(queue)
    unsubscribe = node.subscribe(deliver)
    try:
        await response.prepare(request)
        while (item := await queue.get()) is not None:
            await response.write(item)
    except ConnectionResetError:
        pass  # the client went away
    finally:
        unsubscribe()
        request.app[_STREAMS].discard(queue)
    return response


async def _close_streams(app: web.Application) -> None:
    for queue in app[_STREAMS]:
        queue.put_nowait(None)


def make_app(node: EmulatedNode) -> web.Application:
    """The node's HTTP API as an aiohttp application."""
    app = web.Application(middlewares=[_go_errors])
    app[NODE] = node
    app[_STREAMS] = set()
    app.on_response_prepare.append(_litefs_headers)
    app.on_shutdown.append(_close_streams)
    app.router.add_get("/info", get_info, allow_head=False)
    app.router.add_get("/export", get_export, allow_head=False)
    app.router.add_post("/import", post_import)
    app.router.add_get("/events", get_events, allow_head=False)
    return app


async def start_http(node: EmulatedNode, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve `node` on host:port (0 = a free port); returns the runner (`await runner.cleanup()`) and URL."""
    runner = web.AppRunner(make_app(node), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addr = runner.addresses[0]
    return runner, f"http://{addr[0]}:{addr[1]}"


__all__ = ["NODE", "make_app", "start_http"]
