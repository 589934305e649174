"""A store (or backup server) that hangs holds up only the calls waiting on it: the sidecar's ticks go on, so a
demotion is acted on, new databases are found and a stop stops, while upstream's positions are still being read."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.config import EngineConfig
from sidecar.daemon import Sidecar
from sidecar.daemon.litefs import LiteFSNode
from sidecar.daemon.upstream import EngineUpstream, HTTPUpstream, Upstream
from sidecar.emulator import EmulatedNode
from tests.daemon.conftest import Env, engine_via, eventually, write
from tests.faults import FaultProxy
from tests.server.conftest import TOKEN, Running, start_server

NEVER = 3600.0  # seconds: upstream's own timeouts, so that a request to the hung store ends only when it does


@dataclass
class Hung:
    """An upstream reached through `proxy`, which takes requests and answers none from `hang()` (or those naming one
    database from `hang_on(db)`) to `answer()`."""

    proxy: FaultProxy
    upstream: Upstream
    url: str
    store: str  # the store's (moto's) or the server's own URL, not through the proxy
    bucket: str = ""  # the store's bucket; empty for a server

    def hang(self) -> None:
        self.proxy.faults.hang = True

    def hang_on(self, db: str) -> None:
        self.proxy.faults.hang_on = db

    def answer(self) -> None:
        self.proxy.faults.hang = False
        self.proxy.faults.hang_on = ""
        self.proxy.faults.release.set()  # the requests held go on to the store

    async def direct(self, state: Path) -> tuple[Upstream, str]:
        """Another upstream on the same store (or server) and its URL, not through the proxy: nothing holds it."""
        if self.bucket:
            url = f"s3://{self.bucket}/b"
            engine = EngineConfig(l0_interval=0.0, s3_endpoint=self.store, s3_force_path_style=True)
            return await EngineUpstream.open(url, "default", state, engine), url
        return HTTPUpstream(self.store, TOKEN, "default"), self.store

    @property
    def hanging(self) -> bool:
        """Whether requests wait on the store now."""
        return self.proxy.faults.held > 0


@pytest.fixture(params=["s3", "http"])
async def hung(request: pytest.FixtureRequest, env: Env, tmp_path: Path) -> AsyncIterator[Hung]:
    """The in-process engine on s3:// (moto), or `serve` over HTTP, behind a fault proxy."""
    server: Running | None = None
    if request.param == "s3":
        moto = request.getfixturevalue("moto_server")
        bucket = moto.create_bucket()
        proxy = FaultProxy(moto.url)
        await proxy.start()
        # Opened (the store checked) while the store answers.
        engine = await engine_via(proxy, bucket, tmp_path / "engine", read_timeout=NEVER, attempt_timeout=NEVER)
        h = Hung(proxy, engine, f"s3://{bucket}/b", moto.url, bucket)
    else:
        server = await start_server(tmp_path / "server")
        proxy = FaultProxy(server.url)
        await proxy.start()
        h = Hung(proxy, HTTPUpstream(proxy.url, TOKEN, "default", timeout=NEVER), proxy.url, server.url)
    try:
        yield h
    finally:
        h.answer()
        await env.stop()
        await proxy.stop()
        if server is not None:
            await server.shutdown()


class TestStoreHanging:
    async def test_a_demotion_is_acted_on_while_the_store_hangs(self, env: Env, hung: Hung, tmp_path: Path) -> None:
        """`.primary` appearing while upstream's positions are read from a hung store is acted on at once."""
        write(env, "app.db", 3)
        hung.hang()
        sidecar = await env.start(hung.upstream, upstream=hung.url, shutdown_grace=0.5)
        await eventually(lambda: hung.hanging)  # the first tick reads upstream's positions
        env.node.set_primary(False, "node-b")
        await eventually(lambda: sidecar.metrics.primary._value.get() == 0)
        other = EmulatedNode(tmp_path / "b" / "data", tmp_path / "b" / "mount")  # the new primary
        try:
            other.execute("new.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            env.node.apply_ltx("new.db", other.snapshot("new.db"))  # a database its stream brings
        finally:
            other.close()
        await eventually(lambda: "new.db" in sidecar.dbs)  # by a tick after the one that saw the demotion
        assert sidecar.health()["databases"]["new.db"]["local"] is not None
        assert hung.hanging  # all this before the store answers
        hung.answer()
        env.node.set_primary(True)  # and back: everything is shipped
        write(env, "app.db", 2, start=3)
        write(env, "new.db", 2, start=0)
        await env.synced("app.db")
        await env.synced("new.db")

    async def test_a_stop_while_the_store_hangs_ends_the_sidecar(self, env: Env, hung: Hung) -> None:
        """SIGTERM while upstream's positions are read from a hung store stops the sidecar before the store answers."""
        write(env, "app.db", 3)
        hung.hang()
        await env.start(hung.upstream, upstream=hung.url, shutdown_grace=0.5)
        await eventually(lambda: hung.hanging)
        async with asyncio.timeout(30):  # only so a failure ends: unfixed, the stop waits as long as the store hangs
            await env.stop()
        assert hung.hanging

    async def test_a_database_found_while_a_replica_polls_a_hung_store_stops_nothing(
            self, env: Env, hung: Hung, tmp_path: Path) -> None:
        """A replica's HWM poll, held by a hung store, goes on over the databases it started with when a tick finds a
        new one meanwhile (it iterated the live dict: 'changed size during iteration' ended the sidecar)."""
        write(env, "app.db", 3)
        sidecar = await env.start(hung.upstream, upstream=hung.url, shutdown_grace=0.5, position_interval=0.2)
        await env.synced("app.db")
        env.node.set_primary(False, "node-b")
        await eventually(lambda: sidecar.metrics.primary._value.get() == 0)
        demoted = time.monotonic()
        await eventually(lambda: sidecar.positions_at > demoted)  # let go, and polling the HWMs
        hung.hang()
        await eventually(lambda: hung.hanging)  # a poll of the HWMs waits on the store
        other = EmulatedNode(tmp_path / "b" / "data", tmp_path / "b" / "mount")
        try:
            other.execute("new.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            env.node.apply_ltx("new.db", other.snapshot("new.db"))
        finally:
            other.close()
        await eventually(lambda: "new.db" in sidecar.dbs)
        hung.answer()
        def polled_since(t: float) -> Callable[[], bool]:
            return lambda: sidecar.positions_at > t or env.done

        for _ in range(2):  # the held poll ends, and a later one starts (one call at a time)
            await eventually(polled_since(time.monotonic()))
        assert not env.done, "the sidecar stopped"

    async def test_a_replica_learns_every_hwm_but_the_one_whose_call_hangs(
            self, env: Env, hung: Hung, tmp_path: Path) -> None:
        """A replica asks upstream its databases' HWMs at once: one database whose call hangs holds back neither the
        others' HWMs nor their pruning (asked one after another, every database after it waited as long)."""
        replica = EmulatedNode(tmp_path / "replica-data", tmp_path / "replica-mount", primary=False,
                               primary_hostname="primary")

        def txids(db: str) -> set[int]:
            return {int(p.name[17:33], 16) for p in replica.ltx_files(db)}
        try:
            for db in ("hung.db", "other.db"):
                write(env, db, 3)
            env.node.add_replica(replica)
            for db in ("hung.db", "other.db"):
                write(env, db, 5, start=3)  # the replica holds files of its own
            upstream, url = await hung.direct(tmp_path / "primary-engine")
            primary = await env.start(upstream, upstream=url)  # the primary's sidecar reaches upstream directly
            await env.synced("hung.db")
            await env.synced("other.db")
            hung.hang_on("hung.db")  # the replica's calls about hung.db wait on the store (or server)
            config = dataclasses.replace(primary.config, data_dir=replica.data_dir, mount_dir=replica.mount_dir,
                                         state_dir=tmp_path / "replica-sidecar", upstream=hung.url,
                                         position_interval=0.2, metrics_addr="", shutdown_grace=0.5)
            side = Sidecar(config, hung.upstream, LiteFSNode("", replica.mount_dir))
            stop = asyncio.Event()
            task = asyncio.create_task(side.run(stop))
            try:
                newest = env.node.pos("other.db").txid
                await eventually(lambda: task.done() or txids("other.db") == {newest})
                assert not task.done()
                assert hung.hanging
                assert list(side.dbs) == ["hung.db", "other.db"]  # one after another, hung.db was asked first
                assert side.dbs["hung.db"].hwm is None and len(txids("hung.db")) > 1  # unknown: nothing pruned
            finally:
                hung.answer()
                stop.set()
                await task
        finally:
            replica.close()
