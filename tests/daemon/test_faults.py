"""Faults: upstream down for 30 s during writes; the sidecar SIGKILLed at 20 random moments; one database's upload
hanging."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import sys
import time
from pathlib import Path

from sidecar.config import EngineConfig
from sidecar.daemon.upstream import EngineUpstream, HTTPUpstream, Upstream
from sidecar.emulator import LoadWriter
from sidecar.engine import Engine
from sidecar.engine.lease import PREFIX
from sidecar.errors import StorageError, UpstreamError
from sidecar.ltx import Pos
from sidecar.storage import open_storage
from sidecar.storage.file import FileStorage
from tests.daemon.conftest import Env, HeldUpstream, eventually, start_stuck, write
from tests.faults import FaultProxy
from tests.server.conftest import TOKEN, start_server


async def test_upstream_down_for_30s_during_writes(env: Env, tmp_path: Path) -> None:
    server = await start_server(tmp_path / "server")
    proxy = FaultProxy(server.url)
    await proxy.start()
    try:
        sidecar = await env.start(HTTPUpstream(proxy.url, TOKEN, "default"), upstream=proxy.url)
        async with LoadWriter(env.node, "app.db", rate=100, seed=1) as load:
            await load.wait_txs(100)
            # Upstream has caught up with what was written so far; the load goes on writing (the node's position
            # is a moving target: waiting for upstream to *equal* it may never end on a busy machine).
            await env.shipped_past("app.db", load.txs[-1].txid)
            proxy.faults.down = True
            await asyncio.sleep(1)  # an upload already past the proxy may still succeed
            db = sidecar.dbs["app.db"]
            confirmed = db.local_hwm or 0
            await asyncio.sleep(29)
            assert db.local_hwm == confirmed  # upstream confirmed nothing more while down
            head = env.node.pos("app.db").txid  # read before listing: the load goes on writing files above it
            kept = {int(p.name[17:33], 16) for p in env.node.ltx_files("app.db")}
            assert set(range(confirmed + 1, head + 1)) <= kept  # nothing unconfirmed deleted
            assert sidecar.metrics.errors.labels("upstream")._value.get() > 0
            proxy.faults.down = False
            await load.wait_txs(len(load.txs) + 50)
        await env.synced("app.db", within=60)
        got = await server.engine.restore_to("default", "app.db", tmp_path / "out")
        assert Pos(got.txid, got.checksum) == env.node.pos("app.db")
        history = load.history
        boundaries = sorted({s.max_txid for n, s in sidecar.shipped if n == "app.db"})
        for txid in random.Random(1).sample(boundaries, 10):  # every batch restores, outage or not
            point = await server.engine.restore_to("default", "app.db", tmp_path / f"at-{txid}", txid=txid)
            assert point.checksum == history[txid][1]
    finally:
        await env.stop()
        await proxy.stop()
        await server.shutdown()


async def test_sigkill_at_20_random_moments_loses_nothing(env: Env, tmp_path: Path) -> None:
    backups, state = tmp_path / "backups", tmp_path / "sidecar-state"
    argv = [sys.executable, "-m", "sidecar.cli", "run", "--data-dir", str(env.node.data_dir),
            "--mount-dir", str(env.node.mount_dir), "--litefs-url", env.litefs_url, "--upstream", f"file://{backups}",
            "--state-dir", str(state), "--batch-interval", "50ms", "--retention", "0s", "--metrics-addr", "",
            "--l0-interval", "0s", "--log-format", "json"]
    rng = random.Random(20)
    log = open(tmp_path / "sidecar.log", "ab")
    try:
        async with LoadWriter(env.node, "app.db", rate=200, seed=2) as load:
            for _ in range(20):
                proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)
                await asyncio.sleep(rng.uniform(0.6, 2.0))  # start-up takes ~0.5 s: kill both early and late
                os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
            await load.wait_txs(len(load.txs) + 20)
        proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)
        try:
            async with asyncio.timeout(60):
                for attempt in itertools.count():  # a fresh engine each time: it reads the store, not a cache
                    engine = await Engine.open(open_storage(f"file://{backups}"), tmp_path / f"check-{attempt}")
                    try:
                        if engine.pos("default", "app.db") == env.node.pos("app.db"):
                            break
                    finally:
                        await engine.close()
                    await asyncio.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        log.close()
    engine = await Engine.open(open_storage(f"file://{backups}"), tmp_path / "check2")
    try:
        files = sorted((e.min_txid, e.max_txid) for e in engine.index("default", "app.db") if e.level == 0)
        assert files[0][0] == 1
        for (_, prev_max), (lo, _) in itertools.pairwise(files):
            assert lo == prev_max + 1, f"stored history is not contiguous: {files}"  # no gap, no duplicate
        got = await engine.restore_to("default", "app.db", tmp_path / "out")
        assert Pos(got.txid, got.checksum) == env.node.pos("app.db")
        history = load.history
        ends = [hi for _, hi in files]
        for txid in random.Random(3).sample(ends, min(20, len(ends))):  # fewer files if kills came before start-up
            point = await engine.restore_to("default", "app.db", tmp_path / f"at-{txid}", txid=txid)
            assert point.checksum == history[txid][1]
    finally:
        await engine.close()


async def test_a_database_whose_upload_hangs_holds_back_no_other(env: Env) -> None:
    sidecar, held = await start_stuck(env)
    write(env, "app.db", 3, start=2)  # shipped while stuck.db's first upload still hangs
    await env.synced("app.db")
    assert sidecar.dbs["stuck.db"].remote == Pos()
    held.unblock.set()
    await env.synced("stuck.db")


class BoastingUpstream(HeldUpstream):
    """Wraps a real upstream; says every TXID there will ever be is durable, and fails every upload after the first."""

    def __init__(self, inner: Upstream) -> None:
        super().__init__(inner, "")
        self.uploads = 0

    async def upload(self, db: str, data: bytes) -> int:
        self.uploads += 1
        if self.uploads > 1:
            raise UpstreamError(500, "EINTERNAL", "down")
        await self.inner.upload(db, data)
        return 2**63 - 1


async def test_an_hwm_beyond_what_upstream_holds_prunes_nothing_it_lacks(env: Env) -> None:
    write(env, "app.db", 9)  # TXIDs 1..10
    _, inner = await env.upstream(env.config())
    upstream = BoastingUpstream(inner)
    sidecar = await env.start(upstream, max_files_per_upload=4)  # type: ignore[arg-type]
    db = sidecar.dbs["app.db"]
    await eventually(lambda: db.hwm is not None and sidecar.metrics.errors.labels("upstream")._value.get() > 0)
    assert db.remote is not None and db.remote.txid == 4  # 1..4 shipped; 5..10 not
    await eventually(lambda: db.local.count == 6)  # 1..4 pruned: at or below the HWM
    assert [int(p.name[17:33], 16) for p in env.node.ltx_files("app.db")] == list(range(5, 11))


class RolledBackUpstream(HeldUpstream):
    """Wraps a real upstream; once `rolled` is set it is an emptied store that cannot take uploads (restored from
    an older copy, or emptied by hand): it reports no position, and refuses every upload."""

    def __init__(self, inner: Upstream) -> None:
        super().__init__(inner, "")
        self.rolled = False

    async def positions(self) -> dict[str, Pos]:
        return {} if self.rolled else await self.inner.positions()

    async def upload(self, db: str, data: bytes) -> int:
        if self.rolled:
            raise UpstreamError(503, "ESTORAGE", "store unavailable")
        return await self.inner.upload(db, data)


async def test_an_hwm_upstream_no_longer_holds_prunes_nothing(env: Env) -> None:
    """Files shipped under an HWM that a rolled-back store no longer holds are kept past their retention: the HWM
    counts only up to upstream's position."""
    write(env, "app.db", 9)  # TXIDs 1..10
    _, inner = await env.upstream(env.config())
    upstream = RolledBackUpstream(inner)
    sidecar = await env.start(upstream, retention=3.0, position_interval=0.2)  # type: ignore[arg-type]
    db = sidecar.dbs["app.db"]
    await env.synced("app.db")
    await eventually(lambda: db.hwm == 10)
    upstream.rolled = True
    await eventually(lambda: db.remote == Pos())
    kept = env.node.ltx_files("app.db")
    assert len(kept) > 1  # still within their retention when the store rolled back
    newest = max(p.stat().st_mtime for p in kept)
    await eventually(lambda: time.time() > newest + 3.0 + 0.5)  # past the retention, and a few ticks beyond
    assert db.local_hwm == 0
    assert env.node.ltx_files("app.db") == kept


class LeaseDownStore(FileStorage):
    """A local store that cannot be reached for the cluster's lease while `down` is set (an outage)."""

    down = False

    async def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes, str] | None:
        if self.down and key.startswith(PREFIX):
            raise StorageError(key, "store unreachable (test)", retryable=True)
        return await super().get_if_changed(key, etag)

    async def put_bytes(self, key: str, data: bytes, *, timestamp: int | None = None,
                        if_none_match: bool = False, if_match: str | None = None) -> str:
        if self.down and key.startswith(PREFIX):
            raise StorageError(key, "store unreachable (test)", retryable=True)
        return await super().put_bytes(key, data, timestamp=timestamp, if_none_match=if_none_match,
                                       if_match=if_match)


async def test_a_store_outage_past_the_lease_is_retried_not_the_end_of_the_sidecar(env: Env, tmp_path: Path) -> None:
    """`run --upstream s3://…` while the store cannot be reached for longer than the lease: reading upstream's
    positions must take the lease again, which fails; that is an upstream error, retried with backoff (as with
    `serve`), never an exception that stops the sidecar and every database with it."""
    write(env, "app.db", 3)
    store = LeaseDownStore(env.backups)
    engine = await Engine.from_config(store, EngineConfig(l0_interval=0.0, lease_ttl=4.0, lease_skew=1.0),
                                      tmp_path / "engine")
    sidecar = await env.start(EngineUpstream(f"file://{env.backups}", engine, "default"), position_interval=0.2)
    await env.synced("app.db")
    store.down = True
    upstream_errors = sidecar.metrics.errors.labels("upstream")
    task = env._task
    assert task is not None
    await eventually(lambda: (not engine.leases.holds("default") and upstream_errors._value.get() > 0)
                     or task.done())
    assert not task.done()
    store.down = False
    write(env, "app.db", 3, start=3)
    await env.synced("app.db")
