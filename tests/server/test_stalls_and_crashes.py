"""A sender that stalls mid-body, and a server that crashed mid-write: neither leaves anything half-stored."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
from pathlib import Path

import aiohttp
import pytest
import structlog

from sidecar.engine.uploadlog import encode_record
from sidecar.errors import SidecarError
from sidecar.ltx import Pos
from tests.engine.history import History
from tests.server.client import BackupClient
from tests.server.conftest import SNAPSHOT, TOKEN, start_server, wait_until


class TestStalledUpload:
    async def test_a_stalled_body_gets_408_and_nothing_is_stored(self, tmp_path: Path,
                                                                 http: aiohttp.ClientSession) -> None:
        """Half a chunked body, then silence: 408 ETIMEOUT once request_timeout passes; others are unaffected."""
        srv = await start_server(tmp_path, request_timeout=0.5)
        try:
            host, port = srv.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"POST /db/tx?db=app.db HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n"
                         f"Transfer-Encoding: chunked\r\n\r\n{len(SNAPSHOT):x}\r\n".encode() + SNAPSHOT[:100])
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))[15:])
            body = json.loads(await reader.readexactly(length))
            writer.close()
            assert head.startswith(b"HTTP/1.1 408 ") and body == {
                "code": "ETIMEOUT", "error": "request body not received within 0.5s"}
            assert srv.engine.pos("default", "app.db").is_zero
            assert await BackupClient(http, srv.url, TOKEN).write_tx("app.db", SNAPSHOT) > 0
        finally:
            await srv.shutdown()


    async def test_a_sender_that_goes_away_mid_body_is_no_crash(self, tmp_path: Path, http: aiohttp.ClientSession,
                                                                caplog: pytest.LogCaptureFixture) -> None:
        """Half a body, then the connection closes (a LiteFS node restarting): a refusal like any unreadable body,
        not an error with a traceback in the log; nothing is stored and the next upload is taken."""
        srv = await start_server(tmp_path)
        try:
            host, port = srv.url.removeprefix("http://").split(":")
            chunked = f"Transfer-Encoding: chunked\r\n\r\n{len(SNAPSHOT):x}\r\n"
            length = f"Content-Length: {len(SNAPSHOT)}\r\n\r\n"
            for framing, sent in ((chunked, len(SNAPSHOT) // 2), (length, len(SNAPSHOT) // 2), (length, 50)):
                _, writer = await asyncio.open_connection(host, int(port))
                writer.write(f"POST /db/tx?db=app.db HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n{framing}"
                             .encode() + SNAPSHOT[:sent])  # the body cut off, or even its header
                await writer.drain()
                writer.close()
                await writer.wait_closed()

            async def answered() -> bool:  # both requests have ended, one way or another
                async with http.get(srv.url + "/metrics") as resp:
                    return 'lfsc_request_seconds_count{route="/db/tx"} 3.0' in await resp.text()
            await wait_until(answered)
            assert [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []
            assert srv.engine.pos("default", "app.db").is_zero
            assert await BackupClient(http, srv.url, TOKEN).write_tx("app.db", SNAPSHOT) > 0
        finally:
            await srv.shutdown()


    async def test_a_reader_that_goes_away_mid_download_is_no_crash(self, tmp_path: Path,
                                                                    http: aiohttp.ClientSession,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
        """A snapshot download whose client closes the connection after the first bytes (a LiteFS node restarting
        mid-restore, a curl interrupted): not an error with a traceback in the log."""
        con = sqlite3.connect(tmp_path / "big.db")
        con.execute("CREATE TABLE t (b BLOB)")
        con.execute("INSERT INTO t VALUES (randomblob(16 << 20))")  # far more than the sockets buffer
        con.commit()
        con.close()
        srv = await start_server(tmp_path)
        try:
            async with http.post(srv.url + "/api/upload?db=big.db", data=io.BytesIO((tmp_path / "big.db").read_bytes()),
                                 headers={"Authorization": TOKEN}) as resp:
                assert resp.status == 200
            host, port = srv.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET /db/snapshot?db=big.db HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n\r\n"
                         .encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            writer.transport.abort()

            async def ended() -> bool:
                async with http.get(srv.url + "/metrics") as resp:
                    return 'lfsc_request_seconds_count{route="/db/snapshot"} 1.0' in await resp.text()
            await wait_until(ended)
            assert [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []
        finally:
            await srv.shutdown()


class TestCrashMidWrite:
    async def prepare(self, tmp_path: Path, http: aiohttp.ClientSession) -> tuple[History, bytes, Path]:
        """Three transactions stored; the fourth's upload, and the next upload log segment it would go to."""
        history = History(tmp_path / "live.db")
        srv = await start_server(tmp_path)
        client = BackupClient(http, srv.url, TOKEN)
        for i in range(3):
            history.write()
            await client.write_tx("app.db", history.commit(i))
        await srv.shutdown()
        history.write()
        logdir = tmp_path / "state" / "log"
        last = max((int(p.stem, 16) for p in logdir.glob("*.log")), default=0)
        return history, history.commit(3), logdir / f"{last + 1:016x}.log"

    async def test_a_torn_newest_upload_is_dropped(self, tmp_path: Path, http: aiohttp.ClientSession) -> None:
        """A record cut short at the end of the log was never acknowledged: the server starts without it."""
        history, fourth, segment = await self.prepare(tmp_path, http)
        record = b"".join(encode_record("default", "app.db", fourth))
        segment.write_bytes(record[: len(record) // 2])
        with structlog.testing.capture_logs() as logs:
            srv = await start_server(tmp_path)
        try:
            torn = [e for e in logs if e["event"].startswith("upload log: torn record")]
            assert [(e["file"], e["offset"]) for e in torn] == [(str(segment), 0)]
            assert srv.engine.pos("default", "app.db") == Pos(3, history.checksums[3])
            assert await BackupClient(http, srv.url, TOKEN).write_tx("app.db", fourth) == 4
        finally:
            await srv.shutdown()
            history.close()

    async def test_an_older_damaged_upload_stops_the_start(self, tmp_path: Path,
                                                           http: aiohttp.ClientSession) -> None:
        """Damage with an intact record after it is acknowledged data lost: refuse to start, naming the file."""
        history, fourth, segment = await self.prepare(tmp_path, http)
        damaged = bytearray(b"".join(encode_record("default", "app.db", fourth)))
        damaged[-10] ^= 0xFF
        segment.write_bytes(bytes(damaged) + b"".join(encode_record("default", "other.db", SNAPSHOT)))
        with pytest.raises(SidecarError, match=rf"{segment}: damaged record at offset 0"):
            await start_server(tmp_path)
        history.close()
