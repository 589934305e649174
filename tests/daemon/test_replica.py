"""Replicas ship nothing and prune under the HWM they poll; SIGTERM ships what is batched first."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

from sidecar.daemon import Sidecar
from sidecar.daemon.litefs import LiteFSNode
from sidecar.daemon.upstream import EngineUpstream, Upstream
from sidecar.emulator import EmulatedNode, start_http
from sidecar.ltx import Pos
from tests.daemon.conftest import Env, eventually, rows, write


def txids(node: EmulatedNode, db: str) -> set[int]:
    return {int(p.name[17:33], 16) for p in node.ltx_files(db)}


async def test_replica_prunes_under_the_polled_hwm_and_ships_nothing(env: Env, tmp_path: Path) -> None:
    replica = EmulatedNode(tmp_path / "replica-data", tmp_path / "replica-mount", primary=False,
                           primary_hostname="primary")
    try:
        write(env, "app.db", 3)
        env.node.add_replica(replica)
        write(env, "app.db", 20, start=3)
        assert txids(replica, "app.db")  # the replica holds files of its own
        assert (replica.mount_dir / ".primary").exists()
        primary = await env.start()
        config = dataclasses.replace(primary.config, data_dir=replica.data_dir, mount_dir=replica.mount_dir,
                                     state_dir=tmp_path / "replica-sidecar", position_interval=0.2)
        side = Sidecar(config, primary.upstream, LiteFSNode("", replica.mount_dir))
        stop = asyncio.Event()
        task = asyncio.create_task(side.run(stop))
        try:
            await env.synced("app.db")
            shipped_before = len(primary.shipped)
            await eventually(lambda: txids(replica, "app.db") == {env.node.pos("app.db").txid})
            assert not side.shipped  # a replica never uploads
            write(env, "app.db", 5, start=50)  # files past the HWM stay until upstream holds them
            newest = env.node.pos("app.db").txid
            assert newest in txids(replica, "app.db")
            await env.synced("app.db")
            await eventually(lambda: txids(replica, "app.db") == {newest})
            assert len(primary.shipped) > shipped_before and not side.shipped
        finally:
            stop.set()
            await task
    finally:
        replica.close()


async def test_stop_ships_what_is_batched(env: Env, tmp_path: Path) -> None:
    sidecar = await env.start(batch_interval=3600.0)  # no tick would come for an hour
    write(env, "app.db", 7)
    await asyncio.sleep(0.2)
    assert not sidecar.shipped or sidecar.dbs["app.db"].remote != env.node.pos("app.db")
    await env.stop()
    engine = env.engine
    assert engine.pos("default", "app.db") == env.node.pos("app.db") != Pos()


async def test_a_broken_file_on_a_replica_is_reported_and_stops_nothing(env: Env, tmp_path: Path) -> None:
    replica = EmulatedNode(tmp_path / "replica-data", tmp_path / "replica-mount", primary=False,
                           primary_hostname="primary")
    try:
        write(env, "app.db", 3)
        write(env, "other.db", 3)
        env.node.add_replica(replica)
        write(env, "app.db", 5, start=3)
        write(env, "other.db", 5, start=3)
        foreign = replica.ltx_dir("app.db") / "00000000000000ff-00000000000000ff.ltx"
        foreign.write_text("not an LTX file\n")
        primary = await env.start()
        config = dataclasses.replace(primary.config, data_dir=replica.data_dir, mount_dir=replica.mount_dir,
                                     state_dir=tmp_path / "replica-sidecar", position_interval=0.2,
                                     metrics_addr="")
        side = Sidecar(config, primary.upstream, LiteFSNode("", replica.mount_dir))
        stop = asyncio.Event()
        task = asyncio.create_task(side.run(stop))
        try:
            await env.synced("other.db")
            await eventually(lambda: task.done() or txids(replica, "other.db") == {env.node.pos("other.db").txid})
            assert not task.done()  # the replica's sidecar goes on, and prunes the other database
            assert foreign in side.dbs["app.db"].local.bad
            assert side.metrics.errors.labels("bad_file")._value.get() == 1
        finally:
            stop.set()
            await task
    finally:
        replica.close()


async def test_a_snapshot_from_the_primary_replacing_a_replicas_files_is_no_alarm(env: Env, tmp_path: Path) -> None:
    replica = EmulatedNode(tmp_path / "replica-data", tmp_path / "replica-mount", primary=False,
                           primary_hostname="primary")
    try:
        write(env, "app.db", 3)
        env.node.add_replica(replica)
        write(env, "app.db", 5, start=3)
        primary = await env.start()
        config = dataclasses.replace(primary.config, data_dir=replica.data_dir, mount_dir=replica.mount_dir,
                                     state_dir=tmp_path / "replica-sidecar", position_interval=0.2,
                                     metrics_addr="", retention=3600.0)
        side = Sidecar(config, primary.upstream, LiteFSNode("", replica.mount_dir))
        stop = asyncio.Event()
        task = asyncio.create_task(side.run(stop))
        try:
            held = [p.name for p in replica.ltx_files("app.db")]
            await eventually(lambda: "app.db" in side.dbs and
                             [f.name for f in side.dbs["app.db"].local.sorted()] == held)
            env.node.remove_replica(replica)  # it falls behind; reconnecting, it gets a snapshot (docs/litefs.md §3)
            write(env, "app.db", 5, start=8)
            replica.apply_ltx("app.db", env.node.snapshot("app.db"))
            [snapshot] = replica.ltx_files("app.db")
            await eventually(lambda: [f.path for f in side.dbs["app.db"].local.sorted()] == [snapshot])
            assert side.metrics.errors.labels("deleted_unshipped")._value.get() == 0
        finally:
            stop.set()
            await task
    finally:
        replica.close()


class BoastingHwm:
    """Wraps a real upstream; its HWM answer says every TXID there will ever be is durable."""

    def __init__(self, inner: Upstream) -> None:
        self.inner = inner
        self.url, self.compress, self.identity = inner.url, inner.compress, inner.identity

    async def positions(self) -> dict[str, Pos]:
        return await self.inner.positions()

    async def upload(self, db: str, data: bytes) -> int:
        return await self.inner.upload(db, data)

    async def snapshot(self, db: str) -> bytes:
        return await self.inner.snapshot(db)

    async def hwm(self, db: str) -> tuple[int, Pos]:
        _, pos = await self.inner.hwm(db)
        return 2**63 - 1, pos

    async def release(self) -> None:
        await self.inner.release()

    def failing(self, db: str) -> dict[str, str]:
        return self.inner.failing(db)

    async def close(self, within: float | None = None) -> None:
        await self.inner.close(within)


async def test_a_replica_prunes_nothing_above_upstreams_position_whatever_hwm_said(env: Env, tmp_path: Path) -> None:
    replica = EmulatedNode(tmp_path / "replica-data", tmp_path / "replica-mount", primary=False,
                           primary_hostname="primary")
    try:
        env.node.add_replica(replica)
        write(env, "app.db", 5)
        primary = await env.start()
        await env.synced("app.db")
        shipped = env.node.pos("app.db").txid
        await env.stop()  # upstream now stays at `shipped`
        write(env, "app.db", 5, start=50)  # on the replica too, never shipped
        newest = env.node.pos("app.db").txid
        config = dataclasses.replace(primary.config, data_dir=replica.data_dir, mount_dir=replica.mount_dir,
                                     state_dir=tmp_path / "replica-sidecar", position_interval=0.2)
        _, inner = await env.upstream(config)
        side = Sidecar(config, BoastingHwm(inner), LiteFSNode("", replica.mount_dir))  # type: ignore[arg-type]
        stop = asyncio.Event()
        task = asyncio.create_task(side.run(stop))
        try:
            # At or below upstream's position the replica prunes (all but the files after it); never above.
            await eventually(lambda: min(txids(replica, "app.db")) == shipped + 1)
            assert txids(replica, "app.db") == set(range(shipped + 1, newest + 1))
        finally:
            stop.set()
            await task
    finally:
        replica.close()


async def test_a_replicas_engine_takes_no_free_lease_and_writes_nothing(env: Env, tmp_path: Path) -> None:
    """A replica's sidecar on file:// runs an engine of its own; while the cluster's lease is free (the primary's
    sidecar restarting, a failover under way) that engine must not take it to compact: the replica would write the
    store, and the primary's sidecar would be refused until the lease idled out."""
    replica = EmulatedNode(tmp_path / "replica-data", tmp_path / "replica-mount", primary=False,
                           primary_hostname="primary")
    try:
        env.node.add_replica(replica)
        write(env, "app.db", 20)
        await env.start()
        await env.synced("app.db")  # L0 holds files no compaction has consumed: L1 is due at once
        await env.stop()  # the primary's sidecar lets the lease go
        config = dataclasses.replace(env.config(), data_dir=replica.data_dir, mount_dir=replica.mount_dir,
                                     state_dir=tmp_path / "replica-sidecar", position_interval=0.2)
        _, upstream = await env.upstream(config)
        assert isinstance(upstream, EngineUpstream)
        took: list[int] = []
        upstream.engine.leases.on_change = took.append
        side = Sidecar(config, upstream, LiteFSNode("", replica.mount_dir))
        stop = asyncio.Event()
        task = asyncio.create_task(side.run(stop))
        try:
            await eventually(lambda: "app.db" in side.dbs and side.dbs["app.db"].hwm is not None)  # it polls
            with contextlib.suppress(TimeoutError):  # the engine ticks every second; give it a few
                await eventually(lambda: bool(took), within=3)
            assert not took and not upstream.engine.index("default", "app.db").level(1)
        finally:
            stop.set()
            await task
    finally:
        replica.close()


async def test_a_promoted_replica_restarted_ships_only_what_the_store_lacks_after_an_import(env: Env,
                                                                                            tmp_path: Path) -> None:
    """After an operator restore the primary's sidecar imports it, and from then on upstream's TXIDs are the node's
    plus one. A replica's sidecar learns that offset from its polls and keeps it: restarted on the promoted node, it
    ships the transactions the old primary committed but never shipped (which the replica holds), never importing
    upstream's state over them."""
    replica = EmulatedNode(tmp_path / "replica-data", tmp_path / "replica-mount", primary=False,
                           primary_hostname="primary")
    runner, url = await start_http(replica)
    try:
        env.node.add_replica(replica)
        write(env, "app.db", 10)
        primary = await env.start()
        await env.synced("app.db")
        good = env.node.pos("app.db")
        write(env, "app.db", 5, start=10)  # a "bad migration", shipped
        await env.synced("app.db")
        await env.engine.restore_to("default", "app.db", tmp_path / "good.db", txid=good.txid)
        await env.engine.write_state("default", "app.db", tmp_path / "good.db")  # the operator's restore
        await eventually(lambda: any(s.kind == "import" for _, s in primary.shipped))
        write(env, "app.db", 2, start=20)
        await env.synced("app.db")
        assert primary.dbs["app.db"].link.offset == 1
        config = dataclasses.replace(env.config(), data_dir=replica.data_dir, mount_dir=replica.mount_dir,
                                     litefs_url=url, state_dir=tmp_path / "replica-sidecar", position_interval=0.2)
        _, upstream = await env.upstream(config)
        side = Sidecar(config, upstream, LiteFSNode(url, replica.mount_dir))
        stop = asyncio.Event()
        task = asyncio.create_task(side.run(stop))
        try:
            await eventually(lambda: "app.db" in side.dbs and side.dbs["app.db"].hwm is not None
                             and side.dbs["app.db"].link.offset == 1)  # learned from its polls
        finally:
            stop.set()
            await task
        await env.stop()
        write(env, "app.db", 3, start=30)  # committed on the old primary, replicated, never shipped
        env.node.remove_replica(replica)
        env.node.set_primary(False, "replica")
        replica.set_primary(True)
        expected = rows(replica.path("app.db"))
        _, upstream = await env.upstream(config)
        side = Sidecar(config, upstream, LiteFSNode(url, replica.mount_dir))  # restarted on the promoted node
        stop = asyncio.Event()
        task = asyncio.create_task(side.run(stop))
        try:
            await eventually(lambda: side.dbs.get("app.db") is not None and side.dbs["app.db"].remote is not None
                             and side.dbs["app.db"].remote.post_apply_checksum ==
                             replica.pos("app.db").post_apply_checksum)
            assert [s.kind for _, s in side.shipped] == ["files"]
            assert rows(replica.path("app.db")) == expected
            assert isinstance(upstream, EngineUpstream)
            got = await upstream.engine.restore_to("default", "app.db", tmp_path / "out")
            assert got.checksum == replica.pos("app.db").post_apply_checksum
        finally:
            stop.set()
            await task
    finally:
        await runner.cleanup()
        replica.close()



async def test_a_replica_reads_the_headers_of_its_files_down_to_upstreams_position_only(env: Env,
                                                                                      tmp_path: Path) -> None:
    """A replica maps upstream's position onto its files by checksum newest first, stopping at the first match: it
    reads the headers of the files above that position and of the match, not of every file it holds (600,000 under
    a 10-minute retention at 1,000 tx/s), and learns the same HWM and TXID offset as a search of them all."""
    replica = EmulatedNode(tmp_path / "replica-data", tmp_path / "replica-mount", primary=False,
                           primary_hostname="primary")
    try:
        env.node.add_replica(replica)
        write(env, "app.db", 200)
        primary = await env.start()
        await env.synced("app.db")
        shipped = env.node.pos("app.db").txid
        await env.stop()  # upstream now stays at `shipped`
        write(env, "app.db", 3, start=200)  # on the replica too, never shipped
        newest = env.node.pos("app.db").txid
        config = dataclasses.replace(primary.config, data_dir=replica.data_dir, mount_dir=replica.mount_dir,
                                     state_dir=tmp_path / "replica-sidecar", position_interval=0.2,
                                     retention=3600.0, metrics_addr="")  # nothing pruned: every file stays
        _, upstream = await env.upstream(config)
        side = Sidecar(config, upstream, LiteFSNode("", replica.mount_dir))
        stop = asyncio.Event()
        task = asyncio.create_task(side.run(stop))
        try:
            await eventually(lambda: task.done() or ("app.db" in side.dbs and side.dbs["app.db"].hwm is not None))
            assert not task.done()
            db = side.dbs["app.db"]
            assert db.hwm == shipped and db.link.offset == 0
            read = [f.max_txid for f in db.local.oldest() if f.header is not None]  # headers are kept once read
            assert db.local.count > 200 and read == list(range(shipped, newest + 1))
        finally:
            stop.set()
            await task
    finally:
        replica.close()
