"""The emulated LiteFS node: its files apply, look like LiteFS's, and its HTTP API answers as LiteFS does."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.emulator import (
    DatabaseNotFound,
    EmulatedNode,
    LoadWriter,
    ReadOnlyReplica,
    expired_ltx_files,
    start_http,
)
from sidecar.ltx import CHECKSUM_FLAG, FLAG_COMPRESS_LZ4, Header, Pos, Version
from sidecar.ltx.checksum import checksum_database_file
from sidecar.ltx.decoder import decode, verify
from sidecar.ltx.sqlite import apply_files
from tests.conftest import LITEFS, make_db

FX_WAL = LITEFS / "per-tx" / "fx-wal.db"
FX_NOCOMP = LITEFS / "per-tx" / "fx-nocomp.db"
LTX_NAME = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{16}\.ltx$")
POS_TEXT = re.compile(r"^[0-9a-f]{16}/[0-9a-f]{16}\n$")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., EmulatedNode]]:
    nodes: list[EmulatedNode] = []

    def make(sub: str = "a", **kwargs: object) -> EmulatedNode:
        node = EmulatedNode(tmp_path / sub / "data", tmp_path / sub / "mnt", **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


@pytest.fixture
def node(make_node: Callable[..., EmulatedNode]) -> EmulatedNode:
    return make_node()


def replay(files: list[Path], out: Path, upto: int | None = None) -> tuple[bytes, Pos]:
    """Apply LTX files in TXID order to a new file; returns its bytes and the final position."""
    chosen = [p.read_bytes() for p in files]
    if upto is not None:
        chosen = [d for d in chosen if Header.unpack(d[:100]).max_txid <= upto]
    with open(out, "w+b") as f:
        pos = apply_files(f, chosen, Version.V2)
    return out.read_bytes(), pos


def headers(files: list[Path]) -> list[Header]:
    return [verify(p.read_bytes(), Version.V2)[0] for p in files]


def post_of(path: Path) -> int:
    return verify(path.read_bytes(), Version.V2)[1].post_apply_checksum


async def run_load(node: EmulatedNode, name: str, n: int, **kwargs: object) -> LoadWriter:
    async with LoadWriter(node, name, rate=0, max_commits=n, **kwargs) as load:  # type: ignore[arg-type]
        await load.wait_txs(n)
    return load


class TestCommits:
    async def test_load_chain_reproduces_the_working_db(self, node: EmulatedNode, tmp_path: Path) -> None:
        """Applying every LTX file in order gives the working db byte for byte, and the pos file the position."""
        load = await run_load(node, "app.db", 120, shrink_every=30)
        files = node.ltx_files("app.db")
        assert [h.max_txid for h in headers(files)] == list(range(1, len(files) + 1))
        data, pos = replay(files, tmp_path / "replayed.db")
        work = node.work_path("app.db").read_bytes()
        assert data == work
        assert node.database_path("app.db").read_bytes() == work
        assert node.path("app.db").read_bytes() == work
        assert pos == node.pos("app.db") == load.txs[-1].pos
        assert node.pos_path("app.db").read_text() == f"{pos}\n"
        assert checksum_database_file(work, 4096) == pos.post_apply_checksum
        with sqlite3.connect(node.path("app.db")) as con:
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        con.close()

    async def test_history_allows_point_in_time_checks(self, node: EmulatedNode, tmp_path: Path) -> None:
        """The load records (timestamp, post-apply checksum) per TXID; replaying up to a TXID matches it."""
        load = await run_load(node, "app.db", 40, shrink_every=15)
        history = load.history
        assert sorted(history) == list(range(1, len(history) + 1))
        for txid in (1, 7, 16, 23, len(history)):
            data, pos = replay(node.ltx_files("app.db"), tmp_path / f"at-{txid}.db", upto=txid)
            assert pos == Pos(txid, history[txid][1])
            assert checksum_database_file(data, 4096) == history[txid][1]
        stamps = [history[t][0] for t in sorted(history)]
        assert stamps == sorted(stamps)

    def test_files_look_like_litefs_files(self, node: EmulatedNode) -> None:
        """Header conventions match LiteFS 0.5.14's own files (fixture fx-wal.db, compressed by default)."""
        node.execute("app.db", "PRAGMA user_version = 1")
        node.execute("app.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)")
        node.execute("app.db", "INSERT INTO t (name, n) VALUES ('alpha', 1)")
        ours = node.ltx_files("app.db")
        theirs = sorted(FX_WAL.glob("*.ltx"))
        mine, real = headers(ours), headers(theirs)
        for hs, files in ((mine, ours), (real, theirs)):
            assert all(LTX_NAME.match(p.name) for p in files)
            assert hs[0].min_txid == 1 and hs[0].pre_apply_checksum == 0  # TXID 1 is a snapshot
            assert all(h.min_txid == h.max_txid for h in hs)  # one file per transaction
            assert all(h.flags == FLAG_COMPRESS_LZ4 and h.page_size == 4096 for h in hs)
            assert len({h.node_id for h in hs}) == 1 and hs[0].node_id != 0
            for prev, path, h in zip(files, files[1:], hs[1:], strict=False):
                assert h.pre_apply_checksum == post_of(prev), path.name
            assert len(str(hs[0].timestamp)) == 13  # milliseconds
        # TXID 1 in the fixture was written in rollback-journal mode, as every emulated file is: no WAL fields.
        assert (real[0].wal_offset, real[0].wal_size, real[0].wal_salt1) == (0, 0, 0)
        assert all((h.wal_offset, h.wal_size, h.wal_salt1, h.wal_salt2) == (0, 0, 0, 0) for h in mine)
        # The page block is one LZ4 frame with LiteFS's frame descriptor (magic, FLG, BD).
        assert ours[0].read_bytes()[100:106] == theirs[0].read_bytes()[100:106]
        fixture_pos = (LITEFS / "db" / "fx-wal.db.pos").read_text()
        ours_pos = node.pos_path("app.db").read_text()
        assert POS_TEXT.match(fixture_pos) and POS_TEXT.match(ours_pos) and len(ours_pos) == len(fixture_pos) == 34

    def test_uncompressed_node_matches_nocomp_fixture(self, make_node: Callable[..., EmulatedNode]) -> None:
        """`compress=False` writes flag 0, as LiteFS with `data.compress: false` (fixture fx-nocomp.db)."""
        node = make_node(compress=False)
        node.execute("app.db", "CREATE TABLE t (x)")
        assert {h.flags for h in headers(node.ltx_files("app.db"))} == {0}
        assert {h.flags for h in headers(sorted(FX_NOCOMP.glob("*.ltx")))} == {0}

    def test_only_changed_pages_are_stored(self, node: EmulatedNode) -> None:
        """An incremental file holds the pages the transaction changed, not the database."""
        node.write("app.db", lambda con: (con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)"),
                                          con.executemany("INSERT INTO t (v) VALUES (?)",
                                                          [(bytes(500),)] * 400)))
        first = node.commit("app.db")
        assert first is None  # nothing new since the write recorded itself
        rec = node.execute("app.db", "UPDATE t SET v = x'01' WHERE id = 1")
        assert rec is not None and rec.commit > 40
        _, pages, _ = decode(rec.path.read_bytes(), Version.V2)
        assert 1 <= len(pages) <= 3 and pages[0][0] == 1  # page 1 (change counter) and the leaf
        assert rec.pages == len(pages)

    def test_a_write_that_changes_nothing_writes_no_file(self, node: EmulatedNode) -> None:
        """No changed page, no transaction: LiteFS writes no file for a read."""
        node.execute("app.db", "CREATE TABLE t (x)")
        assert node.execute("app.db", "SELECT * FROM t") is None
        assert node.execute("app.db", "DELETE FROM t WHERE x = 1") is None
        assert len(node.ltx_files("app.db")) == 1

    def test_shrinking_commit_applies(self, node: EmulatedNode, tmp_path: Path) -> None:
        """DELETE then VACUUM makes a file with a smaller commit; replaying still gives the working db."""
        node.write("app.db", lambda con: (con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)"),
                                          con.executemany("INSERT INTO t (v) VALUES (randomblob(3000))",
                                                          [()] * 200)))
        before = node.pos("app.db")
        node.execute("app.db", "DELETE FROM t WHERE id > 10")
        rec = node.write("app.db", lambda con: con.execute("VACUUM"), transaction=False)
        assert rec is not None
        grown, shrunk = headers(node.ltx_files("app.db"))[-2:]
        assert shrunk.commit < grown.commit
        assert rec.pre_apply_checksum == post_of(node.ltx_files("app.db")[-2])
        data, pos = replay(node.ltx_files("app.db"), tmp_path / "r.db")
        assert data == node.work_path("app.db").read_bytes() and len(data) == shrunk.commit * 4096
        assert pos == rec.pos and pos.txid == before.txid + 2

    def test_restart_resumes_from_the_newest_file(self, make_node: Callable[..., EmulatedNode],
                                                  tmp_path: Path) -> None:
        """A new node on the same data dir continues the chain, with a new node ID like a restarted LiteFS."""
        first = make_node(node_id=1)
        first.execute("app.db", "CREATE TABLE t (x)")
        first.execute("app.db", "INSERT INTO t VALUES (1)")
        pos = first.pos("app.db")
        first.close()
        second = make_node(node_id=2)
        assert second.databases() == ["app.db"] and second.pos("app.db") == pos
        rec = second.execute("app.db", "INSERT INTO t VALUES (2)")
        assert rec is not None and rec.txid == pos.txid + 1 and rec.pre_apply_checksum == pos.post_apply_checksum
        assert Header.unpack(rec.path.read_bytes()[:100]).node_id == 2
        data, _ = replay(second.ltx_files("app.db"), tmp_path / "r.db")
        assert data == second.work_path("app.db").read_bytes()

    def test_delete_writes_a_deletion_file(self, node: EmulatedNode, tmp_path: Path) -> None:
        """Deleting a database is a Commit-0 file with post-apply 8000000000000000; the mount hides it."""
        node.execute("app.db", "CREATE TABLE t (x)")
        rec = node.delete_db("app.db")
        assert (rec.commit, rec.pages, rec.post_apply_checksum) == (0, 0, CHECKSUM_FLAG)
        assert not node.path("app.db").exists()
        data, pos = replay(node.ltx_files("app.db"), tmp_path / "r.db")
        assert data == b"" and pos == rec.pos
        again = node.execute("app.db", "CREATE TABLE u (y)")  # writing again recreates it
        assert again is not None and again.txid == rec.txid + 1
        data, _ = replay(node.ltx_files("app.db"), tmp_path / "r2.db")
        assert data == node.path("app.db").read_bytes()


class TestImportExport:
    def test_import_is_the_next_txid_holding_every_page(self, node: EmulatedNode, tmp_path: Path) -> None:
        """Import writes one incremental file of the whole db (LiteFS `importToLTX`), and writes continue."""
        node.execute("app.db", "CREATE TABLE t (x)")
        before = node.pos("app.db")
        src = make_db(tmp_path / "src.db", rows=300).read_bytes()
        rec = node.import_db("app.db", src)
        assert rec.txid == before.txid + 1 and rec.pre_apply_checksum == before.post_apply_checksum
        assert rec.pages == rec.commit == len(src) // 4096
        exported = node.export("app.db")
        assert exported[24:28] == exported[40:44] == bytes(4)  # change counter and schema cookie zeroed
        assert exported[:24] == src[:24] and exported[44:] == src[44:]
        assert checksum_database_file(exported, 4096) == rec.post_apply_checksum
        after = node.execute("app.db", "INSERT INTO t (v) VALUES ('after import')")
        assert after is not None and after.txid == rec.txid + 1
        data, pos = replay(node.ltx_files("app.db"), tmp_path / "r.db")
        assert data == node.export("app.db") and pos == after.pos

    def test_a_reader_during_an_import_sees_the_old_database_or_the_new(self, node: EmulatedNode,
                                                                      tmp_path: Path) -> None:
        """LiteFS applies an import as one transaction: a reader never sees a half-written file (the emulator wrote
        it in place, and a reader could meet an empty database: "no such table")."""
        node.execute("app.db", "CREATE TABLE t (x)")
        src = make_db(tmp_path / "src.db", rows=2000).read_bytes()
        errors: list[str] = []
        done = threading.Event()

        def read() -> None:
            while not done.is_set():
                con = sqlite3.connect(f"file:{node.path('app.db')}?mode=ro", uri=True)
                try:
                    con.execute("SELECT count(*) FROM t").fetchone()
                except sqlite3.Error as err:
                    errors.append(str(err))
                finally:
                    con.close()

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for _ in range(30):
                node.import_db("app.db", src)
        finally:
            done.set()
            reader.join()
        assert errors == []

    def test_import_into_a_new_database_is_a_snapshot(self, node: EmulatedNode, tmp_path: Path) -> None:
        """With no transactions yet, the import is TXID 1 with pre-apply 0."""
        rec = node.import_db("new.db", make_db(tmp_path / "src.db"))
        header = verify(rec.path.read_bytes(), Version.V2)[0]
        assert (header.min_txid, header.pre_apply_checksum) == (1, 0)
        assert node.pos_path("new.db").read_text() == f"{rec.pos}\n"

    def test_export_of_unknown_database(self, node: EmulatedNode) -> None:
        """Unknown names raise DatabaseNotFound ("database not found", as LiteFS says)."""
        with pytest.raises(DatabaseNotFound, match="database not found"):
            node.export("nope.db")


class TestReplica:
    def test_replica_writes_primary_file_and_refuses_writes(self, make_node: Callable[..., EmulatedNode]) -> None:
        """`.primary` holds the primary's hostname on a replica and is absent on the primary."""
        primary = make_node("p", hostname="node-a")
        replica = make_node("r", primary=False, primary_hostname="node-a")
        assert (replica.mount_dir / ".primary").read_text() == "node-a\n"
        assert not (primary.mount_dir / ".primary").exists()
        with pytest.raises(ReadOnlyReplica):
            replica.execute("app.db", "CREATE TABLE t (x)")
        with pytest.raises(ReadOnlyReplica):
            replica.import_db("app.db", b"")
        replica.set_primary(True)
        assert not (replica.mount_dir / ".primary").exists()

    async def test_replica_receives_the_primarys_files(self, make_node: Callable[..., EmulatedNode]) -> None:
        """Files streamed to a replica are byte copies (the primary's node ID); late joiners get a snapshot."""
        primary = make_node("p")
        primary.execute("app.db", "CREATE TABLE t (x)")
        primary.execute("app.db", "INSERT INTO t VALUES (1)")
        replica = make_node("r", primary=False, primary_hostname="p")
        primary.add_replica(replica)
        snap = headers(replica.ltx_files("app.db"))
        assert [(h.min_txid, h.max_txid) for h in snap] == [(1, 2)]  # caught up by snapshot 1-2
        await run_load(primary, "app.db", 20)
        assert replica.pos("app.db") == primary.pos("app.db")
        assert replica.path("app.db").read_bytes() == primary.path("app.db").read_bytes()
        for path in primary.ltx_files("app.db")[2:]:
            assert (replica.ltx_dir("app.db") / path.name).read_bytes() == path.read_bytes()
        assert replica.cluster_id == primary.cluster_id != ""

    def test_snapshot_replaces_every_ltx_file(self, make_node: Callable[..., EmulatedNode]) -> None:
        """A received snapshot (restore from backup) leaves only `0000000000000001-<N>.ltx` in `ltx/`."""
        a, b = make_node("a"), make_node("b")
        for n in range(3):
            a.execute("app.db", f"CREATE TABLE t{n} (x)")
        b.execute("app.db", "CREATE TABLE other (y)")
        (b.ltx_dir("app.db") / "junk.ltx.tmp").write_bytes(b"x")
        pos = b.apply_ltx("app.db", a.snapshot("app.db"))
        assert pos == a.pos("app.db")
        assert [p.name for p in b.ltx_dir("app.db").iterdir()] == ["0000000000000001-0000000000000003.ltx"]
        rec = b.execute("app.db", "INSERT INTO t0 VALUES (1)")
        assert rec is not None and rec.txid == 4


class TestRetention:
    def test_expired_ltx_files(self) -> None:
        """Old files go, except the newest; with a backup only files below the HWM go; temp files are ignored."""
        names = [f"{t:016x}-{t:016x}.ltx" for t in range(1, 6)]
        entries = [(n, 100.0) for n in names] + [("0000000000000009-0000000000000009.ltx.tmp", 0.0)]
        assert expired_ltx_files(entries, now=1000.0, retention=600.0, hwm=None) == names[:4]
        assert expired_ltx_files(entries, now=650.0, retention=600.0, hwm=None) == []
        assert expired_ltx_files(entries, now=1000.0, retention=600.0, hwm=3) == names[:2]
        assert expired_ltx_files(entries, now=1000.0, retention=600.0, hwm=0) == []

    def test_retention_without_backup_deletes_unshipped_files(self, make_node: Callable[..., EmulatedNode]) -> None:
        """The danger: with no backup client LiteFS deletes by age alone, shipped or not."""
        clock = Clock()
        node = make_node(retention_seconds=600, clock=clock)
        for n in range(5):
            node.execute("app.db", f"CREATE TABLE t{n} (x)")
        assert node.enforce_retention() == []
        clock.now += 601
        deleted = node.enforce_retention()
        assert len(deleted) == 4
        assert [p.name for p in node.ltx_files("app.db")] == ["0000000000000005-0000000000000005.ltx"]

    def test_retention_with_backup_waits_for_the_hwm(self, make_node: Callable[..., EmulatedNode]) -> None:
        """With a backup configured nothing at or above the HWM goes, and the HWM starts at 0."""
        clock = Clock()
        node = make_node(retention_seconds=600, backup=True, clock=clock)
        for n in range(5):
            node.execute("app.db", f"CREATE TABLE t{n} (x)")
        clock.now += 601
        assert node.enforce_retention() == []
        node.set_hwm("app.db", 3)
        assert [p.name for p in node.enforce_retention()] == [f"{t:016x}-{t:016x}.ltx" for t in (1, 2)]

    async def test_retention_monitor_runs_until_stopped(self, make_node: Callable[..., EmulatedNode]) -> None:
        """The monitor enforces retention every interval and returns when told to stop."""
        clock = Clock()
        node = make_node(retention_seconds=600, retention_monitor_interval=0.01, clock=clock)
        for n in range(3):
            node.execute("app.db", f"CREATE TABLE t{n} (x)")
        clock.now += 601
        stop = asyncio.Event()
        passes: asyncio.Queue[list[Path]] = asyncio.Queue()
        task = asyncio.create_task(node.run_retention(stop, on_pass=passes.put_nowait))
        deleted = await asyncio.wait_for(passes.get(), 5)
        assert len(deleted) == 2 and len(node.ltx_files("app.db")) == 1
        stop.set()
        await task


class TestLoadWriter:
    async def test_rate_and_stop(self, node: EmulatedNode) -> None:
        """The load runs at its rate until stopped; every commit's checksum is its file's post-apply checksum."""
        async with LoadWriter(node, "app.db", rate=500) as load:
            await load.wait_txs(10)
        n = len(load.txs)
        assert n >= 10 and load.steps >= 10
        assert len(node.ltx_files("app.db")) == n
        for rec in load.txs:
            assert post_of(rec.path) == rec.post_apply_checksum


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class TestHTTP:
    async def test_export_matches_the_pos(self, node: EmulatedNode, http: aiohttp.ClientSession) -> None:
        """GET /export returns the database whose checksum is the `-pos` file's, with LiteFS's headers."""
        await run_load(node, "app.db", 30)
        runner, url = await start_http(node)
        try:
            async with http.get(f"{url}/export", params={"name": "app.db"}) as resp:
                assert resp.status == 200
                body = await resp.read()
                assert resp.headers["Litefs-Id"] == f"{node.node_id:016X}"
                assert resp.headers["Litefs-Cluster-Id"] == node.cluster_id
            pos = Pos.parse(node.pos_path("app.db").read_text())
            assert checksum_database_file(body, 4096) == pos.post_apply_checksum
            async with http.get(f"{url}/export", params={"name": "nope.db"}) as resp:
                assert resp.status == 404 and await resp.text() == "database not found\n"
                assert resp.content_type == "text/plain"
            async with http.get(f"{url}/export") as resp:
                assert resp.status == 400 and await resp.text() == "name required\n"
        finally:
            await runner.cleanup()

    async def test_import_adds_the_next_txid(self, node: EmulatedNode, http: aiohttp.ClientSession,
                                             tmp_path: Path) -> None:
        """POST /import answers 200 with an empty body; the import is the next TXID and the chain applies."""
        node.execute("app.db", "CREATE TABLE t (x)")
        before = node.pos("app.db")
        runner, url = await start_http(node)
        try:
            body = make_db(tmp_path / "src.db", rows=2000).read_bytes()
            async with http.post(f"{url}/import", params={"name": "app.db"}, data=body) as resp:
                assert resp.status == 200 and await resp.read() == b""
        finally:
            await runner.cleanup()
        assert node.pos("app.db").txid == before.txid + 1
        data, pos = replay(node.ltx_files("app.db"), tmp_path / "r.db")
        assert data == node.export("app.db") and pos == node.pos("app.db")

    async def test_replica_refuses_import_but_exports(self, make_node: Callable[..., EmulatedNode],
                                                      http: aiohttp.ClientSession) -> None:
        """On a replica, /import is 503 "lease expired" (LiteFS's primary context); /export still works."""
        primary = make_node("p")
        primary.execute("app.db", "CREATE TABLE t (x)")
        replica = make_node("r", primary=False, primary_hostname="p-host")
        primary.add_replica(replica)
        runner, url = await start_http(replica)
        try:
            async with http.post(f"{url}/import", params={"name": "app.db"}, data=b"x") as resp:
                assert resp.status == 503 and await resp.text() == "lease expired\n"
            async with http.get(f"{url}/export", params={"name": "app.db"}) as resp:
                assert resp.status == 200 and await resp.read() == primary.export("app.db")
            async with http.get(f"{url}/info") as resp:
                info = json.loads(await resp.text())
            assert info["isPrimary"] is False and info["primary"] == {"hostname": "p-host"}
        finally:
            await runner.cleanup()

    async def test_info(self, node: EmulatedNode, http: aiohttp.ClientSession) -> None:
        """GET /info is LiteFS's indented JSON; the cluster ID is the one in `<data>/clusterid`."""
        runner, url = await start_http(node)
        try:
            async with http.get(f"{url}/info") as resp:
                text = await resp.text()
        finally:
            await runner.cleanup()
        info = json.loads(text)
        assert text.endswith("}\n") and text.startswith('{\n  "clusterID": ')
        assert info == {"clusterID": node.cluster_id, "isPrimary": True, "candidate": True,
                        "path": str(node.data_dir), "primary": {"hostname": "localhost"}}
        assert (node.data_dir / "clusterid").read_text() == f"{node.cluster_id}\n"
        assert re.fullmatch(r"LFSC[0-9A-F]{16}", node.cluster_id)

    async def test_events_stream_tx(self, node: EmulatedNode, http: aiohttp.ClientSession) -> None:
        """GET /events starts with `init`, then one `tx` event per transaction; shutdown ends the stream."""
        runner, url = await start_http(node)
        try:
            async with http.get(f"{url}/events") as resp:
                init = json.loads(await resp.content.readline())
                assert init == {"type": "init", "data": {"isPrimary": True}}
                rec = await asyncio.to_thread(node.execute, "app.db", "CREATE TABLE t (x)")
                assert rec is not None
                event = json.loads(await resp.content.readline())
                assert event["type"] == "tx" and event["db"] == "app.db"
                assert event["data"]["txID"] == f"{rec.txid:016x}"
                assert event["data"]["postApplyChecksum"] == f"{rec.post_apply_checksum:016x}"
                assert (event["data"]["pageSize"], event["data"]["commit"]) == (4096, rec.commit)
                await runner.cleanup()
                assert await resp.content.read() == b""
        finally:
            await runner.cleanup()

    async def test_unknown_paths_and_methods(self, node: EmulatedNode, http: aiohttp.ClientSession) -> None:
        """Go's answers: "404 page not found" and "method not allowed"."""
        runner, url = await start_http(node)
        try:
            async with http.get(f"{url}/pos") as resp:
                assert resp.status == 404 and await resp.text() == "404 page not found\n"
            async with http.post(f"{url}/export?name=x") as resp:
                assert resp.status == 405 and await resp.text() == "method not allowed\n"
        finally:
            await runner.cleanup()
