"""bench/sidecar_bench.py's replay load: the emulator's transactions, renamed into ltx/ at the rate, in order."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

from bench.sidecar_bench import _replay_load
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
