"""End to end with the emulator: what the node commits is what upstream restores, at every batch boundary."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from sidecar.emulator import LoadWriter
from sidecar.ltx import Pos
from tests.daemon.conftest import Env


async def test_three_databases_restore_at_batch_boundaries(env: Env, tmp_path: Path) -> None:
    sidecar = await env.start()
    names = ["a.db", "b.db", "c.db"]
    loads = [LoadWriter(env.node, n, rate=0, seed=i, max_commits=3400) for i, n in enumerate(names)]
    async with asyncio.TaskGroup() as tg:
        for load in loads:
            tg.create_task(load.run())
    for name in names:
        await env.synced(name)
    assert sum(len(load.txs) for load in loads) >= 10_000
    rng = random.Random(7)
    for name, load in zip(names, loads, strict=True):
        history = load.history
        latest = await env.restore(name, tmp_path / f"{name}.latest")
        assert Pos(latest.txid, latest.checksum) == env.node.pos(name)
        boundaries = sorted({s.max_txid for n, s in sidecar.shipped if n == name})
        assert len(boundaries) >= 20, boundaries
        for txid in rng.sample(boundaries, 20):
            got = await env.restore(name, tmp_path / f"{name}.{txid}", txid=txid)
            assert (got.txid, got.checksum) == (txid, history[txid][1])
