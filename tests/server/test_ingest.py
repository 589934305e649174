"""Verify at the door: an upload that lies about its checksums or header is refused with a 4xx naming what, and
nothing is stored; the honest upload after it goes through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.ltx import Version
from sidecar.ltx.decoder import decode
from tests.engine.history import History
from tests.server.conftest import TOKEN, Running, forge


async def post(http: aiohttp.ClientSession, url: str, body: bytes, db: str = "app.db") -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/db/tx", params={"db": db}, data=body, headers={"Authorization": TOKEN}) as resp:
        return resp.status, (await resp.json() if resp.status != 200 else {})


@pytest.fixture
def live(tmp_path: Path) -> Iterator[History]:
    h = History(tmp_path / "live.db")
    yield h
    h.close()


async def start(server: Running, http: aiohttp.ClientSession, live: History, n: int = 3) -> None:
    for _ in range(n):
        live.write()
        assert (await post(http, server.url, live.commit(1_700_000_000_000)))[0] == 200


def stored(server: Running) -> list[str]:
    return sorted(p.name for p in (server.root / "store").rglob("*.ltx"))


async def test_a_false_post_apply_checksum_is_refused(server: Running, http: aiohttp.ClientSession,
                                                      live: History) -> None:
    await start(server, http, live)
    before, files = server.engine.pos("default", "app.db"), stored(server)
    live.write()
    honest = live.commit(1_700_000_001_000)
    status, body = await post(http, server.url, forge(honest, post=live.pos.post_apply_checksum ^ 0x5A5A))
    assert status == 422 and body["code"] == "EBADCHECKSUM"
    assert f"{live.pos.post_apply_checksum ^ 0x5A5A:016x}" in body["error"]  # the claimed value
    assert f"{live.pos.post_apply_checksum:016x}" in body["error"]  # the value its pages give
    assert server.engine.pos("default", "app.db") == before and stored(server) == files
    assert (await post(http, server.url, honest))[0] == 200


@pytest.mark.parametrize(("change", "field"), [
    ({"commit": 0xFFFFFFFF}, "commit"),  # SQLite's pages end at 2^32-2
    ({"timestamp": 253_402_300_800_000}, "timestamp"),  # past the year 9999
    ({"max_txid": 1 << 63}, "max_txid"),
])
async def test_insane_headers_are_refused(server: Running, http: aiohttp.ClientSession, live: History,
                                          change: dict[str, int], field: str) -> None:
    await start(server, http, live)
    before = server.engine.pos("default", "app.db")
    live.write()
    status, body = await post(http, server.url, forge(live.commit(1_700_000_001_000), **change))
    assert status == 422 and body["code"] == "EBADHEADER" and field in body["error"], body
    assert server.engine.pos("default", "app.db") == before


async def test_a_commit_grown_past_the_pages_sent_is_refused(server: Running, http: aiohttp.ClientSession,
                                                             live: History) -> None:
    """Growing the database by pages the upload does not hold would leave them undefined."""
    await start(server, http, live)
    live.write()
    honest = live.commit(1_700_000_001_000)
    h, _, _ = decode(honest, Version.V2)
    status, body = await post(http, server.url, forge(honest, commit=h.commit + 5))
    assert status == 422 and body["code"] == "EBADHEADER" and "commit grows" in body["error"], body
    assert (await post(http, server.url, honest))[0] == 200


async def test_right_txid_with_another_historys_checksum_is_refused(server: Running, http: aiohttp.ClientSession,
                                                                     live: History, tmp_path: Path) -> None:
    """A diverged primary after a failover sends the next TXID on top of another history: 409, nothing stored."""
    await start(server, http, live)
    other = History(tmp_path / "other.db", seed=9)
    for _ in range(4):
        other.write()
        other.commit(1_700_000_000_000)
    other.write()
    diverged = other.commit(1_700_000_001_000)  # TXID 5; ours are at 3
    live.write()
    live.write()
    status, body = await post(http, server.url, forge(diverged, min_txid=4, max_txid=4))
    assert status == 409 and body["code"] == "EPOSMISMATCH" and "pre-apply checksum" in body["error"]
    assert body["pos"]["txid"] == "0000000000000003"
    other.close()


async def test_a_mismatch_is_refused_before_the_body_is_sent(server: Running, http: aiohttp.ClientSession,
                                                            live: History) -> None:
    """The header alone earns the 409: the server answers while the client still holds back the pages."""
    await start(server, http, live)
    live.write()
    live.write()
    stale = forge(live.commit(1_700_000_001_000), min_txid=9, max_txid=9)
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield stale[:100]
        await release.wait()  # the rest only once the answer has come
        yield stale[100:]

    async with asyncio.timeout(20):
        async with http.post(f"{server.url}/db/tx", params={"db": "app.db"}, data=body(),
                             headers={"Authorization": TOKEN}) as resp:
            assert resp.status == 409 and (await resp.json())["code"] == "EPOSMISMATCH"
            release.set()
