"""The engine on S3 (moto over HTTP): restores match the live database, and the real Litestream reads our bucket."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.engine import Engine, Levels
from sidecar.storage import Storage, open_storage
from tests.engine.history import History
from tests.s3server import MotoServer

T0 = 1_790_000_000.0


def litestream_config(path: Path, db: Path, bucket: str, endpoint: str) -> Path:
    path.write_text(f"""dbs:
  - path: {db}
    replicas:
      - type: s3
        bucket: {bucket}
        path: c/app.db
        endpoint: {endpoint}
        region: us-east-1
        force-path-style: true
        access-key-id: testing
        secret-access-key: testing
""")
    return path


@pytest.fixture
async def s3_store(moto_server: MotoServer) -> AsyncIterator[tuple[Storage, str]]:
    bucket = moto_server.create_bucket()
    store = open_storage(f"s3://{bucket}", endpoint_url=moto_server.url, force_path_style=True)
    yield store, bucket
    await store.close()


async def test_engine_on_s3_restores_and_litestream_agrees(moto_server: MotoServer, s3_store: tuple[Storage, str],
                                                           history: History, tmp_path: Path) -> None:
    store, bucket = s3_store
    now = [T0]
    levels = Levels(l0_interval=10, l1_interval=60, l2_interval=300, snapshot_interval=600)
    engine = await Engine.open(store, tmp_path / "state", levels, clock=lambda: now[0])
    for _ in range(60):
        history.write(n=4)
        await engine.write_tx("c", "app.db", history.commit(int(now[0] * 1000)))
        now[0] += 11
        await engine.tick()
    await engine.close()
    assert {e.level for e in engine.index("c", "app.db")} == {0, 1, 2, 9}
    keys = [o.key for o in await store.list("c/app.db/")]
    assert any(k.startswith("c/app.db/0009/") for k in keys) and any(k.startswith("c/app.db/0000/") for k in keys)
    points = engine.restore_points("c", "app.db")
    _, ts, _ = points[len(points) // 3]
    at = datetime.fromtimestamp((ts + 1) / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    config = litestream_config(tmp_path / "litestream.yml", tmp_path / "app.db", bucket, moto_server.url)
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # a plain-http endpoint
    for args, target in (([], {}), (["-timestamp", at], {"timestamp": ts})):
        ours, theirs = tmp_path / "ours.db", tmp_path / "theirs.db"
        result = await engine.restore_to("c", "app.db", ours, integrity_check=True, **target)
        assert result.verified and result.checksum == history.checksums[result.txid]
        cmd = ["litestream", "restore", "-config", str(config), *args, "-o", str(theirs), str(tmp_path / "app.db")]
        proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        assert ours.read_bytes() == theirs.read_bytes()
        ours.unlink()
        theirs.unlink()
    # Losing the engine's state loses nothing: the index comes back from the bucket.
    engine2 = await Engine.open(store, tmp_path / "state2", clock=lambda: now[0])
    assert engine2.pos("c", "app.db") == history.pos
