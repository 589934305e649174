"""Any number of `serve` processes over one store: requests reach the process that writes their cluster, a dead
process is replaced within the lease TTL, and a process paused past its lease writes nothing once it resumes.

Three `serve` processes on one moto store, behind a round-robin proxy in this test; databases in three clusters
upload every second as a sidecar does (on 409 it continues from the position it is given). Then: every transaction
ends up stored, no history forks (no two stored files of a level overlap), and each database restores to exactly
its client's state.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.engine import Engine
from sidecar.ltx import Pos, Version
from sidecar.ltx.compactor import compact
from sidecar.storage import open_storage
from sidecar.storage.layout import Layout
from tests.engine.history import History
from tests.s3server import MotoServer, free_port
from tests.server.conftest import wait_until, wait_up

CLUSTERS = {"red": "tok-red-0123456789abcdef0", "green": "tok-green-0123456789abcdef",
            "blue": "tok-blue-0123456789abcdef"}
TTL = "6s"  # a short lease, so takeovers happen within the test
# The kill test's size. CI runs a small one; the full run is
# SCALEOUT_TEST_SIZE="50 20 120" pytest tests/server/test_scaleout.py -k killed
# (50 databases, one process killed every 20 s, for 120 s).
DBS, KILL_EVERY, SECONDS = (int(x) for x in os.environ.get("SCALEOUT_TEST_SIZE", "12 10 45").split())


@dataclass
class Proc:
    port: int
    state: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Cluster:
    """Three serve processes on one store, started and stopped by the test."""

    def __init__(self, tmp: Path, moto: MotoServer, bucket: str) -> None:
        self.tmp, self.moto, self.bucket = tmp, moto, bucket
        self.procs = [Proc(free_port(), tmp / f"state-{i}") for i in range(3)]
        self.log = open(tmp / "servers.log", "ab")

    def start(self, p: Proc) -> None:
        env = {**os.environ, "LITEFS_SIDECAR_SERVER_TOKENS": ";".join(f"{c} {t}" for c, t in CLUSTERS.items()),
               "PYTHONPATH": os.pathsep.join(sys.path)}
        p.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--storage", f"s3://{self.bucket}/backups",
             "--s3-endpoint", self.moto.url, "--s3-force-path-style", "--state-dir", str(p.state),
             "--addr", f"127.0.0.1:{p.port}", "--l0-interval", "1s", "--lease-ttl", TTL, "--lease-skew", "1s",
             "--log-format", "json", "--shutdown-grace", "3s"], env=env, stdout=self.log, stderr=self.log)

    async def wait_up(self, p: Proc) -> None:
        await wait_up(p.url)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.proc is not None and p.proc.poll() is None:
                os.kill(p.proc.pid, signal.SIGCONT)
                p.proc.kill()
                p.proc.wait()
        self.log.close()


async def round_robin(backends: list[str]) -> tuple[web.AppRunner, str]:
    """An HTTP proxy sending each request to the next backend; a dead one answers 502."""
    turn = itertools.count()
    session = aiohttp.ClientSession(auto_decompress=False)

    async def handle(request: web.Request) -> web.StreamResponse:
        url = backends[next(turn) % len(backends)] + request.path_qs
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length",
                                                                               "transfer-encoding")}
        try:
            async with session.request(request.method, url, headers=headers, data=body) as up:
                data = await up.read()
                return web.Response(status=up.status, body=data, headers={
                    k: v for k, v in up.headers.items() if k.lower() not in ("content-length", "transfer-encoding",
                                                                             "content-encoding")})
        except aiohttp.ClientError as err:
            return web.json_response({"code": "EPROXY", "error": str(err)}, status=502)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(lambda _: session.close())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@dataclass
class Client:
    """One database's writer, as a sidecar ships: the next files after upstream's position; on 409 it continues
    from the position it is given (it must be one of its own: anything else is a fork)."""

    cluster: str
    db: str
    history: History
    files: dict[int, bytes] = field(default_factory=dict)  # txid -> that transaction's LTX file
    remote: Pos | None = None
    forks: list[str] = field(default_factory=list)

    def write(self) -> None:
        self.history.write()
        txid = self.history.pos.txid + 1
        self.files[txid] = self.history.commit(int(time.time() * 1000))  # now: retention keeps it a day

    async def ship(self, http: aiohttp.ClientSession, url: str) -> None:
        token = CLUSTERS[self.cluster]
        if self.remote is None:
            async with http.get(f"{url}/pos", headers={"Authorization": token}) as r:
                if r.status != 200:
                    return
                doc = await r.json()
            p = doc.get(self.db)
            self.remote = Pos(int(p["txid"], 16), int(p["postApplyChecksum"], 16)) if p else Pos()
        head = self.history.pos.txid
        if self.remote.txid >= head:
            return
        out = io.BytesIO()
        compact([self.files[t] for t in range(self.remote.txid + 1, head + 1)], out, version=Version.V2)
        async with http.post(f"{url}/db/tx", params={"db": self.db}, data=out.getvalue(),
                             headers={"Authorization": token}) as r:
            if r.status == 200:
                self.remote = self.history.pos
            elif r.status == 409:
                p = (await r.json())["pos"]
                given = Pos(int(p["txid"], 16), int(p["postApplyChecksum"], 16))
                if given.txid and self.history.checksums.get(given.txid) != given.post_apply_checksum:
                    self.forks.append(f"{self.db}: server at {given}, which this client never wrote")
                self.remote = given
            else:
                self.remote = None  # 502 from the proxy, 503 while a lease moves: ask again

    async def durable(self, http: aiohttp.ClientSession, url: str) -> bool:
        """Whether upstream's HWM covers every transaction. An acknowledged upload is in the writer's log, not
        yet in the store: if that writer dies first, the next one reports a lower position and this client
        sends again."""
        if self.remote != self.history.pos:
            return False
        async with http.get(f"{url}/db/hwm", params={"db": self.db},
                            headers={"Authorization": CLUSTERS[self.cluster]}) as r:
            if r.status != 200:
                return False
            hwm = int((await r.json())["hwm"], 16)
        if hwm >= self.history.pos.txid:
            return True
        self.remote = None  # ask for the position again: it falls back if the acknowledging writer died
        return False


@pytest.fixture
async def three(moto_server: MotoServer, tmp_path: Path) -> AsyncIterator[tuple[Cluster, str]]:
    cluster = Cluster(tmp_path, moto_server, moto_server.create_bucket())
    for p in cluster.procs:
        cluster.start(p)
    for p in cluster.procs:
        await cluster.wait_up(p)
    runner, url = await round_robin([p.url for p in cluster.procs])
    try:
        yield cluster, url
    finally:
        await runner.cleanup()
        cluster.stop_all()


async def run_clients(clients: list[Client], url: str, seconds: float, during: object) -> None:
    async with aiohttp.ClientSession() as http:
        async def one(c: Client) -> None:
            for _ in range(int(seconds)):
                c.write()
                await c.ship(http, url)
                await asyncio.sleep(1)
        await asyncio.gather(*(one(c) for c in clients), during)  # type: ignore[arg-type]
        async with asyncio.timeout(60):  # then until every transaction is durable: the HWM only ever rises
            while not all(await asyncio.gather(*(c.durable(http, url) for c in clients))):
                await asyncio.gather(*(c.ship(http, url) for c in clients))
                await asyncio.sleep(0.3)


def overlaps(keys: list[str], layout: Layout) -> list[tuple[str, int, int, int]]:
    """(db prefix, level, min, max) of every file that overlaps the one before it: two histories of a range."""
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for key in keys:
        if (k := layout.parse(key)) is not None and k.min_txid != 1:
            spans.setdefault((k.prefix, k.level), []).append((k.min_txid, k.max_txid))
    return [(prefix, level, b, c) for (prefix, level), s in spans.items()
            for (_, a), (b, c) in itertools.pairwise(sorted(s)) if b <= a]


async def check_store(moto: MotoServer, bucket: str, clients: list[Client], tmp: Path) -> None:
    storage = open_storage(f"s3://{bucket}/backups", endpoint_url=moto.url, force_path_style=True)

    async def one_history() -> bool:
        # A paused process's PUT can land after its lease ran out and beside the new owner's files (S3 has no
        # fencing token); the new owner's sweeps delete it.
        return not overlaps([o.key for o in await storage.list("")], storage.layout)
    await wait_until(one_history, within=90)
    engine = await Engine.open(storage, tmp / "checker")  # a fresh engine: it reads the store, no cache
    try:
        for c in clients:
            assert not c.forks, c.forks
            index = engine.index(c.cluster, c.db)
            for level, files in index.levels.items():  # no history forks: no two files of a level overlap
                spans = sorted((e.min_txid, e.max_txid) for e in files if not e.is_snapshot)
                for (_, a), (b, _) in itertools.pairwise(spans):
                    assert b > a, f"{c.cluster}/{c.db} L{level}: overlapping files {spans}"
            got = await engine.restore_to(c.cluster, c.db, tmp / f"{c.cluster}-{c.db}.out")
            assert Pos(got.txid, got.checksum) == c.history.pos  # every transaction stored
    finally:
        await engine.close()
        await storage.close()


def clients_for(tmp: Path, n: int) -> list[Client]:
    names = list(CLUSTERS)
    return [Client(names[i % 3], f"db{i}.db", History(tmp / f"c{i}.db", seed=i)) for i in range(n)]


async def test_three_processes_one_killed_every_ten_seconds(three: tuple[Cluster, str], moto_server: MotoServer,
                                                            tmp_path: Path) -> None:
    cluster, url = three
    clients = clients_for(tmp_path, DBS)

    async def kill_and_restart() -> None:
        for victim in itertools.islice(itertools.cycle(cluster.procs), (SECONDS - 1) // KILL_EVERY):
            await asyncio.sleep(KILL_EVERY)
            assert victim.proc is not None
            victim.proc.kill()  # SIGKILL: its acknowledged uploads come back from the clients
            victim.proc.wait()
            cluster.start(victim)
            await cluster.wait_up(victim)

    try:
        await run_clients(clients, url, SECONDS, kill_and_restart())
        await check_store(moto_server, cluster.bucket, clients, tmp_path)
        forwarded = 0.0
        async with aiohttp.ClientSession() as http:
            for p in cluster.procs:
                async with http.get(f"{p.url}/metrics") as r:
                    forwarded += sum(float(line.split()[-1]) for line in (await r.text()).splitlines()
                                     if line.startswith("lfsc_forwarded_total"))
        assert forwarded > 0  # round-robin requests did reach the writers through the others
    finally:
        for c in clients:
            c.history.close()


async def test_a_process_paused_past_its_lease_writes_nothing_once_resumed(three: tuple[Cluster, str],
                                                                          moto_server: MotoServer,
                                                                          tmp_path: Path) -> None:
    cluster, url = three
    clients = clients_for(tmp_path, 6)

    async def pause_one() -> None:
        await asyncio.sleep(5)
        paused = cluster.procs[0]
        assert paused.proc is not None
        os.kill(paused.proc.pid, signal.SIGSTOP)  # whatever it owns is taken over once its lease expires
        await asyncio.sleep(12)
        os.kill(paused.proc.pid, signal.SIGCONT)

    try:
        await run_clients(clients, url, 30, pause_one())
        await check_store(moto_server, cluster.bucket, clients, tmp_path)
    finally:
        for c in clients:
            c.history.close()


async def test_serve_workers_share_one_port(tmp_path: Path) -> None:
    """`serve --workers 2`: two processes on one port, each its own engine and state directory; every request is
    answered by the worker that writes its cluster."""
    port = free_port()
    env = {**os.environ, "LITEFS_SIDECAR_SERVER_TOKENS": ";".join(f"{c} {t}" for c, t in CLUSTERS.items()),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    log = open(tmp_path / "serve.log", "ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "--workers", "2", "--storage", f"file://{tmp_path / 'store'}",
        "--state-dir", str(tmp_path / "state"), "--addr", f"127.0.0.1:{port}", "--l0-interval", "1s",
        "--log-format", "json", env=env, stdout=log, stderr=log)
    clients = clients_for(tmp_path, 6)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_up(url)
        await run_clients(clients, url, 8, asyncio.sleep(0))
        assert sorted(p.name for p in (tmp_path / "state").iterdir() if p.name.startswith("worker-")) == [
            "worker-1", "worker-2"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        storage = open_storage(f"file://{tmp_path / 'store'}")
        engine = await Engine.open(storage, tmp_path / "checker")
        for c in clients:
            got = await engine.restore_to(c.cluster, c.db, tmp_path / f"{c.db}.out")
            assert Pos(got.txid, got.checksum) == c.history.pos
        await engine.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        for c in clients:
            c.history.close()
