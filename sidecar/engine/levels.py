"""Compaction levels and their schedule, pure: no clock, no I/O (docs/levels.md).

Defaults give 10-second restore points for a day and 5-minute points for 30 days:

    L0  every flush of accepted uploads (10 s)     kept 24 h
    L1  5 minutes                                  kept 30 d
    L2  1 hour                                     kept 30 d
    L9  daily snapshots                            kept 30 d

Compactions run at wall-clock boundaries, multiples of the level's interval since the epoch (UTC), as
Litestream's do; a level is compacted only when its source level has files it has not consumed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from sidecar.storage.layout import SNAPSHOT_LEVEL

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True, slots=True)
class Levels:
    """Intervals and retentions in seconds. `l0_interval` 0 flushes every upload (sensible with file://)."""

    l0_interval: float = 10.0
    l1_interval: float = 300.0
    l2_interval: float = HOUR
    snapshot_interval: float = DAY
    l0_retention: float = DAY
    l1_retention: float = 30 * DAY
    l2_retention: float = 30 * DAY
    snapshot_retention: float = 30 * DAY

    @property
    def compacted(self) -> tuple[int, ...]:
        """Levels built by compaction, in order (each from the one below)."""
        return (1, 2)

    @property
    def all(self) -> tuple[int, ...]:
        return (0, 1, 2, SNAPSHOT_LEVEL)

    def interval(self, level: int) -> float:
        return {0: self.l0_interval, 1: self.l1_interval, 2: self.l2_interval,
                SNAPSHOT_LEVEL: self.snapshot_interval}[level]

    def retention(self, level: int) -> float:
        return {0: self.l0_retention, 1: self.l1_retention, 2: self.l2_retention,
                SNAPSHOT_LEVEL: self.snapshot_retention}[level]

    def source(self, level: int) -> int:
        """The level a compacted level is built from (snapshots from everything below)."""
        return 2 if level == SNAPSHOT_LEVEL else level - 1

    def problems(self) -> list[str]:
        """What is wrong with these settings, one message per problem."""
        out = []
        if self.l0_interval < 0:
            out.append(f"l0_interval must be >= 0, got {self.l0_interval}")
        chain = [("l1_interval", self.l1_interval), ("l2_interval", self.l2_interval),
                 ("snapshot_interval", self.snapshot_interval)]
        for name, value in chain:
            if value <= 0:
                out.append(f"{name} must be > 0, got {value}")
        for (a, va), (b, vb) in itertools.pairwise(chain):
            if va >= vb:
                out.append(f"{a} ({va}s) must be shorter than {b} ({vb}s)")
        for level in self.all:
            if self.retention(level) < self.interval(level):
                out.append(f"retention of L{level} ({self.retention(level)}s) is shorter than its interval")
        return out


def boundary(now: float, interval: float) -> float:
    """The latest multiple of `interval` (seconds since the epoch) at or before `now`."""
    return math.floor(now / interval) * interval


def next_boundary(now: float, interval: float) -> float:
    """The first multiple of `interval` strictly after `now`."""
    return boundary(now, interval) + interval


def due(last_run: float | None, now: float, interval: float) -> bool:
    """Whether a level compacted last at `last_run` is due again at `now` (a boundary has passed)."""
    return last_run is None or boundary(now, interval) > boundary(last_run, interval)
