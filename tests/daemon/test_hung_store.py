"""A store (or backup server) that hangs holds up only the calls waiting on it: the sidecar's ticks go on, so a
demotion is acted on, new databases are found and a stop stops, while upstream's positions are still being read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.daemon.upstream import HTTPUpstream, Upstream
from sidecar.emulator import EmulatedNode
from tests.daemon.conftest import Env, engine_via, eventually, write
from tests.faults import FaultProxy
from tests.server.conftest import TOKEN, Running, start_server

NEVER = 3600.0  # seconds: upstream's own timeouts, so that a request to the hung store ends only when it does


@dataclass
class Hung:
    """An upstream reached through `proxy`, which takes requests and answers none from `hang()` to `answer()`."""

    proxy: FaultProxy
    upstream: Upstream
    url: str

    def hang(self) -> None:
        self.proxy.faults.hang = True

    def answer(self) -> None:
        self.proxy.faults.hang = False
        self.proxy.faults.release.set()  # the requests held go on to the store

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
        h = Hung(proxy, engine, f"s3://{bucket}/b")
    else:
        server = await start_server(tmp_path / "server")
        proxy = FaultProxy(server.url)
        await proxy.start()
        h = Hung(proxy, HTTPUpstream(proxy.url, TOKEN, "default", timeout=NEVER), proxy.url)
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
