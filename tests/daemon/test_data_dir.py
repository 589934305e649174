"""`run --data-dir` naming a directory that does not exist: said at start and in /healthz, not silently idle; a
database directory that vanishes stops nothing else, and the database is forgotten until it comes back."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import aiohttp
import structlog

from sidecar.config import EngineConfig, SidecarConfig
from sidecar.daemon import Sidecar
from sidecar.daemon.upstream import EngineUpstream
from sidecar.emulator import EmulatedNode
from tests.daemon.conftest import Env, eventually, look, rows, start_stuck, write


async def test_a_missing_data_dir_is_warned_about_and_shown_in_healthz(env: Env) -> None:
    missing = env.tmp / "nonexistent"
    with structlog.testing.capture_logs() as logs:
        sidecar = await env.start(data_dir=missing)
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["data_dir"] == str(missing) and "does not exist" in warning["event"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sidecar.url}/healthz") as resp:
            health = await resp.json()
        assert health["data_dir"] == str(missing)
        assert health["warnings"] == [warning["event"]]
        (missing / "dbs").mkdir(parents=True)  # LiteFS starts after all: the warning goes
        async with http.get(f"{sidecar.url}/healthz") as resp:
            assert (await resp.json())["warnings"] == []


async def test_a_database_directory_removed_before_its_files_are_pruned_stops_nothing(tmp_path: Path) -> None:
    node = EmulatedNode(tmp_path / "data", tmp_path / "mount")
    config = SidecarConfig(data_dir=node.data_dir, mount_dir=node.mount_dir, litefs_url="",
                           upstream=f"file://{tmp_path / 'backups'}", state_dir=tmp_path / "state", metrics_addr="",
                           retention=60.0)
    upstream = await EngineUpstream.open(config.upstream, config.cluster, tmp_path / "engine",
                                         EngineConfig(l0_interval=0.0))
    now = [time.time()]
    sidecar = Sidecar(config, upstream, None, clock=lambda: now[0])
    try:
        for db in ("gone.db", "kept.db"):
            for i in range(3):
                node.execute(db, "CREATE TABLE IF NOT EXISTS t (x)")
                node.execute(db, "INSERT INTO t VALUES (?)", (i,))
        await sidecar.tick()  # shipped; kept for the retention
        assert sidecar.dbs["gone.db"].local.count == 4
        shutil.rmtree(node.db_dir("gone.db"))  # an operator removes it before the watcher has said so
        now[0] += 120
        node.execute("kept.db", "INSERT INTO t VALUES (3)")
        await sidecar.tick()
        assert sidecar.dbs["kept.db"].remote == node.pos("kept.db")
        assert [p.name for p in node.ltx_files("kept.db")] == ["0000000000000005-0000000000000005.ltx"]
        assert "gone.db" not in sidecar.dbs  # forgotten before its tick: its files went with the directory
        assert sidecar.metrics.errors.labels("prune")._value.get() == 0
    finally:
        await sidecar.close()
        node.close()


async def test_the_in_process_engine_keeps_its_state_where_engine_state_dir_says(tmp_path: Path) -> None:
    """`[engine] state_dir` is used by `run` too (it used to be ignored for `<sidecar.state_dir>/engine`)."""
    config = SidecarConfig(data_dir=tmp_path / "data", mount_dir=tmp_path / "mount", litefs_url="",
                           upstream=f"file://{tmp_path / 'backups'}", state_dir=tmp_path / "state", metrics_addr="")
    sidecar = await Sidecar.open(config, EngineConfig(l0_interval=0.0, state_dir=tmp_path / "fast"))
    await sidecar.close()
    assert (tmp_path / "fast" / "log").is_dir() and not (tmp_path / "state" / "engine").exists()
    sidecar = await Sidecar.open(config, EngineConfig(l0_interval=0.0))  # the default: under its own
    await sidecar.close()
    assert (tmp_path / "state" / "engine" / "log").is_dir()


class TestDatabaseRemoved:
    """LiteFS removed `dbs/<name>/` (an invalid database header at start-up; an operator): the database is forgotten."""

    async def test_a_removed_database_is_forgotten_and_found_again_when_it_returns(self, env: Env) -> None:
        """Gone: no more ticks, no series frozen at their last value, not in /healthz; back: found again, and it ships
        on from upstream's position (its state is upstream's and the link file's, not the forgotten object's)."""
        write(env, "gone.db", 3)
        write(env, "app.db", 3)
        env.node.ltx_dir("empty.db").mkdir(parents=True)  # nothing written yet: a database all the same
        sidecar = await env.start()
        await env.synced("gone.db")
        await env.synced("app.db")
        aside = env.tmp / "aside"
        with structlog.testing.capture_logs() as logs:
            shutil.copytree(env.node.db_dir("gone.db"), aside)
            shutil.rmtree(env.node.db_dir("gone.db"))  # the watcher sees each file go
            await eventually(lambda: "gone.db" not in sidecar.dbs)
            write(env, "app.db", 2, start=3)  # the others ship on
            await env.synced("app.db")
            _, health, metrics = await look(sidecar)
            assert sorted(health["databases"]) == ["app.db", "empty.db"] and health["ok"] is True
            assert 'db="gone.db"' not in metrics
            assert 'litefs_sidecar_lag_seconds{db="app.db"}' in metrics
            assert "gone.db" not in sidecar.backoff and "gone.db" not in sidecar._jobs
            aside.rename(env.node.db_dir("gone.db"))
            await eventually(lambda: "gone.db" in sidecar.dbs)
            before = len([s for n, s in sidecar.shipped if n == "gone.db"])
            write(env, "gone.db", 2, start=3)
            await env.synced("gone.db")
        assert [e["db"] for e in logs if e["event"] == "database removed"] == ["gone.db"]
        assert [e["db"] for e in logs if e["event"] == "database found"] == ["gone.db"]
        assert set([s.kind for n, s in sidecar.shipped if n == "gone.db"][before:]) == {"files"}  # no snapshot again
        await env.restore("gone.db", env.tmp / "restored.db")
        assert [v for _, v in rows(env.tmp / "restored.db")] == [f"row {i}" for i in range(5)]

    async def test_a_database_is_not_forgotten_while_its_upload_is_under_way(self, env: Env) -> None:
        """Its tick job still runs (an upload hangs) when the directory goes: forgotten once the job has ended."""
        sidecar, held = await start_stuck(env)
        assert "stuck.db" in sidecar._jobs
        shutil.rmtree(env.node.db_dir("stuck.db"))
        write(env, "late.db", 1)  # found, and so shipped, by a tick that looked after the removal
        await env.synced("late.db")
        assert "stuck.db" in sidecar.dbs and "stuck.db" in sidecar._jobs
        held.unblock.set()
        await eventually(lambda: "stuck.db" not in sidecar.dbs)
        assert env._task is not None and not env._task.done()  # the job's end in a vanished directory stopped nothing
        _, health, metrics = await look(sidecar)
        assert sorted(health["databases"]) == ["app.db", "late.db"]
        assert 'db="stuck.db"' not in metrics
