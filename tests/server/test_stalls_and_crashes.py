"""A sender that stalls mid-body, and a server that crashed mid-write: neither leaves anything half-stored."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
import structlog

from sidecar.ltx import LTXError, Pos, format_filename
from tests.engine.history import History
from tests.server.client import BackupClient
from tests.server.conftest import TOKEN, start_server
from tests.server.test_hostile import SNAPSHOT


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


class TestCrashMidWrite:
    async def prepare(self, tmp_path: Path, http: aiohttp.ClientSession) -> tuple[History, bytes, Path]:
        """Three transactions stored; the fourth's upload, and the pending directory it would be written to."""
        history = History(tmp_path / "live.db")
        srv = await start_server(tmp_path)
        client = BackupClient(http, srv.url, TOKEN)
        for i in range(3):
            history.write()
            await client.write_tx("app.db", history.commit(i))
        await srv.shutdown()
        history.write()
        return history, history.commit(3), tmp_path / "state" / "default" / "app.db" / "pending"

    async def test_a_torn_newest_upload_is_dropped(self, tmp_path: Path, http: aiohttp.ClientSession) -> None:
        """The newest pending file cut short was never acknowledged: the server starts without it."""
        history, fourth, pending = await self.prepare(tmp_path, http)
        pending.mkdir(parents=True, exist_ok=True)
        (pending / format_filename(4, 4)).write_bytes(fourth[: len(fourth) // 2])
        with structlog.testing.capture_logs() as logs:
            srv = await start_server(tmp_path)
        try:
            assert [e["file"] for e in logs if e["event"] == "torn upload removed"] == [format_filename(4, 4)]
            assert srv.engine.pos("default", "app.db") == Pos(3, history.checksums[3])
            assert await BackupClient(http, srv.url, TOKEN).write_tx("app.db", fourth) == 4
        finally:
            await srv.shutdown()
            history.close()

    async def test_an_older_damaged_upload_stops_the_start(self, tmp_path: Path,
                                                           http: aiohttp.ClientSession) -> None:
        """Damage anywhere but the newest file was acknowledged data: refuse to start, naming the file."""
        history, fourth, pending = await self.prepare(tmp_path, http)
        pending.mkdir(parents=True, exist_ok=True)
        (pending / format_filename(4, 4)).write_bytes(fourth[: len(fourth) // 2])
        (pending / format_filename(5, 5)).write_bytes(fourth)
        with pytest.raises(LTXError, match=format_filename(4, 4)):
            await start_server(tmp_path)
        history.close()
