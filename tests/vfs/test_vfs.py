"""The VFS itself: time travel by pragma, one TXID per read transaction, page reads that fetch little."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import aiohttp
import apsw
import pytest
from aiohttp import web

from sidecar.engine import Engine, Levels, scan
from sidecar.engine.index import restore_points
from sidecar.errors import RestoreError, SidecarError
from sidecar.ltx import format_timestamp
from sidecar.storage import open_storage
from sidecar.vfs import BackupVFS
from sidecar.vfs.http import ServerSource
from tests.engine.history import History
from tests.vfs.conftest import EVENTS, READER, Stored, open_written, rows, stale_head

COUNT = "SELECT count(*), coalesce(sum(length(body)), 0) FROM events"


def one(con: apsw.Connection, sql: str) -> tuple[object, ...]:
    return tuple(next(iter(con.execute(sql))))


class TestTimeTravel:
    async def test_pragmas_move_between_transactions_only(self, stored: Stored,
                                                          make_vfs: Callable[..., BackupVFS]) -> None:
        """`PRAGMA litefs_txid = X` inside a transaction takes effect at the next one; `latest` comes back."""
        points = restore_points(await scan(open_storage(f"file://{stored.root}"), "c/app.db"))
        (old, old_ts, _), (new, new_ts, _) = points[len(points) // 3], points[-1]
        url = f"file://{stored.root}/c/app.db"

        def run() -> None:
            con = make_vfs().connect(url)
            try:
                assert one(con, "PRAGMA litefs_txid") == (f"{new:016x}",)
                assert one(con, "PRAGMA litefs_timestamp") == (format_timestamp(new_ts),)
                latest = one(con, COUNT)
                con.execute("BEGIN")
                assert one(con, COUNT) == latest
                assert one(con, f"PRAGMA litefs_txid = '{old:016x}'") == (f"{old:016x}",)
                assert one(con, COUNT) == latest  # this transaction keeps its TXID
                con.execute("COMMIT")
                past = one(con, COUNT)
                assert past != latest and float(one(con, "PRAGMA litefs_lag")[0]) >= 0
                assert one(con, "PRAGMA litefs_txid = latest") == (f"{new:016x}",)
                assert one(con, f"PRAGMA litefs_timestamp = '{format_timestamp(old_ts + 1)}'") == \
                    (format_timestamp(old_ts),)
                assert one(con, "PRAGMA litefs_txid") == (f"{old:016x}",) and one(con, COUNT) == past
                assert one(con, "PRAGMA litefs_txid = 'latest'") == (f"{new:016x}",)
                assert one(con, COUNT) == latest
                with pytest.raises(RestoreError, match="before every snapshot"):
                    con.execute("PRAGMA litefs_timestamp = '2020-01-01T00:00:00Z'")
                with pytest.raises(SidecarError, match="want a hex transaction ID"):
                    con.execute("PRAGMA litefs_txid = 'yesterday'")
                assert one(con, COUNT) == latest  # a refused target changes nothing
            finally:
                con.close()
        await asyncio.to_thread(run)

    async def test_uri_parameters(self, stored: Stored, make_vfs: Callable[..., BackupVFS]) -> None:
        points = restore_points(await scan(open_storage(f"file://{stored.root}"), "c/app.db"))
        txid, ts, _ = points[5]
        vfs = make_vfs()
        url = f"file://{stored.root}/c/app.db"

        def run() -> None:
            for uri in (f"file:{url}?txid={txid:x}", f"file:{url}?timestamp={format_timestamp(ts + 1)}"):
                con = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI, vfs=vfs.vfs_name)
                assert one(con, "PRAGMA litefs_txid") == (f"{txid:016x}",)
                con.close()
            with pytest.raises(SidecarError, match="not both"):
                vfs.connect(url, txid=txid, timestamp=ts)
        await asyncio.to_thread(run)


class TestPageReads:
    async def test_a_lookup_in_a_big_snapshot_reads_a_window_of_its_index(
            self, tmp_path: Path, make_vfs: Callable[..., BackupVFS]) -> None:
        """A snapshot whose page index is far bigger than one read: a primary-key lookup reads a few windows
        of it and a few frames, not the index; a range scan coalesces neighbouring frames."""
        history = History(tmp_path / "live.db", page_size=512)
        history.con.execute("BEGIN")
        history.con.executemany("INSERT INTO events (at, body) VALUES (?, ?)",
                                [(i, f"row {i} " + "x" * 200) for i in range(60_000)])
        history.con.execute("COMMIT")
        engine = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state",
                                   Levels(l0_interval=0))
        await engine.write_tx("c", "app.db", history.commit(1_000))
        await engine.close()
        history.close()
        [snapshot] = list(engine.index("c", "app.db"))
        ltx = tmp_path / "store" / "c" / "app.db" / "ltx" / "0" / "0000000000000001-0000000000000001.ltx"
        index_bytes = int.from_bytes(ltx.read_bytes()[-24:-16], "big")
        assert snapshot.commit > 30_000 and index_bytes > 200_000
        vfs = make_vfs(cache_bytes=1 << 20)
        url = f"file://{tmp_path / 'store' / 'c' / 'app.db'}"
        live = sqlite3.connect(tmp_path / "live.db")
        scan_rows = live.execute("SELECT id, at FROM events WHERE id BETWEEN 5000 AND 8000").fetchall()
        live.close()

        def run() -> None:
            con = vfs.connect(url)
            try:
                stats = vfs.stats(url)
                assert one(con, "SELECT body FROM events WHERE id = 43456") == ("row 43455 " + "x" * 200,)
                assert stats.bytes < index_bytes // 2 and stats.requests <= 12, stats
                before = stats.snapshot()
                got = [tuple(r) for r in con.execute("SELECT id, at FROM events WHERE id BETWEEN 5000 AND 8000")]
                assert got == scan_rows
                pages, requests = stats.pages_fetched - before["pages_fetched"], stats.requests - before["requests"]
                assert pages > 300 and requests < pages / 8, stats  # neighbours come in one read
            finally:
                con.close()
        await asyncio.to_thread(run)


class TestStaleHeadObject:
    async def test_the_latest_state_is_planned_from_the_files(self, tmp_path: Path,
                                                              make_vfs: Callable[..., BackupVFS]) -> None:
        """The head object is a hint; the files are the truth: a connection to the latest state, following or
        not, reads the newest stored state instead of failing on a deleted file."""
        w = await stale_head(tmp_path)
        try:
            vfs = make_vfs()

            def run(follow: bool) -> tuple[object, list[tuple[object, ...]]]:
                con = vfs.connect(w.url, follow=follow)
                try:
                    return one(con, "PRAGMA litefs_txid")[0], [tuple(r) for r in con.execute(EVENTS)]
                finally:
                    con.close()
            for follow in (False, True):
                assert await asyncio.to_thread(run, follow) == (f"{w.history.pos.txid:016x}", rows(w.history.path))
        finally:
            await w.close()


class TestThroughAProxy:
    async def test_a_proxy_that_ignores_range_still_gives_the_bytes_asked(self, tmp_path: Path) -> None:
        """Some caches and proxies answer a ranged GET with 200 and the whole file: the reader takes its range."""
        w = await open_written("server", tmp_path, None)
        for _ in range(3):
            await w.write()
        await w.engine.flush_all()
        assert w.served is not None

        async def whole(request: web.Request) -> web.Response:
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization",)}
            async with aiohttp.ClientSession() as http, \
                    http.get(f"{w.served.url}{request.path_qs}", headers=headers) as resp:  # type: ignore[union-attr]
                return web.Response(status=resp.status, body=await resp.read())

        app = web.Application()
        app.router.add_get("/{tail:.*}", whole)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        direct, proxied = ServerSource(w.url, token=READER), ServerSource(f"http://127.0.0.1:{port}/app.db",
                                                                         token=READER)
        try:
            entry = (await direct.plan()).plan[-1]
            stored = await direct.read(direct.key(entry), 0, entry.size)
            assert len(stored) == entry.size
            assert await proxied.read(proxied.key(entry), 10, 50) == stored[10:60]
        finally:
            await direct.close()
            await proxied.close()
            await runner.cleanup()
            await w.close()
