"""bench/index_bench.py runs and prints a row per history length, with its history's file count."""

from __future__ import annotations

import itertools
import subprocess
import sys

from bench.index_bench import history


def test_a_history_holds_what_retention_leaves() -> None:
    now = 1_790_000_000_000 + 30 * 86_400_000
    files = history(30, now)
    by_level: dict[int, int] = {}
    for e in files:
        by_level[e.level] = by_level.get(e.level, 0) + 1
    assert by_level == {9: 30, 2: 720, 1: 8640, 0: 8640}
    l0 = sorted((e for e in files if e.level == 0), key=lambda e: e.min_txid)
    assert all(b.min_txid == a.max_txid + 1 for a, b in itertools.pairwise(l0))  # one unbroken day


def test_the_bench_prints_a_row_per_history() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.index_bench", "--flushes", "50"], capture_output=True,
                         text=True, check=True, timeout=300).stdout
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[-1].endswith("×")]
    assert [r[0] for r in rows] == ["fresh", "1", "7", "30"]
    assert rows[0][3] == "1.00×"
