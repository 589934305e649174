"""The engine on a local store: acceptance rules, durability, HWM, levels, retention, restore, restart."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.engine import Engine, Levels, plan_restore
from sidecar.engine.flush import phase
from sidecar.errors import PosMismatch, SidecarError
from sidecar.ltx import LTXError, Pos
from sidecar.ltx.sqlite import encode_db
from sidecar.storage import open_storage
from sidecar.storage.base import SNAPSHOT_LEVEL
from tests.engine.history import History

MIN, HOUR = 60.0, 3600.0
T0 = 1_790_000_000.0  # a fixed epoch second, aligned to nothing in particular


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def open_engine(tmp: Path, clock: Clock, levels: Levels | None = None) -> Engine:
    storage = open_storage(f"file://{tmp / 'store'}")
    return await Engine.open(storage, tmp / "state", levels or Levels(), clock=clock)


async def test_accepts_snapshot_then_contiguous_and_refuses_the_rest(tmp_path: Path, history: History) -> None:
    clock = Clock()
    engine = await open_engine(tmp_path, clock)
    history.write()
    first = history.commit(1000)
    assert await engine.write_tx("c", "app.db", first) == 0  # durable on this host, not yet in the store
    assert engine.pos("c", "app.db") == history.pos
    history.write()
    second = history.commit(2000)
    history.write()
    third = history.commit(3000)
    with pytest.raises(PosMismatch) as err:
        await engine.write_tx("c", "app.db", third)  # skips TXID 2
    assert err.value.pos == Pos(1, history.checksums[1])
    corrupt = bytearray(second)
    corrupt[-20] ^= 1
    with pytest.raises(LTXError, match=r"c/app\.db"):
        await engine.write_tx("c", "app.db", bytes(corrupt))
    with pytest.raises(LTXError):
        await engine.write_tx("c", "app.db", second[: len(second) // 2])
    assert engine.pos("c", "app.db").txid == 1
    await engine.write_tx("c", "app.db", second)
    await engine.write_tx("c", "app.db", third)
    with pytest.raises(PosMismatch):
        await engine.write_tx("c", "app.db", third)  # a replay
    with pytest.raises(PosMismatch, match=r"not ahead"):
        await engine.write_tx("c", "app.db", first)  # a snapshot behind the position
    assert engine.pos("c", "app.db") == history.pos
    assert engine.status("c", "app.db").pending_files == 3
    # Acknowledged means durable: after a crash (nothing flushed), the next engine on the same state replays the
    # three uploads from the upload log, and nothing rejected. While the first holds the state, none may open it.
    with pytest.raises(SidecarError, match="in use by another engine"):
        await open_engine(tmp_path, clock)
    engine.abandon()
    again = await open_engine(tmp_path, clock)
    assert again.pos("c", "app.db") == history.pos
    assert again.status("c", "app.db").pending_files == 3
    await again.flush("c", "app.db")
    assert again.hwm("c", "app.db") == 3


async def test_hwm_follows_flushes_and_survives_restart(tmp_path: Path, history: History) -> None:
    # app.db flushes at its own phase of the 10 s L0 interval: start 9.5 s before one of its points.
    due = phase("c/app.db", 10.0) + 10.0 * 179_000_000
    clock = Clock(due - 9.5)
    engine = await open_engine(tmp_path, clock)
    for _ in range(3):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(int(clock.now * 1000)))
        clock.now += 3
    assert engine.hwm("c", "app.db") == 0
    clock.now = due - 0.01
    await engine.tick()  # the oldest upload is 9.49 s old, its point not reached: not yet due
    assert engine.hwm("c", "app.db") == 0
    clock.now = due
    await engine.tick()
    assert engine.hwm("c", "app.db") == 3
    history.write()
    await engine.write_tx("c", "app.db", history.commit(int(clock.now * 1000)))
    # A crash now: the 4th upload is acknowledged but not flushed; a new engine finds it.
    engine.abandon()
    engine2 = await open_engine(tmp_path, clock)
    assert engine2.pos("c", "app.db") == history.pos
    assert engine2.hwm("c", "app.db") == 3
    await engine2.close()
    assert engine2.hwm("c", "app.db") == 4
    # Losing the state directory loses nothing that was flushed: the index is rebuilt from the store.
    shutil.rmtree(tmp_path / "state")
    engine3 = await open_engine(tmp_path, clock)
    assert engine3.pos("c", "app.db") == history.pos
    assert [(e.level, e.min_txid, e.max_txid) for e in engine3.index("c", "app.db")] == \
        [(e.level, e.min_txid, e.max_txid) for e in engine2.index("c", "app.db")]


async def test_multi_hour_history_restores_at_every_point(tmp_path: Path, history: History) -> None:
    """Two and a half hours of writes: every L0 point restores exactly; after compaction and retention,
    every retained point still does, and `verify` passes."""
    clock = Clock(T0)
    levels = Levels(l0_interval=10, l1_interval=5 * MIN, l2_interval=30 * MIN, snapshot_interval=HOUR,
                    l0_retention=40 * MIN, l1_retention=90 * MIN, l2_retention=90 * MIN,
                    snapshot_retention=90 * MIN)
    engine = await open_engine(tmp_path, clock, levels)
    end = T0 + 2.5 * HOUR
    while clock.now < end:
        history.write(n=3, at=int(clock.now))
        await engine.write_tx("c", "app.db", history.commit(int(clock.now * 1000)))
        clock.now += 13
        await engine.tick()
    await engine.close()
    idx = engine.index("c", "app.db")
    levels_seen = {e.level for e in idx}
    assert levels_seen == {0, 1, 2, SNAPSHOT_LEVEL}
    assert engine.hwm("c", "app.db") == history.pos.txid
    # Retention ran: the oldest L0 files are gone, snapshots older than the window too.
    assert min(e.timestamp for e in idx.level(0)) >= (clock.now - 40 * MIN - 60) * 1000
    points = engine.restore_points("c", "app.db")
    assert len(points) > 100
    oldest = points[0]
    for txid, ts, _level in points:
        out = tmp_path / "r.db"
        result = await engine.restore_to("c", "app.db", out, txid=txid)
        assert result.checksum == history.checksums[txid] and result.verified
        assert result.timestamp == ts
        out.unlink()
    # A time between two points restores the earlier one; a time after the newest, the newest.
    txid, ts, _ = points[len(points) // 2]
    result = await engine.restore_to("c", "app.db", tmp_path / "t.db", timestamp=ts + 1)
    assert result.txid == txid
    result = await engine.restore_to("c", "app.db", tmp_path / "t.db", timestamp=int(clock.now * 1000) + 10**7,
                                     integrity_check=True)
    assert result.txid == history.pos.txid
    con = sqlite3.connect(tmp_path / "t.db")
    live = sqlite3.connect(history.path)
    assert con.execute("SELECT count(*), sum(length(body)) FROM events").fetchone() == \
        live.execute("SELECT count(*), sum(length(body)) FROM events").fetchone()
    con.close()
    live.close()
    # Every retained restore point is reachable from a retained snapshot; older ones are refused.
    assert plan_restore(idx, txid=oldest[0])[0].is_snapshot
    from sidecar.errors import RestoreError
    with pytest.raises(RestoreError):
        await engine.restore_to("c", "app.db", tmp_path / "never.db", timestamp=int(T0 * 1000) - 1)
    assert not (tmp_path / "never.db").exists()
    assert await asyncio.to_thread(main, ["verify", f"file://{tmp_path / 'store' / 'c' / 'app.db'}"]) == 0


async def test_idle_database_costs_no_store_requests(tmp_path: Path, history: History) -> None:
    clock = Clock()
    engine = await open_engine(tmp_path, clock, Levels(l0_interval=10))
    history.write()
    await engine.write_tx("c", "app.db", history.commit(1))
    clock.now += 3 * HOUR
    await engine.tick()
    store = tmp_path / "store"
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    for _ in range(50):
        clock.now += 2 * HOUR
        await engine.tick()
    after = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    assert before == after


async def test_litestream_restores_our_store(tmp_path: Path, history: History) -> None:
    """The real litestream restore reads our file store and gets our bytes, at latest and at a time."""
    import subprocess
    clock = Clock()
    engine = await open_engine(tmp_path, clock, Levels(l0_interval=10))
    for _ in range(40):
        history.write(n=4)
        await engine.write_tx("c", "app.db", history.commit(int(clock.now * 1000)))
        clock.now += 7
        await engine.tick()
    await engine.close()
    url = f"file://{tmp_path / 'store' / 'c' / 'app.db'}"
    points = engine.restore_points("c", "app.db")
    _, ts, _ = points[len(points) // 2]
    from datetime import UTC, datetime
    # Litestream takes files strictly before the time; ours include a transaction committed at it.
    at = datetime.fromtimestamp((ts + 1) / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    for args, target in (([], {}), (["-timestamp", at], {"timestamp": ts})):
        ours = tmp_path / "ours.db"
        theirs = tmp_path / "theirs.db"
        await engine.restore_to("c", "app.db", ours, **target)
        proc = await asyncio.to_thread(subprocess.run, ["litestream", "restore", *args, "-o", str(theirs), url],
                                       capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert ours.read_bytes() == theirs.read_bytes()
        os.unlink(ours)
        os.unlink(theirs)


async def test_a_state_from_before_a_page_size_change_restores_in_place(tmp_path: Path, history: History) -> None:
    """An operator restore (write_state) of a point before a VACUUM that changed the page size appends it as the new
    head, as a snapshot (an incremental file cannot change the page size); the history before it stays restorable."""
    clock = Clock()
    engine = await open_engine(tmp_path, clock, Levels(l0_interval=0))
    for _ in range(3):
        history.write()
        clock.now += 10
        await engine.write_tx("c", "app.db", history.commit(int(clock.now * 1000)))
    history.con.execute("PRAGMA page_size=8192")
    history.con.execute("VACUUM")
    history.page_size, history.pages = 8192, {}
    history.write()
    clock.now += 10
    history.commit(int(clock.now * 1000))  # TXID 4's checksum; LiteFS ships a new page size as a snapshot
    snapshot = io.BytesIO()
    with open(history.path, "rb") as f:
        encode_db(f, snapshot, compress=True, txid=4, timestamp=int(clock.now * 1000))
    await engine.write_tx("c", "app.db", snapshot.getvalue())
    assert engine.pos("c", "app.db") == history.pos
    old = await engine.restore_to("c", "app.db", tmp_path / "old.db", txid=2)
    assert old.page_size == 4096
    pos = await engine.write_state("c", "app.db", tmp_path / "old.db")
    assert pos.txid == 5 and engine.hwm("c", "app.db") == 5
    head = await engine.restore_to("c", "app.db", tmp_path / "head.db")
    assert (head.txid, head.checksum, head.page_size) == (5, history.checksums[2], 4096)
    before = await engine.restore_to("c", "app.db", tmp_path / "before.db", txid=4)
    assert (before.checksum, before.page_size) == (history.checksums[4], 8192)
    await engine.close()
