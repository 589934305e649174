"""`plan_restore`'s refusals, table-driven on hand-made indexes: each names the right reason and restore points."""

from __future__ import annotations

import pytest

from sidecar.engine.index import FileEntry
from sidecar.engine.restore import plan_restore
from sidecar.errors import RestoreError
from sidecar.ltx import format_timestamp

T0 = 1_790_000_000_000  # ms


def f(level: int, lo: int, hi: int) -> FileEntry:
    """A file of `level` holding TXIDs lo..hi, committed at T0 + hi seconds."""
    return FileEntry(level, lo, hi, T0 + hi * 1000, 100)


def at(level: int, txid: int) -> str:
    return f"{txid:016x} at {format_timestamp(T0 + txid * 1000)} (L{level})"


# A snapshot to 0x100, L1 files every 0x100, L0 files every 0x51 on top: the restore points are their ends.
STORE = [f(9, 1, 0x100), f(1, 0x101, 0x200 - 0x10), f(1, 0x1f1, 0x2a2), f(0, 0x2a3, 0x2f3), f(0, 0x2f4, 0x351)]


class TestRefusals:
    def test_a_txid_between_restore_points_names_both_neighbours(self) -> None:
        """0x200 lies inside the L1 file 0x1f1-0x2a2: not a restore point, nearest 0x1f0 below and 0x2a2 above."""
        with pytest.raises(RestoreError) as info:
            plan_restore(STORE, txid=0x200)
        assert str(info.value) == (f"TXID 0000000000000200 is not a restore point; the nearest are {at(1, 0x1f0)} "
                                   f"below and {at(1, 0x2a2)} above (see `litefs-sidecar ls`)")

    def test_a_txid_past_every_file_is_beyond_the_newest(self) -> None:
        with pytest.raises(RestoreError) as info:
            plan_restore(STORE, txid=0x400)
        assert str(info.value) == f"TXID 0000000000000400 is beyond the newest restore point {at(0, 0x351)}"

    def test_a_missing_file_before_the_target_is_a_gap(self) -> None:
        """The file 0x2a3-0x2f3 deleted from the store: 0x300 cannot be reached, and the message says why."""
        store = [e for e in STORE if e.min_txid != 0x2a3]
        with pytest.raises(RestoreError) as info:
            plan_restore(store, txid=0x300)
        assert str(info.value) == ("TXID 0000000000000300 cannot be restored: the backup has a gap: TXIDs "
                                   f"00000000000002a3..00000000000002f3 are missing after {at(1, 0x2a2)}")
        with pytest.raises(RestoreError, match="0000000000000351 cannot be restored: the backup has a gap"):
            plan_restore(store, txid=0x351)  # a file's end, but past the gap
        with pytest.raises(RestoreError) as info:
            plan_restore(store, txid=0x400)  # past everything: the newest reachable point, and the gap
        assert str(info.value) == (f"TXID 0000000000000400 is beyond the newest restore point {at(1, 0x2a2)}; "
                                   "the backup has a gap: TXIDs 00000000000002a3..00000000000002f3 are missing "
                                   f"after {at(1, 0x2a2)}")
        with pytest.raises(RestoreError, match=r"^the backup has a gap: TXIDs 00000000000002a3"):
            plan_restore(store)  # the latest state
        assert plan_restore(store, txid=0x2a2)[-1].max_txid == 0x2a2  # what precedes the gap still restores

    def test_a_missing_file_bridged_by_a_coarser_level_is_no_gap(self) -> None:
        """L0 lost 0x2a3-0x2f3 but an L1 file covers 0x2a3-0x351: only the points inside it are gone."""
        store = [e for e in STORE if e.min_txid != 0x2a3] + [f(1, 0x2a3, 0x351)]
        assert [e.max_txid for e in plan_restore(store)] == [0x100, 0x1f0, 0x2a2, 0x351]
        with pytest.raises(RestoreError) as info:
            plan_restore(store, txid=0x2f3)
        assert f"not a restore point; the nearest are {at(1, 0x2a2)} below and {at(1, 0x351)} above" in str(info.value)

    def test_restore_points_plan_exactly(self) -> None:
        for end in (0x100, 0x1f0, 0x2a2, 0x2f3, 0x351):
            plan = plan_restore(STORE, txid=end)
            assert plan[0].is_snapshot and plan[-1].max_txid == end
