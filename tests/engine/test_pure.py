"""Table-driven tests of the engine's pure decisions: restore plans, compaction sources and schedule, retention,
flush order, and encoding a database on top of a position."""

from __future__ import annotations

import io
import itertools
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sidecar.engine import DbIndex, FileEntry, Levels, plan_restore, retention_victims
from sidecar.engine.compaction import SourceGap, due_levels, sources
from sidecar.engine.database import Database, Pending
from sidecar.engine.flush import due, due_at, phase
from sidecar.engine.index import reachable
from sidecar.errors import RestoreError
from sidecar.ltx import Header, Pos, Version
from sidecar.ltx.sqlite import apply_files, database_checksum_of, encode_db

S = 1000  # ms per second
DAY = 86400


def f(level: int, lo: int, hi: int, t: float = 0.0, pre: int = 0, post: int = 0) -> FileEntry:
    """A stored file: level, TXIDs lo..hi, timestamp t seconds."""
    return FileEntry(level, lo, hi, int(t * S), 100, 1, 4096, pre, post)


def sum_at(history: str, txid: int) -> int:
    """The database checksum at `txid` in one of two histories that agree up to TXID 2 (0 before TXID 1)."""
    return 0 if txid < 1 else (0x100 if txid <= 2 or history == "a" else 0x200) + txid


def hf(history: str, level: int, lo: int, hi: int) -> FileEntry:
    """A stored file of `history` ("a": the stored one; "b": another node's, from TXID 3 on) with its checksums."""
    return f(level, lo, hi, pre=0 if lo == 1 else sum_at(history, lo - 1), post=sum_at(history, hi))


# L0 files 1..5 of history a, 3-3 lost, then the other node's 3-3 (its TXID 3 applies on the same TXID 2).
FORKED = [hf("a", 0, 1, 1), hf("a", 0, 2, 2), hf("b", 0, 3, 3), hf("a", 0, 4, 4), hf("a", 0, 5, 5)]


def spans(entries: list[FileEntry]) -> list[tuple[int, int, int]]:
    return [(e.level, e.min_txid, e.max_txid) for e in entries]


class TestPlanRestore:
    """The fewest files from the newest snapshot at or before the target, coarsest first."""

    CASES = [
        # name, files, target kwargs, expected (level, min, max) or an error fragment
        ("snapshot only", [f(9, 1, 10)], {}, [(9, 1, 10)]),
        ("snapshot then L0", [f(9, 1, 10), f(0, 11, 12), f(0, 13, 15)], {}, [(9, 1, 10), (0, 11, 12), (0, 13, 15)]),
        ("coarse level first", [f(9, 1, 10), f(1, 11, 20), f(0, 11, 12), f(0, 13, 20), f(0, 21, 22)], {},
         [(9, 1, 10), (1, 11, 20), (0, 21, 22)]),
        ("txid inside an L1 span uses L0", [f(9, 1, 10), f(1, 11, 20), f(0, 11, 12), f(0, 13, 20)],
         {"txid": 12}, [(9, 1, 10), (0, 11, 12)]),
        ("newest snapshot wins", [f(9, 1, 10), f(0, 11, 20), f(9, 1, 20), f(0, 21, 25)], {},
         [(9, 1, 20), (0, 21, 25)]),
        ("timestamp picks files up to it", [f(9, 1, 10, 0), f(0, 11, 12, 10), f(0, 13, 14, 20)],
         {"timestamp": 15 * S}, [(9, 1, 10), (0, 11, 12)]),
        ("before every snapshot", [f(9, 5, 10, 100)], {"timestamp": 50 * S}, "before every snapshot"),
        ("gap", [f(9, 1, 10), f(0, 11, 12), f(0, 14, 15)], {}, "gap"),
        # Past a lost file, files of another history do not continue the chain: their TXIDs follow, their state not.
        ("another history past a lost file", FORKED, {}, "L0 0000000000000004-0000000000000004 after it applies on "
                                                         "another state"),
        ("up to the end of the chain past a lost file", FORKED, {"txid": 3}, [(0, 1, 1), (0, 2, 2), (0, 3, 3)]),
        ("beyond the end of the chain past a lost file", FORKED, {"txid": 4}, "cannot be restored: the backup's "
                                                                              "chain stops at 0000000000000003"),
        ("an overlapping file of the chain's history goes on", [*FORKED[:3], hf("a", 0, 4, 4), hf("b", 0, 2, 5)],
         {}, [(0, 1, 1), (0, 2, 5)]),
        ("unknown checksums chain as TXIDs do", [f(9, 1, 2, post=5), f(0, 3, 3), f(0, 4, 4, pre=7)], {},
         [(9, 1, 2), (0, 3, 3), (0, 4, 4)]),
        ("nothing", [], {}, "no backup files"),
    ]

    @pytest.mark.parametrize(("name", "files", "target", "want"), CASES, ids=[c[0] for c in CASES])
    def test_plan(self, name: str, files: list[FileEntry], target: dict[str, int],
                  want: list[tuple[int, int, int]] | str) -> None:
        if isinstance(want, str):
            with pytest.raises(RestoreError, match=want):
                plan_restore(DbIndex(files), **target)
        else:
            assert spans(plan_restore(DbIndex(files), **target)) == want


class TestCompactionSources:
    """What a level's next file is built from."""

    CASES = [
        ("nothing below", 1, [], []),
        ("first L1 from L0", 1, [f(0, 1, 3), f(0, 4, 5)], [(0, 1, 3), (0, 4, 5)]),
        ("only what L1 lacks", 1, [f(1, 1, 3), f(0, 1, 3), f(0, 4, 5)], [(0, 4, 5)]),
        ("nothing new", 1, [f(1, 1, 5), f(0, 1, 3), f(0, 4, 5)], []),
        ("a snapshot supersedes", 1, [f(1, 1, 3), f(0, 4, 5), f(0, 1, 8), f(0, 9, 9)], [(0, 1, 8), (0, 9, 9)]),
        ("L2 from L1", 2, [f(1, 1, 3), f(1, 4, 9)], [(1, 1, 3), (1, 4, 9)]),
        ("snapshot from the restore plan", 9, [f(0, 1, 3), f(0, 4, 5)], [(0, 1, 3), (0, 4, 5)]),
        ("snapshot already current", 9, [f(9, 1, 5), f(0, 1, 3), f(0, 4, 5)], []),
        # An import (a snapshot upload) made an L1 file starting at TXID 1: it is L1's newest, though it sorts first.
        ("only what L1 lacks after an import", 1, [f(1, 1, 1), f(1, 2, 5), f(1, 1, 12), f(0, 1, 9), f(0, 10, 12),
                                                   f(0, 13, 13)], [(0, 13, 13)]),
        ("nothing new after an import", 1, [f(1, 1, 1), f(1, 2, 5), f(1, 1, 12), f(0, 1, 9), f(0, 10, 12)], []),
        ("only what L2 lacks after an import", 2, [f(2, 2, 5), f(2, 1, 12), f(1, 1, 12), f(1, 13, 14)],
         [(1, 13, 14)]),
        # A lost L0 file 3-3 filled by the client sending 3..5 again, while 4-4 and 5-5 are still stored: the chain
        # takes the file reaching furthest and leaves out the files it covers, as a restore plan does.
        ("a gap filled by one upload over stored files", 1, [f(0, 1, 1), f(0, 2, 2), f(0, 3, 5), f(0, 4, 4),
                                                            f(0, 5, 5), f(0, 6, 6)],
         [(0, 1, 1), (0, 2, 2), (0, 3, 5), (0, 6, 6)]),
        ("a gap filled one upload at a time over stored files", 1, [f(0, 1, 1), f(0, 2, 2), f(0, 3, 3), f(0, 4, 4),
                                                                   f(0, 4, 5), f(0, 5, 5)],
         [(0, 1, 1), (0, 2, 2), (0, 3, 3), (0, 4, 5)]),
        ("a source file reaching past the level's newest", 1, [f(1, 1, 5), f(0, 5, 6), f(0, 7, 7)],
         [(0, 5, 6), (0, 7, 7)]),
        ("overlapping L1 files into L2", 2, [f(1, 1, 2), f(1, 3, 5), f(1, 5, 6)], [(1, 1, 2), (1, 3, 5), (1, 5, 6)]),
        ("up to a gap", 1, [f(0, 1, 2), f(0, 4, 5)], [(0, 1, 2)]),
        ("up to the end of the chain past a lost file", 1, FORKED, [(0, 1, 1), (0, 2, 2), (0, 3, 3)]),
        ("another history's file overlapping the chain is left out", 1,
         [*FORKED, hf("b", 0, 4, 4), hf("a", 0, 4, 6), hf("b", 0, 5, 5)], [(0, 1, 1), (0, 2, 2), (0, 3, 3),
                                                                            (0, 4, 4), (0, 5, 5)]),
    ]

    @pytest.mark.parametrize(("name", "level", "files", "want"), CASES, ids=[c[0] for c in CASES])
    def test_sources(self, name: str, level: int, files: list[FileEntry], want: list[tuple[int, int, int]]) -> None:
        assert spans(sources(DbIndex(files), level)) == want

    def test_gap_in_the_source_level_is_refused(self) -> None:
        with pytest.raises(SourceGap, match="skips TXIDs 0000000000000004"):
            sources(DbIndex([f(1, 1, 3), f(0, 6, 7)]), 1)

    def test_another_history_in_the_source_level_is_refused(self) -> None:
        with pytest.raises(SourceGap, match="L0 0000000000000004-0000000000000004 applies on another state"):
            sources(DbIndex([hf("b", 1, 1, 3), *FORKED]), 1)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 3)), max_size=20), st.integers(0, 6))
    def test_the_chain_compacted_is_the_one_a_restore_walks(self, spans_: list[tuple[int, int]], done: int) -> None:
        """Whatever the L0 files overlap, L1's next file continues L1 and ends where a restore's chain does."""
        l0 = [f(0, lo, lo + span) for lo, span in spans_]
        l1 = [f(1, 1, done)] if done else []
        index = DbIndex([*l1, *l0])
        try:
            chain = sources(index, 1)
        except SourceGap:
            assert not any(e.min_txid <= done + 1 < e.max_txid + 1 for e in l0)  # nothing continues L1
            assert any(e.min_txid > done + 1 for e in l0)
            return
        for prev, cur in itertools.pairwise(chain):
            assert cur.min_txid <= prev.max_txid + 1 and cur.max_txid > prev.max_txid  # as the compactor checks
        if chain:
            assert chain[0].is_snapshot or chain[0].min_txid <= done + 1 < chain[0].max_txid + 1
        # From L1's newest file (a chain's start, like a snapshot), it ends as far as a restore gets: nothing is left.
        start = [f(9, 1, done)] if done else []
        assert (chain[-1].max_txid if chain else done) == max(reachable(DbIndex([*start, *l0])), default=0)


class TestSchedule:
    """Levels run at wall-clock boundaries of their intervals."""

    LV = Levels()
    CASES = [
        ("never ran", {}, 1_000_000.0, [1, 2, 9]),
        ("same 5 minutes", {1: 1_000_200.0, 2: 997_000.0, 9: 950_400.0}, 1_000_201.0, [2]),
        ("next 5-minute boundary", {1: 1_000_199.0, 2: 1_000_100.0, 9: 950_400.0}, 1_000_200.0, [1]),
        ("next day", {1: 1_036_799.0, 2: 1_036_799.0, 9: 1_036_799.0}, 1_036_800.0, [1, 2, 9]),
    ]

    @pytest.mark.parametrize(("name", "last", "now", "want"), CASES, ids=[c[0] for c in CASES])
    def test_due_levels(self, name: str, last: dict[int, float], now: float, want: list[int]) -> None:
        assert due_levels(last, now, self.LV) == want

    @staticmethod
    def pending_db(tmp_path: Path, name: str, *arrived: float) -> Database:
        d = Database("c", name, tmp_path, DbIndex())
        d.pending = [Pending(Header(page_size=4096, commit=1, min_txid=1, max_txid=1), 0, t, 1, b"")
                     for t in arrived]
        return d

    def test_flush_order_is_oldest_first_and_waits_for_each_ones_phase(self, tmp_path: Path) -> None:
        dbs = [self.pending_db(tmp_path, *a) for a in [("young", 100.0), ("old", 80.0, 99.0), ("idle",),
                                                          ("due", 90.0)]]
        assert [d.name for d in due(dbs, 100.0, 10.0)] == ["old", "due"]
        young = dbs[0]
        assert [d.name for d in due(dbs, due_at(young, 10.0), 10.0)] == ["old", "due", "young"]

    @pytest.mark.parametrize("arrived", [0.0, 3.3, 97.5, 1e6 + 0.25])
    @pytest.mark.parametrize("interval", [10.0, 0.5])
    def test_a_database_comes_due_on_its_grid_within_one_interval(self, tmp_path: Path, arrived: float,
                                                                   interval: float) -> None:
        for i in range(20):
            d = self.pending_db(tmp_path, f"db{i}.db", arrived, arrived + 1)
            at = due_at(d, interval)
            assert arrived <= at < arrived + interval
            steps = (at - phase(d.prefix, interval)) / interval
            assert abs(steps - round(steps)) < 1e-6

    def test_without_an_interval_a_database_is_due_at_once(self, tmp_path: Path) -> None:
        assert due_at(self.pending_db(tmp_path, "a.db", 42.5), 0.0) == 42.5

    def test_phases_spread_evenly_over_the_interval(self) -> None:
        """A thousand databases that started together flush about a tenth at a time in each tenth of it."""
        tenths = [int(phase(f"cluster{i % 7}/db{i}.db", 10.0)) for i in range(1000)]
        assert min(tenths) >= 0 and max(tenths) <= 9
        assert all(60 <= tenths.count(k) <= 140 for k in range(10))
        assert phase("c/a.db", 10.0) == phase("c/a.db", 10.0) != phase("c/b.db", 10.0)


class TestRetention:
    """Retention keeps every restore point of the window reachable."""

    LV = Levels(l0_retention=DAY, l1_retention=30 * DAY, l2_retention=30 * DAY, snapshot_retention=30 * DAY)
    NOW = 100 * DAY

    CASES = [
        ("young files stay", [f(9, 1, 10, 99 * DAY), f(0, 11, 12, 99.5 * DAY)], []),
        ("old L0 covered by L1 goes", [f(9, 1, 10, 50 * DAY), f(1, 11, 20, 98 * DAY), f(0, 11, 15, 98 * DAY),
                                       f(0, 16, 20, 98 * DAY), f(0, 21, 22, 99.9 * DAY)],
         [(0, 11, 15), (0, 16, 20)]),
        ("old L0 not yet covered by L1 stays", [f(9, 1, 10, 50 * DAY), f(1, 11, 15, 98 * DAY),
                                                f(0, 11, 15, 98 * DAY), f(0, 16, 20, 98 * DAY),
                                                f(0, 21, 22, 99.9 * DAY)],
         [(0, 11, 15)]),
        ("the newest snapshot before the window stays", [f(9, 1, 10, 50 * DAY), f(9, 1, 20, 60 * DAY),
                                                         f(9, 1, 30, 80 * DAY)],
         [(9, 1, 10)]),
        ("each level's newest file stays", [f(0, 1, 5, 10 * DAY)], []),
        ("old L0 covered by an L1 file from an import goes", [f(9, 1, 1, 50 * DAY), f(1, 1, 1, 50 * DAY),
                                                              f(1, 2, 5, 90 * DAY), f(1, 1, 12, 98 * DAY),
                                                              f(0, 2, 5, 90 * DAY), f(0, 1, 9, 98 * DAY),
                                                              f(0, 10, 12, 98 * DAY), f(0, 13, 13, 99.9 * DAY)],
         [(0, 2, 5), (0, 1, 9), (0, 10, 12)]),
    ]

    @pytest.mark.parametrize(("name", "files", "want"), CASES, ids=[c[0] for c in CASES])
    def test_victims(self, name: str, files: list[FileEntry], want: list[tuple[int, int, int]]) -> None:
        doomed = retention_victims(DbIndex(files), self.LV, self.NOW)
        assert sorted(spans(doomed)) == sorted(want)
        kept = DbIndex([e for e in files if e not in doomed])
        for e in files:  # every restore point still inside its level's retention stays restorable
            if e.timestamp < int((self.NOW - self.LV.retention(e.level)) * S):
                continue
            try:
                plan_restore(DbIndex(files), txid=e.max_txid)
            except RestoreError:
                continue
            plan_restore(kept, txid=e.max_txid)


class TestHwm:
    """The HWM is where a restore's chain ends: past a gap in the stored files it stops before the gap."""

    CASES = [
        ("empty", [], 0, None),
        ("a healthy chain reaches its newest file", [f(9, 1, 10), f(1, 11, 20), f(0, 11, 15), f(0, 16, 22)], 22,
         None),
        ("a lost L0 file", [f(0, 1, 1), f(0, 2, 2), f(0, 4, 4), f(0, 5, 5)], 2, (3, 3)),
        ("no snapshot", [f(0, 2, 2), f(0, 3, 3)], 0, (1, 1)),
        ("an L1 file bridges a lost L0 file", [f(0, 1, 1), f(1, 2, 4), f(0, 2, 2), f(0, 4, 4)], 4, None),
        ("a snapshot taken past a gap restarts the chain", [f(0, 1, 1), f(0, 3, 3), f(9, 1, 3), f(0, 4, 4)], 4,
         None),
        ("a snapshot ending inside the next file", [f(9, 1, 12), f(1, 11, 20)], 20, None),
        ("another history past a lost file", FORKED, 3, (4, 3)),
        ("its files where the other is lost", [hf("a", 0, 1, 1), hf("a", 0, 2, 2), hf("a", 0, 3, 3),
                                               hf("b", 0, 4, 4), hf("b", 0, 5, 5)], 3, (4, 3)),
        ("a snapshot of the other history restarts the chain", [*FORKED, hf("b", 9, 1, 4), hf("b", 0, 5, 5)], 5,
         None),
    ]

    @pytest.mark.parametrize(("name", "files", "hwm", "gap"), CASES, ids=[c[0] for c in CASES])
    def test_hwm(self, name: str, files: list[FileEntry], hwm: int, gap: tuple[int, int] | None) -> None:
        index = DbIndex(files)
        assert (index.hwm, index.gap()) == (hwm, gap)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.integers(1, 12), st.integers(0, 3)),
                    max_size=30))
    def test_kept_up_to_date_as_files_come_and_go(self, ops: list[tuple[bool, int, int, int]]) -> None:
        """Added one by one (the O(1) path) or removed, the HWM is always what a walk of every file finds."""
        index = DbIndex()
        for add, level, lo, span in ops:
            if add:
                index.add(f(level, lo, lo + span))
            elif len(index):
                index.remove([list(index)[lo % len(index)]])
            assert index.hwm == max(reachable(index), default=0) == DbIndex(index).hwm
            assert index.hwm <= index.max_txid and (index.gap() is None) == (index.hwm == index.max_txid)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.booleans(), st.sampled_from("ab"), st.integers(0, 1), st.integers(1, 6),
                              st.integers(0, 2)), max_size=30))
    def test_kept_up_to_date_over_two_histories(self, ops: list[tuple[bool, str, int, int, int]]) -> None:
        """Files of two histories added one by one or removed: the HWM is what a walk finds, and a restore reaches
        it when no TXID is a fork (no state of each history is stored there)."""
        index = DbIndex()
        for add, history, level, lo, span in ops:
            if add:
                index.add(hf(history, level, lo, lo + span))
            elif len(index):
                index.remove([list(index)[lo % len(index)]])
            assert index.hwm == max(reachable(index), default=0) == DbIndex(index).hwm
            assert index.hwm <= index.max_txid and (index.gap() is None) == (index.hwm == index.max_txid)
        ends: dict[int, set[int]] = {}
        for e in index:
            ends.setdefault(e.max_txid, set()).add(e.post)
        if index.hwm and all(len(sums) == 1 for sums in ends.values()):
            plan = plan_restore(index, txid=index.hwm)
            for prev, cur in itertools.pairwise(plan):
                assert cur.min_txid <= prev.max_txid or cur.pre == prev.post  # each applies on the state before

    def test_a_gap_is_logged_once_and_so_is_its_filling(self) -> None:
        db = Database("c", "app.db", Path("unused"), DbIndex([f(0, 1, 1), f(0, 2, 2), f(0, 4, 4)]), pos=Pos(4, 0))
        with capture_logs() as logs:
            assert (db.hwm, db.hwm) == (2, 2)
            assert db.status().failing == {"chain": db.gap()} and "TXIDs 0000000000000003..0000000000000003" in \
                db.gap()
            db.index.add(f(0, 3, 3))
            assert (db.hwm, db.hwm, db.status().gap) == (4, 4, "")
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("backup has a gap: the HWM stops before it", "error"), ("backup gap filled", "info")]


def sqlite_bytes(tmp: Path, name: str, rows: int, page_size: int = 4096) -> bytes:
    path = tmp / name
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA page_size={page_size}")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t (v) VALUES (?)", [("x" * 300,)] * rows)
    con.commit()
    con.close()
    return path.read_bytes()


class TestEncodeOnto:
    """A database encoded on top of a position applies there and gives exactly that database."""

    CASES = [("from nothing", 0, 40), ("grows", 20, 200), ("shrinks", 200, 20), ("same size", 50, 50)]

    @pytest.mark.parametrize(("name", "before_rows", "after_rows"), CASES, ids=[c[0] for c in CASES])
    def test_encode_onto(self, name: str, before_rows: int, after_rows: int, tmp_path: Path) -> None:
        target = sqlite_bytes(tmp_path, "after.db", after_rows)
        pos = Pos()
        before = sqlite_bytes(tmp_path, "before.db", before_rows) if before_rows else b""
        if before:
            pos = Pos(7, database_checksum_of(io.BytesIO(before))[0])
        out = io.BytesIO()
        header, trailer = encode_db(io.BytesIO(target), out, version=Version.V2, onto=pos, timestamp=1)
        assert (header.min_txid, header.max_txid) == (pos.txid + 1, pos.txid + 1)
        assert header.pre_apply_checksum == pos.post_apply_checksum
        with open(tmp_path / "applied.db", "w+b") as db:
            db.write(before)
            got = apply_files(db, [out.getvalue()], Version.V2, pos)
        assert got == Pos(pos.txid + 1, trailer.post_apply_checksum)
        assert (tmp_path / "applied.db").read_bytes() == target
        assert trailer.post_apply_checksum == database_checksum_of(io.BytesIO(target))[0]
