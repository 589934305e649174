"""The engine against a failing store: nothing acknowledged is lost, the HWM never passes what is durable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.engine import Engine, Levels, plan_restore, scan
from sidecar.errors import RestoreError
from sidecar.ltx import Version
from sidecar.ltx.sqlite import encode_db
from sidecar.storage import FILE_LAYOUT, open_storage
from sidecar.storage.s3 import S3Storage
from tests.engine.history import History
from tests.faults import FaultProxy
from tests.s3server import MotoServer

T0 = 1_790_000_000.0


@pytest.fixture
async def proxied(moto_server: MotoServer) -> AsyncIterator[tuple[S3Storage, FaultProxy]]:
    proxy = FaultProxy(moto_server.url)
    url = await proxy.start()
    store = S3Storage(moto_server.create_bucket(), "", endpoint_url=url, force_path_style=True, max_attempts=3,
                      backoff_base=0.001, backoff_cap=0.005)
    yield store, proxy
    await store.close()
    await proxy.stop()


async def test_outage_keeps_uploads_and_holds_the_hwm(proxied: tuple[S3Storage, FaultProxy], history: History,
                                                      tmp_path: Path) -> None:
    store, proxy = proxied
    now = [T0]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    history.write()
    await engine.write_tx("c", "app.db", history.commit(1))
    now[0] += 10
    await engine.tick()
    assert engine.hwm("c", "app.db") == 1
    proxy.faults.down = True
    for _ in range(5):
        history.write()
        assert await engine.write_tx("c", "app.db", history.commit(int(now[0] * 1000))) == 1
        now[0] += 4
    await engine.tick()  # the flush fails alone: recorded on the database; uploads stay pending, the HWM stays
    assert engine.status("c", "app.db").failing
    assert engine.hwm("c", "app.db") == 1
    assert engine.pos("c", "app.db") == history.pos
    # A crash during the outage: a new engine finds every acknowledged upload.
    engine.abandon()
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    # The index cache is written every few seconds, so it may not know file 1 yet: the HWM is never above what is
    # stored (at most lower, which only makes clients keep files longer) until the store answers again.
    assert engine.pos("c", "app.db") == history.pos and engine.hwm("c", "app.db") <= 1
    proxy.faults.down = False
    proxy.faults.slowdown_every = 2  # flaky, but each call gets through within its retries
    now[0] += 20
    await engine.tick()
    assert engine.hwm("c", "app.db") == history.pos.txid
    result = await engine.restore_to("c", "app.db", tmp_path / "out.db", integrity_check=True)
    assert result.checksum == history.checksums[history.pos.txid]


async def test_closing_while_the_store_is_down_keeps_uploads_for_the_next_start(
        proxied: tuple[S3Storage, FaultProxy], history: History, tmp_path: Path) -> None:
    store, proxy = proxied
    now = [T0]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    for _ in range(3):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(int(now[0] * 1000)))
    proxy.faults.down = True
    await engine.close()  # the flush fails: a warning, not an error, and the uploads stay in the upload log
    assert list((tmp_path / "state" / "log").glob("*.log"))
    proxy.faults.down = False
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    assert engine.pos("c", "app.db") == history.pos and engine.hwm("c", "app.db") == 0
    await engine.close()
    assert not list((tmp_path / "state" / "log").glob("*.log"))  # flushed, so the log is gone
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    assert engine.hwm("c", "app.db") == history.pos.txid
    result = await engine.restore_to("c", "app.db", tmp_path / "out.db")
    assert result.checksum == history.checksums[history.pos.txid]
    await engine.close()


async def test_a_crash_after_a_snapshot_over_pending_uploads_still_opens_while_the_store_is_down(
        proxied: tuple[S3Storage, FaultProxy], history: History, tmp_path: Path) -> None:
    """Replaying the upload log writes nothing to the store: a snapshot logged after other uploads opens from the
    cache while the store is down, and reaches the store as its own file once it answers."""
    store, proxy = proxied
    now = [T0]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    for _ in range(3):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(int(now[0] * 1000)))
    history.write()
    with open(history.path, "rb") as f, open(tmp_path / "snap.ltx", "wb") as out:
        encode_db(f, out, version=Version.V2, compress=True, txid=5, timestamp=int(now[0] * 1000))
    assert await engine.write_tx("c", "app.db", (tmp_path / "snap.ltx").read_bytes()) == 3  # 1-3 flushed first
    snap_pos = engine.pos("c", "app.db")
    engine.abandon()  # a crash before the index cache was written
    proxy.faults.down = True
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    assert engine.pos("c", "app.db") == snap_pos
    proxy.faults.down = False
    now[0] += 3600
    await engine.tick()
    assert [(e.min_txid, e.max_txid) for e in engine.index("c", "app.db").level(0)] == [(1, 3), (1, 5)]
    result = await engine.restore_to("c", "app.db", tmp_path / "3.db", txid=3)
    assert result.checksum == history.checksums[3]
    await engine.close()


async def test_gap_in_the_store_is_refused_clearly(history: History, tmp_path: Path) -> None:
    store = open_storage(f"file://{tmp_path / 'store'}")
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0))
    for _ in range(4):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(1000))
    middle = engine.index("c", "app.db").level(0)[2]
    (tmp_path / "store" / middle.key(FILE_LAYOUT, "c/app.db")).unlink()
    index = await scan(store, "c/app.db")
    with pytest.raises(RestoreError, match=r"gap: TXIDs 0000000000000003\.\.0000000000000003 are missing"):
        plan_restore(index)
    out = tmp_path / "out.db"
    url = f"file://{tmp_path / 'store' / 'c' / 'app.db'}"
    assert await asyncio.to_thread(main, ["restore", "-o", str(out), url]) == 1
    assert not out.exists()
    assert plan_restore(index, txid=2)[-1].max_txid == 2  # what precedes the gap still restores


async def test_closing_flushes_every_database_even_when_one_fails(tmp_path: Path) -> None:
    """A database whose flush the store refuses keeps only its own uploads out of the store at close, not others'."""
    store = open_storage(f"file://{tmp_path / 'store'}")
    now = [T0]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    histories = {name: History(tmp_path / name, seed=i) for i, name in enumerate(("a.db", "b.db"))}
    for name, h in histories.items():
        h.write()
        await engine.write_tx("c", name, h.commit(int(now[0] * 1000)))
    # An object already at a.db's next L0 key (a late write of a previous owner): its flush is refused.
    await store.put_bytes(store.layout.ltx_key("c/a.db", 0, 1, 1), b"not ours")
    await engine.close()
    assert engine.hwm("c", "a.db") == 0
    assert engine.hwm("c", "b.db") == 1 and engine.status("c", "b.db").pending_files == 0
    for h in histories.values():
        h.close()


async def test_a_cluster_named_log_keeps_its_uploads_over_a_start_while_the_store_is_down(
        proxied: tuple[S3Storage, FaultProxy], history: History, tmp_path: Path) -> None:
    """Cluster `log`'s cached indexes sit beside the upload log's segments: they are read at a start while the store
    is down like any other cluster's, so its acknowledged uploads still continue them."""
    store, proxy = proxied
    now = [T0]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    history.write()
    await engine.write_tx("log", "app.db", history.commit(int(now[0] * 1000)))
    await engine.flush("log", "app.db")
    await engine.close()  # the index cache holds file 1
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    history.write()
    await engine.write_tx("log", "app.db", history.commit(int(now[0] * 1000)))  # acknowledged, not stored
    engine.abandon()
    proxy.faults.down = True
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    assert engine.pos("log", "app.db") == history.pos
    proxy.faults.down = False
    now[0] += 3600
    await engine.tick()
    assert engine.hwm("log", "app.db") == 2
    await engine.close()
