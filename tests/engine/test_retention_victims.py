"""retention_victims, exactly: which files go at `now`, table-driven with files on each side of every cut-off.

The invariant tests (tests/invariants/test_retention.py) check that nothing needed goes; these check that what may
go does, to the millisecond, so retention neither keeps a level forever nor moves its cut-offs.
"""

from __future__ import annotations

import pytest

from sidecar.engine import DbIndex, FileEntry, Levels, retention_victims
from sidecar.engine.retention import expired_set_aside
from sidecar.storage.base import SNAPSHOT_LEVEL

S = SNAPSHOT_LEVEL
NOW = 100.0  # seconds: 100_000 ms
# Cut-offs at NOW: snapshots 90_000 ms, L2 70_000, L1 80_000, L0 95_000.
LEVELS = Levels(l0_retention=5, l1_retention=20, l2_retention=30, snapshot_retention=10)

File = tuple[int, int, int, int]  # level, min TXID, max TXID, timestamp (ms)


def entries(files: list[File]) -> DbIndex:
    return DbIndex(FileEntry(level, lo, hi, ts, 100) for level, lo, hi, ts in files)


ROWS: list[tuple[str, list[File], set[File]]] = [
    ("snapshots before the window go, but for the newest of them",
     [(S, 1, 10, 60_000), (S, 1, 20, 80_000), (S, 1, 30, 89_999), (S, 1, 40, 95_000)],
     {(S, 1, 10, 60_000), (S, 1, 20, 80_000)}),
    ("a snapshot exactly at the window's start is inside it",
     [(S, 1, 10, 60_000), (S, 1, 20, 80_000), (S, 1, 30, 90_000), (S, 1, 40, 95_000)],
     {(S, 1, 10, 60_000)}),
    ("the newest snapshot and the base of the window stay, however old",
     [(S, 1, 10, 1_000), (S, 1, 20, 2_000)],
     set()),
    ("L1 and L2 files go once old and under the base snapshot; L1 at its cut-off stays",
     [(S, 1, 20, 60_000), (S, 1, 30, 85_000), (S, 1, 40, 95_000),
      (1, 1, 5, 70_000), (1, 6, 10, 79_999), (1, 11, 20, 80_000), (1, 21, 30, 85_000), (1, 31, 40, 96_000),
      (2, 1, 20, 60_000), (2, 21, 40, 96_000)],
     {(S, 1, 20, 60_000), (1, 1, 5, 70_000), (1, 6, 10, 79_999), (2, 1, 20, 60_000)}),
    ("a level file ending exactly at the base snapshot goes; one past it stays",
     [(S, 1, 10, 50_000), (S, 1, 30, 60_000), (S, 1, 50, 99_000),
      (2, 1, 30, 50_000), (2, 31, 31, 55_000), (2, 32, 50, 99_000)],
     {(S, 1, 10, 50_000), (2, 1, 30, 50_000)}),
    ("an L2 file just inside its retention stays, just outside goes",
     [(S, 1, 10, 50_000), (S, 1, 30, 60_000), (S, 1, 50, 99_000),
      (2, 1, 10, 69_999), (2, 11, 30, 70_000), (2, 31, 50, 99_000)],
     {(S, 1, 10, 50_000), (2, 1, 10, 69_999)}),
    ("expired L0 goes oldest first up to what L1 covers; L0 at its cut-off stays",
     [(S, 1, 30, 60_000), (S, 1, 50, 99_000), (1, 1, 40, 96_000),
      (0, 36, 37, 94_000), (0, 38, 38, 94_999), (0, 39, 39, 95_000), (0, 40, 41, 96_000)],
     {(0, 36, 37, 94_000), (0, 38, 38, 94_999)}),
    ("every expired, covered L0 file goes but the newest",
     [(1, 1, 40, 90_000), (0, 31, 32, 90_000), (0, 33, 35, 91_000), (0, 36, 40, 92_000)],
     {(0, 31, 32, 90_000), (0, 33, 35, 91_000)}),
    ("L0 stops at the first file L1 does not cover, expired or not",
     [(1, 1, 34, 90_000), (1, 35, 40, 99_000), (0, 31, 32, 90_000), (0, 33, 35, 91_000), (0, 36, 40, 92_000),
      (0, 41, 41, 99_500)],
     {(0, 31, 32, 90_000), (0, 33, 35, 91_000), (0, 36, 40, 92_000)}),
    ("without L1, the base snapshot covers L0",
     [(S, 1, 20, 50_000), (S, 1, 35, 60_000), (S, 1, 50, 99_000),
      (0, 30, 33, 60_000), (0, 34, 35, 61_000), (0, 36, 36, 62_000), (0, 37, 50, 99_000)],
     {(S, 1, 20, 50_000), (0, 30, 33, 60_000), (0, 34, 35, 61_000)}),
    ("nothing covers L0: it all stays",
     [(S, 1, 20, 50_000), (0, 21, 22, 60_000), (0, 23, 24, 61_000)],
     set()),
    ("nothing old: nothing goes",
     [(S, 1, 20, 95_000), (S, 1, 30, 99_000), (1, 1, 30, 99_000), (0, 21, 30, 99_000), (0, 31, 31, 99_900)],
     set()),
]


@pytest.mark.parametrize(("files", "gone"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_retention_victims(files: list[File], gone: set[File]) -> None:
    """Exactly the files listed go, each once."""
    victims = retention_victims(entries(files), LEVELS, NOW)
    assert sorted((e.level, e.min_txid, e.max_txid, e.timestamp) for e in victims) == sorted(gone)


def test_set_aside_copies_older_than_the_snapshot_retention_expire() -> None:
    """A copy set aside before the snapshot window's start (90_000 ms at NOW) expires; one at its start or later,
    like a snapshot there, stays; none known, none expire."""
    copies = {"q/c/a/x.89999": 89_999, "q/c/a/y.90000": 90_000, "q/c/a/z.99000": 99_000, "q/c/a/w.1000": 1_000}
    assert expired_set_aside(copies, LEVELS, NOW) == ["q/c/a/w.1000", "q/c/a/x.89999"]
    assert expired_set_aside({}, LEVELS, NOW) == []
