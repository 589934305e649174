"""HTTP hygiene: slow and excess connections are closed, client mistakes are 4xx JSON with no traceback logged."""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from sidecar.ltx import Header, Pos, Version
from sidecar.ltx.encoder import encode
from tests.server.conftest import ADMIN, READER, SNAPSHOT, TOKEN, Running, start_server


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection (EOF or reset) within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1024):
                pass
        return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_a_connection_that_never_finishes_its_headers_is_closed(tmp_path: Path) -> None:
    srv = await start_server(tmp_path, header_timeout=0.5)
    host, port = srv.url.removeprefix("http://").split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /db/tx?db=app.db HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        assert await closed_within(reader, 10)
        writer.close()
        async with aiohttp.ClientSession() as http, http.get(f"{srv.url}/healthz") as resp:
            assert resp.status == 200  # the server is fine
    finally:
        await srv.shutdown()


async def test_connections_past_the_cap_are_closed_at_once(tmp_path: Path) -> None:
    srv = await start_server(tmp_path, max_connections=3)
    host, port = srv.url.removeprefix("http://").split(":")
    try:
        held = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
        reader, writer = await asyncio.open_connection(host, int(port))
        assert await closed_within(reader, 5)  # the fourth
        writer.close()
        for r, _ in held:
            assert not await closed_within(r, 0.2)  # the three stay
        for _, w in held:
            w.close()
            await w.wait_closed()
        async with aiohttp.ClientSession() as http:

            async def healthy() -> bool:
                try:
                    async with http.get(f"{srv.url}/healthz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False
            async with asyncio.timeout(10):
                while not await healthy():  # noqa: ASYNC110  (another process's state: nothing to wait on)
                    await asyncio.sleep(0.05)
    finally:
        await srv.shutdown()


async def test_an_oversized_header_is_400_with_no_traceback(server: Running, caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /pos HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    with caplog.at_level(logging.DEBUG):
        status = await reader.readline()
        assert status.startswith(b"HTTP/1.") and status[9:10] == b"4", status
        writer.close()
        await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.records


@pytest.mark.parametrize(("what", "kwargs"), [
    ("gzip that is not gzip", {"data": b"not gzip at all", "headers": {"Content-Encoding": "gzip"}}),
    ("unknown encoding", {"data": b"x", "headers": {"Content-Encoding": "br-ish"}}),
    ("gzip of garbage", {"data": gzip.compress(b"garbage"), "headers": {"Content-Encoding": "gzip"}}),
])
async def test_bad_encodings_are_client_errors(server: Running, http: aiohttp.ClientSession, what: str,
                                               kwargs: dict[str, object]) -> None:
    headers = {"Authorization": TOKEN, **kwargs.pop("headers")}  # type: ignore[dict-item]
    async with http.post(f"{server.url}/db/tx", params={"db": "app.db"}, headers=headers, **kwargs) as resp:
        assert 400 <= resp.status < 500, what
        body = await resp.json(content_type=None)
        assert body["code"] and body["error"]
    assert server.engine.pos("default", "app.db").is_zero


@pytest.mark.parametrize(("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
async def test_a_compressed_upload_shorter_than_an_ltx_header_is_read_whole(
        server: Running, http: aiohttp.ClientSession, encoding: str, compress: Callable[[bytes], bytes]) -> None:
    # One zero page compresses to under 100 bytes: the Content-Length is the compressed size, not the header's.
    data = encode(Header(page_size=4096, commit=1, min_txid=1, max_txid=1, timestamp=1), [(1, bytes(4096))],
                  Version.V2)
    body = compress(data)
    assert len(body) < 100
    async with http.post(f"{server.url}/db/tx", params={"db": "app.db"}, data=body,
                         headers={"Authorization": TOKEN, "Content-Encoding": encoding}) as resp:
        assert resp.status == 200, await resp.text()
    assert server.engine.pos("default", "app.db") == Pos(1, int.from_bytes(data[-16:-8], "big"))


async def test_the_admin_token_must_name_a_cluster_on_protocol_routes(server: Running,
                                                                     http: aiohttp.ClientSession) -> None:
    for method, path in (("POST", "/db/tx"), ("GET", "/db/hwm"), ("GET", "/db/snapshot"), ("GET", "/pos")):
        async with http.request(method, f"{server.url}{path}", params={"db": "app.db"}, data=SNAPSHOT,
                                headers={"Authorization": ADMIN}) as resp:
            body = await resp.json()
            assert resp.status == 400 and body["code"] == "ENOCLUSTER", (path, body)


async def test_read_tokens_read_and_never_write(server: Running, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{server.url}/db/tx", params={"db": "app.db"}, data=SNAPSHOT,
                         headers={"Authorization": TOKEN}) as resp:
        assert resp.status == 200
    reader = {"Authorization": f"Bearer {READER}"}
    async with http.get(f"{server.url}/pos", headers=reader) as resp:
        assert resp.status == 200 and list(await resp.json()) == ["app.db"]
    for method, path in (("POST", "/db/tx"), ("POST", "/api/restore"), ("POST", "/api/upload"),
                         ("POST", "/api/clone"), ("DELETE", "/api/db")):
        async with http.request(method, f"{server.url}{path}", params={"db": "app.db", "to_cluster": "default"},
                                data=SNAPSHOT, headers=reader) as resp:
            body = await resp.json()
            assert resp.status == 403 and body["code"] == "EREADONLY", (path, body)
    async with http.get(f"{server.url}/pos", params={"cluster": "other"}, headers=reader) as resp:
        assert resp.status == 401  # and it sees no other cluster
    assert server.engine.databases("default") == ["app.db"]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code"), [
    ("POST", "/api/restore", {"data": b"not json"}, 400, "EBADJSON"),
    ("POST", "/api/restore", {"json": [1, 2]}, 400, "EBADJSON"),
    ("POST", "/api/restore", {"json": {"txid": 5}}, 400, "EBADTARGET"),
    ("POST", "/api/restore", {"json": {"timestamp": 5}}, 400, "EBADTARGET"),
    ("POST", "/api/restore", {"json": {"timestamp": "yesterday"}}, 400, "EBADTARGET"),
    ("POST", "/api/restore", {"json": {}}, 400, "EBADTARGET"),  # never a silent "latest"
    ("GET", "/api/preview", {}, 400, "EBADTARGET"),
    ("GET", "/api/download", {"params": {"format": "xml"}}, 400, "EBADFORMAT"),
    ("POST", "/api/upload", {"data": b"12345"}, 422, "ENOTSQLITE"),
    ("POST", "/api/upload", {"data": b"x" * 5000}, 422, "ENOTSQLITE"),
])
async def test_operator_mistakes_are_4xx_naming_the_field(server: Running, http: aiohttp.ClientSession, method: str,
                                                          path: str, kwargs: dict[str, object], status: int,
                                                          code: str) -> None:
    async with http.post(f"{server.url}/db/tx", params={"db": "app.db"}, data=SNAPSHOT,
                         headers={"Authorization": TOKEN}) as resp:
        assert resp.status == 200
    pos = server.engine.pos("default", "app.db")
    params = {"db": "app.db", **kwargs.pop("params", {})}  # type: ignore[dict-item]
    async with http.request(method, f"{server.url}{path}", params=params, headers={"Authorization": TOKEN},
                            **kwargs) as resp:  # type: ignore[arg-type]
        body = await resp.json()
        assert (resp.status, body["code"]) == (status, code), body
    assert server.engine.pos("default", "app.db") == pos  # nothing changed


async def test_an_upload_whose_size_is_not_a_page_multiple_is_refused(server: Running, http: aiohttp.ClientSession,
                                                                      tmp_path: Path) -> None:
    from tests.conftest import make_db
    data = make_db(tmp_path / "x.db").read_bytes()
    async with http.post(f"{server.url}/api/upload", params={"db": "new.db"}, data=data + b"tail",
                         headers={"Authorization": TOKEN}) as resp:
        body = await resp.json()
        assert resp.status == 422 and body["code"] == "ENOTSQLITE" and "multiple" in body["error"]
    assert not server.engine.exists("default", "new.db")
