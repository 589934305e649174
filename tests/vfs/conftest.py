"""Backups to read in place, written by the real engine: on a local store, on S3 (moto), or behind a server."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.engine import Engine, Levels
from sidecar.ltx import Header
from sidecar.server import Scope, ServerConfig, serve
from sidecar.storage import Storage, open_storage
from sidecar.vfs import BackupVFS
from tests.engine.history import History
from tests.s3server import MotoServer

T0 = 1_790_000_000.0
MIN, HOUR = 60.0, 3600.0
# Hourly snapshots, half-hourly L2, 5-minute L1: a two-hour history exercises every level and retention.
LEVELS = Levels(l0_interval=10, l1_interval=5 * MIN, l2_interval=30 * MIN, snapshot_interval=HOUR,
                l0_retention=40 * MIN, l1_retention=90 * MIN, l2_retention=90 * MIN, snapshot_retention=90 * MIN)
EVENTS = "SELECT id, at, body FROM events ORDER BY id"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


READER = "tok-reader-0123456789abcdef"  # the served cluster "c"'s read-only token


@dataclass
class Served:
    """`serve` running in this event loop."""

    url: str
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shutdown(self) -> None:
        self.stop.set()
        await self.task


async def start_serving(engine: Engine) -> Served:
    """The engine behind a real server on 127.0.0.1, with READER as a read-only token of cluster "c"."""
    config = ServerConfig(tokens={"tok-writer-0123456789abcdef": Scope("c"), READER: Scope("c", readonly=True)})
    stop = asyncio.Event()
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(engine, config, "127.0.0.1", 0, stop=stop, grace=5, started=started.set_result))
    return Served(await asyncio.wait_for(started, 10), stop, task)


@dataclass
class Written:
    """A database's backup as the engine wrote it: where it is, and the live database it mirrors."""

    url: str  # the database's backup URL, as `query` takes it
    storage: Storage  # the store's root
    engine: Engine
    history: History
    clock: Clock
    options: dict[str, Any]  # for readers (BackupVFS, open_source): S3 options, or the server's token
    flags: list[str]  # the same for the command line (a token goes in LITEFS_SIDECAR_TOKEN instead)
    served: Served | None = None

    async def close(self) -> None:
        if self.served is not None:
            await self.served.shutdown()  # closes the engine
        else:
            await self.engine.close()
        self.history.close()
        await self.storage.close()

    async def write(self, n: int = 1, step: float = 13.0) -> None:
        """`n` more transactions, `step` seconds apart, each followed by the engine's tick."""
        for _ in range(n):
            self.history.write(n=3, at=int(self.clock.now))
            await self.engine.write_tx("c", "app.db", self.history.commit(int(self.clock.now * 1000)))
            self.clock.now += step
            await self.engine.tick()


async def open_written(kind: str, tmp: Path, moto: MotoServer | None, levels: Levels = LEVELS) -> Written:
    """An engine writing `c/app.db` to a local store ("file", "server": then served over HTTP) or to S3."""
    options: dict[str, Any] = {}
    flags: list[str] = []
    if kind == "s3":
        assert moto is not None
        bucket = moto.create_bucket()
        options = {"endpoint_url": moto.url, "force_path_style": True}
        flags = ["--s3-endpoint", moto.url, "--s3-force-path-style"]
        storage = open_storage(f"s3://{bucket}/backups", **options)
        url = f"s3://{bucket}/backups/c/app.db"
    else:
        storage = open_storage(f"file://{tmp / 'store'}")
        url = f"file://{tmp / 'store' / 'c' / 'app.db'}"
    clock = Clock()
    engine = await Engine.open(storage, tmp / "state", levels, clock=clock)
    w = Written(url, storage, engine, History(tmp / "live.db"), clock, options, flags)
    if kind == "server":
        w.served = await start_serving(engine)
        w.url, w.options = f"{w.served.url}/app.db", {"token": READER}
    return w


async def stale_head(tmp_path: Path) -> Written:
    """A local store whose head object still names files retention deleted since (its later writes failed)."""
    w = await open_written("file", tmp_path, None)
    for _ in range(3):
        await w.write()
    await w.engine.flush_all()
    old = await w.storage.get_bytes("c/app.db/head.json")
    for _ in range(400):  # past compaction and retention of the files `old` names
        await w.write(step=30)
    await w.engine.flush_all()
    await w.storage.put_bytes("c/app.db/head.json", old)
    return w


@pytest.fixture(params=["file", "s3", "server"])
async def written(request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Written]:
    """An engine writing one database (`c/app.db`) to a local store, to S3, or behind a server read with a
    read-only token (in LITEFS_SIDECAR_TOKEN for the command line); nothing written yet."""
    moto = request.getfixturevalue("moto_server") if request.param == "s3" else None
    w = await open_written(request.param, tmp_path, moto)
    if w.served is not None:
        monkeypatch.setenv("LITEFS_SIDECAR_TOKEN", READER)
    try:
        yield w
    finally:
        await w.close()


@dataclass
class Stored:
    """A finished two-hour history in a local store (`root/c/app.db`), shared by the session's tests (read only)."""

    root: Path
    live: Path  # the database it mirrors, at its last state


async def _write_history(tmp: Path, hours: float, step: float) -> None:
    w = await open_written("file", tmp, None)
    try:
        await w.write(n=int(hours * HOUR / step), step=step)
    finally:
        await w.engine.close()
        w.history.close()
        await w.storage.close()


@pytest.fixture(scope="session")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    """Two hours of writes, one a minute, through the real engine: every level, compaction and retention."""
    tmp = tmp_path_factory.mktemp("history")
    asyncio.run(_write_history(tmp, 2.0, 60.0))
    return Stored(tmp / "store", tmp / "live.db")


async def copy_store(src: Storage, dst: Storage) -> None:
    """Every object of `src` into `dst`, in `dst`'s layout, with the timestamps Litestream reads."""
    for obj in await src.list(""):
        data = await src.get_bytes(obj.key)
        parsed = src.layout.parse(obj.key)
        if parsed is None:
            await dst.put_bytes(obj.key, data)
            continue
        await dst.put_bytes(dst.layout.ltx_key(parsed.prefix, parsed.level, parsed.min_txid, parsed.max_txid), data,
                            timestamp=Header.unpack(data).timestamp)


@pytest.fixture
def make_vfs() -> Iterator[Callable[..., BackupVFS]]:
    """BackupVFS(**options) under a unique name, closed after the test."""
    made: list[BackupVFS] = []

    def make(**options: Any) -> BackupVFS:
        options.setdefault("poll_interval", 0.2)
        v = BackupVFS(f"litefs-sidecar-test-{len(made)}", **options)
        made.append(v)
        return v
    try:
        yield make
    finally:
        for v in made:
            v.close()


def rows(path: Path, sql: str = EVENTS) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()
