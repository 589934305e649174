"""How many databases a LiteFS Cloud compatible backup server holds, and what each upload costs it.

N databases each upload a small compacted LTX v2 file every second (what N sidecars batching at 1 s send),
for each N in `--sizes`, against each target:

    python -m bench.server_bench [--sizes 100,500,1000] [--seconds 15]      # sweep: are uploads acknowledged fast
    python -m bench.server_bench --mode steady --store s3 --sizes 250,500    # steady: does the store keep up
    python -m bench.server_bench --verify on,off                             # ingest verification on and off
    python -m bench.server_bench --workers 1,2 --proxy 3                     # more processes over one store
    python -m bench.server_bench --url http://HOST:PORT --auth 'FlyV1 TOKEN' # any other server already running

Targets (each gets a table; the sizes run one after the other, every target at one N before the next N):

- `serve`: a fresh `litefs-sidecar serve` process per step (`--tokens-file` with `--clusters` clusters, the
  databases spread over them; `--store file` (a temp directory) or `s3` (moto's standalone server, started per
  step); default engine settings unless `--l0-interval` / `--serve-arg`; info-level JSON logs to a file). Each of
  `--verify on,off` (`--[no-]verify-checksums`) and each of `--workers 1,2` (`serve --workers N`: N processes on
  one port) is a target of its own.
- `proxy→K×serve` (`--proxy K`): K `serve` processes, each with its own port and state directory, over one store,
  behind a round-robin TCP proxy (asyncio, in its own process; each connection goes to the next process, as an
  L4 load balancer does). The leases are per cluster, so use several `--clusters` for the processes to share work.
- `aiohttp baseline`: a bare aiohttp handler in its own process that reads the same chunked body whole and
  answers 200 with a `Litefs-Hwm` header, no logging: the floor for CPU per upload, measured in the same run.
  Its steps are at most 15 s long (no store, nothing to reach a steady state).
- `url` (`--url`, `--auth`): a server already running; no process is started and, unless `--url-pid` names
  its process, no CPU figure is taken. `--l0-interval` then only tells the bench the server's flush interval
  (for the flushes due and the lag goal).

Modes:

- `sweep` (default): `--seconds` (15) per step, the first `--warmup` not counted: how fast uploads are
  acknowledged. Held = no errors, every upload made, p99 < 250 ms.
- `steady`: at least 6 L0 intervals counted per step. Held additionally needs the HWM lag p99 ≤ 2.5 L0
  intervals over the second half of the step, and the upload log not growing (see `log_growing`).

Columns (a figure the server does not export prints "n/a"):

- up/s, p50/p99: uploads acknowledged per second; latency from when an upload was due (each database on its own
  phase within the second) to the end of its response, so a server that falls behind shows up as latency.
- err: 5xx other than 503 (each retried after a second, as LiteFS retries), 4xx (which end that database's
  chain) and uploads never made. 503s: back-pressure, retried after `Retry-After`; not errors, but latency.
- CPU (sys): user+system CPU of the server's processes and their children (/proc), over the counted window, in %
  of one core; ms/up: CPU per upload; ×base: that over the baseline's at the same N; up/s/core: uploads one core
  would take at that cost (1 / CPU per upload). RSS: summed over the server's processes, at the end.
- PUTs/s: store PUTs (moto's request log on s3://, else `lfsc_store_requests_total{op="put"}`); flush/s (due):
  L0 flushes done (`lfsc_flushes_total`, else `lfsc_build_seconds_count{level="0"}`) beside those due, N / L0.
- HWM lag p50/p99/max: as the client sees it: for each database, at each response, the age of the oldest
  acknowledged upload above the `Litefs-Hwm` it returns; over the second half of the counted window.
- log: whether the backlog grew over the second half (`log_growing` on `lfsc_pending_uploads`, else on the
  upload log's size on disk); under each row: the series of both, every `--sample` seconds, and the server's
  own `lfsc_hwm_lag_seconds` (p50/p99/max over databases) and `lfsc_hwm_lag_seconds_max` at the end.
  With `--workers` above 1 a scrape of /metrics reaches one worker of several: counters are left out (n/a).
  In sweep mode /metrics is read only at the start and the end of the window: rendering it costs the server a
  few % of a core with thousands of databases, which would count as upload CPU.

The client is raw HTTP/1.1 over asyncio streams, requests pre-built, spread over `--clients` processes, one
keep-alive connection per database as each LiteFS node holds its own; uploads are sent as LiteFS sends them:
`POST /db/tx?db=NAME`, chunked. Every database sends the same chain of real LTX v2 files, built once from a real
SQLite database: a snapshot, then files of 3 transactions each (a few pages, LZ4, correct checksums). Its CPU is
printed beside the server's. The machine's single-core speed (bench/machine.py) heads the output; the summary
gives the ratios the goals are stated in: CPU per upload ≤ 3× the baseline's (issue 15), verification on/off
(issue 12), two workers holding ≥ 1.8× the databases one does (issue 13), the largest N held in steady state
(issue 17).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bench.machine import single_core_seconds
from sidecar.config import EngineConfig, parse_duration
from sidecar.engine.uploadlog import SEGMENT_SIZE
from sidecar.ltx import FLAG_COMPRESS_LZ4, Header, Version, lock_pgno
from sidecar.ltx.checksum import page_checksum
from sidecar.ltx.compactor import compact
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.types import CHECKSUM_FLAG

TOKEN = "bench-token-0123456789abcdef"  # cluster k's token is TOKEN + "-k"
GOAL_P99 = 0.250  # seconds
GOAL_LAG_INTERVALS = 2.5  # HWM lag p99, in L0 intervals (issue 17)
GOAL_BASELINE_RATIO = 3.0  # CPU per upload, ours / the bare aiohttp handler's (issue 15)
GOAL_WORKERS_RATIO = 1.8  # databases held by 2 workers / by 1 (issue 13)
STEADY_INTERVALS = 6  # L0 intervals counted per steady step
BASELINE_SECONDS = 15  # longest baseline step
TXIDS_PER_UPLOAD = 3
RETRY_AFTER_MAX = 5.0  # seconds: longest wait before a 503 is retried
RETRY_GRACE = 10.0  # seconds after the last upload was due during which 503s are still retried
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# -- the load ----------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Endpoint:
    """Where uploads go: an HTTP(S) origin."""

    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/"):
            raise SystemExit(f"--url {url!r}: want http://HOST:PORT or https://HOST[:PORT], no path")
        return cls(u.hostname, u.port or (443 if u.scheme == "https" else 80), u.scheme == "https")

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port,
                                             ssl=ssl.create_default_context() if self.tls else None)


def request(endpoint: Endpoint, db: str, auth: str, body: bytes) -> bytes:
    """POST /db/tx as LiteFS's backup client sends it: chunked, no Content-Length."""
    head = (f"POST /db/tx?db={db} HTTP/1.1\r\nHost: {endpoint.host}:{endpoint.port}\r\nAuthorization: {auth}\r\n"
            "Litefs-Cluster-Id: LFSC0123456789ABCDEF\r\nContent-Type: application/octet-stream\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    return head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-case names) of one HTTP/1.1 response; its body is read and dropped."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF (after the last: no trailers expected)
            if size == 0:
                break
    elif length := int(headers.get("content-length", "0")):
        await reader.readexactly(length)
    return status, headers


def retry_after(headers: dict[str, str]) -> float:
    """Seconds to wait before retrying a 503: its Retry-After (seconds form), 1 s if absent, at most 5 s."""
    try:
        return min(RETRY_AFTER_MAX, max(0.0, float(headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


class HwmLag:
    """How far one database's HWM trails what the server acknowledged, as its client sees it.

    At each acknowledgement: the age of the oldest acknowledged upload whose last TXID is above the HWM the
    response carries (0 when the HWM covers everything acknowledged).
    """

    def __init__(self) -> None:
        self._acked: deque[tuple[int, float]] = deque()  # (max TXID, when acknowledged), oldest first

    def ack(self, max_txid: int, at: float, hwm: int) -> float:
        self._acked.append((max_txid, at))
        while self._acked and self._acked[0][0] <= hwm:
            self._acked.popleft()
        return at - self._acked[0][1] if self._acked else 0.0


class Result(NamedTuple):
    """One upload as its client saw it."""

    due: float  # when it was due (monotonic clock)
    latency: float  # from due to the end of its last response
    status: int  # of the last response; 0: the connection was lost
    busy: int  # 503s (back-pressure) before it, each retried after Retry-After
    failed: int  # other 5xx before it, each retried as LiteFS retries: server errors
    lag: float  # HWM lag in seconds after it (see HwmLag); -1: no Litefs-Hwm header


async def _database(endpoint: Endpoint, db: str, auth: str, chain: list[bytes], t0: float, seconds: int,
                    phase: float, out: list[Result]) -> None:
    """Connect once, then upload chain[j] at t0 + phase + j; record one Result per upload made.

    A 5xx is retried after its Retry-After (1 s without), as LiteFS retries, until RETRY_GRACE seconds after
    the last upload was due; any other refusal ends this database's chain (its uploads are then missing)."""
    reader, writer = await endpoint.connect()
    requests = [request(endpoint, db, auth, body) for body in chain[:seconds]]
    lag = HwmLag()
    retry_until = t0 + seconds + RETRY_GRACE
    try:
        for j, req in enumerate(requests):
            due = t0 + phase + j
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            busy = failed = 0
            while True:
                try:
                    writer.write(req)
                    status, headers = await read_response(reader)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
                    out.append(Result(due, time.monotonic() - due, 0, busy, failed, -1.0))
                    return
                if status < 500 or time.monotonic() > retry_until:
                    break
                busy += status == 503
                failed += status != 503
                await asyncio.sleep(retry_after(headers))
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader, writer = await endpoint.connect()
            now = time.monotonic()
            hwm = headers.get("litefs-hwm")
            seen = lag.ack((j + 1) * TXIDS_PER_UPLOAD, now, int(hwm, 16)) if status == 200 and hwm else -1.0
            out.append(Result(due, now - due, status, busy, failed, seen))
            if status != 200:
                return  # the chain is broken for this database; the error is counted
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader, writer = await endpoint.connect()
    finally:
        writer.close()


def client(endpoint: Endpoint, dbs: list[tuple[str, str]], chain: list[bytes], seconds: int,
           conn: Connection) -> None:
    """A client process: connect every database, wait for t0, upload, send back (results, CPU seconds)."""
    async def run() -> tuple[list[Result], float]:
        out: list[Result] = []
        t0 = conn.recv()
        rng = random.Random(os.getpid())
        cpu0 = time.process_time()
        await asyncio.gather(*(_database(endpoint, db, auth, chain, t0, seconds, rng.random(), out)
                               for db, auth in dbs))
        return out, time.process_time() - cpu0
    conn.send(asyncio.run(run()))


# -- figures from samples (pure) -----------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    """The q-quantile of an ascending list (nearest rank below); NaN if empty."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def log_growing(series: list[tuple[float, float]], start: float, end: float, slack: float) -> bool | None:
    """Whether a backlog series (time, size) grew over the second half of [start, end]; None if too few samples.

    The peak of its last quarter against the peak of its third: flushes come in waves (every database's L0
    falls due at about the same time), so each quarter, at least 1.5 L0 intervals in steady mode, holds a full
    wave, and a store that keeps up gives the same peak twice. Growing = more than 25% higher, plus `slack`
    (the upload log on disk moves by whole segments).
    """
    half, three = start + (end - start) / 2, start + 3 * (end - start) / 4
    q3 = [v for t, v in series if half <= t < three]
    q4 = [v for t, v in series if three <= t <= end]
    if not q3 or not q4:
        return None
    return max(q4) > 1.25 * max(q3) + slack


Scrape = dict[str, list[tuple[dict[str, str], float]]]  # sample name -> [(labels, value)]


def parse_metrics(texts: list[str]) -> Scrape:
    """Prometheus exposition texts (one per process) as one table of samples."""
    out: Scrape = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def metric_total(scrape: Scrape | None, name: str, **labels: str) -> float | None:
    """The sum of `name`'s samples whose labels include `labels`; None if the server exports none."""
    if scrape is None or name not in scrape:
        return None
    picked = [v for lab, v in scrape[name] if all(lab.get(k) == w for k, w in labels.items())]
    return sum(picked) if picked else None


def flushes_total(scrape: Scrape | None) -> float | None:
    """L0 flushes so far: `lfsc_flushes_total`, else the count of level-0 builds."""
    found = metric_total(scrape, "lfsc_flushes_total")
    return found if found is not None else metric_total(scrape, "lfsc_build_seconds_count", level="0")


def mean_ms(first: Scrape | None, last: Scrape | None, histogram: str, **labels: str) -> float | None:
    """The mean of a histogram's observations between two scrapes, in ms; None without any."""
    total = rate(metric_total(first, histogram + "_sum", **labels), metric_total(last, histogram + "_sum", **labels), 1)
    count = rate(metric_total(first, histogram + "_count", **labels),
                 metric_total(last, histogram + "_count", **labels), 1)
    return total / count * 1000 if total is not None and count else None


def rate(first: float | None, last: float | None, span: float) -> float | None:
    """Per second between two readings of a counter; one first seen at the end (a label's first use) began at 0."""
    return None if last is None else (last - (first or 0.0)) / span


# -- processes ---------------------------------------------------------------------------------------------


def descendants(pids: list[int]) -> list[int]:
    """`pids` and every process below them (workers, forked helpers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, every thread included, from /proc/<pid>/stat; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pids: list[int]) -> dict[int, tuple[float, float]]:
    return {pid: cpu_seconds(pid) for pid in descendants(pids)}


def cpu_between(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]) -> tuple[float, float]:
    """(user, system) CPU seconds the processes spent between two `tree_cpu` readings."""
    user = sum(u - before.get(pid, (0.0, 0.0))[0] for pid, (u, _) in after.items())
    system = sum(s - before.get(pid, (0.0, 0.0))[1] for pid, (_, s) in after.items())
    return user, system


def memory_mib(pids: list[int], key: str) -> float:
    """VmRSS or VmHWM (peak) in MiB, summed over processes, from /proc/<pid>/status."""
    total = 0.0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(key + ":"):
                total += int(line.split()[1]) / 1024
    return total


def log_bytes(state_dirs: list[Path]) -> int:
    """Bytes of the upload log on disk: every file under a `log` directory of the state directories."""
    total = 0
    for state in state_dirs:
        for dirpath, _, files in os.walk(state):
            if "log" in Path(dirpath).relative_to(state).parts:
                for f in files:
                    try:
                        total += os.stat(os.path.join(dirpath, f)).st_size
                    except OSError:
                        pass  # deleted while we looked
    return total


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_server(cmd: list[str], log_path: Path, what: str, env: dict[str, str] | None = None,
                 ) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server that prints `… serving on http://HOST:PORT` once listening; return it and its port."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "serving on" not in line:
        stop_process(proc)
        tail = log_path.read_text(errors="replace")[-2000:]
        if "--workers" in cmd and "--workers" in tail:
            raise SystemExit(f"{what} refused --workers: this litefs-sidecar has no `serve --workers N` yet "
                             f"(issue 13).\n{tail}")
        raise SystemExit(f"{what} did not start: {line!r}\n{tail}")
    return proc, int(line.strip().rstrip("/").rsplit(":", 1)[1])


class MotoLog:
    """Requests moto's standalone server has answered so far, by method, read from its request log."""

    LINE = re.compile(rb'"(PUT|GET|HEAD|DELETE|POST) /')

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.counts: dict[str, int] = {}

    def read(self) -> dict[str, int]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]  # whole lines only
        self.offset += len(data)
        for m in self.LINE.finditer(data):
            method = m.group(1).decode()
            self.counts[method] = self.counts.get(method, 0) + 1
        return dict(self.counts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(root: Path) -> tuple[subprocess.Popen[bytes], str, MotoLog]:
    """moto's standalone server on a free port, its request log in root/moto.log; (process, endpoint, log)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "moto.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                raise SystemExit(f"moto's server did not start: {(root / 'moto.log').read_text()[-2000:]}") from None
            time.sleep(0.1)
    urllib.request.urlopen(urllib.request.Request(f"{url}/bench", method="PUT"), timeout=10).close()
    return proc, url, MotoLog(root / "moto.log")


def proxy(backends: list[int], conn: Connection) -> None:
    """A round-robin TCP proxy on 127.0.0.1 (each new connection to the next backend port); sends its port."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # either side went away: close the other
        finally:
            writer.close()

    async def run() -> None:
        turn = itertools.cycle(backends)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", next(turn))
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
        conn.send(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()
    asyncio.run(run())


def baseline_server() -> None:
    """The same-run floor: POST /db/tx reads the chunked body whole, answers 200 with a Litefs-Hwm header."""
    async def post_tx(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(headers={"Litefs-Hwm": "0000000000000000"})

    async def run() -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/db/tx", post_tx)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
        print(f"baseline serving on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
    asyncio.run(run())


# -- one step: one target, N databases ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a table measures."""

    kind: str  # "serve", "proxy", "baseline" or "url"
    workers: int | None = None  # serve --workers N; None: the flag is not passed
    verify: bool = True
    processes: int = 1  # behind the proxy

    @property
    def label(self) -> str:
        if self.kind in ("baseline", "url"):
            return {"baseline": "aiohttp baseline", "url": "url"}[self.kind]
        out = "serve" if self.kind == "serve" else f"proxy→{self.processes}×serve"
        if self.workers is not None:
            out += f" workers={self.workers}"
        return out + ("" if self.verify else " verify=off")


@dataclass
class Running:
    """The processes serving one step, and where the bench reads them."""

    endpoint: Endpoint
    server_pids: list[int] = field(default_factory=list)  # their CPU and RSS (children included) are the server's
    metrics_urls: list[str] = field(default_factory=list)
    state_dirs: list[Path] = field(default_factory=list)
    moto: tuple[int, MotoLog] | None = None  # the store's process and request log, on s3://
    proxy_pid: int | None = None
    counters_valid: bool = True  # False when a scrape reaches one process of several sharing a port
    ports: list[int] = field(default_factory=list)  # of each server process


@dataclass
class Sample:
    """What the bench reads from the running server every `--sample` seconds."""

    t: float  # seconds since the load started
    log_bytes: int | None
    pending: float | None
    scrape: Scrape | None
    store: dict[str, int] | None  # requests moto answered so far, by method


@dataclass
class Step:
    """The figures of one target at one N (see the module docstring for each)."""

    target: Target
    n: int
    steady: bool
    l0: float
    span: float
    uploads_per_s: float
    p50: float
    p99: float
    errors: int
    retries: int
    cpu: float | None  # CPU seconds of the server over the window (None: not measured)
    sys_cpu: float | None
    uploads: int
    rss: float | None
    peak: float | None
    client_cpu: float
    store_cpu: float | None
    proxy_cpu: float | None
    puts_per_s: float | None
    store_req_per_s: float | None
    flushes_per_s: float | None
    lag: tuple[float, float, float] | None  # client-seen p50, p99, max over the second half
    server_lag: tuple[float, float, float] | None  # lfsc_hwm_lag_seconds over databases at the end
    server_lag_max: float | None
    put_ms: float | None  # mean store PUT latency over the window, from lfsc_store_request_seconds
    flush_concurrency: float | None  # lfsc_flush_concurrency at the end
    log_series: list[tuple[float, int]]
    pending_series: list[tuple[float, float]]
    growing: bool | None
    baseline_cpu_per_upload: float | None = None
    rep: int = 0  # which of `--repeat` runs

    @property
    def cpu_per_upload(self) -> float | None:
        return self.cpu / self.uploads if self.cpu is not None and self.uploads else None

    @property
    def baseline_ratio(self) -> float | None:
        mine, base = self.cpu_per_upload, self.baseline_cpu_per_upload
        return mine / base if mine is not None and base else None

    @property
    def acknowledged(self) -> bool:
        return self.errors == 0 and self.p99 < GOAL_P99 and self.uploads_per_s >= 0.99 * self.n

    @property
    def lag_bounded(self) -> bool | None:
        return None if self.lag is None else self.lag[1] <= GOAL_LAG_INTERVALS * self.l0

    @property
    def held(self) -> bool:
        """Sweep: acknowledged in time. Steady: also the HWM keeping up and the log not growing (when known)."""
        if not self.steady or self.target.kind == "baseline":
            return self.acknowledged
        return self.acknowledged and self.lag_bounded is not False and self.growing is not True


def step(target: Target, n: int, chain: list[bytes], args: argparse.Namespace, root: Path) -> Step:
    """One target, n databases, its files under `root` (kept until the end of the run: deleting thousands of
    files just before the next step would slow its file creations on this machine's journal-less ext4)."""
    root.mkdir()
    seconds = min(args.seconds, BASELINE_SECONDS) if target.kind == "baseline" else args.seconds
    procs: list[subprocess.Popen[bytes]] = []
    proxy_proc: BaseProcess | None = None
    try:
        running = start_target(target, args, root, procs)
        if target.kind == "proxy":
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe()
            proxy_proc = ctx.Process(target=proxy, args=(running.ports, child), daemon=True)
            proxy_proc.start()
            running.endpoint = Endpoint("127.0.0.1", parent.recv())
            parent.close()
            running.proxy_pid = proxy_proc.pid
        return load(target, n, chain, seconds, args, running)
    finally:
        if proxy_proc is not None:
            proxy_proc.terminate()
            proxy_proc.join()
        for proc in reversed(procs):
            stop_process(proc)
        if args.keep_logs:
            Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
            for log in root.glob("*.log"):
                shutil.copy(log, Path(args.keep_logs) / f"{slug(target.label)}-{n}-{log.name}")


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def start_target(target: Target, args: argparse.Namespace, root: Path,
                 procs: list[subprocess.Popen[bytes]]) -> Running:
    """Start what serves `target` (appending each process to `procs`, which the caller stops)."""
    if target.kind == "url":
        running = Running(Endpoint.parse(args.url), metrics_urls=[args.url.rstrip("/") + "/metrics"])
        if args.url_pid:
            running.server_pids = [args.url_pid]
        return running
    if target.kind == "baseline":
        proc, port = start_server([sys.executable, "-m", "bench.server_bench", "--baseline-server"],
                                  root / "baseline.log", "the aiohttp baseline")
        procs.append(proc)
        return Running(Endpoint("127.0.0.1", port), server_pids=[proc.pid])
    (root / "tokens").write_text("".join(f"bench{k} {TOKEN}-{k}\n" for k in range(args.clusters)))
    env = dict(os.environ)
    moto = None
    if args.store == "s3":
        env.update(CREDENTIALS)
        moto_proc, endpoint, moto_log = start_moto(root)
        procs.append(moto_proc)
        moto = (moto_proc.pid, moto_log)
        store = ["--storage", "s3://bench/backups", "--s3-endpoint", endpoint, "--s3-region", "us-east-1",
                 "--s3-force-path-style"]
    else:
        store = ["--storage", f"file://{root}/store"]
    running = Running(Endpoint("127.0.0.1", 0), moto=moto,
                      counters_valid=target.workers is None or target.workers <= 1)
    for k in range(target.processes):
        state = root / f"state{k}"
        # Workers share one port (SO_REUSEPORT): with port 0 each would bind a port of its own.
        addr = f"127.0.0.1:{free_port() if target.workers is not None else 0}"
        cmd = [sys.executable, "-m", "sidecar", "serve", "--addr", addr,
               "--tokens-file", str(root / "tokens"), *store, "--state-dir", str(state), "--log-format", "json"]
        if args.l0_interval is not None:
            cmd += ["--l0-interval", args.l0_interval]
        if not target.verify:
            cmd.append("--no-verify-checksums")
        if target.workers is not None:
            cmd += ["--workers", str(target.workers)]
        proc, port = start_server(cmd + args.serve_arg, root / f"server{k}.log", "litefs-sidecar serve", env)
        procs.append(proc)
        running.endpoint = Endpoint("127.0.0.1", port)
        running.server_pids.append(proc.pid)
        running.metrics_urls.append(f"http://127.0.0.1:{port}/metrics")
        running.ports.append(port)
        running.state_dirs.append(state)
    return running


def scrape(urls: list[str]) -> Scrape | None:
    """Every process's /metrics as one table; None if any does not answer or is not Prometheus text."""
    texts = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                texts.append(resp.read().decode())
        except (OSError, ValueError):
            return None
    try:
        return parse_metrics(texts)
    except ValueError:
        return None


def sample(running: Running, t: float, metrics: bool = True) -> Sample:
    """The log's size, moto's request counts and (if `metrics`) the servers' /metrics, now."""
    s = scrape(running.metrics_urls) if running.metrics_urls and metrics else None
    pending = metric_total(s, "lfsc_pending_uploads") if running.counters_valid else None
    return Sample(t, log_bytes(running.state_dirs) if running.state_dirs else None, pending, s,
                  running.moto[1].read() if running.moto else None)


def load(target: Target, n: int, chain: list[bytes], seconds: int, args: argparse.Namespace,
         running: Running) -> Step:
    """Drive n databases against `running` for `seconds`, sampling it, and compute the step's figures."""
    ctx = mp.get_context("spawn")
    run_id = f"{random.randrange(16 ** 4):04x}"  # fresh names, so a server that keeps its data sees new databases
    clusters = 1 if target.kind == "url" else args.clusters
    dbs = [(f"b{run_id}-{i:05d}.db", args.auth if target.kind == "url" else f"FlyV1 {TOKEN}-{i % clusters}")
           for i in range(n)]
    pipes, clients = [], []
    for k in range(args.clients):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=client, args=(running.endpoint, dbs[k::args.clients], chain, seconds, child))
        p.start()
        pipes.append(parent)
        clients.append(p)
    start = time.monotonic() + args.start_delay
    for pipe in pipes:
        pipe.send(start)
    # The baseline's steps are capped (BASELINE_SECONDS) and hold no state to settle: a long --warmup is not its.
    warmup = min(args.warmup, seconds / 5) if target.kind == "baseline" else args.warmup
    window = (start + warmup, start + seconds)
    time.sleep(max(0.0, window[0] - time.monotonic()))
    measured = running.server_pids + ([running.moto[0]] if running.moto else []) + (
        [running.proxy_pid] if running.proxy_pid else [])
    cpu0 = tree_cpu(measured)
    samples = [sample(running, time.monotonic() - start)]
    spy = None
    if args.py_spy and running.server_pids:  # where the server's CPU goes, over the window
        spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "--subprocesses", "-p",
                                str(running.server_pids[0]), "-d", str(int(window[1] - window[0])), "-f", "raw",
                                "-o", f"{args.py_spy}-{slug(target.label)}-{n}.txt"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while (now := time.monotonic()) < window[1]:
        time.sleep(max(0.0, min(start + samples[-1].t + args.sample, window[1]) - now))
        if time.monotonic() < window[1] - 0.5:
            samples.append(sample(running, time.monotonic() - start, metrics=args.mode == "steady"))
    cpu1 = tree_cpu(measured)
    pids = descendants(running.server_pids)
    rss, peak = memory_mib(pids, "VmRSS"), memory_mib(pids, "VmHWM")
    samples.append(sample(running, time.monotonic() - start))
    results: list[Result] = []
    client_cpu = 0.0
    for pipe, p in zip(pipes, clients, strict=True):
        try:
            out, cpu = pipe.recv()
        except (EOFError, ConnectionError):
            p.join()
            raise SystemExit(f"a client process failed (exit code {p.exitcode}); its traceback is above") from None
        results += out
        client_cpu += cpu
        p.join()
    if spy is not None:
        spy.wait(timeout=60)
    return figures(target, n, args, window, start, seconds, results, client_cpu, samples, running, cpu0, cpu1,
                   rss, peak)


def figures(target: Target, n: int, args: argparse.Namespace, window: tuple[float, float], start: float,
            seconds: int, results: list[Result], client_cpu: float, samples: list[Sample], running: Running,
            cpu0: dict[int, tuple[float, float]], cpu1: dict[int, tuple[float, float]], rss: float,
            peak: float) -> Step:
    span = window[1] - window[0]
    counted = sorted(r.latency for r in results if window[0] <= r.due < window[1] and r.status == 200)
    done = sum(1 for r in results if window[0] <= r.due + r.latency < window[1] and r.status == 200)
    errors = sum((r.status != 200) + r.failed for r in results) + n * seconds - len(results)
    half = (window[0] + window[1]) / 2
    lags = sorted(r.lag for r in results if r.lag >= 0 and half <= r.due + r.latency < window[1]
                  and target.kind != "baseline")  # the baseline's HWM is a constant

    def cpu_of(pids: list[int]) -> tuple[float, float] | None:
        if not pids:
            return None
        tree = descendants(pids)
        return cpu_between({p: cpu0[p] for p in tree if p in cpu0}, {p: cpu1[p] for p in tree if p in cpu1})
    server = cpu_of(running.server_pids)
    store = cpu_of([running.moto[0]]) if running.moto else None
    proxied = cpu_of([running.proxy_pid]) if running.proxy_pid else None
    first, last = samples[0], samples[-1]
    valid = running.counters_valid
    puts: float | None
    requests: float | None
    if first.store is not None and last.store is not None:
        puts = (last.store.get("PUT", 0) - first.store.get("PUT", 0)) / span
        requests = (sum(last.store.values()) - sum(first.store.values())) / span
    else:
        puts = rate(metric_total(first.scrape, "lfsc_store_requests_total", op="put"),
                    metric_total(last.scrape, "lfsc_store_requests_total", op="put"), span) if valid else None
        requests = None
    server_lags = sorted(v for _, v in (last.scrape or {}).get("lfsc_hwm_lag_seconds", []))
    lag_max = metric_total(last.scrape, "lfsc_hwm_lag_seconds_max")
    t_window = (window[0] - start, window[1] - start)
    log_series = [(s.t, s.log_bytes) for s in samples if s.log_bytes is not None]
    pending_series = [(s.t, s.pending) for s in samples if s.pending is not None]
    # The backlog itself if the server says; else the log's size on disk, which moves by whole segments.
    growing = log_growing(pending_series, *t_window, slack=n)
    if growing is None:
        growing = log_growing([(t, float(b)) for t, b in log_series], *t_window, slack=SEGMENT_SIZE)
    return Step(
        target=target, n=n, steady=args.mode == "steady", l0=args.l0_seconds, span=span,
        uploads_per_s=done / span, p50=percentile(counted, 0.50), p99=percentile(counted, 0.99),
        errors=errors, retries=sum(r.busy for r in results),
        cpu=sum(server) if server else None, sys_cpu=server[1] if server else None, uploads=done,
        rss=rss if running.server_pids else None, peak=peak if running.server_pids else None,
        client_cpu=client_cpu / (seconds + args.start_delay),
        store_cpu=sum(store) / span if store else None, proxy_cpu=sum(proxied) / span if proxied else None,
        puts_per_s=puts, store_req_per_s=requests,
        flushes_per_s=rate(flushes_total(first.scrape), flushes_total(last.scrape), span) if valid else None,
        lag=(percentile(lags, 0.5), percentile(lags, 0.99), lags[-1]) if lags else None,
        server_lag=(percentile(server_lags, 0.5), percentile(server_lags, 0.99), server_lags[-1])
        if server_lags and valid else None,
        server_lag_max=lag_max if valid else None,
        put_ms=mean_ms(first.scrape, last.scrape, "lfsc_store_request_seconds", op="put") if valid else None,
        flush_concurrency=metric_total(last.scrape, "lfsc_flush_concurrency") if valid else None,
        log_series=log_series, pending_series=pending_series, growing=growing)


# -- output ------------------------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or value != value else f"{value:{spec}}{suffix}"


def fmt_triple(t: tuple[float, float, float] | None) -> str:
    return "n/a" if t is None else "/".join(f"{v:.1f}" for v in t)


HEADER = (f"{'N':>6} {'up/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'err':>4} {'503s':>5} {'CPU (sys)':>11} "
          f"{'ms/up':>6} {'×base':>6} {'up/s/core':>9} {'RSS MiB':>7} {'PUTs/s':>7} {'flush/s (due)':>13} "
          f"{'HWM lag s p50/p99/max':>21} {'log':>5}  held")


def row(s: Step) -> str:
    """One line of a target's table, in HEADER's columns."""
    cpu = "n/a" if s.cpu is None or s.sys_cpu is None else \
        f"{s.cpu / s.span * 100:.0f}% ({s.sys_cpu / s.span * 100:.0f}%)"
    per = s.cpu_per_upload
    due = s.n / s.l0 if s.l0 > 0 else None
    flush = f"{fmt(s.flushes_per_s, '.0f')} ({fmt(due, '.0f')})"
    growing = {None: "n/a", True: "grows", False: "flat"}[s.growing]
    return (f"{s.n:>6} {s.uploads_per_s:>6.0f} {s.p50 * 1000:>7.1f} {s.p99 * 1000:>7.1f} {s.errors:>4} "
            f"{s.retries:>5} {cpu:>11} {fmt(per and per * 1000, '.2f'):>6} {fmt(s.baseline_ratio, '.2f', '×'):>6} "
            f"{fmt(per and 1 / per, '.0f'):>9} {fmt(s.rss, '.0f'):>7} {fmt(s.puts_per_s, '.1f'):>7} {flush:>13} "
            f"{fmt_triple(s.lag):>21} {growing:>5}  {'yes' if s.held else 'NO'}")


def details(s: Step) -> str:
    """The step's other figures, indented under its row."""
    parts = [f"client CPU {s.client_cpu * 100:.0f}%"]
    if s.store_cpu is not None:
        parts.append(f"store (moto) CPU {s.store_cpu * 100:.0f}%, {fmt(s.store_req_per_s, '.0f')} requests/s")
    if s.proxy_cpu is not None:
        parts.append(f"proxy CPU {s.proxy_cpu * 100:.0f}%")
    if s.peak is not None:
        parts.append(f"peak RSS {s.peak:.0f} MiB")
    if s.target.kind != "baseline":
        parts.append(f"server's lfsc_hwm_lag_seconds at the end p50/p99/max {fmt_triple(s.server_lag)} s, "
                     f"lfsc_hwm_lag_seconds_max {fmt(s.server_lag_max, '.1f')}; store PUT mean "
                     f"{fmt(s.put_ms, '.1f', ' ms')}; flush concurrency {fmt(s.flush_concurrency, '.0f')}")
    lines = ["       " + "; ".join(parts)]
    if s.log_series:
        lines.append("       upload log MiB at t s: " + " ".join(f"{t:.0f}:{b / 2**20:.1f}" for t, b in s.log_series))
    if s.pending_series:
        lines.append("       pending uploads at t s: " + " ".join(f"{t:.0f}:{v:.0f}" for t, v in s.pending_series))
    return "\n".join(lines)


def held_sizes(steps: list[Step]) -> list[int]:
    """The sizes at which every repeat held."""
    sizes = sorted({s.n for s in steps})
    return [n for n in sizes if all(s.held for s in steps if s.n == n)]


def largest_held(steps: list[Step]) -> str:
    held = held_sizes(steps)
    if not held:
        return "none"
    return f"≥{held[-1]}" if held[-1] == max(s.n for s in steps) else str(held[-1])  # ≥: no larger size was tried


def medians(values: list[tuple[int, float]]) -> dict[int, float]:
    """The median per N of (N, value) pairs, in order of N."""
    out: dict[int, list[float]] = {}
    for n, v in sorted(values):
        out.setdefault(n, []).append(v)
    return {n: statistics.median(vs) for n, vs in out.items()}


def summary(steps: list[Step], targets: list[Target], args: argparse.Namespace, single_core: float) -> None:
    """The goals' ratios, each from steps of the same run (medians over `--repeat` at each N)."""
    by: dict[Target, list[Step]] = {t: [s for s in steps if s.target == t] for t in targets}
    what = f"{args.mode}, {args.url or args.store + '://'}" + (
        f", L0 {args.l0_seconds:g} s" if args.mode == "steady" else "")
    print(f"\nsummary ({what}; {args.repeat} run(s) of each step, medians; single-core speed: a 10-million-step "
          f"Python loop takes {single_core:.2f} s CPU)")
    held_rule = "p99 < 250 ms, no errors, every upload made" + (
        f", HWM lag p99 ≤ {GOAL_LAG_INTERVALS:g} L0 intervals, log not growing" if args.mode == "steady" else "")
    print(f"  largest N held in every run ({held_rule}):")
    for t in targets:
        if t.kind != "baseline":
            print(f"    {t.label:<28} {largest_held(by[t])}")
    if any(s.baseline_ratio is not None for s in steps):
        print(f"  CPU per upload / the bare aiohttp handler's at the same N (goal ≤ {GOAL_BASELINE_RATIO:g}×; fixed "
              "costs weigh most at small N), and uploads/s one core takes at that cost:")
        for t in targets:
            ratio = medians([(s.n, s.baseline_ratio) for s in by[t] if s.baseline_ratio is not None])
            per_core = medians([(s.n, 1 / s.cpu_per_upload) for s in by[t] if s.cpu_per_upload])
            if t.kind == "baseline" and per_core:
                print(f"    {t.label:<28} " + ", ".join(f"N={n} {v:.0f}/s" for n, v in per_core.items()))
            elif ratio:
                print(f"    {t.label:<28} " + ", ".join(f"N={n} {v:.2f}× ({per_core[n]:.0f}/s)"
                                                        for n, v in ratio.items()))
    for t_on in [t for t in targets if t.kind == "serve" and t.verify]:
        t_off = Target(t_on.kind, t_on.workers, False, t_on.processes)
        pairs = [(a, b) for a in by[t_on] for b in by.get(t_off, []) if (a.n, a.rep) == (b.n, b.rep)]
        on = medians([(a.n, a.cpu_per_upload * 1000) for a, _ in pairs if a.cpu_per_upload])
        off = medians([(b.n, b.cpu_per_upload * 1000) for _, b in pairs if b.cpu_per_upload])
        ratio = medians([(a.n, a.cpu_per_upload / b.cpu_per_upload) for a, b in pairs
                         if a.cpu_per_upload and b.cpu_per_upload])
        if ratio:
            print(f"  ingest verification ({t_on.label}), CPU ms per upload on / off: "
                  + ", ".join(f"N={n} {on[n]:.3f} / {off[n]:.3f} = {v:.2f}×" for n, v in ratio.items()))
    one = next((t for t in targets if t.kind == "serve" and t.workers == 1 and t.verify), None)
    two = next((t for t in targets if t.kind == "serve" and t.workers == 2 and t.verify), None)
    if one and two:
        h1, h2 = held_sizes(by[one]), held_sizes(by[two])
        scale = f"{h2[-1] / h1[-1]:.2f}×" if h1 and h2 else "n/a"
        print(f"  workers: 1 holds {largest_held(by[one])}, 2 hold {largest_held(by[two])}: 2/1 = {scale} "
              f"(goal ≥ {GOAL_WORKERS_RATIO:g}×; ≥ means the largest size tried was held)")


# -- main ------------------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[Target]:
    """The targets of this run, the baseline first (its CPU per upload at each N is the others' yardstick)."""
    if args.url:
        return [Target("url")]
    verify = [{"on": True, "off": False}[v] for v in args.verify.split(",")]
    workers: list[int | None] = [int(w) for w in args.workers.split(",")] if args.workers else [None]
    targets = [Target("baseline")] if args.baseline else []
    targets += [Target("serve", w, v) for w in workers for v in verify]
    if args.proxy:
        targets.append(Target("proxy", None, verify[0], args.proxy))
    return targets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["sweep", "steady"], default="sweep",
                        help="sweep: short steps (acknowledgement); steady: ≥ 6 L0 intervals (does the store keep up)")
    parser.add_argument("--store", choices=["file", "s3"], default="file", help="file:// (temp dir) or s3:// (moto)")
    parser.add_argument("--sizes", default="100,500,1000", help="numbers of databases, comma-separated")
    parser.add_argument("--seconds", type=int, help="uploads per database in each step (one a second); default "
                        "15 in sweep mode, warmup + 6 L0 intervals in steady mode")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not counted at the start of each step")
    parser.add_argument("--l0-interval", metavar="DURATION", help="passed to `serve --l0-interval` (default: "
                        "serve's, 10s); steady steps last 6 of them")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples of /metrics and the log")
    parser.add_argument("--clusters", type=int, default=8, help="clusters (tokens) the databases are spread over; "
                        "the leases are per cluster, so workers and processes share work by cluster")
    parser.add_argument("--verify", default="on", help="ingest verification: on, off or on,off (a target each)")
    parser.add_argument("--workers", metavar="N,…", help="serve --workers N, a target each (e.g. 1,2)")
    parser.add_argument("--proxy", type=int, metavar="K", help="also K serve processes behind a round-robin proxy")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the bare aiohttp handler too (default: yes, unless --url)")
    parser.add_argument("--url", help="measure a server already running (http://HOST:PORT); nothing is started")
    parser.add_argument("--auth", help="with --url: the Authorization header value to send (e.g. 'FlyV1 TOKEN')")
    parser.add_argument("--url-pid", type=int, help="with --url: the server's process id, to read its CPU and RSS")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each step (the summary gives medians)")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--start-delay", type=float, default=3.0, help="seconds for clients to connect")
    parser.add_argument("--dir", default="/var/tmp", help="where the temporary store and state live (a real disk)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    parser.add_argument("--py-spy", metavar="PREFIX", help="profile the server with py-spy into PREFIX-TARGET-N.txt")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy each step's server (and moto) logs into DIR")
    parser.add_argument("--stop-after-miss", action="store_true", help="stop a target at its first N not held")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server:
        return args
    if args.url and not args.auth:
        parser.error("--url needs --auth (the Authorization header value, e.g. 'FlyV1 TOKEN')")
    if args.url:
        args.baseline = False
    if set(args.verify.split(",")) - {"on", "off"}:
        parser.error(f"--verify {args.verify!r}: want on, off or on,off")
    args.l0_seconds = parse_duration(args.l0_interval) if args.l0_interval else EngineConfig().l0_interval
    need = args.warmup + STEADY_INTERVALS * args.l0_seconds
    if args.seconds is None:
        args.seconds = int(-(-need // 1)) if args.mode == "steady" else 15
    elif args.mode == "steady" and args.seconds < need:
        parser.error(f"--seconds {args.seconds}: steady mode counts at least {STEADY_INTERVALS} L0 intervals "
                     f"after the warmup: ≥ {need:g}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.baseline_server:
        baseline_server()
        return
    targets = plan(args)
    single_core = single_core_seconds()
    work = Path(tempfile.mkdtemp(prefix="server-bench-", dir=args.dir))
    chain = build_chain(args.seconds, work)
    sizes = [len(b) for b in chain]
    print(f"{os.cpu_count()} CPUs; single-core speed: a 10-million-step Python loop takes {single_core:.2f} s CPU")
    print(f"upload = {TXIDS_PER_UPLOAD} transactions, {min(sizes)}-{max(sizes)} bytes (first: a {sizes[0]}-byte "
          f"snapshot); mode {args.mode}, {args.seconds} s per step (baseline ≤ {BASELINE_SECONDS} s), first "
          f"{args.warmup:g} s not counted; store {args.store}://; L0 interval {args.l0_seconds:g} s; "
          f"{args.clusters if not args.url else 1} clusters; {args.clients} client processes")
    print(f"{'target':<28} {HEADER}")
    steps: list[Step] = []
    missed: set[Target] = set()
    try:
        for n, rep in itertools.product([int(s) for s in args.sizes.split(",")], range(args.repeat)):
            base = None  # every target at this N and repeat, one after the other, the baseline first
            for t in targets:
                if t in missed:
                    continue
                s = step(t, n, chain, args, work / f"{slug(t.label)}-n{n}-{rep}")
                s.rep = rep
                if t.kind == "baseline":
                    base = s.cpu_per_upload
                else:
                    s.baseline_cpu_per_upload = base
                steps.append(s)
                print(f"{t.label:<28} {row(s)}\n{details(s)}", flush=True)
                if not s.held and args.stop_after_miss and t.kind != "baseline":
                    missed.add(t)
    finally:
        shutil.rmtree(work)
    for t in targets:
        print(f"\n{t.label}\n{HEADER}")
        for s in steps:
            if s.target == t:
                print(row(s))
    summary(steps, targets, args, single_core)


if __name__ == "__main__":
    main()
