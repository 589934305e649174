"""`run` restarted with its state directory on another store, or on its store after its files were deleted:
shipping resumes (the engine's cache and the sidecar's own state about upstream are rebuilt, never trusted), and
the backup restores to the node's checksum. Then two sidecars on one prefix: only the lease holder writes."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import shutil
import signal
import sqlite3
import sys
import tempfile
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.config import EngineConfig
from sidecar.daemon.upstream import EngineUpstream
from sidecar.emulator import EmulatedNode, start_http
from sidecar.engine import Engine
from sidecar.errors import UpstreamError
from sidecar.ltx import Pos
from sidecar.storage import open_storage
from tests.daemon.conftest import Env, HeldUpstream, engine_via, eventually, write
from tests.faults import FaultProxy
from tests.s3server import MotoServer


async def test_restart_on_a_new_empty_store_resumes_shipping(env: Env, tmp_path: Path) -> None:
    write(env, "app.db", 20)
    before = len(env.node.ltx_files("app.db"))
    await env.start(retention=0.0)
    await env.synced("app.db")
    await env.stop()
    assert len(env.node.ltx_files("app.db")) < before  # pruned under the old store's HWM: TXID 1 is gone
    env.backups = tmp_path / "another-store"  # the same state directory, pointed at a new, empty store
    write(env, "app.db", 5, start=20)
    await env.start()
    await env.synced("app.db", within=30)
    got = await env.restore("app.db", tmp_path / "out.db")
    assert Pos(got.txid, got.checksum) == env.node.pos("app.db")


async def test_restart_on_a_store_whose_files_were_deleted_resumes_shipping(env: Env, tmp_path: Path) -> None:
    write(env, "app.db", 20)
    await env.start(retention=0.0)
    await env.synced("app.db")
    await env.stop()
    shutil.rmtree(env.backups / "default")  # the backups are gone; the store's identity is not
    write(env, "app.db", 5, start=20)
    await env.start()
    await env.synced("app.db", within=30)
    got = await env.restore("app.db", tmp_path / "out.db")
    assert Pos(got.txid, got.checksum) == env.node.pos("app.db")


async def test_a_second_sidecar_on_the_same_prefix_waits_and_says_who_writes(env: Env, tmp_path: Path) -> None:
    write(env, "app.db", 10)
    first = await env.start()
    await env.synced("app.db")
    # A second sidecar with its own state directory, same store and cluster: the lease is the first's.
    second_config = dataclasses.replace(env.config(), state_dir=tmp_path / "second")
    _, upstream = await env.upstream(second_config)
    try:
        with pytest.raises(UpstreamError) as err:
            await upstream.positions()
        assert err.value.status == 503 and "written by engine" in str(err.value) and "waiting" in str(err.value)
    finally:
        await upstream.close()
    assert first.dbs["app.db"].error == ""


async def test_failover_between_two_sidecars_stores_one_history(tmp_path: Path) -> None:
    """Two nodes share a history, then diverge. Only the lease holder's history is stored; when it is SIGKILLed,
    the other's sidecar takes over once the lease expires, brings its node to upstream's state first (as after an
    operator restore), and continues with no gap and no overlap."""
    store = tmp_path / "store"
    nodes = [EmulatedNode(tmp_path / f"data{i}", tmp_path / f"mount{i}") for i in range(2)]
    runners = []
    procs: list[asyncio.subprocess.Process] = []
    log = open(tmp_path / "sidecars.log", "ab")
    try:
        for node in nodes:
            runners.append(await start_http(node))
        for node in nodes:  # the same transactions on both: the same pages, the same checksums
            node.execute("app.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            for i in range(10):
                node.execute("app.db", "INSERT INTO t (v) VALUES (?)", (f"shared {i}",))
        assert nodes[0].pos("app.db") == nodes[1].pos("app.db")
        for i in range(5):  # then each its own
            nodes[0].execute("app.db", "INSERT INTO t (v) VALUES (?)", (f"a {i}",))
            nodes[1].execute("app.db", "INSERT INTO t (v) VALUES (?)", (f"b {i}",))

        def argv(i: int) -> list[str]:
            return [sys.executable, "-m", "sidecar", "run", "--data-dir", str(nodes[i].data_dir),
                    "--mount-dir", str(nodes[i].mount_dir), "--litefs-url", runners[i][1],
                    "--upstream", f"file://{store}", "--state-dir", str(tmp_path / f"state{i}"),
                    "--batch-interval", "100ms", "--metrics-addr", "", "--lease-ttl", "4s", "--lease-skew", "1s",
                    "--position-interval", "1s", "--log-format", "json"]
        procs.append(await asyncio.create_subprocess_exec(*argv(0), stdout=log, stderr=log))
        await wait_stored(store, nodes[0].pos("app.db"))  # the first holds the lease and ships its history
        procs.append(await asyncio.create_subprocess_exec(*argv(1), stdout=log, stderr=log))
        await asyncio.sleep(3)  # the second waits meanwhile: it must not write
        assert await stored_pos(store) == nodes[0].pos("app.db")
        procs[0].kill()  # the holder dies
        await procs[0].wait()

        def rows() -> list[str]:
            con = sqlite3.connect(nodes[1].mount_dir / "app.db")
            try:
                return [r[0] for r in con.execute("SELECT v FROM t ORDER BY id")]
            finally:
                con.close()
        async with asyncio.timeout(60):  # within the TTL the second takes over and brings its node to upstream's
            while "a 4" not in rows():  # noqa: ASYNC110 (another process's work)
                await asyncio.sleep(0.3)
        assert rows() == [f"shared {i}" for i in range(10)] + [f"a {i}" for i in range(5)]  # b's were never stored
        nodes[1].execute("app.db", "INSERT INTO t (v) VALUES ('after the failover')")
        async with asyncio.timeout(60):  # and ships on from there (local TXIDs now offset from upstream's)
            while (await stored_pos(store)).post_apply_checksum != nodes[1].pos(  # noqa: ASYNC110
                    "app.db").post_apply_checksum:
                await asyncio.sleep(0.3)
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
                await p.wait()
        log.close()
        for runner, _ in runners:
            await runner.cleanup()
        for node in nodes:
            node.close()
    engine = await Engine.open(open_storage(f"file://{store}"), tmp_path / "checker")
    try:
        spans = sorted((e.min_txid, e.max_txid) for e in engine.index("default", "app.db").level(0))
        for (_, a), (b, _) in itertools.pairwise(spans):
            assert b == a + 1, f"gap or overlap in L0: {spans}"
    finally:
        await engine.close()
    assert await asyncio.to_thread(main, ["verify", str(store / "default" / "app.db")]) == 0


async def stored_pos(store: Path) -> Pos:
    """What a fresh engine reads from the store (no cache)."""
    engine = await Engine.open(open_storage(f"file://{store}"), Path(tempfile.mkdtemp(prefix="check-")))
    try:
        return engine.pos("default", "app.db")
    finally:
        await engine.close()


async def wait_stored(store: Path, pos: Pos) -> None:
    async with asyncio.timeout(30):
        while await stored_pos(store) != pos:  # noqa: ASYNC110 (another process's writes)
            await asyncio.sleep(0.2)


async def test_a_primary_that_becomes_a_replica_lets_the_lease_go(env: Env, tmp_path: Path) -> None:
    """On a LiteFS failover the old primary's sidecar sees `.primary` appear and lets the lease go at once, so the
    new primary's sidecar writes without waiting for it to expire (the TTL here is ten minutes)."""
    write(env, "app.db", 10)
    config = env.config()
    held = await EngineUpstream.open(config.upstream, config.cluster, config.state_dir / "engine",
                                     EngineConfig(l0_interval=0.0, lease_ttl=600.0))
    await env.start(to=held)
    await env.synced("app.db")
    _, second = await env.upstream(dataclasses.replace(config, state_dir=tmp_path / "second"))
    try:
        with pytest.raises(UpstreamError) as err:
            await second.positions()
        assert err.value.status == 503  # held by the primary's sidecar
        env.node.set_primary(False, "node-b")  # LiteFS moved the primary elsewhere
        async with asyncio.timeout(30):
            while True:
                try:
                    positions = await second.positions()
                    break
                except UpstreamError:
                    await asyncio.sleep(0.2)
        assert positions["app.db"] == env.node.pos("app.db")  # the new writer continues from what was stored
    finally:
        await second.close()


async def test_a_restart_while_the_store_is_unreachable_keeps_what_the_node_wrote(env: Env,
                                                                                  moto_server: MotoServer) -> None:
    """After an import (upstream's TXIDs run ahead of the node's), `run` restarted while its store does not answer
    opens its engine from the cache: the sidecar's state about that store (the TXID offset) is still its store's,
    so the transactions the node wrote meanwhile are shipped once the store answers, not replaced by another
    import of upstream's older state."""
    bucket = moto_server.create_bucket()
    proxy = FaultProxy(moto_server.url)
    await proxy.start()
    url = f"s3://{bucket}/b"
    try:
        write(env, "app.db", 10)
        sidecar = await env.start(await engine_via(proxy, bucket, env.tmp / "engine"), upstream=url)
        await env.synced("app.db")
        engine = env.engine
        await engine.restore_to("default", "app.db", env.tmp / "good.db", txid=env.node.pos("app.db").txid)
        await engine.write_state("default", "app.db", env.tmp / "good.db")  # an operator's restore: an import
        await eventually(lambda: sidecar.dbs["app.db"].link.offset != 0)
        await env.synced("app.db")
        await env.stop()
        proxy.faults.down = True
        write(env, "app.db", 5, start=100)  # while the store does not answer
        sidecar = await env.start(await engine_via(proxy, bucket, env.tmp / "engine"), upstream=url)
        proxy.faults.down = False
        await env.synced("app.db")
        with sqlite3.connect(env.node.path("app.db")) as con:
            assert [v for (v,) in con.execute("SELECT v FROM t WHERE id > 10")] == [f"row {i}" for i in range(100, 105)]
        assert [s.kind for _, s in sidecar.shipped] == ["files"]
    finally:
        await proxy.stop()


async def test_a_catch_up_under_way_when_the_node_is_demoted_stops_and_lets_the_lease_go(env: Env,
                                                                                           tmp_path: Path) -> None:
    """A catch-up under way when `.primary` appears ends with the upload in flight: the demoted node's sidecar
    ships nothing more and lets the lease go after it (never to take it back), so the new primary's sidecar
    writes at once."""
    write(env, "app.db", 10)
    config = env.config()
    _, inner = await env.upstream(config)
    assert isinstance(inner, EngineUpstream)
    held = HeldUpstream(inner, "app.db")  # the first upload hangs, after upstream's positions took the lease
    sidecar = await env.start(held, max_files_per_upload=1)  # type: ignore[arg-type]  # eleven uploads to ship
    await eventually(lambda: "app.db" in sidecar._jobs and inner.engine.leases.holds("default"))
    job = sidecar._jobs["app.db"]
    env.node.set_primary(False, "node-b")  # LiteFS moved the primary elsewhere
    await eventually(lambda: sidecar.metrics.primary._value.get() == 0)  # the sidecar has seen it
    held.unblock.set()  # the upload in flight goes on
    await eventually(job.done)
    assert len(sidecar.shipped) <= 1  # that one at most: the catch-up stopped there
    await eventually(lambda: not inner.engine.leases.held)
    _, second = await env.upstream(dataclasses.replace(config, state_dir=tmp_path / "second"))
    try:
        positions = await second.positions()  # free for the new primary's sidecar: no 503
        assert positions.get("app.db", Pos()).txid <= 1
    finally:
        await second.close()


async def test_an_upload_hanging_when_the_node_is_demoted_holds_the_lease_no_longer_than_the_grace(
        env: Env, tmp_path: Path) -> None:
    """The upload in flight is waited for only up to `shutdown_grace`; one that hangs is then cancelled, and the
    lease let go."""
    write(env, "app.db", 10)
    _, inner = await env.upstream(env.config())
    assert isinstance(inner, EngineUpstream)
    held = HeldUpstream(inner, "app.db")  # never unblocked until the end
    sidecar = await env.start(held, shutdown_grace=0.5)  # type: ignore[arg-type]
    await eventually(lambda: "app.db" in sidecar._jobs and inner.engine.leases.holds("default"))
    env.node.set_primary(False, "node-b")
    await eventually(lambda: not inner.engine.leases.held)
    assert not sidecar.shipped
    await env.stop()
