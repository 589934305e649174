"""The machine's single-core speed, printed by every bench so figures from different machines can be compared.

A fixed pure-Python loop of 10 million steps, timed in CPU seconds of this process (other processes on the
machine move it less than wall time); lower is faster. The issue's reference machine: 1.13 s.
"""

from __future__ import annotations

import time

STEPS = 10_000_000


def _loop(n: int) -> int:
    total = 0
    for i in range(n):
        total += i & 7
    return total


def single_core_seconds(repeat: int = 3) -> float:
    """The fastest of `repeat` timings of the loop, in CPU seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        _loop(STEPS)
        best = min(best, time.process_time() - t0)
    return best


def describe() -> str:
    """One line for a bench's header."""
    return f"single-core speed: a {STEPS // 1_000_000}-million-step Python loop takes {single_core_seconds():.2f} s CPU"


if __name__ == "__main__":
    print(describe())
