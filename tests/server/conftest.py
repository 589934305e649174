"""A real backup server on 127.0.0.1 for each test, over a local store.

Also the helpers several server test modules share: a reference upload (`SNAPSHOT`, `uploads`), a raw `post` and a
`forge`d upload, `serving` (`litefs-sidecar serve` as a real process), `wait_up`, and the `pair` of servers over one
store (tests/server/procs.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.engine import Engine, Levels
from sidecar.ltx import Version
from sidecar.ltx.decoder import decode
from sidecar.ltx.encoder import Encoder
from sidecar.server import Scope, ServerConfig, serve
from sidecar.storage import open_storage
from tests.conftest import LITEFS
from tests.server.procs import Proc, start

TOKEN = "tok-default-0123456789abcdef"
OTHER = "tok-other-0123456789abcdef0"
ADMIN = "tok-admin-0123456789abcdef0"
READER = "tok-reader-0123456789abcdef"  # read-only, cluster "default"

SNAPSHOT = sorted((LITEFS / "uploads").glob("*fx-wal.db-0000000000000001-*.ltx"))[0].read_bytes()
BASE_ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[2])}


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
                       max_databases: int = 0, **options: Any) -> Running:
    storage = open_storage(f"file://{root / 'store'}")
    engine = await Engine.open(storage, root / "state", Levels(l0_interval=l0_interval), max_databases=max_databases)
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


async def wait_up(url: str) -> None:
    """Until the server at `url` says it is ready."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(90):  # a restart replays, reconciles, rebuilds
        while True:
            try:
                async with http.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def post(http: aiohttp.ClientSession, url: str, db: str, body: bytes, auth: str | None = TOKEN,
               **params: str) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": auth} if auth is not None else {}
    async with http.post(f"{url}/db/tx", params={"db": db, **params}, data=body, headers=headers) as resp:
        return resp.status, (await resp.json() if resp.status != 200 else {"hwm": resp.headers["Litefs-Hwm"]})


def uploads(db: str) -> list[Path]:
    return sorted(p for p in (LITEFS / "uploads").glob("*.ltx") if p.name.split("-", 1)[1].startswith(db + "-"))


def forge(data: bytes, *, post: int | None = None, pages: list[tuple[int, bytes]] | None = None,
          **header: Any) -> bytes:
    """Re-encode an upload with header fields, pages or post-apply checksum changed; its file checksum stays valid."""
    h, found, trailer = decode(data, Version.V2)
    out = io.BytesIO()
    enc = Encoder(out, h.replace(**header), Version.V2)
    for pgno, page in found if pages is None else pages:
        enc.write_page(pgno, page)
    enc.close(trailer.post_apply_checksum if post is None else post)
    return out.getvalue()


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    url: str
    stderr: Path

    def logs(self) -> list[dict[str, object]]:
        """The JSON log lines written so far."""
        return [json.loads(line) for line in self.stderr.read_text().splitlines() if line.startswith("{")]

    async def stop(self) -> int:
        """SIGTERM, as systemd stops a service; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 60)


@asynccontextmanager
async def serving(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> AsyncIterator[Served]:
    """`litefs-sidecar serve ARGS` on 127.0.0.1, once it prints the URL it listens on."""
    stderr = tmp_path / "serve.stderr"
    with open(stderr, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "serve", *args, env={**BASE_ENV, **(env or {})},
            stdout=asyncio.subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("litefs-sidecar serving on "), (line, stderr.read_text())
        yield Served(proc, line.split()[-1], stderr)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Proc, Proc]]:
    a = await start(tmp_path / "store", tmp_path / "state-a", "aaaaaaaaaaaaaaaa")
    b = await start(tmp_path / "store", tmp_path / "state-b", "bbbbbbbbbbbbbbbb")
    yield a, b
    for p in (a, b):
        p.stop.set()
        await p.task
