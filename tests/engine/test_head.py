"""The head object: its JSON round-trips, and its fast planner answers exactly as `plan_restore`."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.engine import Engine, Levels, head
from sidecar.engine.head import Head
from sidecar.engine.index import DbIndex, FileEntry
from sidecar.engine.restore import plan_restore
from sidecar.errors import NotFound, RestoreError
from sidecar.storage import open_storage
from tests.engine.history import History


def entry(level: int, lo: int, hi: int, **kw: int) -> FileEntry:
    return FileEntry(level, lo, hi, kw.get("timestamp", hi * 1000), kw.get("size", 100), kw.get("commit", 5),
                     4096, kw.get("pre", 0), kw.get("post", (1 << 63) | hi))


@st.composite
def indexes(draw: st.DrawFn) -> list[FileEntry]:
    """A database's files as the engine leaves them: L0 runs, L1/L2 unions of them, snapshots, holes."""
    n = draw(st.integers(1, 60))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    bounds = list(zip([0, *cuts], [*cuts, n], strict=True))
    files = [entry(0, lo + 1, hi) for lo, hi in bounds]
    for level in (1, 2):
        i = 0
        while i < len(bounds):
            k = draw(st.integers(1, 4))
            if draw(st.booleans()):
                files.append(entry(level, bounds[i][0] + 1, bounds[min(i + k, len(bounds)) - 1][1]))
            i += k
    for hi in draw(st.sets(st.sampled_from([b[1] for b in bounds]), max_size=4)):
        files.append(entry(9, 1, hi))
    dropped = draw(st.sets(st.integers(0, len(files) - 1), max_size=len(files) // 3))
    return [f for i, f in enumerate(files) if i not in dropped]


def outcome(fn, *args, **kw):  # type: ignore[no-untyped-def]
    try:
        return fn(*args, **kw)
    except RestoreError as err:
        return str(err)


class TestPlan:
    @settings(max_examples=400, deadline=None)
    @given(indexes(), st.data())
    def test_same_answer_as_plan_restore(self, files: list[FileEntry], data: st.DataObject) -> None:
        """At latest, at any TXID and any time: the same files, or the same error message."""
        top = max(f.max_txid for f in files)
        target = data.draw(st.sampled_from(["latest", "txid", "timestamp"]))
        kw = {}
        if target == "txid":
            kw["txid"] = data.draw(st.integers(1, top + 2))
        elif target == "timestamp":
            kw["timestamp"] = data.draw(st.integers(0, (top + 2) * 1000))
        assert outcome(head.plan, DbIndex(files), **kw) == outcome(plan_restore, DbIndex(files), **kw)

    @settings(max_examples=200, deadline=None)
    @given(indexes(), st.data())
    def test_plan_after_continues_a_replica(self, files: list[FileEntry], data: st.DataObject) -> None:
        """The files after TXID `after` continue it without a hole and end where the latest plan ends."""
        try:
            latest = plan_restore(files)
        except RestoreError:
            return
        after = data.draw(st.integers(0, latest[-1].max_txid))
        chain = head.plan_after(files, after)
        if after == latest[-1].max_txid:
            assert chain == []
            return
        assert chain[0].min_txid <= after + 1 and chain[-1].max_txid == latest[-1].max_txid
        for prev, cur in itertools.pairwise(chain):
            assert cur.min_txid <= prev.max_txid + 1 < cur.max_txid + 1

    def test_plan_after_a_hole_starts_over_from_a_snapshot(self) -> None:
        files = [entry(9, 1, 10), entry(0, 11, 12), entry(0, 13, 14), entry(9, 1, 16), entry(0, 15, 16)]
        assert [(e.min_txid, e.max_txid) for e in head.plan_after(files, 12)] == [(13, 14), (15, 16)]
        del files[2]
        assert [(e.min_txid, e.max_txid) for e in head.plan_after(files, 12)] == [(1, 16)]


class TestHeadJson:
    def test_round_trip_with_and_without_indexes(self) -> None:
        plan = [entry(9, 1, 10, commit=7), entry(2, 11, 40, pre=(1 << 63) | 10), entry(0, 41, 41, commit=8)]
        h = Head.of_plan(plan)
        assert (h.txid, h.commit, h.timestamp, h.post_apply_checksum) == (41, 8, 41_000, (1 << 63) | 41)
        assert head.decode(head.encode(h)) == h
        with_idx = Head.of_plan(plan, [(100, 20), (300, 9), (50, 3)])
        assert head.decode(head.encode(with_idx)) == with_idx

    def test_latest_of_an_index(self) -> None:
        idx = DbIndex([entry(9, 1, 10), entry(0, 11, 11), entry(0, 12, 14), entry(1, 11, 14)])
        h = head.latest(idx)
        assert h is not None and [(e.level, e.min_txid) for e in h.plan] == [(9, 1), (1, 11)]
        assert head.latest(DbIndex([entry(0, 3, 4)])) is None  # no snapshot: nothing to follow

    @pytest.mark.parametrize(("text", "field"), [
        (b"{", "not JSON"),
        (b'{"version": 2}', "version 2"),
        (b'{"version": 1, "plan": []}', "plan"),
        (b'{"version": 1, "plan": [{"level": 9}]}', r"plan\[0\]\.minTxid"),
    ])
    def test_bad_documents_name_the_field(self, text: bytes, field: str) -> None:
        with pytest.raises(ValueError, match=field):
            head.decode(text)

    def test_a_plan_may_start_after_a_snapshot(self) -> None:
        h = Head.of_plan([entry(0, 11, 12), entry(0, 13, 14)])
        assert head.decode(head.encode(h)) == h

    def test_a_plan_that_does_not_continue_is_refused(self) -> None:
        doc = head.encode(Head.of_plan([entry(9, 1, 10), entry(0, 11, 12)])).replace(b'"000000000000000b"',
                                                                                    b'"000000000000000d"')
        with pytest.raises(ValueError, match=r"plan\[1\]"):
            head.decode(doc)

    def test_a_plan_of_two_histories_is_refused(self) -> None:
        """A file that applies on another state than the one the plan reaches before it (its pre-apply checksum)."""
        doc = head.encode(Head.of_plan([entry(9, 1, 10), entry(0, 11, 12, pre=(1 << 63) | 3)]))
        with pytest.raises(ValueError, match=r"plan\[1\]: preApplyChecksum 8000000000000003 is not the "
                                             r"postApplyChecksum 800000000000000a of plan\[0\]"):
            head.decode(doc)

    def test_keys(self) -> None:
        assert head.head_key("c/app.db") == "c/app.db/head.json" and head.head_key("") == "head.json"


class TestEngineWritesHead:
    async def test_each_store_change_rewrites_the_head_and_wakes_waiters(self, tmp_path: Path,
                                                                          history: History) -> None:
        storage = open_storage(f"file://{tmp_path / 'store'}")
        engine = await Engine.open(storage, tmp_path / "state", Levels(l0_interval=10), clock=lambda: 1_000.0)
        try:
            with pytest.raises(NotFound):
                await storage.get_bytes("c/app.db/head.json")
            woken = asyncio.Event()

            async def waiter() -> None:
                async with engine.stored:
                    await engine.stored.wait()
                woken.set()
            task = asyncio.create_task(waiter())
            await asyncio.sleep(0)
            for _ in range(3):
                history.write()
                await engine.write_tx("c", "app.db", history.commit(1_000))
            assert not woken.is_set()  # accepted, not stored yet
            await engine.flush("c", "app.db")
            await asyncio.wait_for(task, 5)
            stored = head.decode(await storage.get_bytes("c/app.db/head.json"))
            assert stored == head.latest(engine.index("c", "app.db"))
            assert (stored.txid, stored.post_apply_checksum) == (history.pos.txid, history.pos.post_apply_checksum)
            await engine.compact_level("c", "app.db", 1)
            assert head.decode(await storage.get_bytes("c/app.db/head.json")).plan[-1].level == 1
            await engine.delete_database("c", "app.db")
            with pytest.raises(NotFound):
                await storage.get_bytes("c/app.db/head.json")
        finally:
            await engine.close()
            await storage.close()
