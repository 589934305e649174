"""bench/sidecar_bench.py's replay load: the emulator's transactions, renamed into ltx/ at the rate, in order."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

from bench.sidecar_bench import Row, Usage, _replay_load, ratios
from sidecar.daemon.build import compact_files
from sidecar.ltx import parse_filename


def _txids(ltx: Path) -> list[int]:
    return sorted(t[1] for p in ltx.iterdir() if (t := parse_filename(p.name)) is not None)


def test_replay_places_the_setup_first_then_one_unbroken_chain_at_the_rate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ours, theirs = mp.Pipe()
    load = threading.Thread(target=_replay_load, args=(theirs, data, "app.db", 200.0, 0.5, 7, True))
    load.start()
    kind, setup = ours.recv()
    ltx = data / "dbs" / "app.db" / "ltx"
    assert kind == "ready"
    assert _txids(ltx) == list(range(1, setup + 1))  # only the schema and prefill before the window

    t0 = time.time() + 0.1
    ours.send(t0)
    appeared, n, elapsed, _ = ours.recv()
    load.join()
    assert n == 100 and 0.45 < elapsed < 2.0
    assert [tx for tx, _ in appeared] == list(range(setup + 1, setup + 101))
    assert all(t0 <= at < t0 + elapsed for _, at in appeared)
    files = sorted(ltx.iterdir(), key=lambda p: parse_filename(p.name) or (0, 0))
    assert _txids(ltx) == list(range(1, setup + 101))
    assert abs(files[-1].stat().st_mtime - appeared[-1][1]) < 1e-3  # its mtime: the moment it appeared
    # the files chain as LiteFS's do: every checksum verified, each pre-apply checksum the previous post-apply
    _, header, _ = compact_files(files)
    assert (header.min_txid, header.max_txid) == (1, setup + 100)


def test_the_goals_are_judged_on_each_rates_median_ratio_over_its_runs() -> None:
    def row(rate: float, run: int, sidecar: float, litestream: float | None, rss: float = 60.0) -> Row:
        return Row(rate, run, sidecar=Usage(cpu_pct=sidecar, rss_max=rss),
                   litestream=None if litestream is None else Usage(cpu_pct=litestream, rss_max=30.0))

    rows = [row(1000, 0, 4.0, 2.0), row(5000, 0, 12.0, 6.0, rss=66.0), row(1000, 1, 3.0, 2.0),
            row(5000, 1, 10.0, 4.0), row(1000, 2, 6.0, 2.0), row(100, 0, 1.0, None)]
    by_rate = {r.rate: r for r in ratios(rows)}
    assert sorted(by_rate) == [1000, 5000]  # a rate Litestream did not run beside has no ratio
    one = by_rate[1000]
    assert one.cpu == 2.0 and one.cpu_range == (1.5, 3.0)  # the median of 2.0, 1.5 and 3.0, not of the CPUs' sum
    assert (one.sidecar_cpu, one.litestream_cpu) == (4.0, 2.0)
    assert one.rss == 2.0 and one.rss_spread == ""
    five = by_rate[5000]
    assert five.cpu == 2.25 and five.cpu_range == (2.0, 2.5)  # two runs: the mean of the middle pair
    assert five.rss_range == (2.0, 2.2)


def test_a_litestream_load_that_falls_short_is_also_compared_per_transaction() -> None:
    """On a slow machine Litestream's own load (one Python process committing) may not reach the rate: the CPU
    ratio is then also given per transaction, as each side's CPU over the transactions it replicated."""
    def row(run: int, ls_achieved: float) -> Row:
        r = Row(5000, run, sidecar=Usage(cpu_pct=40.0, rss_max=60.0), litestream=Usage(cpu_pct=8.0, rss_max=30.0))
        r.achieved, r.ls_achieved = 5000.0, ls_achieved
        return r

    (short,) = ratios([row(0, 4000.0), row(1, 4000.0), row(2, 5000.0)])
    assert short.cpu == 5.0  # 40% against 8% in each run, whatever the load reached
    assert short.litestream_short == 4000.0
    assert short.cpu_per_tx == 4.0  # the median of 4.0, 4.0 and 5.0: 40% for 5,000 tx/s against 8% for 4,000
    (even,) = ratios([row(0, 4990.0)])
    assert even.litestream_short is None and even.cpu_per_tx is None  # within 5%: the same load
