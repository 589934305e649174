"""An S3 endpoint that ignores conditional writes is refused at start (by the engine, `serve` and `run`) with
nothing written to it; a normal start leaves no scratch object behind, and one left by a crash is never data.

The endpoint is moto behind a proxy that drops If-None-Match and If-Match from every write (tests/faults.py)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.engine import Engine, Levels
from sidecar.errors import ConditionalWritesIgnored
from sidecar.storage import FILE_LAYOUT, S3_LAYOUT
from sidecar.storage.layout import IDENTITY_KEY, PROBE_PREFIX
from sidecar.storage.s3 import S3Storage
from tests.engine.history import History
from tests.faults import FaultProxy
from tests.s3server import CREDENTIALS, MotoServer

T0 = 1_790_000_000.0
LEVELS = Levels(l0_interval=0, l1_interval=60, l2_interval=300, snapshot_interval=600)


@pytest.fixture
async def proxy(moto_server: MotoServer) -> AsyncIterator[FaultProxy]:
    """moto behind a proxy that strips the conditional-write headers."""
    p = FaultProxy(moto_server.url)
    await p.start()
    p.faults.strip_conditions = True
    yield p
    await p.stop()


async def stored(endpoint: str, bucket: str) -> dict[str, str]:
    """Every object in the bucket: key -> ETag."""
    store = S3Storage(bucket, endpoint_url=endpoint, force_path_style=True)
    try:
        return {o.key: o.etag for o in await store.list("")}
    finally:
        await store.close()


async def write_one(store: S3Storage, state: Path, history: History) -> None:
    engine = await Engine.open(store, state, LEVELS, clock=lambda: T0)
    try:
        history.write(n=2)
        await engine.write_tx("c", "app.db", history.commit(int(T0 * 1000)))
    finally:
        await engine.close()


async def test_the_engine_refuses_the_store_before_writing_anything(moto_server: MotoServer, proxy: FaultProxy,
                                                                   tmp_path: Path) -> None:
    bucket = moto_server.create_bucket()
    store = S3Storage(bucket, "backups", endpoint_url=proxy.url, force_path_style=True)
    try:
        with pytest.raises(ConditionalWritesIgnored, match=f"storage s3://{bucket}/backups \\(S3 endpoint "
                                                           f"{proxy.url}\\): the endpoint ignores If-None-Match and "
                                                           "If-Match"):
            await Engine.open(store, tmp_path / "state", LEVELS)
    finally:
        await store.close()
    assert await stored(moto_server.url, bucket) == {}  # no identity, no lease, no scratch object
    assert not (tmp_path / "state" / "store.json").exists()


async def test_a_store_with_backups_is_refused_at_open_not_at_the_first_lease(
        moto_server: MotoServer, proxy: FaultProxy, history: History, tmp_path: Path) -> None:
    """The store's identity exists already, so opening needs no conditional write of its own: the check runs
    anyway, and the backups are left exactly as they were."""
    bucket = moto_server.create_bucket()
    store = S3Storage(bucket, "backups", endpoint_url=moto_server.url, force_path_style=True)
    try:
        await write_one(store, tmp_path / "state", history)
    finally:
        await store.close()
    before = await stored(moto_server.url, bucket)
    assert f"backups/{IDENTITY_KEY}" in before and any(k.startswith("backups/c/app.db/0000/") for k in before)
    store = S3Storage(bucket, "backups", endpoint_url=proxy.url, force_path_style=True)
    try:
        with pytest.raises(ConditionalWritesIgnored):
            await Engine.open(store, tmp_path / "state", LEVELS)
    finally:
        await store.close()
    assert await stored(moto_server.url, bucket) == before


async def test_a_normal_start_leaves_no_scratch_object_and_a_stray_one_is_no_database(
        moto_server: MotoServer, history: History, tmp_path: Path) -> None:
    bucket = moto_server.create_bucket()
    store = S3Storage(bucket, "backups", endpoint_url=moto_server.url, force_path_style=True)
    try:
        await write_one(store, tmp_path / "state", history)
        keys = await stored(moto_server.url, bucket)
        assert not [k for k in keys if PROBE_PREFIX in k]
        # A process killed between the check's PUT and its DELETE leaves its scratch object: nothing reads it.
        await store.put_bytes(PROBE_PREFIX + "00000000000000000000000000000001", b"probe")
        engine = await Engine.open(store, tmp_path / "other-state", LEVELS, clock=lambda: T0)
        try:
            assert [(db.cluster, db.name) for db in engine.catalog] == [("c", "app.db")]
        finally:
            await engine.close()
    finally:
        await store.close()


def test_no_layout_takes_a_scratch_object_for_an_ltx_file() -> None:
    for layout in (FILE_LAYOUT, S3_LAYOUT):
        assert layout.parse(PROBE_PREFIX + "0000000000000001-0000000000000001.ltx") is None
        assert layout.parse(PROBE_PREFIX + "0123456789abcdef") is None


@pytest.mark.parametrize("command", ["serve", "serve --workers 2", "run"])
async def test_serve_and_run_refuse_to_start_and_exit_2(command: str, moto_server: MotoServer, proxy: FaultProxy,
                                                        tmp_path: Path) -> None:
    bucket = moto_server.create_bucket()
    url = f"s3://{bucket}/backups"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[2]), **CREDENTIALS,
           "LITEFS_SIDECAR_ENGINE_S3_ENDPOINT": proxy.url, "LITEFS_SIDECAR_ENGINE_S3_FORCE_PATH_STYLE": "true",
           "LITEFS_SIDECAR_ENGINE_STATE_DIR": str(tmp_path / "engine")}
    if command.startswith("serve"):  # with workers, each refuses, and the supervisor stops (no restart loop)
        args = [*command.split(), "--insecure-no-auth", "--storage", url, "--addr", "127.0.0.1:0"]
    else:
        (tmp_path / "litefs" / "dbs").mkdir(parents=True)
        args = ["run", "--data-dir", str(tmp_path / "litefs"), "--mount-dir", str(tmp_path / "mnt"),
                "--upstream", url, "--cluster", "c", "--metrics-addr", "127.0.0.1:0"]
        env["LITEFS_SIDECAR_STATE_DIR"] = str(tmp_path / "sidecar")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sidecar", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:  # it started after all: the test fails, and leaves no process behind
            proc.kill()
            await proc.wait()
    stderr = err.decode()
    assert proc.returncode == 2, stderr
    assert f"litefs-sidecar: invalid configuration:\n  storage {url} (S3 endpoint {proxy.url}): the endpoint " \
           "ignores If-None-Match and If-Match on PUT" in stderr
    assert "Traceback" not in stderr and b"serving on" not in out
    assert await stored(moto_server.url, bucket) == {}
