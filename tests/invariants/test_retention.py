"""Retention keeps the whole window restorable: from its oldest instant to now, at the finest level it still keeps.

`retention_victims` is pure, so each row of the tables is an index, a time and the invariants checked on what the
deletions leave; rows are chosen where the windows fall between snapshots and where compaction lags behind
expiry, the cases where deleting too much goes unnoticed by restoring only the points that are left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from sidecar.engine import DbIndex, FileEntry, Levels, plan_restore, retention_victims
from sidecar.errors import RestoreError
from sidecar.storage.base import SNAPSHOT_LEVEL
from tests.invariants.conftest import T0, MakeIndex

STEP = 60.0  # one TXID a minute
HOUR = 3600.0
# Five-minute L1 files (5 TXIDs), half-hourly L2, hourly snapshots; L0 kept an hour, everything else three.
LEVELS = Levels(l0_interval=STEP, l1_interval=300, l2_interval=1800, snapshot_interval=HOUR, l0_retention=HOUR,
                l1_retention=3 * HOUR, l2_retention=3 * HOUR, snapshot_retention=3 * HOUR)
N = 300  # TXIDs, five hours


def at(txid: int, offset: float = 0.0) -> float:
    """The time (seconds) TXID `txid` committed, plus `offset` seconds."""
    return T0 + txid * STEP + offset


@dataclass(frozen=True)
class Row:
    name: str
    now: float
    layout: dict[str, Any] = field(default_factory=dict)
    deletes: bool = True  # the row is not vacuous: retention has something to delete


HOURLY = (60, 120, 180, 240, 300)
ROWS = [
    Row("window starts on a snapshot", at(N) + 0.0, {"snapshots": HOURLY}),
    Row("window starts just after a snapshot", at(N, 30), {"snapshots": HOURLY}),
    Row("window starts just before a snapshot", at(N, -30), {"snapshots": HOURLY}),
    Row("window starts between snapshots", at(N, 25 * 60), {"snapshots": HOURLY}),
    Row("two snapshots, the older long before the window", at(N, 3 * HOUR), {"snapshots": (10, 290)}),
    Row("idle for days", at(N, 48 * HOUR), {"snapshots": HOURLY}),
    Row("L1 lags behind L0 expiry", at(N, 2 * HOUR), {"snapshots": (60, 120, 180, 240), "l1_upto": 100,
                                                         "l2_upto": 90}),
    Row("L1 lags, recent snapshots", at(N, 90 * 60), {"snapshots": (120, 240, 280, 299), "l1_upto": 100,
                                                        "l2_upto": 90}),
    Row("no L1, no L2, two snapshots", at(N, 2 * HOUR), {"snapshots": (100, 150), "l1_upto": 0, "l2_upto": 0}),
    Row("no compaction at all", at(N, 2 * HOUR), {"l1_upto": 0, "l2_upto": 0}, deletes=False),
    Row("L1 stopped before the first snapshot", at(N, 4 * HOUR), {"snapshots": (200, 260), "l1_upto": 40,
                                                                    "l2_upto": 30}),
    Row("L1 caught up but for the newest flush", at(N, 2 * HOUR), {"snapshots": HOURLY, "l1_upto": 295}),
    Row("flushes of several TXIDs, L1 lagging", at(N, 2 * HOUR), {"snapshots": (60, 120), "l0_every": 3,
                                                                    "l1_upto": 150, "l2_upto": 120}),
    Row("old L0 already gone, L1 lagging", at(N, 2 * HOUR), {"snapshots": (60, 120, 180), "l0_from": 61,
                                                                "l1_upto": 200, "l2_upto": 180}),
]


def restored(index: DbIndex | list[FileEntry], t: float) -> int | None:
    """The TXID a restore at time `t` reaches, or None when none can."""
    try:
        return plan_restore(index, timestamp=int(t * 1000))[-1].max_txid
    except RestoreError:
        return None


def after(index: DbIndex, now: float) -> list[FileEntry]:
    victims = retention_victims(index, LEVELS, now)
    assert len(set(victims)) == len(victims) and set(victims) <= set(index)
    return [e for e in index if e not in set(victims)]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
class TestRetentionWindow:
    """Table-driven: each row an index at a time; the window is [now - snapshot retention, now]."""

    def test_the_oldest_instant_of_the_window_stays_restorable(self, row: Row, make_index: MakeIndex) -> None:
        """A restore at the window's first instant still finds a snapshot to start from and a chain to follow."""
        index = make_index(N, **row.layout)
        start = row.now - LEVELS.snapshot_retention
        if restored(index, start) is None:
            pytest.fail("row is not sharp: the window start was never restorable")
        assert restored(after(index, row.now), start) is not None

    def test_the_latest_state_stays_restorable(self, row: Row, make_index: MakeIndex) -> None:
        """The newest TXID is restorable after retention as before: no L0 file that nothing else covers is gone."""
        index = make_index(N, **row.layout)
        newest = max(t for t in range(1, N + 1) if at(t) <= row.now)
        assert restored(after(index, row.now), row.now) == restored(index, row.now) == newest

    def test_every_instant_keeps_five_minute_points(self, row: Row, make_index: MakeIndex) -> None:
        """At every instant of the window a restore reaches at least the state of one L1 interval earlier."""
        index = make_index(N, **row.layout)
        kept = after(index, row.now)
        start = row.now - LEVELS.snapshot_retention
        instants = [start, *(at(t) for t in range(1, N + 1) if start <= at(t) <= row.now)]
        for t in instants:
            want = restored(index, t - LEVELS.l1_interval)
            if want is not None:
                got = restored(kept, t)
                assert got is not None and got >= want, f"at {t - T0:.0f}s: restores {got}, needs >= {want}"

    def test_newest_of_each_level_stays_and_something_goes(self, row: Row, make_index: MakeIndex) -> None:
        """Each level's newest file stays; a row meant to delete does delete (the table is not vacuous)."""
        index = make_index(N, **row.layout)
        kept = set(after(index, row.now))
        for level in (0, 1, 2, SNAPSHOT_LEVEL):
            newest = index.newest(level)
            assert newest is None or newest in kept
        assert (len(kept) < len(index)) == row.deletes


L0_ROWS = [
    # (name, layout, now, the newest TXID covered by L1 or the base snapshot: no L0 file above it may go)
    ("L1 far behind, L0 all expired", {"snapshots": (60,), "l1_upto": 100, "l2_upto": 90}, at(N, 2 * HOUR), 100),
    ("no L1 at all", {"snapshots": (), "l1_upto": 0, "l2_upto": 0}, at(N, 2 * HOUR), 0),
    ("the base snapshot covers beyond L1", {"snapshots": (60, 180, 290), "l1_upto": 100, "l2_upto": 90},
     at(N, 3 * HOUR), 180),
    ("L1 covers beyond the base snapshot", {"snapshots": (60, 120), "l1_upto": 200, "l2_upto": 180},
     at(N, 3 * HOUR), 200),
]


@pytest.mark.parametrize(("name", "layout", "now", "covered"), L0_ROWS, ids=[r[0] for r in L0_ROWS])
def test_expired_l0_files_that_nothing_covers_stay(name: str, layout: dict[str, Any], now: float, covered: int,
                                                   make_index: MakeIndex) -> None:
    """An expired L0 file goes only once L1 (or the base snapshot) covers it: it may be the only copy of its TXIDs."""
    index = make_index(N, **layout)
    assert all(e.timestamp < (now - LEVELS.l0_retention) * 1000 for e in index.level(0))  # all of L0 expired
    victims = retention_victims(index, LEVELS, now)
    gone = [e for e in victims if e.level == 0]
    assert gone == [e for e in index.level(0) if e.max_txid <= covered]  # oldest first, every covered one
    assert all(e.max_txid <= covered for e in gone)
