"""`sidecar.retry.Backoff`, the one backoff of every retry loop (a sidecar's databases and positions, the engine's
jobs, `serve --workers` restarts): full jitter, capped, reset by a success."""

from __future__ import annotations

import random

from sidecar.retry import Backoff, full_jitter


def test_each_failure_doubles_the_ceiling_of_the_wait_up_to_the_cap() -> None:
    random.seed(7)
    b = Backoff(base=0.5, cap=30.0)
    for n in range(1, 12):
        delay = b.fail(100.0)
        assert b.failures == n
        assert 0 <= delay <= min(30.0, 0.5 * 2 ** n)
        assert b.until == 100.0 + delay
        assert not b.ready(100.0 + delay - 1e-6) or delay == 0
        assert b.ready(100.0 + delay)
    assert b.fail(0.0, cap=2.0) <= 2.0  # a caller's cap (the sidecar's `backoff_max`) wins over the default


def test_a_success_resets_it() -> None:
    b = Backoff()
    b.fail(5.0)
    b.ok()
    assert (b.failures, b.until) == (0, 0.0) and b.ready(0.0)


def test_the_waits_spread_over_the_whole_range() -> None:
    random.seed(1)
    waits = [full_jitter(3, 0.5, 30.0) for _ in range(2000)]
    assert max(waits) <= 4.0 and min(waits) >= 0.0
    assert min(waits) < 0.4 and max(waits) > 3.6  # full jitter: not bunched at the ceiling, as retries in step would be
