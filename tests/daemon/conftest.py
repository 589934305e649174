"""An emulated LiteFS node with its HTTP API, and a sidecar beside it shipping to an in-process engine."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import EngineConfig, SidecarConfig
from sidecar.daemon import Sidecar
from sidecar.daemon.litefs import LiteFSNode
from sidecar.daemon.upstream import EngineUpstream, Upstream
from sidecar.emulator import EmulatedNode, start_http
from sidecar.engine.restore import RestoreResult


class Env:
    """A node, its HTTP API, and where the sidecar keeps things; `start()` runs a sidecar until `stop()`."""

    def __init__(self, tmp: Path, node: EmulatedNode, litefs_url: str) -> None:
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

    async def start(self, to: Upstream | None = None, **changes: Any) -> Sidecar:
        config = self.config(**changes)
        upstream = to or await EngineUpstream.open(config.upstream, config.cluster, config.state_dir / "engine",
                                                 EngineConfig(l0_interval=0.0))
        started = asyncio.Event()
        self.sidecar = Sidecar(config, upstream, LiteFSNode(config.litefs_url, config.mount_dir))
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.sidecar.run(self._stop, started=lambda _: started.set()))
        await started.wait()
        return self.sidecar

    async def stop(self) -> None:
        if self._task is not None:
            self._stop.set()
            await self._task
            self._task = None

    @property
    def engine_upstream(self) -> EngineUpstream:
        assert self.sidecar is not None and isinstance(self.sidecar.upstream, EngineUpstream)
        return self.sidecar.upstream

    async def synced(self, db: str, within: float = 30.0) -> None:
        """Wait until upstream holds the node's position of `db`."""
        assert self.sidecar is not None
        async with asyncio.timeout(within):
            while True:
                want = self.node.pos(db)
                shipper = self.sidecar.dbs.get(db)
                if shipper is not None and shipper.remote is not None and \
                        shipper.remote.post_apply_checksum == want.post_apply_checksum:
                    return
                await asyncio.sleep(0.05)

    async def restore(self, db: str, out: Path, **target: Any) -> RestoreResult:
        return await self.engine_upstream.engine.restore_to("default", db, out, **target)


async def eventually(condition: Callable[[], bool], within: float = 30.0) -> None:
    """Wait until `condition()` holds, polling; TimeoutError after `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.05)


@asynccontextmanager
async def environment(tmp: Path, **node_options: Any) -> AsyncIterator[Env]:
    node = EmulatedNode(tmp / "data", tmp / "mount", **node_options)
    runner, url = await start_http(node)
    env = Env(tmp, node, url)
    try:
        yield env
    finally:
        await env.stop()
        await runner.cleanup()
        node.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with environment(tmp_path) as e:
        yield e
