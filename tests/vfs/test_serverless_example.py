"""docs/serverless.md's example app, run locally against a real server with a read-only token."""

from __future__ import annotations

import importlib.util
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
from aiohttp import web

from sidecar.ltx import format_timestamp
from tests.server.conftest import wait_until
from tests.vfs.conftest import READER, Written, open_written

APP = Path(__file__).parents[2] / "docs" / "examples" / "serverless_app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serverless_app", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def written(tmp_path: Path) -> AsyncIterator[Written]:
    w = await open_written("server", tmp_path, None)
    try:
        yield w
    finally:
        await w.close()


async def test_the_example_app_reads_through_the_server(written: Written, tmp_path: Path) -> None:
    for _ in range(10):
        await written.write()
    await written.engine.flush_all()
    early_txid, early_ts = 3, written.history.times[3]
    runner = web.AppRunner(load_example().make_app(written.url, READER))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    live = sqlite3.connect(written.history.path)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/") as resp:
                doc = await resp.json()
            count = live.execute("SELECT count(*) FROM events").fetchone()[0]
            assert doc["txid"] == f"{written.history.pos.txid:016x}" and doc["events"] == count
            first = live.execute("SELECT id, at, body FROM events ORDER BY id LIMIT 1").fetchone()
            async with http.get(f"{base}/events/{first[0]}") as resp:
                assert [(await resp.json())[k] for k in ("id", "at", "body")] == list(first)
            for _ in range(3):  # new transactions reach the running app: it follows the server
                await written.write()
            await written.engine.flush_all()
            live_txid = f"{written.history.pos.txid:016x}"

            async def current() -> bool:
                async with http.get(base + "/") as r:
                    return (await r.json())["txid"] == live_txid  # type: ignore[no-any-return]
            await wait_until(current, within=15)
            out = tmp_path / "then.db"
            await written.engine.restore_to("c", "app.db", out, timestamp=early_ts)
            then = sqlite3.connect(out)
            want = then.execute("SELECT id, at, body FROM events ORDER BY id LIMIT 1").fetchone()
            then.close()
            async with http.get(f"{base}/events/{want[0]}", params={"at": format_timestamp(early_ts)}) as resp:
                doc = await resp.json()
            assert doc["txid"] == f"{early_txid:016x}" and [doc[k] for k in ("id", "at", "body")] == list(want)
            async with http.get(f"{base}/events/1", params={"at": "2020-01-01T00:00:00Z"}) as resp:
                assert resp.status == 404 and "before every snapshot" in (await resp.json())["error"]
            async with http.get(f"{base}/events/999999") as resp:
                assert resp.status == 404 and (await resp.json())["txid"] == live_txid
    finally:
        live.close()
        await runner.cleanup()
