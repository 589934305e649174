"""plan_restore, exactly: the files a restore merges for each target, and the error for each target it cannot reach."""

from __future__ import annotations

import pytest

from sidecar.engine import DbIndex, FileEntry, Levels, plan_restore, restore_points, retention_victims
from sidecar.engine.index import reachable
from sidecar.errors import RestoreError
from sidecar.storage.base import SNAPSHOT_LEVEL

S = SNAPSHOT_LEVEL
File = tuple[int, int, int]  # level, min TXID, max TXID; the timestamp is 1000 ms per TXID


def ts(txid: int) -> int:
    return 1_000_000 + 1000 * txid


def index(*files: File) -> DbIndex:
    return DbIndex(FileEntry(level, lo, hi, ts(hi), 100) for level, lo, hi in files)


def plan(idx: DbIndex, **target: int) -> list[File]:
    return [(e.level, e.min_txid, e.max_txid) for e in plan_restore(idx, **target)]


# Two snapshots, hourly (L2) and five-minute (L1) files after each, and the L0 flushes of the tail.
HISTORY = index((S, 1, 10), (S, 1, 30), (2, 11, 20), (2, 21, 30), (1, 11, 15), (1, 16, 20), (1, 21, 25),
                (1, 26, 30), (1, 31, 35), (0, 31, 32), (0, 33, 35), (0, 36, 36), (0, 37, 39))

PLANS: list[tuple[str, dict[str, int], list[File]]] = [
    ("latest: the newest snapshot, then the coarsest files that reach furthest", {},
     [(S, 1, 30), (1, 31, 35), (0, 36, 36), (0, 37, 39)]),
    ("a TXID that a snapshot ends at", {"txid": 30}, [(S, 1, 30)]),
    ("a TXID before the newest snapshot", {"txid": 25}, [(S, 1, 10), (2, 11, 20), (1, 21, 25)]),
    ("a TXID only L0 reaches", {"txid": 36}, [(S, 1, 30), (1, 31, 35), (0, 36, 36)]),
    ("the first snapshot itself", {"txid": 10}, [(S, 1, 10)]),
    ("a time exactly at a file's timestamp includes it", {"timestamp": ts(36)},
     [(S, 1, 30), (1, 31, 35), (0, 36, 36)]),
    ("a time a millisecond earlier does not", {"timestamp": ts(36) - 1}, [(S, 1, 30), (1, 31, 35)]),
    ("a time between points restores the earlier", {"timestamp": ts(24)}, [(S, 1, 10), (2, 11, 20)]),
    ("a time after everything restores the latest", {"timestamp": ts(1000)},
     [(S, 1, 30), (1, 31, 35), (0, 36, 36), (0, 37, 39)]),
]


@pytest.mark.parametrize(("target", "want"), [r[1:] for r in PLANS], ids=[r[0] for r in PLANS])
def test_plans(target: dict[str, int], want: list[File]) -> None:
    """The plan is exactly these files, in order."""
    assert plan(HISTORY, **target) == want


def test_an_l0_snapshot_counts_as_a_snapshot() -> None:
    """A file from TXID 1 at any level starts a plan (the first flush of a database is one)."""
    assert plan(index((0, 1, 3), (0, 4, 4))) == [(0, 1, 3), (0, 4, 4)]
    assert plan(index((0, 1, 3), (S, 1, 3), (0, 4, 4))) == [(S, 1, 3), (0, 4, 4)]


def test_overlapping_files_continue_the_chain() -> None:
    """A file starting before the current TXID (v3 overlap) continues the chain if it reaches beyond it."""
    assert plan(index((S, 1, 10), (1, 5, 12), (0, 13, 13))) == [(S, 1, 10), (1, 5, 12), (0, 13, 13)]
    assert plan(index((S, 1, 10), (1, 5, 10), (0, 11, 11))) == [(S, 1, 10), (0, 11, 11)]


def test_restore_points_are_the_ends_plans_reach_through_overlapping_files() -> None:
    """A snapshot taken while L1 lagged (its L1 write failed, or a flush landed during the compaction) ends inside the
    next L1 file; once L0 retention deleted the flushes after it, that L1 file continues the chain from the snapshot
    by overlap. Its end and what follows are restore points (`ls`, the operator's list) and the restorable head
    (the position reported after a restart), as the plans say."""
    idx = index((S, 1, 12), (1, 11, 20), (1, 21, 25), (0, 26, 26))
    assert plan(idx) == [(S, 1, 12), (1, 11, 20), (1, 21, 25), (0, 26, 26)]
    assert [p[0] for p in restore_points(idx)] == [12, 20, 25, 26]
    assert reachable(idx) == {12, 20, 25, 26}
    head = idx.restorable_head()
    assert head is not None and (head.level, head.max_txid) == (0, 26)


ERRORS: list[tuple[str, DbIndex, dict[str, int], str]] = [
    ("both a TXID and a time", HISTORY, {"txid": 30, "timestamp": ts(30)},
     r"^give a TXID or a timestamp, not both$"),
    ("nothing stored", index(), {}, r"^no backup files found$"),
    ("a TXID before every snapshot", HISTORY, {"txid": 9},
     r"^target TXID 0000000000000009 is before every snapshot; the oldest restore point is "
     r"000000000000000a at 1970-01-01T00:16:50\.000Z \(L9\)$"),
    ("a time before every snapshot", HISTORY, {"timestamp": ts(10) - 1},
     r"^target 1970-01-01T00:16:49\.999Z is before every snapshot; the oldest restore point is 000000000000000a"),
    ("no snapshot at all", index((0, 5, 6)), {},
     r"^target 1970-01-01T00:00:00\.000Z is before every snapshot; the backup has no snapshot$"),
    ("no snapshot before a TXID", index((0, 5, 6)), {"txid": 6},
     r"^target TXID 0000000000000006 is before every snapshot; the backup has no snapshot$"),
    ("a TXID beyond the newest", HISTORY, {"txid": 40},
     r"^TXID 0000000000000028 is beyond the newest restore point 0000000000000027 at 1970-01-01T00:17:19\.000Z "
     r"\(L0\)$"),
    ("a gap", index((S, 1, 10), (0, 11, 11), (0, 12, 12), (0, 15, 15), (0, 16, 16)), {},
     r"^the backup has a gap: TXIDs 000000000000000d\.\.000000000000000e are missing after 000000000000000c at "
     r"1970-01-01T00:16:52\.000Z \(L0\)$"),
    ("a gap before the target TXID", index((S, 1, 10), (0, 12, 12)), {"txid": 12},
     r"^TXID 000000000000000c cannot be restored: the backup has a gap: TXIDs 000000000000000b\.\.000000000000000b "
     r"are missing after 000000000000000a at 1970-01-01T00:16:50\.000Z \(L9\)$"),
]


@pytest.mark.parametrize(("idx", "target", "error"), [r[1:] for r in ERRORS], ids=[r[0] for r in ERRORS])
def test_errors(idx: DbIndex, target: dict[str, int], error: str) -> None:
    """An unreachable target is refused with a message naming the target and the nearest restore points."""
    with pytest.raises(RestoreError, match=error):
        plan_restore(idx, **target)


def test_a_gap_after_the_target_does_not_matter() -> None:
    """Only what the target needs must be contiguous."""
    idx = index((S, 1, 10), (0, 11, 11), (0, 14, 15))
    assert plan(idx, txid=11) == [(S, 1, 10), (0, 11, 11)]
    assert plan(idx, timestamp=ts(12)) == [(S, 1, 10), (0, 11, 11)]


def test_a_time_inside_a_file_whose_l0_retention_has_begun_restores_the_earlier_point() -> None:
    """L0 retention deleting the first flushes an L1 file covers is no gap: a time among the flushes left restores
    the last point before the L1 file, as a time among flushes already deleted does."""
    flushes = [(0, t, t) for t in range(11, 21)]
    full = index((S, 1, 10), (1, 11, 20), *flushes)
    levels = Levels(l0_retention=1, l1_retention=100, l2_retention=100, snapshot_retention=100)
    gone = retention_victims(full, levels, now=ts(14) / 1000 + 1.5)  # L0 cut-off: just after TXID 14
    assert {(e.min_txid, e.max_txid) for e in gone} == {(t, t) for t in range(11, 15)}
    full.remove(gone)
    assert plan(full, timestamp=ts(12)) == [(S, 1, 10)]
    assert plan(full, timestamp=ts(17)) == [(S, 1, 10)]
    assert plan(full, timestamp=ts(20)) == [(S, 1, 10), (1, 11, 20)]
