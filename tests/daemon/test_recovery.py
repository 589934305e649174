"""Recovery paths end to end: an empty upstream after local pruning, a local gap, an operator restore upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from sidecar.daemon import Sidecar
from sidecar.daemon.litefs import LiteFSError, LiteFSNode
from sidecar.daemon.upstream import EngineUpstream
from sidecar.emulator import LoadWriter
from sidecar.ltx import Pos
from tests.daemon.conftest import Env, eventually, rows, write


def drop_files(env: Env, db: str, upto: int) -> None:
    """What LiteFS's own retention would have done before the sidecar ran: delete files ≤ `upto`."""
    for path in env.node.ltx_files(db):
        if int(path.name[17:33], 16) <= upto:
            path.unlink()


async def test_empty_upstream_and_pruned_files_ships_an_export_snapshot(any_env: Env, tmp_path: Path) -> None:
    env = any_env
    write(env, "app.db", 30)
    drop_files(env, "app.db", 20)  # TXID 1 is gone: a chain from 1 is impossible
    sidecar = await env.start()
    await env.synced("app.db")
    kinds = [s.kind for n, s in sidecar.shipped if n == "app.db"]
    assert kinds[0] == "snapshot" and sidecar.shipped[0][1].files == 0  # from /export, not from files
    got = await env.restore("app.db", tmp_path / "out")
    assert Pos(got.txid, got.checksum) == env.node.pos("app.db")
    write(env, "app.db", 5, start=30)  # and the history goes on from there, file by file
    await env.synced("app.db")
    assert [s.kind for n, s in sidecar.shipped][-1] == "files"
    got = await env.restore("app.db", tmp_path / "out2")
    assert Pos(got.txid, got.checksum) == env.node.pos("app.db")
    assert len(rows(tmp_path / "out2")) == 35


async def test_local_gap_ships_the_current_state_onto_upstream(any_env: Env, tmp_path: Path) -> None:
    env = any_env
    write(env, "app.db", 10)
    await env.start()
    await env.synced("app.db")
    shipped_to = env.node.pos("app.db").txid
    await env.stop()
    write(env, "app.db", 20, start=10)
    drop_files(env, "app.db", shipped_to + 5)  # files the sidecar never shipped are gone
    sidecar = await env.start()
    await env.synced("app.db")
    last = [s for n, s in sidecar.shipped if n == "app.db"][-1]
    assert (last.kind, last.min_txid, last.max_txid) == ("export", shipped_to + 1, env.node.pos("app.db").txid)
    got = await env.restore("app.db", tmp_path / "out")
    assert Pos(got.txid, got.checksum) == env.node.pos("app.db")
    before = await env.restore("app.db", tmp_path / "before", txid=shipped_to)  # the old history is kept
    assert len(rows(tmp_path / "before")) == 10 and before.txid == shipped_to


async def test_operator_restore_upstream_while_the_node_keeps_writing(any_env: Env, tmp_path: Path) -> None:
    env = any_env
    write(env, "app.db", 10)
    sidecar = await env.start()
    await env.synced("app.db")
    good = env.node.pos("app.db")
    write(env, "app.db", 10, start=10)  # a "bad migration"
    await env.synced("app.db")
    engine = env.engine
    async with LoadWriter(env.node, "other.db", rate=100, seed=3):  # the node keeps writing elsewhere too
        # The operator restores app.db to `good` as a new head, while app.db keeps taking writes.
        await engine.restore_to("default", "app.db", tmp_path / "good.db", txid=good.txid)
        head = await engine.write_state("default", "app.db", tmp_path / "good.db")
        assert head.txid == env.node.pos("app.db").txid + 1  # upstream is now ahead of the node
        write(env, "app.db", 3, start=100)
        await eventually(lambda: rows(env.node.path("app.db"))[:10] == rows(tmp_path / "good.db")
                         and len(rows(env.node.path("app.db"))) <= 13)
    # The node holds the restored state; later writes land on top and are backed up on top of the restore.
    write(env, "app.db", 2, start=200)
    await env.synced("app.db")
    got = await env.restore("app.db", tmp_path / "final")
    assert got.checksum == env.node.pos("app.db").post_apply_checksum
    assert got.txid > head.txid  # upstream's history went on from its head: nothing was overwritten
    final = rows(tmp_path / "final")
    assert final[:10] == rows(tmp_path / "good.db")
    later = [v for _, v in final[10:]]
    assert later[-2:] == ["row 200", "row 201"]
    # Writes racing the restore may survive or be discarded (upstream wins, as with LiteFS Cloud); the "bad
    # migration" rows never come back.
    assert set(later) <= {"row 100", "row 101", "row 102", "row 200", "row 201"}
    kinds = [s.kind for n, s in sidecar.shipped if n == "app.db"]
    assert "import" in kinds
    restored = await env.restore("app.db", tmp_path / "at-head", txid=head.txid)  # the restore point is kept
    assert rows(tmp_path / "at-head") == rows(tmp_path / "good.db") and restored.txid == head.txid


class BusyNode(LiteFSNode):
    """The real API of the emulated node, with a write landing while each export travels (a busy database)."""

    def __init__(self, env: Env) -> None:
        super().__init__(env.litefs_url, env.node.mount_dir)
        self.env, self.exports = env, 0

    async def _call(self, method: str, path: str, db: str, data: bytes | None = None) -> bytes:
        body = await super()._call(method, path, db, data)
        if path == "/export":
            self.exports += 1
            write(self.env, db, 1, start=1000 + self.exports)
        return body


async def test_a_database_written_during_every_export_is_still_shipped(env: Env, tmp_path: Path) -> None:
    write(env, "app.db", 30)
    drop_files(env, "app.db", 20)  # upstream is empty and TXID 1 is gone: only an export will do
    config, upstream = await env.upstream(env.config())
    sidecar = Sidecar(config, upstream, BusyNode(env))
    try:
        await sidecar.tick()
        [(_, first)] = [(n, s) for n, s in sidecar.shipped if n == "app.db"]
        assert first.kind == "snapshot" and first.max_txid == 31  # the state the copy was taken at
        assert sidecar.dbs["app.db"].remote is not None and sidecar.dbs["app.db"].remote.txid == 31
        await sidecar.tick()  # the write that raced the export follows as a file
        assert isinstance(upstream, EngineUpstream)
        got = await upstream.engine.restore_to("default", "app.db", tmp_path / "out")
        assert Pos(got.txid, got.checksum) == env.node.pos("app.db")
    finally:
        await sidecar.close()


class LostAnswerNode(LiteFSNode):
    """The real API of the emulated node; the first `POST /import` is applied but its answer is lost (a timeout, a
    connection reset), and the application writes at once on top of the imported state."""

    def __init__(self, env: Env) -> None:
        super().__init__(env.litefs_url, env.node.mount_dir)
        self.env, self.imports = env, 0

    async def _call(self, method: str, path: str, db: str, data: bytes | None = None) -> bytes:
        body = await super()._call(method, path, db, data)
        if path == "/import":
            self.imports += 1
            if self.imports == 1:
                self.env.node.execute(db, "INSERT INTO t (v) VALUES ('written after the import')")
                raise LiteFSError(f"{method} {self.url}{path}?name={db}: Connection reset by peer")
        return body


async def test_an_import_whose_answer_was_lost_is_not_done_again_over_later_writes(env: Env, tmp_path: Path) -> None:
    """After an operator restore the sidecar imports upstream's state; when LiteFS applied the import but its answer
    never came, the retry finds the import in `ltx/` instead of importing again over what was written since."""
    write(env, "app.db", 10)
    node = LostAnswerNode(env)
    config, upstream = await env.upstream(env.config())
    sidecar = Sidecar(config, upstream, node)
    try:
        while (await sidecar.tick()) or sidecar.dbs["app.db"].remote != env.node.pos("app.db"):
            pass
        good = env.node.pos("app.db")
        write(env, "app.db", 5, start=10)  # a "bad migration", shipped
        while sidecar.dbs["app.db"].remote != env.node.pos("app.db"):
            await sidecar.tick()
        assert isinstance(upstream, EngineUpstream)
        engine = upstream.engine
        await engine.restore_to("default", "app.db", tmp_path / "good.db", txid=good.txid)
        await engine.write_state("default", "app.db", tmp_path / "good.db")  # the operator's restore
        await sidecar.refresh_positions()
        await eventually_ticked(sidecar, lambda: node.imports >= 1 and sidecar.dbs["app.db"].remote is not None and
                                sidecar.dbs["app.db"].remote.post_apply_checksum ==
                                env.node.pos("app.db").post_apply_checksum)
        assert node.imports == 1
        assert [v for _, v in rows(env.node.path("app.db"))] == \
            [f"row {i}" for i in range(10)] + ["written after the import"]
        got = await upstream.engine.restore_to("default", "app.db", tmp_path / "out")
        assert Pos(got.txid, got.checksum) == Pos(sidecar.dbs["app.db"].remote.txid, env.node.pos(
            "app.db").post_apply_checksum)
    finally:
        await sidecar.close()


async def eventually_ticked(sidecar: Sidecar, condition: Callable[[], bool]) -> None:
    """Tick `sidecar` (past its backoffs) until `condition()` holds."""
    async with asyncio.timeout(30):
        while not condition():
            await sidecar.tick()
            await asyncio.sleep(0.05)
