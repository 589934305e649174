"""Real LiteFS 0.5.14 per-transaction files, replayed into a data directory, back up to the fixture's bytes."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from sidecar.config import EngineConfig, SidecarConfig
from sidecar.daemon import Sidecar
from sidecar.daemon.upstream import EngineUpstream
from sidecar.ltx import Pos
from tests.conftest import LITEFS
from tests.daemon.conftest import eventually


def place(src: Path, ltx: Path) -> None:
    """As LiteFS writes: a temp name, then a rename."""
    tmp = ltx / (src.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.rename(tmp, ltx / src.name)


@pytest.mark.parametrize("db", ["fx-wal.db", "fx-nocomp.db"])
async def test_replayed_litefs_files_restore_to_the_fixture_database(tmp_path: Path, db: str) -> None:
    ltx = tmp_path / "data" / "dbs" / db / "ltx"
    ltx.mkdir(parents=True)
    config = SidecarConfig(data_dir=tmp_path / "data", mount_dir=tmp_path / "mount", litefs_url="",
                           upstream=f"file://{tmp_path / 'backups'}", state_dir=tmp_path / "state",
                           batch_interval=0.05, metrics_addr="", retention=0.0)
    upstream = await EngineUpstream.open(config.upstream, "default", tmp_path / "engine", EngineConfig())
    sidecar = Sidecar(config, upstream, None)
    stop = asyncio.Event()
    task = asyncio.create_task(sidecar.run(stop))
    files = sorted((LITEFS / "per-tx" / db).iterdir())
    for i, src in enumerate(files):
        place(src, ltx)
        if i % 3 == 2:
            await asyncio.sleep(0.12)  # several batches, not one
    last = int(files[-1].name[17:33], 16)
    await eventually(lambda: db in sidecar.dbs and sidecar.dbs[db].remote == Pos(last, sidecar.dbs[db].local.head.post
                                                                                  if sidecar.dbs[db].local.head else 0))
    assert len([s for n, s in sidecar.shipped if n == db]) >= 2
    out = tmp_path / "restored"
    await upstream.engine.restore_to("default", db, out)
    assert out.read_bytes() == (LITEFS / "db" / db).read_bytes()
    stop.set()
    await task
