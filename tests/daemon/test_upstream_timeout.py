"""The HTTP upstream gives up on a stalled request, not on a slow one: a big upload on a slow link goes through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from sidecar.daemon.upstream import HTTPUpstream
from sidecar.errors import UpstreamError

TIMEOUT = 0.5  # the upstream's timeout in these tests: an upload below takes several times as long
BODY = 16 << 20  # its first half comes with 8 pauses of 0.4 × the timeout: 3.2 × the timeout in all


async def slow_reader(request: web.Request) -> web.Response:
    """Take the first half of the body with a pause of 0.4 × the timeout after each MiB, the rest at once (the
    sender's buffers hold a few MiB it cannot see go); then answer with the size as the HWM."""
    size, half, pauses = 0, BODY // 2, 0
    while chunk := await request.content.read(1 << 16):
        size += len(chunk)
        if size <= half and size >> 20 > pauses:
            pauses = size >> 20
            await asyncio.sleep(TIMEOUT * 0.4)
    return web.Response(headers={"Litefs-Hwm": f"{size:016x}"})


async def slow_sender(request: web.Request) -> web.StreamResponse:
    """Send a body 16 KiB at a time, a tenth of the timeout apart."""
    resp = web.StreamResponse()
    await resp.prepare(request)
    for _ in range(24):  # 2.4 × the timeout in all
        await resp.write(bytes(16384))
        await asyncio.sleep(TIMEOUT / 10)
    await resp.write_eof()
    return resp


async def stalled(request: web.Request) -> web.Response:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/db/tx", slow_reader)
    app.router.add_get("/db/snapshot", slow_sender)
    app.router.add_get("/pos", stalled)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_slow_upload_that_keeps_moving_goes_through(server: str) -> None:
    upstream = HTTPUpstream(server, "token", "default", timeout=TIMEOUT)
    try:
        assert await upstream.upload("app.db", bytes(BODY)) == BODY
        assert len(await upstream.snapshot("app.db")) == 24 * 16384
    finally:
        await upstream.close()


async def test_a_stalled_request_fails_naming_it(server: str) -> None:
    upstream = HTTPUpstream(server, "token", "default", timeout=TIMEOUT)
    try:
        with pytest.raises(UpstreamError, match=r"GET http://127\.0\.0\.1:\d+/pos: no progress for 0\.5 s"):
            await upstream.positions()
    finally:
        await upstream.close()
