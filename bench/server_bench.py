"""How many databases one `litefs-sidecar serve` process holds: N databases each upload a small compacted LTX v2
file every second (what N sidecars batching at 1 s send), for N = 100, 500, 1000, 2000, 3000 …

Run: python -m bench.server_bench [--sizes 100,500,1000,2000,3000] [--seconds 12] [--clients 2] [--dir /var/tmp]

Each step starts a fresh server process (`serve --tokens-file`, file:// storage in a temp directory, default
engine settings, info-level JSON logs to a file) on 127.0.0.1 and opens one keep-alive connection per database,
as each LiteFS node or sidecar holds its own. Uploads are sent as LiteFS sends them: `POST /db/tx?db=NAME`,
chunked, no Content-Length. Every database sends the same chain of real LTX v2 files, built once from a real
SQLite database: a snapshot, then files of 3 transactions each (a few pages, LZ4, correct checksums).

The client is raw HTTP/1.1 over asyncio streams, with requests pre-built, spread over `--clients` processes, so
that it costs a fraction of the server; its CPU is printed beside the server's. Latency runs from when an upload
was due (each database on its own phase within the second) to the end of the response, so a server that falls
behind shows up as latency, not as fewer requests. The first `--warmup` seconds (databases being created) are
not counted. Server CPU and RSS come from /proc/<pid>/stat and /proc/<pid>/status.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing as mp
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from sidecar.ltx import FLAG_COMPRESS_LZ4, Header, Version, lock_pgno
from sidecar.ltx.checksum import page_checksum
from sidecar.ltx.compactor import compact
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.types import CHECKSUM_FLAG

TOKEN = "bench-token-0123456789abcdef"
GOAL_P99 = 0.250  # seconds
TXIDS_PER_UPLOAD = 3


def build_chain(uploads: int, workdir: Path) -> list[bytes]:
    """`uploads` contiguous LTX v2 files of one real SQLite database: a snapshot, then 3 transactions each."""
    path = workdir / "chain.db"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA page_size=4096")
    con.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, at INTEGER, body TEXT)")
    rng = random.Random(7)
    crcs: dict[int, int] = {}
    post, files = 0, []
    for txid in range(1, uploads * TXIDS_PER_UPLOAD + 1):
        con.execute("INSERT INTO events (at, body) VALUES (?, ?)", (txid, "e" * rng.randint(20, 200)))
        data = path.read_bytes()
        pages = {i // 4096 + 1: data[i:i + 4096] for i in range(0, len(data), 4096)}
        pages.pop(lock_pgno(4096), None)
        changed = {p: b for p, b in pages.items() if crcs.get(p) != page_checksum(p, b)}
        pre = post
        for p, b in changed.items():
            crcs[p] = page_checksum(p, b)
        value = 0
        for c in crcs.values():
            value ^= c
        post = CHECKSUM_FLAG | value
        header = Header(page_size=4096, commit=len(pages), min_txid=txid, max_txid=txid,
                        timestamp=1_790_000_000_000 + txid, pre_apply_checksum=pre if txid > 1 else 0,
                        flags=FLAG_COMPRESS_LZ4)
        out = io.BytesIO()
        enc = Encoder(out, header, Version.V2)
        for p in sorted(changed):
            enc.write_page(p, changed[p])
        enc.close(post)
        files.append(out.getvalue())
    con.close()
    chain = []
    for i in range(0, len(files), TXIDS_PER_UPLOAD):  # what the sidecar does with one second of LiteFS files
        out = io.BytesIO()
        compact(files[i:i + TXIDS_PER_UPLOAD], out, version=Version.V2)
        chain.append(out.getvalue())
    return chain


def request(db: str, body: bytes) -> bytes:
    """POST /db/tx as LiteFS's backup client sends it: chunked, no Content-Length."""
    head = (f"POST /db/tx?db={db} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: FlyV1 {TOKEN}\r\n"
            "Litefs-Cluster-Id: LFSC0123456789ABCDEF\r\nContent-Type: application/octet-stream\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    return head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


# -- the client: one process drives a share of the databases ---------------------------------------------


async def _database(port: int, db: str, chain: list[bytes], t0: float, seconds: int, phase: float,
                    out: list[tuple[float, float, int]]) -> None:
    """Connect once, then upload chain[j] at t0 + phase + j; record (due, latency, status)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    requests = [request(db, body) for body in chain[:seconds]]
    try:
        for j, req in enumerate(requests):
            due = t0 + phase + j
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(req)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                out.append((due, time.monotonic() - due, 0))
                return
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            out.append((due, time.monotonic() - due, status))
            if status != 200:
                return  # the chain is broken for this database; the error is counted
    finally:
        writer.close()


def client(port: int, dbs: list[str], chain: list[bytes], seconds: int, conn: Connection) -> None:
    """A client process: connect every database, report ready, wait for t0, upload, send the results back."""
    async def run() -> tuple[list[tuple[float, float, int]], float]:
        out: list[tuple[float, float, int]] = []
        t0 = conn.recv()
        rng = random.Random(os.getpid())
        cpu0 = time.process_time()
        await asyncio.gather(*(_database(port, db, chain, t0, seconds, rng.random(), out) for db in dbs))
        return out, time.process_time() - cpu0
    conn.send(asyncio.run(run()))


# -- the server process ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, every thread included, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int, key: str) -> float:
    """VmRSS or VmHWM (peak) of a process in MiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Step:
    n: int
    uploads_per_s: float
    p50: float
    p99: float
    server_cpu: float  # percent of one core
    server_sys: float  # the part of it in the kernel
    rss: float
    peak: float
    client_cpu: float
    errors: int

    @property
    def held(self) -> bool:
        return self.errors == 0 and self.p99 < GOAL_P99 and self.uploads_per_s >= 0.99 * self.n


def step(n: int, chain: list[bytes], args: argparse.Namespace, root: Path) -> Step:
    """One server, n databases, `args.seconds` seconds of uploads, its files under `root`.

    The files stay until every step has run: deleting thousands of them just before the next step would slow
    its file creations (ext4 skips recently freed inodes when it has no journal, as on this machine's disk).
    """
    root.mkdir()
    (root / "tokens").write_text(f"bench {TOKEN}\n")
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--addr", "127.0.0.1:0", "--tokens-file", str(root / "tokens"),
         "--storage", f"file://{root}/store", "--state-dir", str(root / "state"), "--log-format", "json",
         *args.serve_arg], stdout=subprocess.PIPE, stderr=log)
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        if not line.startswith("litefs-sidecar serving on"):
            raise SystemExit(f"server did not start: {line!r}\n{(root / 'server.log').read_text()[-2000:]}")
        port = int(line.rsplit(":", 1)[1])
        ctx = mp.get_context("spawn")
        names = [f"db{i:05d}.db" for i in range(n)]
        pipes, procs = [], []
        for k in range(args.clients):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client, args=(port, names[k::args.clients], chain, args.seconds, child))
            p.start()
            pipes.append(parent)
            procs.append(p)
        t0 = time.monotonic() + args.start_delay
        for pipe in pipes:
            pipe.send(t0)
        window = (t0 + args.warmup, t0 + args.seconds)
        time.sleep(max(0.0, window[0] - time.monotonic()))
        cpu0 = cpu_seconds(server.pid)
        spy = None
        if args.py_spy:  # sample the server during the window: where its CPU goes
            spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "-p", str(server.pid), "-d",
                                    str(int(window[1] - window[0])), "-f", "raw", "-o", f"{args.py_spy}-{n}.txt"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(max(0.0, window[1] - time.monotonic()))
        cpu1, rss, peak = cpu_seconds(server.pid), memory_mib(server.pid, "VmRSS"), memory_mib(server.pid, "VmHWM")
        results, client_cpu = [], 0.0
        for pipe, p in zip(pipes, procs, strict=True):
            out, cpu = pipe.recv()
            results += out
            client_cpu += cpu
            p.join()
        if spy is not None:
            spy.wait(timeout=60)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        log.close()
        if args.keep_logs:
            shutil.copy(root / "server.log", Path(args.keep_logs) / f"server-{n}.log")
    span = window[1] - window[0]
    counted = sorted(lat for due, lat, status in results if window[0] <= due < window[1] and status == 200)
    done = sum(1 for due, lat, status in results if window[0] <= due + lat < window[1] and status == 200)
    errors = sum(1 for _, _, status in results if status != 200) + n * args.seconds - len(results)

    def pct(q: float) -> float:
        return counted[min(len(counted) - 1, int(q * len(counted)))] if counted else float("nan")
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return Step(n, done / span, pct(0.50), pct(0.99), (user + system) / span * 100, system / span * 100, rss, peak,
                client_cpu / (args.seconds + args.start_delay) * 100, errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,500,1000,2000,3000", help="numbers of databases, comma-separated")
    parser.add_argument("--seconds", type=int, default=15, help="uploads per database in each step (one a second)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not counted at the start of each step")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--start-delay", type=float, default=3.0, help="seconds for clients to connect")
    parser.add_argument("--dir", default="/var/tmp", help="where the temporary store and state live (a real disk)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    parser.add_argument("--py-spy", metavar="PREFIX", help="profile the server with py-spy into PREFIX-N.txt")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy each step's server log into DIR")
    parser.add_argument("--stop-after-miss", action="store_true", help="stop at the first N that is not held")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="server-bench-", dir=args.dir))
    chain = build_chain(args.seconds, work)
    sizes = [len(b) for b in chain]
    print(f"{os.cpu_count()} CPUs; upload = {TXIDS_PER_UPLOAD} transactions, {min(sizes)}-{max(sizes)} bytes "
          f"(first: a {sizes[0]}-byte snapshot); {args.seconds} s per step, first {args.warmup:g} s not counted; "
          f"{args.clients} client processes")
    print(f"{'N':>6} {'uploads/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'server CPU (sys)':>17} {'RSS MiB':>8} "
          f"{'peak MiB':>9} {'client CPU':>11} {'errors':>7}  p99<250ms")
    best = 0
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            r = step(n, chain, args, work / f"n{n}")
            cpu = f"{r.server_cpu:.0f}% ({r.server_sys:.0f}%)"
            print(f"{r.n:>6} {r.uploads_per_s:>10.0f} {r.p50 * 1000:>8.1f} {r.p99 * 1000:>8.1f} {cpu:>17} "
                  f"{r.rss:>8.0f} {r.peak:>9.0f} {r.client_cpu:>10.0f}% {r.errors:>7}  {'yes' if r.held else 'NO'}",
                  flush=True)
            if r.held:
                best = max(best, n)
            elif args.stop_after_miss:
                break
    finally:
        shutil.rmtree(work)
    print(f"largest N held (p99 < {GOAL_P99 * 1000:.0f} ms, no errors, every upload made): {best}")


if __name__ == "__main__":
    main()
