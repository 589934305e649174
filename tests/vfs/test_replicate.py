"""`replicate`: a local copy equal to the backup, kept current in whole transactions, safe against crashes."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.vfs import journal, open_source
from sidecar.vfs.replica import Replica
from tests.engine.history import History
from tests.server.conftest import wait_until
from tests.vfs.conftest import EVENTS, Written, rows, stale_head

STATE = "SELECT count(*), coalesce(sum(length(body)), 0) FROM events"


def state(path: Path) -> tuple[int, int]:
    con = sqlite3.connect(path)
    try:
        return con.execute(STATE).fetchone()  # type: ignore[no-any-return]
    finally:
        con.close()


class Reader(threading.Thread):
    """Reads the copy in a loop, as an application would, remembering every state it saw."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.seen: set[tuple[int, int]] = set()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        con = sqlite3.connect(self.path, timeout=30)
        try:
            while not self.stop.is_set():
                con.execute("BEGIN")
                self.seen.add(con.execute(STATE).fetchone())
                con.execute("COMMIT")
        except BaseException as err:  # reported by the test
            self.errors.append(err)
        finally:
            con.close()


class TestReplicate:
    async def test_follows_in_whole_transactions(self, written: Written, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        """The copy starts equal to the backup; while new states are applied, a reader only ever sees states
        the live database had after some transaction; it ends equal to the live database."""
        valid: set[tuple[int, int]] = set()
        for _ in range(20):
            await written.write()
            valid.add(state(written.history.path))
        await written.engine.flush_all()
        copy = tmp_path / "copy.db"
        assert await asyncio.to_thread(main, ["replicate", *written.flags, "-o", str(copy), written.url]) == 0
        assert f"TXID {written.history.pos.txid:016x}" in capsys.readouterr().out
        assert rows(copy) == rows(written.history.path)
        source = open_source(written.url, poll_interval=0.05, **written.options)
        replica = Replica(source, copy)
        stop = asyncio.Event()
        follower = asyncio.create_task(replica.follow(stop))
        reader = Reader(copy)
        reader.start()
        try:
            for _ in range(25):
                await written.write()
                valid.add(state(written.history.path))
                if written.clock.now % 3 < 1:
                    await written.engine.flush_all()
            await written.engine.flush_all()

            async def caught_up() -> bool:
                return replica.current is not None and replica.current.txid == written.history.pos.txid
            await wait_until(caught_up, within=30)
        finally:
            stop.set()
            await follower
            reader.stop.set()
            await asyncio.to_thread(reader.join)
            await source.close()
        assert not reader.errors
        assert reader.seen <= valid and len(reader.seen) > 1
        assert rows(copy) == rows(written.history.path)
        con = sqlite3.connect(copy)
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA journal_mode").fetchall() == [("delete",)]
        con.close()

    async def test_a_change_cut_short_is_rolled_back_then_redone(self, written: Written, tmp_path: Path) -> None:
        """A change that dies after its journal is hot and half its pages are written: readers see the old
        state, and the next sync applies it again."""
        for _ in range(5):
            await written.write()
        await written.engine.flush_all()
        copy = tmp_path / "copy.db"
        source = open_source(written.url, **written.options)
        written_pages: list[int] = []

        def dying(path: Path, page_size: int, commit: int, pgnos: list[int], page: Callable[[int], bytes],
                  counter: int) -> None:
            def one(p: int) -> bytes:
                if len(written_pages) == len(pgnos) // 2:
                    raise OSError("killed")
                written_pages.append(p)
                return page(p)
            journal.rewrite(path, page_size, commit, pgnos, one, counter)
        try:
            await Replica(source, copy).sync()
            before = rows(copy)
            for _ in range(5):
                await written.write(n=1)
            written.history.con.execute("UPDATE events SET body = body || 'changed'")
            await written.write()
            await written.engine.flush_all()
            with pytest.raises(OSError, match="killed"):
                await Replica(source, copy, rewrite=dying).sync()
            replica = Replica(source, copy)
            assert written_pages and Path(f"{copy}-journal").exists()
            assert rows(copy) == before  # a reader rolls the hot journal back
            pos = await asyncio.to_thread(replica.position)
            assert pos is not None and pos.txid < written.history.pos.txid
            await replica.sync()
            assert rows(copy) == rows(written.history.path)
            # A copy whose position is lost is rebuilt in place from the latest plan.
            (tmp_path / "copy.db-replica").unlink()
            pos, files = await replica.sync()
            assert pos.txid == written.history.pos.txid and files >= 1
            assert rows(copy) == rows(written.history.path)
        finally:
            await source.close()

    async def test_a_database_deleted_and_started_over_is_rebuilt(self, written: Written, tmp_path: Path) -> None:
        """The operator deletes the database and its node starts it over: the backup's new history is behind
        the copy's TXID (or at it, with another checksum), and the copy is rebuilt, not kept as current."""
        for _ in range(6):
            await written.write()
        await written.engine.flush_all()
        copy = tmp_path / "copy.db"
        source = open_source(written.url, **written.options)
        try:
            replica = Replica(source, copy)
            await replica.sync()
            await written.engine.delete_database("c", "app.db")
            for seed in (2, 3):  # started over behind the copy, then again up to the copy's TXID
                written.history.close()
                written.history = History(tmp_path / f"live{seed}.db", seed=seed)
                for _ in range(3):
                    await written.write()
                await written.engine.flush_all()
                pos, files = await replica.sync()
                assert pos.txid == 3 and files >= 1 and rows(copy) == rows(written.history.path)
                await written.engine.delete_database("c", "app.db")
        finally:
            await source.close()

    async def test_a_reader_open_across_a_rebuild_at_the_same_txid_reads_the_new_database(
            self, written: Written, tmp_path: Path) -> None:
        """Started over and back at the copy's TXID, the rebuilt copy gets another change counter: a reader that
        kept its connection (and SQLite's page cache of the old database) reads the new database."""
        for _ in range(3):
            await written.write()
        await written.engine.flush_all()
        copy = tmp_path / "copy.db"
        source = open_source(written.url, **written.options)
        replica = Replica(source, copy)
        await replica.sync()
        reader = sqlite3.connect(copy)
        try:
            assert reader.execute(EVENTS).fetchall() == rows(written.history.path)
            await written.engine.delete_database("c", "app.db")
            written.history.close()
            written.history = History(tmp_path / "live2.db", seed=2)
            for _ in range(3):
                await written.write()
            await written.engine.flush_all()
            pos, _ = await replica.sync()
            assert pos.txid == 3
            assert reader.execute(EVENTS).fetchall() == rows(written.history.path)
            await written.write()  # the new history goes on from the rebuilt copy, in place
            await written.engine.flush_all()
            pos, files = await replica.sync()
            assert (pos.txid, files) == (4, 1) and reader.execute(EVENTS).fetchall() == rows(written.history.path)
            assert await asyncio.to_thread(Replica(source, copy).position) == pos
        finally:
            reader.close()
            await source.close()

    async def test_a_database_started_over_past_the_copy_is_rebuilt_not_patched(self, written: Written,
                                                                               tmp_path: Path) -> None:
        """Started over and past the copy's TXID, the new history's compacted file that spans the copy's TXID
        holds only the pages that changed since its start: applied to the old copy it would leave a mix of
        both databases (malformed). The copy is rebuilt."""
        for _ in range(6):
            await written.write()
        await written.engine.flush_all()
        copy = tmp_path / "copy.db"
        source = open_source(written.url, **written.options)
        try:
            replica = Replica(source, copy)
            await replica.sync()
            await written.engine.delete_database("c", "app.db")
            written.history.close()
            written.history = History(tmp_path / "live2.db", seed=2)
            written.history.con.execute("CREATE TABLE big (x)")
            written.history.con.executemany("INSERT INTO big VALUES (?)", [("y" * 1000,) for _ in range(200)])
            for _ in range(12):
                await written.write()
            await written.engine.flush_all()
            await written.engine.compact_level("c", "app.db", 1)
            pos, _ = await replica.sync()
            assert pos.txid == written.history.pos.txid
            assert rows(copy, "SELECT count(*), sum(length(x)) FROM big") == [(200, 200_000)]
            assert rows(copy) == rows(written.history.path)
            assert rows(copy, "PRAGMA integrity_check") == [("ok",)]
        finally:
            await source.close()

    async def test_an_existing_file_that_is_not_sqlite_is_left_alone(self, written: Written, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
        """-o naming a file that is not a database (a typo) fails with one line naming it; nothing is written."""
        await written.write()
        await written.engine.flush_all()
        notes = tmp_path / "notes.txt"
        notes.write_text("my notes\n" * 100)
        argv = ["replicate", *written.flags, "-o", str(notes), written.url]
        assert await asyncio.to_thread(main, argv) == 1
        assert f"{notes}: exists and is not a SQLite database" in capsys.readouterr().err
        assert notes.read_text() == "my notes\n" * 100
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("notes", ".notes"))) == ["notes.txt"]

    async def test_a_copy_overwritten_by_a_file_that_is_not_sqlite_is_left_alone(
            self, written: Written, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The copy's position file is there but the copy was overwritten (not a database any more, or one SQLite
        cannot open): one line naming it, as for any file that is not a database; nothing is written."""
        await written.write()
        await written.engine.flush_all()
        copy = tmp_path / "copy.db"
        argv = ["replicate", *written.flags, "-o", str(copy), written.url]
        assert await asyncio.to_thread(main, argv) == 0
        copy.write_text("my notes\n" * 100)
        capsys.readouterr()
        assert await asyncio.to_thread(main, argv) == 1
        assert f"{copy}: exists and is not a SQLite database" in capsys.readouterr().err
        assert copy.read_text() == "my notes\n" * 100
        damaged = b"SQLite format 3\0" + b"\xff" * 200  # a header SQLite refuses
        copy.write_bytes(damaged)
        assert await asyncio.to_thread(main, argv) == 1
        assert f"{copy}: a damaged SQLite database (file is not a database)" in capsys.readouterr().err
        assert copy.read_bytes() == damaged

    async def test_an_existing_empty_file_becomes_the_copy(self, written: Written, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
        """-o naming an empty file (touched, or opened by an app before the first sync) is a copy to make, not a
        database to rewrite in place (SQLite would write an empty database's page 1 over it)."""
        for _ in range(3):
            await written.write()
        await written.engine.flush_all()
        copy = tmp_path / "copy.db"
        copy.touch()
        assert await asyncio.to_thread(main, ["replicate", *written.flags, "-o", str(copy), written.url]) == 0, \
            capsys.readouterr().err
        assert rows(copy) == rows(written.history.path)
        assert rows(copy, "PRAGMA integrity_check") == [("ok",)]
        source = open_source(written.url, **written.options)
        try:
            replica = Replica(source, copy)
            assert (await replica.sync())[1] == 0  # its position was kept: already current
        finally:
            await source.close()

    async def test_a_stale_head_object_is_planned_around(self, tmp_path: Path) -> None:
        """The head object names files retention deleted since (its later writes failed): the copy is made from
        the files themselves, the newest stored state."""
        w = await stale_head(tmp_path)
        source = open_source(w.url)
        try:
            copy = tmp_path / "copy.db"
            pos, _ = await Replica(source, copy).sync()
            assert pos.txid == w.history.pos.txid and rows(copy) == rows(w.history.path)
        finally:
            await source.close()
            await w.close()

    async def test_following_goes_on_when_a_reader_holds_the_copy_too_long(self, written: Written,
                                                                           tmp_path: Path) -> None:
        """SQLite gives up waiting for a long read transaction ('database is locked'): the change is retried,
        not the end of following."""
        await written.write()
        await written.engine.flush_all()
        copy = tmp_path / "copy.db"
        source = open_source(written.url, poll_interval=0.05, **written.options)
        busy = [1]

        def locked_once(*args: object) -> None:
            if busy:
                busy.pop()
                raise sqlite3.OperationalError("database is locked")  # what BEGIN EXCLUSIVE says after its timeout
            journal.rewrite(*args)  # type: ignore[arg-type]
        replica = Replica(source, copy, rewrite=locked_once)
        await replica.sync()
        stop = asyncio.Event()
        follower = asyncio.create_task(replica.follow(stop))
        try:
            await written.write()
            await written.engine.flush_all()

            async def caught_up() -> bool:
                assert not follower.done(), follower
                return replica.current is not None and replica.current.txid == written.history.pos.txid
            await wait_until(caught_up, within=30)
        finally:
            stop.set()
            await follower
            await source.close()
        assert not busy and rows(copy) == rows(written.history.path)

    async def test_follow_command_stops_on_sigterm(self, written: Written, tmp_path: Path) -> None:
        for _ in range(3):
            await written.write()
        await written.engine.flush_all()
        copy = tmp_path / "copy.db"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "replicate", "--follow", "--poll-interval", "0.1", *written.flags,
            "-o", str(copy),
            written.url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            first = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert f"TXID {written.history.pos.txid:016x}".encode() in first
            await written.write()
            await written.engine.flush_all()

            async def caught_up() -> bool:
                return await asyncio.to_thread(rows, copy, EVENTS) == rows(written.history.path)
            await wait_until(caught_up, within=30)
        finally:
            if proc.returncode is None:
                proc.terminate()
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()


class TestReplicateArguments:
    async def test_an_output_in_a_missing_directory_is_refused_not_created(self, written: Written, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
        """As restore -o and admin download -o: exit 1 naming it, before any read; the directory is not made."""
        await written.write()
        await written.engine.flush_all()
        out = tmp_path / "typo" / "copy.db"
        argv = ["replicate", *written.flags, "-o", str(out), written.url]
        assert await asyncio.to_thread(main, argv) == 1
        assert capsys.readouterr().err == f"litefs-sidecar: -o {out}: {out.parent} does not exist\n"
        assert not out.parent.exists()

    @pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
    def test_a_poll_interval_that_would_spin_is_a_usage_error(self, value: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
        """0 or less would check the store's head object in a loop without a pause: exit 2, argparse names it."""
        with pytest.raises(SystemExit) as info:
            main(["replicate", "--follow", "--poll-interval", value, "-o", str(tmp_path / "copy.db"),
                  f"file://{tmp_path}/backups/default/app.db"])
        assert info.value.code == 2
        assert f"argument --poll-interval: {value!r}: want a number greater than 0" in capsys.readouterr().err
        assert not (tmp_path / "copy.db").exists()
