"""One writer per cluster, by a lease in the store: taken, renewed, expired, taken over, fenced."""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from sidecar.engine import Engine, Levels
from sidecar.engine.builder import compact_inputs
from sidecar.engine.lease import LeaseDoc, Leases, NotOwner, lease_key
from sidecar.errors import PosMismatch
from sidecar.ltx import Version
from sidecar.storage import open_storage
from sidecar.storage.base import ObjectInfo, Storage
from sidecar.storage.file import FileStorage
from tests.daemon.conftest import eventually
from tests.engine.history import History
from tests.faults import FaultProxy
from tests.s3server import MotoServer

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def open_engine(root: Path, name: str, clock: Clock, l0: float = 3600) -> Engine:
    return await Engine.open(open_storage(f"file://{root / 'store'}"), root / name, Levels(l0_interval=l0),
                             clock=clock)


async def upload(engine: Engine, history: History, clock: Clock, n: int = 1) -> None:
    for _ in range(n):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(int(clock.now * 1000)))


class TestOneWriter:
    async def test_a_second_engine_is_refused_and_told_who_writes(self, tmp_path: Path, history: History) -> None:
        clock = Clock()
        a = await open_engine(tmp_path, "a", clock)
        b = await open_engine(tmp_path, "b", clock)
        await upload(a, history, clock)
        with pytest.raises(NotOwner, match=r"cluster 'c' is written by engine \w+ \(.*pid \d+") as err:
            await b.write_tx("c", "app.db", history.commit(int(clock.now * 1000)))
        assert err.value.holder is not None and err.value.holder.owner == a.leases.owner
        assert b.positions("c") == {}  # nothing accepted
        await a.close()
        await b.close()

    async def test_a_state_refused_for_another_writers_cluster_leaves_no_database(self, tmp_path: Path,
                                                                                   history: History) -> None:
        """An operator's restore, upload or clone into a cluster another engine writes is refused, and this engine
        lists no database for it (it would show, empty, in its operator list and dashboard)."""
        clock = Clock()
        a = await open_engine(tmp_path, "a", clock)
        b = await open_engine(tmp_path, "b", clock)
        await upload(a, history, clock)
        with pytest.raises(NotOwner):
            await b.write_state("c", "copy.db", history.path)
        assert not b.exists("c", "copy.db") and b.databases("c") == []
        await a.close()
        await b.close()

    async def test_release_hands_over_with_everything_stored(self, tmp_path: Path, history: History) -> None:
        clock = Clock()
        a = await open_engine(tmp_path, "a", clock)
        b = await open_engine(tmp_path, "b", clock)
        await upload(a, history, clock, 3)
        await a.release("c")  # flushes what is pending, then lets go
        await upload(b, history, clock, 2)  # b takes over: it reads the store first, so it continues at 3
        assert b.pos("c", "app.db") == history.pos
        await b.flush("c", "app.db")
        result = await b.restore_to("c", "app.db", tmp_path / "out.db")
        assert result.checksum == history.pos.post_apply_checksum
        await a.close()
        await b.close()

    async def test_an_expired_owner_is_fenced_and_its_unstored_uploads_come_back_from_the_client(
            self, tmp_path: Path, history: History) -> None:
        """a stops renewing (paused); past its TTL b takes over; a can write nothing, and what a acknowledged
        without storing is sent again by the client, which finds b's position."""
        clock = Clock()
        a = await open_engine(tmp_path, "a", clock)
        b = await open_engine(tmp_path, "b", clock)
        await upload(a, history, clock, 2)
        await a.flush("c", "app.db")
        stored = history.pos
        await upload(a, history, clock, 2)  # acknowledged by a, not yet stored
        clock.now += a.leases.ttl + a.leases.skew + 1  # a was paused past its lease
        assert not a.owns("c")  # a's own clock says so: it writes nothing more
        history.write()
        late = history.commit(int(clock.now * 1000))
        with pytest.raises(PosMismatch, match="does not continue"):
            await b.write_tx("c", "app.db", late)  # b takes over from the store, not from what a acknowledged
        assert b.owns("c") and b.pos("c", "app.db") == stored
        with pytest.raises(NotOwner):
            await a.flush("c", "app.db")  # a resumes: fenced
        with pytest.raises(NotOwner):
            await a.write_tx("c", "app.db", late)  # and takes nothing
        await a.close()
        keys = sorted(p.name for p in (tmp_path / "store" / "c" / "app.db" / "ltx" / "0").iterdir())
        assert keys == ["0000000000000001-0000000000000002.ltx"]  # a stored nothing after it lost the lease
        await b.close()

    async def test_an_expired_owner_lets_go_of_what_it_never_stored(self, tmp_path: Path, history: History) -> None:
        """a, paused past its lease while b took over, drops what it acknowledged and never stored (its client sends
        it to b): it no longer counts against a's ceiling for its other clusters, nor holds its upload log."""
        clock = Clock()
        a = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "a", Levels(l0_interval=3600),
                              clock=clock, max_pending_bytes=1)
        b = await open_engine(tmp_path, "b", clock)
        await upload(a, history, clock)  # acknowledged by a, not yet stored
        clock.now += a.leases.ttl + a.leases.skew + 1  # a was paused past its lease
        other = History(tmp_path / "other.db")
        other.write()
        await b.write_tx("c", "app.db", other.commit(int(clock.now * 1000)))  # b takes over
        await a.tick()  # a resumes, and finds the cluster is b's
        assert a.status("c", "app.db").pending_files == 0
        another = History(tmp_path / "another.db")
        another.write()
        await a.write_tx("d", "app.db", another.commit(int(clock.now * 1000)))  # not refused for c's sake
        await a.close()
        await b.close()
        other.close()
        another.close()

    async def test_a_restart_takes_its_own_lease_back_at_once(self, tmp_path: Path, history: History) -> None:
        clock = Clock()
        a = await open_engine(tmp_path, "a", clock)
        await upload(a, history, clock, 2)
        a.abandon()  # crashed while holding the lease
        again = await open_engine(tmp_path, "a", clock)  # same state directory: same owner
        await upload(again, history, clock, 1)
        assert again.pos("c", "app.db") == history.pos
        await again.close()

    async def test_lease_object_says_who_holds_it(self, tmp_path: Path, history: History) -> None:
        clock = Clock()
        a = await open_engine(tmp_path, "a", clock)
        await upload(a, history, clock)
        doc = LeaseDoc.decode((tmp_path / "store" / lease_key("c")).read_bytes())
        assert doc.owner == a.leases.owner and doc.expires == int((T0 + a.leases.ttl) * 1000)
        await a.close()  # let go: the object says it has expired
        doc = LeaseDoc.decode((tmp_path / "store" / lease_key("c")).read_bytes())
        assert doc.expires < T0 * 1000



class TestLettingGo:
    async def test_releasing_a_lease_another_engine_took_says_so(self, tmp_path: Path, history: History) -> None:
        """a was paused past its lease and b took the cluster: a's release changes nothing, and its log says that
        rather than 'lease released' (which an operator reads as a clean hand-over)."""
        clock = Clock()
        a = await open_engine(tmp_path, "a", clock)
        b = await open_engine(tmp_path, "b", clock)
        try:
            await upload(a, history, clock)
            await a.flush("c", "app.db")
            clock.now += a.leases.ttl + a.leases.skew + 1
            await upload(b, history, clock)  # b takes over
            with structlog.testing.capture_logs() as logs:
                await a.leases.release("c")
            assert [e["event"] for e in logs] == ["lease already taken by another engine; nothing to release"]
            assert logs[0]["holder"] == b.leases.owner and b.leases.holds("c")
        finally:
            await a.close()
            await b.close()


class TestAReader:
    async def test_a_readers_refresh_follows_the_writer_without_a_warning(self, tmp_path: Path,
                                                                         history: History) -> None:
        """A replica's engine reads what the primary's writes: a changed index is the news it asked for, not a
        cache found wrong (a warning every position poll, per database, was noise in every replica's log)."""
        clock = Clock()
        a = await open_engine(tmp_path, "a", clock)
        b = await open_engine(tmp_path, "b", clock)
        try:
            for _ in range(3):
                await upload(a, history, clock)
                await a.flush("c", "app.db")
                with structlog.testing.capture_logs() as logs:
                    await b.refresh("c", "app.db")
                assert b.hwm("c", "app.db") == a.hwm("c", "app.db") == history.pos.txid
                assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
        finally:
            await a.close()
            await b.close()


class TestOneStateDirectoryTwoRuns:
    """`owner` is the state directory's id, the same across restarts (which take their leases back at once); each run
    of a process is told apart by its lease's `run`."""

    async def test_engines_on_copies_of_one_state_directory_stop_taking_the_lease_from_each_other(
            self, tmp_path: Path, history: History) -> None:
        """A volume fork: b runs on a copy of a's state directory, so both have a's owner id. A client offers
        uploads to both (and goes to the other when refused). Once a has lost the lease to b, it knows b for a
        live copy, says so, and leaves the cluster to b: the lease stops changing hands, and whatever either engine
        acknowledged as stored (its HWM) is in the store."""
        clock = Clock()
        txs: list[bytes] = []  # the client's transactions; txs[t - 1] is TXID t

        async def send(engine: Engine) -> int | None:
            """The client sends what the engine lacks of its transactions (from the position it is told); the HWM
            answered, or None if refused."""
            for _ in range(3):
                try:
                    hwm = 0
                    for tx in txs[engine.pos("c", "app.db").txid:]:
                        hwm = await engine.write_tx("c", "app.db", tx)
                    return hwm
                except PosMismatch:
                    continue  # the engine's position changed (it read the store): again from there
                except NotOwner:
                    return None
            return None

        a = await open_engine(tmp_path, "a", clock, l0=0)
        for _ in range(2):
            history.write()
            txs.append(history.commit(int(clock.now * 1000)))
            await send(a)
        await a.close()
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        a = await open_engine(tmp_path, "a", clock, l0=0)
        b = await open_engine(tmp_path, "b", clock, l0=0)
        assert a.leases.owner == b.leases.owner and a.leases.run != b.leases.run

        acked: set[int] = set()  # HWMs answered
        holders: list[str] = []  # the lease's run after each upload
        with structlog.testing.capture_logs() as logs:
            for _ in range(12):  # four lease TTLs
                clock.now += a.leases.ttl / 3  # a renewal period
                for engine, other in ((a, b), (b, a)):
                    history.write()
                    txs.append(history.commit(int(clock.now * 1000)))
                    hwm = await send(engine)
                    if hwm is None:
                        hwm = await send(other)
                    if hwm is not None:
                        acked.add(hwm)
                    for _ in range(5):  # let background renewals run
                        await asyncio.sleep(0)
                    holders.append(LeaseDoc.decode((tmp_path / "store" / lease_key("c")).read_bytes()).run)
        assert set(holders[-20:]) == {b.leases.run}  # b has kept it since it took it, renewal after renewal
        twins = [e for e in logs if e["log_level"] == "error" and "copied state directory" in e["event"]]
        assert len(twins) == 1 and twins[0]["owner"] == a.leases.owner and twins[0]["twin_run"] == b.leases.run
        with pytest.raises(NotOwner):
            await a.write_tx("c", "app.db", txs[-1])  # while b holds it, a takes nothing
        await a.close()
        await b.close()

        reader = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "reader", clock=clock)
        for t in sorted(acked):
            got = await reader.restore_to("c", "app.db", tmp_path / f"out-{t}.db", txid=t)
            assert got.checksum == history.checksums[t], t
        assert max(acked) == len(txs)
        await reader.close()

    async def test_a_restart_after_a_crash_takes_its_lease_at_once_and_reconciles(self, tmp_path: Path,
                                                                                 history: History) -> None:
        """A new run of a crashed engine's state directory takes the lease back without waiting for it to expire,
        but as a takeover: it reads the store again, so a file that landed after it started (its previous run's
        late flush, or a copy's) is in its index before it takes an upload."""
        clock = Clock()
        store = open_storage(f"file://{tmp_path / 'store'}")
        a = await open_engine(tmp_path, "a", clock)
        await upload(a, history, clock, 2)
        await a.flush("c", "app.db")
        epoch = LeaseDoc.decode((tmp_path / "store" / lease_key("c")).read_bytes()).epoch
        a.abandon()  # crashed while holding the lease

        again = await open_engine(tmp_path, "a", clock)  # same state directory, same owner, another run
        assert again.leases.owner == a.leases.owner
        history.write()
        tx3 = history.commit(int(clock.now * 1000))
        late = io.BytesIO()
        compact_inputs([tx3], late, Version.V2)  # stored as an engine stores it
        await store.put_bytes("c/app.db/ltx/0/0000000000000003-0000000000000003.ltx", late.getvalue(),
                              if_none_match=True)
        await upload(again, history, clock)  # TXID 4: taken at once (the clock has not moved), after a reconcile
        assert again.owns("c") and again.pos("c", "app.db") == history.pos
        assert sorted((e.min_txid, e.max_txid) for e in again.index("c", "app.db").level(0)) == [(1, 2), (3, 3)]
        doc = LeaseDoc.decode((tmp_path / "store" / lease_key("c")).read_bytes())
        assert doc.run == again.leases.run and doc.epoch == epoch + 1
        await again.flush("c", "app.db")
        got = await again.restore_to("c", "app.db", tmp_path / "out.db")
        assert got.checksum == history.pos.post_apply_checksum
        await again.close()


async def test_no_write_replaces_another_writers_object(tmp_path: Path, history: History) -> None:
    """Even a writer that believes it holds the lease cannot replace a stored file: L0 keys are written once."""
    clock = Clock()
    store = open_storage(f"file://{tmp_path / 'store'}")
    a = await Engine.open(store, tmp_path / "a", Levels(l0_interval=3600), clock=clock)
    await upload(a, history, clock, 2)
    key = "c/app.db/ltx/0/0000000000000001-0000000000000002.ltx"
    await store.put_bytes(key, b"another writer's file", if_none_match=True)
    await a.tick(clock.now + 3700)  # the flush finds the key taken: refused, and the index is rebuilt from the store
    assert (tmp_path / "store" / key).read_bytes() == b"another writer's file"
    assert a.status("c", "app.db").failing
    await a.close()


async def test_a_late_write_of_an_expired_owner_is_swept(tmp_path: Path, history: History) -> None:
    """a is paused mid-PUT past its lease; b takes over and goes on; then a's PUT lands (S3 has no fencing token, and
    its key is not b's). b's sweep deletes it: the store holds one history again, with no overlap."""
    clock = Clock()
    store = open_storage(f"file://{tmp_path / 'store'}")
    a = await Engine.open(store, tmp_path / "a", Levels(l0_interval=3600), clock=clock)
    b = await open_engine(tmp_path, "b", clock)
    await upload(a, history, clock, 2)
    await a.flush("c", "app.db")
    history.write()
    tx3 = history.commit(int(clock.now * 1000))
    await a.write_tx("c", "app.db", tx3)  # acknowledged by a; its flush is the PUT that will land late
    clock.now += a.leases.ttl + a.leases.skew + 1
    await b.write_tx("c", "app.db", tx3)  # the client sends it again, to b, which takes over at TXID 2
    await upload(b, history, clock)
    await b.flush("c", "app.db")
    late = "c/app.db/ltx/0/0000000000000003-0000000000000003.ltx"
    await store.put_bytes(late, tx3, if_none_match=True)  # a's PUT lands now
    keys = sorted(p.name for p in (tmp_path / "store" / "c" / "app.db" / "ltx" / "0").iterdir())
    assert keys == ["0000000000000001-0000000000000002.ltx", "0000000000000003-0000000000000003.ltx",
                    "0000000000000003-0000000000000004.ltx"]

    await b.tick(clock.now + 1)  # a sweep comes twice the lease TTL after the takeover
    assert (tmp_path / "store" / late).exists() and b.strays_deleted == 0
    await b.release("c")  # idle: let go
    await b.tick(clock.now + 2 * b.leases.ttl + 1)  # due, but a sweep never takes a lease by itself
    assert (tmp_path / "store" / late).exists() and b.strays_deleted == 0 and not b.owns("c")
    await upload(b, history, clock)  # busy again: b takes its lease back
    await b.tick(clock.now + 2 * b.leases.ttl + 1)
    assert not (tmp_path / "store" / late).exists() and b.strays_deleted == 1
    assert b.status("c", "app.db").failing == {}
    await b.close()  # flushes TXID 5
    await a.close()

    reader = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "reader", clock=clock)
    spans = sorted((e.min_txid, e.max_txid) for e in reader.index("c", "app.db").level(0))
    assert spans == [(1, 2), (3, 4), (5, 5)]
    got = await reader.restore_to("c", "app.db", tmp_path / "out.db")
    assert got.checksum == history.pos.post_apply_checksum
    await reader.close()


async def test_a_late_write_at_the_key_of_the_new_owners_flush_is_swept_not_adopted(tmp_path: Path,
                                                                                   history: History) -> None:
    """a's late PUT lands at the very key b's next flush needs, with a's history (the primary failed over meanwhile):
    b's flush is refused, and b rebuilds from the store without it, so b's own acknowledged history is stored."""
    clock = Clock()
    store = open_storage(f"file://{tmp_path / 'store'}")
    a = await Engine.open(store, tmp_path / "a", Levels(l0_interval=3600), clock=clock)
    b = await open_engine(tmp_path, "b", clock, l0=1)
    await upload(a, history, clock, 2)
    await a.flush("c", "app.db")
    shutil.copy(history.path, tmp_path / "new-primary.db")  # the new primary, at TXID 2 too
    primary = History(tmp_path / "new-primary.db", seed=99)
    primary.pages, primary.pos = dict(history.pages), history.pos
    history.write()
    old_tx3 = history.commit(int(clock.now * 1000))
    await a.write_tx("c", "app.db", old_tx3)  # acknowledged by a; its flush is the PUT that will land late
    clock.now += a.leases.ttl + a.leases.skew + 1
    primary.write()
    new_tx3 = primary.commit(int(clock.now * 1000))
    await b.write_tx("c", "app.db", new_tx3)  # b takes over at TXID 2 and acknowledges the new primary's TXID 3
    late = io.BytesIO()
    compact_inputs([old_tx3], late, Version.V2)
    await store.put_bytes("c/app.db/ltx/0/0000000000000003-0000000000000003.ltx", late.getvalue(),
                          if_none_match=True)  # a's PUT lands now, at the key of b's next flush
    for k in range(1, 8):  # well before b's first sweep (twice the lease TTL after the takeover)
        await b.tick(clock.now + k)  # the flush is refused; the next tick rebuilds from the store; then flushes
    assert b.pos("c", "app.db") == primary.pos and b.hwm("c", "app.db") == 3
    got = await b.restore_to("c", "app.db", tmp_path / "out.db")
    assert got.checksum == primary.pos.post_apply_checksum
    await b.close()
    await a.close()
    primary.close()


async def test_an_engine_that_took_over_from_nobody_does_not_sweep(tmp_path: Path, history: History) -> None:
    """Sweeps cost a LIST per database: only a takeover from another engine can leave a late write behind."""
    clock = Clock()
    store = open_storage(f"file://{tmp_path / 'store'}")
    a = await Engine.open(store, tmp_path / "a", Levels(l0_interval=3600), clock=clock)
    await upload(a, history, clock, 2)
    await a.flush("c", "app.db")
    other = "c/app.db/ltx/0/0000000000000001-0000000000000001.ltx"
    await store.put_bytes(other, b"not ours", if_none_match=True)
    await a.tick(clock.now + 10 * a.leases.ttl)
    assert (tmp_path / "store" / other).exists() and a.strays_deleted == 0
    await a.close()


async def test_the_sweeps_after_a_takeover_end(tmp_path: Path, history: History) -> None:
    """Every restart is a takeover, so its sweeps (a LIST per database each) must end: at doubling gaps from twice
    the lease TTL up to `l1_interval`, the sweep at that gap the last, however long the cluster stays busy."""
    clock = Clock()
    a = await open_engine(tmp_path, "a", clock)
    await upload(a, history, clock, 2)
    await a.flush("c", "app.db")
    a.abandon()  # crashed while holding the lease
    sweeps: list[float] = []

    class Counting(FileStorage):
        async def list(self, prefix: str = "") -> list[ObjectInfo]:
            if prefix == "c/app.db/":
                sweeps.append(clock.now)
            return await super().list(prefix)

    again = await Engine.open(Counting(tmp_path / "store"), tmp_path / "a", Levels(l0_interval=3600), clock=clock)
    await upload(again, history, clock)  # the restart's takeover (and its reconcile)
    start, l1 = clock.now, again.levels.l1_interval
    sweeps.clear()
    while clock.now < start + 10 * l1:  # busy throughout: a write every 10 s keeps the lease
        clock.now += 10
        await upload(again, history, clock)
        await again.tick(clock.now)
    assert sweeps and max(sweeps) < start + 3 * l1
    assert all(b - a <= l1 + 10 for a, b in zip([start, *sweeps], sweeps, strict=False))
    await again.close()


async def test_on_s3_a_flush_delivered_after_a_takeover_is_swept(moto_server: MotoServer, tmp_path: Path,
                                                                 history: History) -> None:
    """The same on S3, the late PUT made by the expired engine's own flush: the network delivers it, whole, after
    another engine took the cluster over and stored the same transaction in a file of its own."""
    clock = Clock()
    bucket = moto_server.create_bucket()
    proxy = FaultProxy(moto_server.url)
    via = await proxy.start()
    a_store = open_storage(f"s3://{bucket}", endpoint_url=via, force_path_style=True)
    b_store = open_storage(f"s3://{bucket}", endpoint_url=moto_server.url, force_path_style=True)
    a = await Engine.open(a_store, tmp_path / "a", Levels(l0_interval=3600), clock=clock)
    b = await Engine.open(b_store, tmp_path / "b", Levels(l0_interval=3600), clock=clock)
    try:
        await upload(a, history, clock, 2)
        await a.flush("c", "app.db")
        history.write()
        tx3 = history.commit(int(clock.now * 1000))
        await a.write_tx("c", "app.db", tx3)
        proxy.faults.hold_puts = "/c/app.db/0000/"
        flushing = asyncio.create_task(a.flush("c", "app.db"))
        await eventually(lambda: proxy.faults.held == 1, within=10)
        clock.now += a.leases.ttl + a.leases.skew + 1  # a is paused mid-PUT past its lease
        await b.write_tx("c", "app.db", tx3)
        await upload(b, history, clock)
        await b.flush("c", "app.db")
        proxy.faults.release.set()
        with contextlib.suppress(Exception):
            await flushing
        spans = sorted(key.rsplit("/", 1)[1] for key in [o.key for o in await b_store.list("c/app.db/0000/")])
        assert spans == ["0000000000000001-0000000000000002.ltx", "0000000000000003-0000000000000003.ltx",
                         "0000000000000003-0000000000000004.ltx"]  # the late PUT landed beside b's file

        await b.tick(clock.now + 2 * b.leases.ttl + 1)
        assert b.strays_deleted == 1
        reader = await Engine.open(b_store, tmp_path / "reader", clock=clock)
        assert sorted((e.min_txid, e.max_txid) for e in reader.index("c", "app.db").level(0)) == [(1, 2), (3, 4)]
        got = await reader.restore_to("c", "app.db", tmp_path / "out.db")
        assert got.checksum == history.pos.post_apply_checksum
        await reader.close()
    finally:
        await b.close()
        await a.close()
        await a_store.close()
        await b_store.close()
        await proxy.stop()


class SlowReads:
    """A real store whose reads of a job's inputs take `seconds` (a large database's files)."""

    def __init__(self, inner: Storage, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def local_files(self, keys: Sequence[str], tmpdir: Path) -> list[Path]:
        await asyncio.sleep(self.seconds)
        return await self.inner.local_files(keys, tmpdir)


async def test_a_compaction_longer_than_the_lease_ttl_keeps_the_lease(tmp_path: Path, history: History) -> None:
    """An idle cluster whose compaction reads its inputs for longer than the lease TTL: the lease is kept (renewed)
    while the job runs, not let go as idle under it, so the compaction is stored."""
    store = SlowReads(open_storage(f"file://{tmp_path / 'store'}"), seconds=1.5)
    leases = Leases(store, ttl=0.6, skew=0.1)  # type: ignore[arg-type]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), leases=leases)  # type: ignore[arg-type]
    for _ in range(2):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(int(time.time() * 1000)))
    stop = asyncio.Event()
    running = asyncio.create_task(engine.run(stop, period=0.1))
    try:
        await eventually(lambda: engine.index("c", "app.db").newest(1) is not None, within=20)
    finally:
        stop.set()
        await running
        await engine.close()


class SlowWrites:
    """A real store whose writes of L1 files take `seconds` (a large compaction's upload)."""

    def __init__(self, inner: Storage, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put_file(self, key: str, path: Path, **kwargs: Any) -> str:
        if "/ltx/1/" in key:
            await asyncio.sleep(self.seconds)
        return await self.inner.put_file(key, path, **kwargs)


async def test_a_write_longer_than_the_lease_ttl_ends_while_the_lease_is_renewed(tmp_path: Path,
                                                                                history: History) -> None:
    """A write may take longer than the lease's TTL as long as the lease is renewed meanwhile: it is bounded by
    the lease as renewed, not as it was when the write started."""
    store = SlowWrites(open_storage(f"file://{tmp_path / 'store'}"), seconds=1.5)
    leases = Leases(store, ttl=0.6, skew=0.1)  # type: ignore[arg-type]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), leases=leases)  # type: ignore[arg-type]
    for _ in range(2):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(int(time.time() * 1000)))
    stop = asyncio.Event()
    running = asyncio.create_task(engine.run(stop, period=0.1))
    try:
        await eventually(lambda: engine.index("c", "app.db").newest(1) is not None, within=20)
    finally:
        stop.set()
        await running
        await engine.close()
