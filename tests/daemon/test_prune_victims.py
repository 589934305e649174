"""prune_victims, exactly: the local LTX files the sidecar deletes, table-driven around the HWM and the age cut-off.

test_prune_property.py shows nothing above the HWM ever goes; these show that what may go does, and no more.
"""

from __future__ import annotations

import pytest

from sidecar.daemon.local import LocalFile, prune_victims

NOW, RETENTION = 1000.0, 60.0  # files with mtime before 940.0 are old enough


def files(*spec: tuple[int, int, float]) -> list[LocalFile]:
    return [LocalFile("/ltx", lo, hi, mtime, 100) for lo, hi, mtime in spec]


OLD, CUT, NEW = 900.0, NOW - RETENTION, 999.0
ROWS: list[tuple[str, list[LocalFile], int | None, list[int]]] = [
    ("nothing confirmed upstream: nothing goes", files((1, 1, OLD), (2, 2, OLD), (3, 3, OLD)), None, []),
    ("old files at or below the HWM go, never the newest", files((1, 1, OLD), (2, 2, OLD), (3, 3, OLD)), 3, [1, 2]),
    ("a file ending exactly at the HWM goes", files((1, 1, OLD), (2, 3, OLD), (4, 4, OLD)), 3, [1, 2]),
    ("the walk stops at the first file above the HWM", files((1, 1, OLD), (2, 3, OLD), (4, 5, OLD), (6, 6, OLD)),
     2, [1]),
    ("a file below the HWM goes when a later one is above it", files((1, 1, OLD), (2, 3, OLD), (4, 5, OLD)), 4,
     [1, 2]),
    ("the walk stops at the first file not old enough", files((1, 1, OLD), (2, 2, NEW), (3, 3, OLD), (4, 4, OLD)),
     9, [1]),
    ("a file exactly at the age cut-off stays", files((1, 1, CUT - 0.001), (2, 2, CUT), (3, 3, OLD)), 9, [1]),
    ("one file alone is the newest: it stays", files((1, 1, OLD)), 9, []),
    ("no files", [], 9, []),
    ("HWM zero: nothing is confirmed", files((1, 1, OLD), (2, 2, OLD)), 0, []),
]


@pytest.mark.parametrize(("local", "hwm", "gone"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_prune_victims(local: list[LocalFile], hwm: int | None, gone: list[int]) -> None:
    """Exactly the listed files (by min TXID) go, oldest first."""
    assert [f.min_txid for f in prune_victims(local, hwm, NOW, RETENTION)] == gone
