"""Retry timing, one rule for every retry loop: exponential backoff with full jitter.

Each wait is uniform in [0, min(cap, base × 2^attempt)], as in AWS's "Exponential Backoff and Jitter": retries
of many clients spread out instead of arriving together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry)."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))


@dataclass
class Backoff:
    """Failures of one job in a row, and when it may run again (times from the caller's clock)."""

    base: float = 0.5
    cap: float = 30.0
    failures: int = 0
    until: float = 0.0

    def fail(self, now: float, cap: float | None = None) -> float:
        """Record a failure at `now`; returns the delay before the next attempt."""
        self.failures += 1
        delay = full_jitter(self.failures, self.base, self.cap if cap is None else cap)
        self.until = now + delay
        return delay

    def ok(self) -> None:
        self.failures, self.until = 0, 0.0

    def ready(self, now: float) -> bool:
        return now >= self.until


__all__ = ["Backoff", "full_jitter"]
