"""A real backup server on 127.0.0.1 for each test, over a local store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.engine import Engine, Levels
from sidecar.server import Scope, ServerConfig, serve
from sidecar.storage import open_storage

TOKEN = "tok-default-0123456789abcdef"
OTHER = "tok-other-0123456789abcdef0"
ADMIN = "tok-admin-0123456789abcdef0"
READER = "tok-reader-0123456789abcdef"  # read-only, cluster "default"


@dataclass
class Running:
    url: str
    engine: Engine
    stop: asyncio.Event
    task: asyncio.Task[None]
    root: Path

    async def shutdown(self) -> None:
        self.stop.set()
        await self.task


async def start_server(root: Path, *, l0_interval: float = 0.0, max_body: int = 1 << 30,
                       request_timeout: float = 300.0, tokens: dict[str, Scope] | None = None,
                       **options: Any) -> Running:
    storage = open_storage(f"file://{root / 'store'}")
    engine = await Engine.open(storage, root / "state", Levels(l0_interval=l0_interval))
    if tokens is None:
        tokens = {TOKEN: Scope("default"), OTHER: Scope("other"), READER: Scope("default", True)}
    config = ServerConfig(tokens=tokens,
                          admin_token=ADMIN, max_body_size=max_body, request_timeout=request_timeout, **options)
    stop = asyncio.Event()
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(engine, config, "127.0.0.1", 0, stop=stop, grace=5,
                                     started=started.set_result))
    url = await asyncio.wait_for(started, 10)
    return Running(url, engine, stop, task, root)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    srv = await start_server(tmp_path)
    yield srv
    if not srv.task.done():
        await srv.shutdown()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def wait_until(cond: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll `cond` (another process's state: no event to wait on) until it holds; TimeoutError if it never does."""
    async with asyncio.timeout(within):
        while not await cond():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
