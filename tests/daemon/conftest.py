"""An emulated LiteFS node with its HTTP API, and a sidecar beside it shipping to an in-process engine."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.config import EngineConfig, SidecarConfig
from sidecar.daemon import Sidecar
from sidecar.daemon.litefs import LiteFSNode
from sidecar.daemon.upstream import EngineUpstream, HTTPUpstream, Upstream
from sidecar.emulator import EmulatedNode, start_http
from sidecar.engine import Engine, Levels
from sidecar.engine.restore import RestoreResult
from sidecar.ltx import Pos
from sidecar.storage.s3 import S3Storage
from tests.faults import FaultProxy
from tests.s3server import MotoServer
from tests.server.conftest import TOKEN, Running, start_server


class Env:
    """A node, its HTTP API, and where the sidecar keeps things; `start()` runs a sidecar until `stop()`."""

    def __init__(self, tmp: Path, node: EmulatedNode, litefs_url: str, kind: str = "file",
                 moto: MotoServer | None = None) -> None:
        self.kind = kind  # where backups go: "file" (engine in-process), "s3" (engine on moto), "http" (`serve`)
        self.moto = moto
        self.server: Running | None = None
        self.tmp = tmp
        self.node = node
        self.litefs_url = litefs_url
        self.backups = tmp / "backups"
        self.sidecar: Sidecar | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def config(self, **changes: Any) -> SidecarConfig:
        base = SidecarConfig(data_dir=self.node.data_dir, mount_dir=self.node.mount_dir, litefs_url=self.litefs_url,
                             upstream=f"file://{self.backups}", state_dir=self.tmp / "sidecar",
                             batch_interval=0.1, metrics_addr="127.0.0.1:0", retention=0.0,
                             position_interval=2.0, rescan_interval=5.0, backoff_max=0.5, shutdown_grace=5.0)
        return dataclasses.replace(base, **changes)

    async def upstream(self, config: SidecarConfig) -> tuple[SidecarConfig, Upstream]:
        if self.kind == "http":
            if self.server is None:
                self.server = await start_server(self.tmp / "server")
            config = dataclasses.replace(config, upstream=self.server.url, token=TOKEN)
            return config, HTTPUpstream(self.server.url, TOKEN, config.cluster)
        engine = EngineConfig(l0_interval=0.0)
        if self.kind == "s3":
            assert self.moto is not None
            if not self.backups.exists():
                self.bucket = self.moto.create_bucket()
                self.backups.mkdir()
            config = dataclasses.replace(config, upstream=f"s3://{self.bucket}/backups")
            engine = EngineConfig(l0_interval=0.0, s3_endpoint=self.moto.url, s3_force_path_style=True)
        return config, await EngineUpstream.open(config.upstream, config.cluster, config.state_dir / "engine", engine)

    async def start(self, to: Upstream | None = None, **changes: Any) -> Sidecar:
        config = self.config(**changes)
        if to is None:
            config, to = await self.upstream(config)
        upstream = to
        started = asyncio.Event()
        self.sidecar = Sidecar(config, upstream, LiteFSNode(config.litefs_url, config.mount_dir))
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.sidecar.run(self._stop, started=lambda _: started.set()))
        await started.wait()
        return self.sidecar

    @property
    def done(self) -> bool:
        """Whether the started sidecar has stopped by itself (an error ended its run)."""
        return self._task is not None and self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._stop.set()
            await self._task
            self._task = None

    @property
    def engine_upstream(self) -> EngineUpstream:
        assert self.sidecar is not None and isinstance(self.sidecar.upstream, EngineUpstream)
        return self.sidecar.upstream

    @property
    def engine(self) -> Engine:
        """The engine that holds the backups, in-process or the server's."""
        if self.server is not None:
            return self.server.engine
        return self.engine_upstream.engine

    async def synced(self, db: str, within: float = 30.0) -> None:
        """Wait until upstream holds the node's position of `db`. Only for a quiet node: while a load writes, the
        position moves on and the moment of equality may never come (use `shipped_past` then)."""
        assert self.sidecar is not None
        async with asyncio.timeout(within):
            while True:
                want = self.node.pos(db)
                shipper = self.sidecar.dbs.get(db)
                if shipper is not None and shipper.remote is not None and \
                        shipper.remote.post_apply_checksum == want.post_apply_checksum:
                    return
                await asyncio.sleep(0.05)

    async def shipped_past(self, db: str, txid: int, within: float = 30.0) -> None:
        """Wait until upstream holds `db` at least up to the node's `txid`: once true it stays true, whatever the
        node writes meanwhile."""
        assert self.sidecar is not None
        sidecar = self.sidecar

        def past() -> bool:
            shipper = sidecar.dbs.get(db)
            return shipper is not None and shipper.remote is not None and \
                shipper.remote.txid - shipper.link.offset >= txid
        await eventually(past, within)

    async def restore(self, db: str, out: Path, **target: Any) -> RestoreResult:
        return await self.engine.restore_to("default", db, out, **target)


class HeldUpstream:
    """Wraps a real upstream; uploads of `db` wait until `unblock` is set (a server stuck on one database)."""

    def __init__(self, inner: Upstream, db: str) -> None:
        self.inner, self.db, self.unblock = inner, db, asyncio.Event()
        self.url, self.compress, self.identity = inner.url, inner.compress, inner.identity

    async def positions(self) -> dict[str, Pos]:
        return await self.inner.positions()

    async def upload(self, db: str, data: bytes) -> int:
        if db == self.db:
            await self.unblock.wait()
        return await self.inner.upload(db, data)

    async def snapshot(self, db: str) -> bytes:
        return await self.inner.snapshot(db)

    async def hwm(self, db: str) -> tuple[int, Pos]:
        return await self.inner.hwm(db)

    async def release(self) -> None:
        await self.inner.release()

    def failing(self, db: str) -> dict[str, str]:
        return self.inner.failing(db)

    async def close(self, within: float | None = None) -> None:
        self.unblock.set()
        await self.inner.close(within)


async def start_stuck(env: Env) -> tuple[Sidecar, HeldUpstream]:
    """A sidecar shipping app.db while the first upload of stuck.db hangs (until `held.unblock` is set)."""
    write(env, "stuck.db", 2)
    write(env, "app.db", 2)
    _, inner = await env.upstream(env.config())
    held = HeldUpstream(inner, "stuck.db")
    sidecar = await env.start(held)  # type: ignore[arg-type]
    await env.synced("app.db")
    return sidecar, held


async def eventually(condition: Callable[[], bool], within: float = 30.0) -> None:
    """Wait until `condition()` holds, polling; TimeoutError after `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.05)


async def look(sidecar: Sidecar) -> tuple[int, dict[str, Any], str]:
    """/healthz's status and JSON, and /metrics' text, over HTTP."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sidecar.url}/healthz") as resp:
            status, health = resp.status, await resp.json()
        async with http.get(f"{sidecar.url}/metrics") as resp:
            return status, health, await resp.text()


async def engine_via(proxy: FaultProxy, bucket: str, state: Path, **store: Any) -> EngineUpstream:
    """An in-process engine on `s3://<bucket>/b` reached through `proxy` (tests.faults), which retries a failing
    request only once (an unreachable store is found at once); `store`: more S3Storage options."""
    options: dict[str, Any] = {"max_attempts": 2, "backoff_base": 0.001, "backoff_cap": 0.005, **store}
    storage = S3Storage(bucket, "b", endpoint_url=proxy.url, force_path_style=True, **options)
    return EngineUpstream(f"s3://{bucket}/b", await Engine.open(storage, state, Levels(l0_interval=0)), "default")


def rows(path: Path) -> list[tuple[object, ...]]:
    """Table t of the database at `path`, read-only, by id."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("SELECT * FROM t ORDER BY id").fetchall()
    finally:
        con.close()


def write(env: Env, db: str, n: int, start: int = 0) -> None:
    env.node.execute(db, "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(start, start + n):
        env.node.execute(db, "INSERT INTO t (v) VALUES (?)", (f"row {i}",))


@asynccontextmanager
async def environment(tmp: Path, kind: str = "file", moto: MotoServer | None = None,
                      **node_options: Any) -> AsyncIterator[Env]:
    node = EmulatedNode(tmp / "data", tmp / "mount", **node_options)
    runner, url = await start_http(node)
    env = Env(tmp, node, url, kind, moto)
    try:
        yield env
    finally:
        await env.stop()
        if env.server is not None:
            await env.server.shutdown()
        await runner.cleanup()
        node.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with environment(tmp_path) as e:
        yield e


@pytest.fixture(params=["file", "s3", "http"])
async def any_env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    """The same environment with each kind of upstream: file://, s3:// (moto over HTTP), and `serve` over HTTP."""
    moto = request.getfixturevalue("moto_server") if request.param == "s3" else None
    async with environment(tmp_path, request.param, moto) as e:
        yield e
