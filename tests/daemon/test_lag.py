"""The lag gauge: set every tick to how long transactions waited, not to the 0 of the instant after a ship."""

from __future__ import annotations

import time
from pathlib import Path

from sidecar.config import EngineConfig, SidecarConfig
from sidecar.daemon import Sidecar
from sidecar.daemon.upstream import EngineUpstream
from sidecar.emulator import EmulatedNode

LATE = 30.0  # the sidecar's clock runs this much after the files' mtimes: each tick looks 30 s late


async def test_the_gauge_shows_how_long_the_shipped_transactions_waited(tmp_path: Path) -> None:
    node = EmulatedNode(tmp_path / "data", tmp_path / "mount")
    config = SidecarConfig(data_dir=node.data_dir, mount_dir=node.mount_dir, litefs_url="",
                           upstream=f"file://{tmp_path / 'backups'}", state_dir=tmp_path / "state", metrics_addr="")
    upstream = await EngineUpstream.open(config.upstream, config.cluster, tmp_path / "engine",
                                         EngineConfig(l0_interval=0.0))
    sidecar = Sidecar(config, upstream, None, clock=lambda: time.time() + LATE)
    lag = sidecar.metrics.lag.labels("app.db")
    try:
        for i in range(3):
            node.execute("app.db", "CREATE TABLE IF NOT EXISTS t (x)")
            node.execute("app.db", "INSERT INTO t VALUES (?)", (i,))
        shipped = await sidecar.tick()
        assert shipped and sidecar.dbs["app.db"].remote == node.pos("app.db")  # nothing is pending any more
        assert lag._value.get() >= LATE  # how long the shipped transactions had waited
        assert await sidecar.tick() == []
        assert lag._value.get() == 0.0  # idle: nothing waits
    finally:
        await sidecar.close()
        node.close()
