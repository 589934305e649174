"""What the engine's bookkeeping costs per flush as a database's history grows.

Every flush of a database adds one L0 file to its index, answers its uploads with the HWM, encodes the head
object (the latest restore plan), lets retention check what may go (every second, for every database), and saves the
index cache. A database backed up for a day holds 8,640 L0 files (one every 10 s); after 30 days, also 8,640 L1
and 720 L2 files and 30 snapshots. Those steps must cost the same on such an index as on a fresh one, or a server
that keeps up on day one falls behind on day two.

    python -m bench.index_bench [--flushes 2000]

For each index size: microseconds per flush of the steps as the engine runs them (`extended` head, journal
append; every 30th flush an L1 file and a full plan, as after the 5-minute compaction) and their ratio to the
fresh index's in the same run. Only that full plan, once every 30 flushes, may grow with the index: from one
day to thirty the index doubles, and this figure should not move. Beside them, the same steps done from scratch
(the full plan and a whole index write at every flush), which is what they cost before.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import machine
from sidecar.engine import DbIndex, FileEntry, Levels, retention_victims
from sidecar.engine import head as heads
from sidecar.engine.index import IndexCache

L0_EVERY = 10_000  # ms
L1_EVERY = 30  # flushes: an L1 file every 5 minutes
DAY = 86_400_000


def history(days: int, now: int) -> list[FileEntry]:
    """The files a database keeps after `days` days of one flush every 10 s (3 TXIDs each), as retention leaves
    them: daily snapshots, hourly L2, five-minute L1 for 30 days, L0 for the last day."""
    if days == 0:
        return [FileEntry(9, 1, 1, now, 4096, 1, 4096, 0, 1)]
    per_l0, flushes = 3, days * DAY // L0_EVERY
    start = now - flushes * L0_EVERY

    def tx(i: int) -> int:
        return 1 + i * per_l0  # the TXID reached after flush i

    out = [FileEntry(9, 1, tx(d * DAY // L0_EVERY), start + d * DAY, 1 << 20, 10, 4096, 0, 1) for d in range(days)]
    for level, every in ((2, 3_600_000), (1, 300_000)):
        n = every // L0_EVERY
        out += [FileEntry(level, tx(i) + 1, tx(i + n), start + (i + n) * L0_EVERY, 50_000, 10, 4096, 1, 1)
                for i in range(0, flushes - n + 1, n)]
    first = max(0, flushes - DAY // L0_EVERY)
    out += [FileEntry(0, tx(i) + 1, tx(i + 1), start + (i + 1) * L0_EVERY, 1400, 10, 4096, 1, 1)
            for i in range(first, flushes)]
    return out


def per_flush(days: int, flushes: int, *, incremental: bool) -> tuple[float, int]:
    """Microseconds per flush of the engine's per-flush steps on a `days`-old index; and the index's size."""
    now = 1_790_000_000_000 + days * DAY
    index = DbIndex(history(days, now))
    files = len(index)
    levels = Levels()
    with tempfile.TemporaryDirectory(prefix="index-bench-") as tmp:
        cache = IndexCache(Path(tmp) / "index.json")
        cache.plan(index)()  # the cache as it is before the run: written whole once
        latest = heads.latest(index)
        window: list[FileEntry] = []
        t0 = time.process_time()
        for i in range(flushes):
            at = now + (i + 1) * L0_EVERY
            entry = FileEntry(0, index.max_txid + 1, index.max_txid + 3, at, 1400, 10, 4096, 1, 1)
            index.add(entry)
            window.append(entry)
            _ = index.max_txid  # the HWM every upload's answer carries
            head = heads.extended(latest, entry, index) if incremental else None
            latest = head if head is not None else heads.latest(index)
            if len(window) == L1_EVERY:  # the L1 compaction every 5 minutes: the head is planned again
                index.add(FileEntry(1, window[0].min_txid, window[-1].max_txid, at, 50_000, 10, 4096, 1, 1))
                latest = heads.latest(index)
                window = []
            assert latest is not None
            heads.encode(latest)  # the head object's bytes
            retention_victims(index, levels, at / 1000)  # the check every tick makes
            if incremental:
                cache.plan(index)()
            else:
                index.changes.clear()
                (Path(tmp) / "whole.json").write_text(index.to_json())
        return (time.process_time() - t0) / flushes * 1e6, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flushes", type=int, default=2000, help="flushes timed per index size (default 2000)")
    args = parser.parse_args()
    print(machine.describe())
    print(f"{args.flushes} flushes per row; µs of CPU per flush: index add, HWM, head plan and its JSON, "
          "retention check, index cache save; every 30th flush, an L1 compaction and its new plan")
    print(f"{'history':>10} {'files':>7} {'now µs':>8} {'÷ fresh':>8} {'from scratch µs':>16} {'÷ fresh':>8}")
    base_now = base_old = 0.0
    for days in (0, 1, 7, 30):
        now_us, files = per_flush(days, args.flushes, incremental=True)
        old_us, _ = per_flush(days, max(20, args.flushes // 50), incremental=False)
        if days == 0:
            base_now, base_old = now_us, old_us
        label = "fresh" if days == 0 else f"{days} day{'s' if days > 1 else ''}"
        print(f"{label:>10} {files:>7} {now_us:>8.0f} {now_us / base_now:>7.2f}× {old_us:>16.0f} "
              f"{old_us / base_old:>7.1f}×")


if __name__ == "__main__":
    main()
