"""Following the latest state: new data shows up, an idle follower makes no LIST, and readers outlive
compaction and retention of the files they read."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest
from structlog.testing import capture_logs

from sidecar.engine import Levels, plan_restore, restore, scan
from sidecar.errors import NotFound, RestoreError, SidecarError
from sidecar.vfs import BackupVFS
from tests.engine.history import History
from tests.s3server import MotoServer
from tests.server.conftest import wait_until
from tests.vfs.conftest import EVENTS, MIN, Written, open_written, rows

LAST = "SELECT max(id), count(*) FROM events WHERE id > (SELECT max(id) - 5 FROM events)"  # a few pages


def query(con: apsw.Connection, sql: str = EVENTS) -> list[tuple[object, ...]]:
    return [tuple(r) for r in con.execute(sql)]


class TestFollow:
    async def test_new_data_shows_up_and_an_idle_follower_never_lists(
            self, written: Written, make_vfs: Callable[..., BackupVFS]) -> None:
        for _ in range(10):
            await written.write()
        await written.engine.flush_all()
        vfs = make_vfs(**written.options)
        con = await asyncio.to_thread(vfs.connect, written.url, follow=True)
        try:
            assert await asyncio.to_thread(query, con) == rows(written.history.path)
            stats = vfs.stats(written.url)
            changes = 3
            for _ in range(changes):
                await written.write()
                await written.engine.flush_all()
                live = rows(written.history.path)

                async def visible(want: list[tuple[object, ...]] = live) -> bool:
                    return await asyncio.to_thread(query, con) == want
                await wait_until(visible, within=15)
            if written.served is not None:
                assert stats.polls <= changes + 2, stats  # one long-poll per change (and the one held now)
            else:
                polls = stats.polls

                async def idled() -> bool:
                    return stats.polls >= polls + 5  # five more polls of the head object, nothing changed
                await wait_until(idled, within=15)
            assert stats.lists == 0, stats  # the head object, conditional GETs or long-polls: never a LIST
            assert await asyncio.to_thread(query, con) == rows(written.history.path)
            assert float(await asyncio.to_thread(lambda: query(con, "PRAGMA litefs_lag")[0][0])) < 10
        finally:
            await asyncio.to_thread(con.close)

    async def test_a_database_started_over_is_read_from_its_new_files(
            self, written: Written, tmp_path: Path, make_vfs: Callable[..., BackupVFS]) -> None:
        """Deleted and started over, a database's new files have the names of the old ones: a reader of the same
        VFS reads the new ones, never pages it cached from the old."""
        for _ in range(3):
            await written.write()
        await written.engine.flush_all()
        vfs = make_vfs(**written.options)

        def read() -> list[tuple[object, ...]]:
            con = vfs.connect(written.url)
            try:
                return query(con)
            finally:
                con.close()
        assert await asyncio.to_thread(read) == rows(written.history.path)
        await written.engine.delete_database("c", "app.db")
        written.history.close()
        written.history = History(tmp_path / "live2.db", seed=9)
        for _ in range(3):
            await written.write()
        await written.engine.flush_all()
        assert await asyncio.to_thread(read) == rows(written.history.path)

    async def test_a_connection_open_across_a_start_over_at_the_same_txid_reads_the_new_database(
            self, written: Written, tmp_path: Path, make_vfs: Callable[..., BackupVFS]) -> None:
        """Back at the TXID a connection last read, in another history: SQLite's page cache of the old database
        is dropped (page 1's change counter differs), whether the connection follows or moves by pragma."""
        for _ in range(3):
            await written.write()
        await written.engine.flush_all()
        vfs = make_vfs(**written.options)
        cons = [await asyncio.to_thread(vfs.connect, written.url, follow=follow) for follow in (False, True)]
        try:
            for con in cons:
                assert await asyncio.to_thread(query, con) == rows(written.history.path)
            old = await asyncio.to_thread(query, cons[0], "PRAGMA litefs_timestamp")
            await written.engine.delete_database("c", "app.db")
            written.history.close()
            written.history = History(tmp_path / "live2.db", seed=2)
            for _ in range(3):
                await written.write()
            await written.engine.flush_all()
            assert await asyncio.to_thread(query, cons[0], "PRAGMA litefs_txid = latest") == [("0000000000000003",)]

            async def moved() -> bool:  # a transaction moves a follower to the newest state it knows
                await asyncio.to_thread(query, cons[1], "SELECT count(*) FROM sqlite_master")
                return await asyncio.to_thread(query, cons[1], "PRAGMA litefs_timestamp") != old
            await wait_until(moved, within=15)
            for con in cons:
                assert await asyncio.to_thread(query, con) == rows(written.history.path)
        finally:
            for con in cons:
                await asyncio.to_thread(con.close)

    async def test_a_transaction_open_across_a_start_over_never_reads_both_databases(
            self, written: Written, tmp_path: Path, make_vfs: Callable[..., BackupVFS]) -> None:
        """A read transaction pinned at a TXID the started-over database reaches again, with other content, fails
        (or reads on in the old state); it never goes on with the new database's pages. The next one reads
        the new database, whole."""
        async def fill(tag: str) -> None:
            written.history.con.executemany("INSERT INTO events (at, body) VALUES (?, ?)",
                                            [(i, f"{tag} {i} " + "x" * 300) for i in range(3000)])
            await written.write(n=2)
            await written.write(n=2)
            await written.engine.flush_all()
        await fill("OLD")
        vfs = make_vfs(cache_bytes=16 << 10, **written.options)
        con = await asyncio.to_thread(vfs.connect, written.url)
        tags = "SELECT DISTINCT substr(body, 1, 3) FROM events WHERE id {} AND body NOT LIKE 'e%'"
        try:
            await asyncio.to_thread(query, con, "BEGIN")
            assert await asyncio.to_thread(query, con, tags.format("< 500")) == [("OLD",)]
            await written.engine.delete_database("c", "app.db")
            written.history.close()
            written.history = History(tmp_path / "live2.db", seed=2)
            await fill("NEW")
            try:
                rest = await asyncio.to_thread(query, con, tags.format(">= 500"))
            except (apsw.BusyError, SidecarError):
                pass  # the state it read is gone
            else:
                assert rest == [("OLD",)]
            await asyncio.to_thread(query, con, "ROLLBACK")
            assert await asyncio.to_thread(query, con, "PRAGMA litefs_txid = latest") == [("0000000000000004",)]
            assert await asyncio.to_thread(query, con) == rows(written.history.path)
        finally:
            await asyncio.to_thread(con.close)

    async def test_a_refused_pragma_of_one_follower_does_not_stop_another(
            self, tmp_path: Path, make_vfs: Callable[..., BackupVFS]) -> None:
        """One connection asks for a TXID that cannot be read, then closes: the others still follow."""
        w = await open_written("file", tmp_path, None)
        try:
            await w.write(3)
            await w.engine.flush_all()
            vfs = make_vfs()
            a = await asyncio.to_thread(vfs.connect, w.url, follow=True)
            b = await asyncio.to_thread(vfs.connect, w.url, follow=True)
            with pytest.raises(RestoreError, match="beyond the newest restore point"):
                await asyncio.to_thread(query, a, "PRAGMA litefs_txid = 'ffff'")
            await asyncio.to_thread(a.close)
            await w.write(3)
            await w.engine.flush_all()

            async def visible() -> bool:
                return await asyncio.to_thread(query, b) == rows(w.history.path)
            await wait_until(visible, within=15)
            await asyncio.to_thread(b.close)
        finally:
            await w.close()

    async def test_a_file_with_a_bad_header_does_not_end_following(
            self, tmp_path: Path, make_vfs: Callable[..., BackupVFS]) -> None:
        """Following by LIST (no head object), a stored file with a bad header fails the polls it is listed in;
        once it is gone, following goes on."""
        w = await open_written("file", tmp_path, None)
        try:
            await w.write(3)
            await w.engine.flush_all()
            db_dir = tmp_path / "store" / "c" / "app.db"
            (db_dir / "head.json").unlink()
            vfs = make_vfs()
            con = await asyncio.to_thread(vfs.connect, w.url, follow=True)
            stats = vfs.stats(w.url)
            junk = db_dir / "ltx" / "0" / "00000000000000ff-00000000000000ff.ltx"
            junk.write_bytes(b"not an LTX file" * 10)
            polls = stats.polls

            async def polled() -> bool:
                return stats.polls >= polls + 2
            await wait_until(polled, within=15)
            junk.unlink()
            await w.write(3)
            await w.engine.flush_all()

            async def visible() -> bool:
                return await asyncio.to_thread(query, con) == rows(w.history.path)
            await wait_until(visible, within=15)
            await asyncio.to_thread(con.close)
        finally:
            await w.close()

    @pytest.mark.parametrize("kind", ["file", "s3", "server", "server-pages"])
    async def test_a_reader_outlives_compaction_and_retention(self, kind: str, tmp_path: Path,
                                                              make_vfs: Callable[..., BackupVFS],
                                                              request: pytest.FixtureRequest) -> None:
        """A transaction pinned to TXID T keeps reading T after an L1 compaction and an L0 retention deleted
        the files it was reading (its pages are not cached anywhere), then the next one sees new data. Through
        a server that resolves pages ("server-pages") nothing vanishes for the reader: the server plans T anew."""
        moto: MotoServer | None = request.getfixturevalue("moto_server") if kind == "s3" else None
        levels = Levels(l0_interval=10, l1_interval=3600, l2_interval=7200, snapshot_interval=86400,
                        l0_retention=10 * MIN, l1_retention=3600, l2_retention=7200, snapshot_retention=86400)
        w = await open_written(kind.split("-")[0], tmp_path, moto, levels)
        try:
            for _ in range(4):  # transactions of random text: each L0 file too big to be read whole at open
                w.history.con.executemany("INSERT INTO events (at, body) VALUES (0, ?)",
                                          [(os.urandom(320).hex(),) for _ in range(220)])
                await w.write(step=13)
            await w.engine.flush_all()
            pinned = w.history.pos.txid
            # No page cache: every page is read from the store again.
            vfs = make_vfs(cache_bytes=0, server_pages=kind == "server-pages", **w.options)
            con = await asyncio.to_thread(vfs.connect, w.url, follow=True)
            try:
                await asyncio.to_thread(con.execute, "PRAGMA cache_size = 1")
                await asyncio.to_thread(con.execute, "BEGIN")
                first = await asyncio.to_thread(query, con)
                plan = vfs.backup(w.url).latest
                assert plan is not None
                l0_keys = [e.key(w.storage.layout, "c/app.db") for e in plan.head.plan if e.level == 0][:-1]
                remote = vfs.backup(w.url).remote
                assert remote == (kind == "server-pages")
                assert l0_keys
                await w.engine.compact_level("c", "app.db", 1)
                w.clock.now += 11 * MIN
                await w.engine.tick()  # retention: the L0 files the transaction reads are deleted
                for key in l0_keys:
                    with pytest.raises(NotFound):
                        await w.storage.get_range(key, 0, 1)
                with capture_logs() as logs:
                    again = await asyncio.to_thread(query, con)
                assert again == first  # the same TXID, read from the files that exist now
                vanished = any(e["event"] == "file vanished; planning the same TXID again" for e in logs)
                assert vanished != remote
                assert (await asyncio.to_thread(query, con, "PRAGMA litefs_txid")) == [(f"{pinned:016x}",)]
                await asyncio.to_thread(con.execute, "COMMIT")
                index = await scan(w.storage, "c/app.db")
                out = tmp_path / "at-pinned.db"
                await restore(w.storage, "c/app.db", plan_restore(index, txid=pinned), out)
                assert first == rows(out)
                for _ in range(2):
                    await w.write()
                await w.engine.flush_all()
                live = rows(w.history.path, LAST)

                async def visible() -> bool:
                    return await asyncio.to_thread(query, con, LAST) == live
                await wait_until(visible, within=15)
            finally:
                await asyncio.to_thread(con.close)
        finally:
            await w.close()
