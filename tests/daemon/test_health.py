"""What an operator sees in the sidecar's `/healthz` and `/metrics` while upstream refuses it, and once it recovers."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.daemon.upstream import HTTPUpstream
from sidecar.errors import SidecarError
from tests.daemon.conftest import Env, engine_via, eventually, look, write
from tests.faults import FaultProxy
from tests.s3server import MotoServer
from tests.server.conftest import TOKEN, start_server


class TestUpstreamRefusingPositions:
    async def test_a_bad_token_shows_on_every_database_it_keeps_from_shipping(self, env: Env, tmp_path: Path) -> None:
        """401 on GET /pos: each database says why it is not shipped, instead of looking healthy."""
        server = await start_server(tmp_path / "server")
        try:
            write(env, "app.db", 3)
            sidecar = await env.start(HTTPUpstream(server.url, "not-the-token", "default"), upstream=server.url)
            await eventually(lambda: sidecar.metrics.errors.labels("upstream")._value.get() >= 2)
            _, health, metrics = await look(sidecar)
            assert health["ok"] is False
            assert "401 EINVALIDAUTH" in health["databases"]["app.db"]["error"]
            assert 'litefs_sidecar_db_error{db="app.db"} 1.0' in metrics
        finally:
            await env.stop()
            await server.shutdown()

    async def test_an_upstream_down_then_back_shows_and_then_clears(self, env: Env, tmp_path: Path) -> None:
        """5xx on GET /pos from the start: shown per database; once upstream answers and it ships, it clears."""
        server = await start_server(tmp_path / "server")
        proxy = FaultProxy(server.url)
        await proxy.start()
        proxy.faults.down = True
        try:
            write(env, "app.db", 3)
            sidecar = await env.start(HTTPUpstream(proxy.url, TOKEN, "default"), upstream=proxy.url)
            await eventually(lambda: sidecar.metrics.errors.labels("upstream")._value.get() >= 2)
            _, health, metrics = await look(sidecar)
            assert health["ok"] is False and "500" in health["databases"]["app.db"]["error"]
            assert 'litefs_sidecar_db_error{db="app.db"} 1.0' in metrics
            proxy.faults.down = False
            await env.synced("app.db")
            write(env, "app.db", 1, start=3)  # a tick that ships clears the error
            await env.synced("app.db")
            await eventually(lambda: not sidecar.dbs["app.db"].error)
            _, health, metrics = await look(sidecar)
            assert health["ok"] is True and health["databases"]["app.db"]["error"] is None
            assert 'litefs_sidecar_db_error{db="app.db"} 0.0' in metrics
        finally:
            await env.stop()
            await proxy.stop()
            await server.shutdown()


class TestInProcessEngineStoreFailing:
    async def test_a_store_refusing_the_lease_is_shown_not_a_crash(self, env: Env) -> None:
        """`run --upstream file://…` whose store fails the lease read: the sidecar goes on, says why each database is
        not shipped, and ships once the store answers."""
        write(env, "app.db", 3)
        leases = env.backups / ".litefs-sidecar" / "leases"
        leases.parent.mkdir(parents=True)
        leases.write_text("in the way")  # reading leases/default fails: ENOTDIR
        sidecar = await env.start()
        await eventually(lambda: sidecar.metrics.errors.labels("upstream")._value.get() >= 2)
        assert env._task is not None and not env._task.done()
        _, health, metrics = await look(sidecar)
        assert health["ok"] is False and "leases/default" in health["databases"]["app.db"]["error"]
        assert 'litefs_sidecar_db_error{db="app.db"} 1.0' in metrics
        leases.unlink()
        await env.synced("app.db")

    async def test_a_flush_failing_in_the_engine_shows_until_it_recovers(self, env: Env) -> None:
        """The in-process engine acknowledges uploads but cannot store them: the database shows the failing job,
        which the engine's own log alone said before; it clears once the flush goes through."""
        write(env, "app.db", 3)
        sidecar = await env.start()
        await env.synced("app.db")
        blocker = env.backups / "default" / "app.db" / "ltx" / "0" / "0000000000000005-0000000000000005.ltx"
        blocker.mkdir()  # the next flush's key is taken
        write(env, "app.db", 1, start=3)
        await eventually(lambda: "flush" in env.engine.status("default", "app.db").failing)
        _, health, _ = await look(sidecar)
        assert health["ok"] is False
        assert "0000000000000005-0000000000000005.ltx" in health["databases"]["app.db"]["failing"]["flush"]
        await eventually(lambda: sidecar.metrics.diverged.labels("app.db")._value.get() == 1)
        blocker.rmdir()
        await eventually(lambda: not env.engine.status("default", "app.db").failing)
        await eventually(lambda: sidecar.metrics.diverged.labels("app.db")._value.get() == 0)
        _, health, metrics = await look(sidecar)
        assert 'litefs_sidecar_db_error{db="app.db"} 0.0' in metrics
        assert health["ok"] is True and health["databases"]["app.db"]["failing"] is None


class TestNoLongerPrimary:
    async def test_a_shipping_error_clears_once_the_node_is_a_replica(self, env: Env, tmp_path: Path) -> None:
        """An error from shipping is about the primary's work: a node that became a replica no longer shows it."""
        server = await start_server(tmp_path / "server")
        proxy = FaultProxy(server.url)
        await proxy.start()
        proxy.faults.down = True
        try:
            write(env, "app.db", 3)
            sidecar = await env.start(HTTPUpstream(proxy.url, TOKEN, "default"), upstream=proxy.url)
            await eventually(lambda: sidecar.metrics.diverged.labels("app.db")._value.get() == 1)
            env.node.set_primary(False, "elsewhere")  # LiteFS made another node the primary
            await eventually(lambda: sidecar.metrics.primary._value.get() == 0)
            proxy.faults.down = False
            await eventually(lambda: sidecar.metrics.diverged.labels("app.db")._value.get() == 0)
            _, health, _ = await look(sidecar)
            assert health["ok"] is True and health["databases"]["app.db"]["error"] is None
        finally:
            await env.stop()
            await proxy.stop()
            await server.shutdown()


@pytest.fixture
def other_moto(moto_server: MotoServer) -> Iterator[MotoServer]:
    """A second S3 endpoint (the session's moto sets the credentials)."""
    server = MotoServer()
    server.start()
    yield server
    server.stop()


class TestInProcessEngineStopped:
    async def test_an_engine_whose_loop_ends_stops_the_sidecar_saying_why(self, env: Env, moto_server: MotoServer,
                                                                         other_moto: MotoServer) -> None:
        """The engine's loop ends (here: the store, unreachable at start, comes back as another store, which it
        asks to be restarted for): the sidecar stops with that error, as `serve` does, for its supervisor to
        restart it, instead of going on with an engine that stores nothing while the watchdog says all is well."""
        bucket = moto_server.create_bucket()
        other_moto.create_bucket(bucket)
        proxy = FaultProxy(moto_server.url)
        await proxy.start()
        url = f"s3://{bucket}/b"
        try:
            write(env, "app.db", 3)
            await env.start(await engine_via(proxy, bucket, env.tmp / "engine"), upstream=url)
            await env.synced("app.db")
            await env.stop()
            proxy.faults.down = True
            proxy.upstream = other_moto.url  # the bucket is replaced with an empty one while unreachable
            await env.start(await engine_via(proxy, bucket, env.tmp / "engine"), upstream=url)
            proxy.faults.down = False
            task = env._task
            assert task is not None
            await eventually(task.done)
            env._task = None
            with pytest.raises(SidecarError, match="is another store than this state directory"):
                await task
        finally:
            await proxy.stop()


def _chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True)


class TestPruneFailing:
    async def test_a_file_that_cannot_be_deleted_shows_until_it_can(self, env: Env) -> None:
        """LiteFS's disk would fill up behind a file the sidecar cannot delete (here immutable, EPERM even for
        root): the database shows the error, naming the file, until the file goes."""
        write(env, "app.db", 3)
        [oldest, *_] = sorted(env.node.ltx_files("app.db"))
        _chattr("+i", oldest)
        try:
            sidecar = await env.start(retention=0.0)
            await env.synced("app.db")
            write(env, "app.db", 3, start=3)  # the first files are now below the HWM and not the newest
            await eventually(lambda: sidecar.metrics.errors.labels("prune")._value.get() >= 2)
            _, health, metrics = await look(sidecar)
            assert health["ok"] is False and oldest.name in health["databases"]["app.db"]["error"]
            assert 'litefs_sidecar_db_error{db="app.db"} 1.0' in metrics
        finally:
            _chattr("-i", oldest)
        await eventually(lambda: not oldest.exists())
        await eventually(lambda: sidecar.metrics.diverged.labels("app.db")._value.get() == 0)
        _, health, _ = await look(sidecar)
        assert health["ok"] is True and health["databases"]["app.db"]["error"] is None
