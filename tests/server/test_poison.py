"""Poison: one cluster sends every hostile upload, and one of its stored files is damaged, while another cluster's
database uploads all along. The second's flushes, compactions and retention keep their schedule, its HWM keeps
moving, the operator API answers, and every backup verifies. On file:// and on s3:// (moto)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.cli import main
from sidecar.engine import Engine, Levels
from sidecar.server import Scope, ServerConfig, serve
from sidecar.storage import open_storage
from tests.engine.history import History
from tests.s3server import MotoServer
from tests.server.conftest import Running, forge

VICTIM = "tok-victim-0123456789abcdef"
ATTACKER = "tok-attacker-0123456789abcd"
ADMIN = "tok-admin-poison-0123456789"
# Levels fast enough to see several boundaries in a few seconds.
FAST = Levels(l0_interval=0.5, l1_interval=2, l2_interval=4, snapshot_interval=8, l0_retention=4, l1_retention=8,
              l2_retention=8, snapshot_retention=16)


@pytest.fixture(params=["file", "s3"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "file":
        yield f"file://{tmp_path / 'store'}"
    else:
        moto: MotoServer = request.getfixturevalue("moto_server")
        yield f"s3://{moto.create_bucket()}/backups"


async def start(url: str, state: Path, endpoint: str | None) -> Running:
    storage = open_storage(url, endpoint_url=endpoint, force_path_style=True if endpoint else None)
    engine = await Engine.open(storage, state, FAST)
    config = ServerConfig(tokens={VICTIM: Scope("victim"), ATTACKER: Scope("attacker")}, admin_token=ADMIN)
    stop = asyncio.Event()
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(engine, config, "127.0.0.1", 0, stop=stop, grace=5, started=started.set_result))
    return Running(await asyncio.wait_for(started, 10), engine, stop, task, state)


async def upload(http: aiohttp.ClientSession, url: str, token: str, body: bytes) -> int:
    async with http.post(f"{url}/db/tx", params={"db": "app.db"}, data=body, headers={"Authorization": token}) as r:
        return r.status


def hostile(honest: bytes, post: int) -> list[bytes]:
    """Each lie the issue lists, made from an honest upload (whose post-apply checksum is `post`)."""
    return [forge(honest, post=post ^ 1),  # a false post-apply checksum, every other checksum right
            forge(honest, commit=0xFFFFFFFF),  # SQLite cannot have that many pages
            forge(honest, timestamp=253_402_300_800_000),  # past the year 9999
            forge(honest, max_txid=1 << 63)]


async def test_one_cluster_cannot_stop_another(store_url: str, tmp_path: Path, request: pytest.FixtureRequest
                                               ) -> None:
    endpoint = request.getfixturevalue("moto_server").url if store_url.startswith("s3") else None
    srv = await start(store_url, tmp_path / "state", endpoint)
    victim, attacker = History(tmp_path / "victim.db"), History(tmp_path / "attacker.db", seed=7)
    try:
        async with aiohttp.ClientSession() as http:
            attacker.write()
            assert await upload(http, srv.url, ATTACKER, attacker.commit(1_700_000_000_000)) == 200
            await srv.engine.flush("attacker", "app.db")
            # Damage the attacker's stored file: its compactions fail from now on, alone.
            storage = open_storage(store_url, endpoint_url=endpoint, force_path_style=True if endpoint else None)
            layout = storage.layout
            key = srv.engine.index("attacker", "app.db").level(0)[0].key(layout, "attacker/app.db")
            await storage.delete([key])
            await storage.put_bytes(key, b"LTX1" + b"\xff" * 200)
            await storage.close()
            refused = []
            start_hwm = 0
            for second in range(24):  # 12 s of the victim uploading twice a second, the attacker lying
                victim.write()
                assert await upload(http, srv.url, VICTIM, victim.commit(1_700_000_000_000 + second * 500)) == 200
                attacker.write()
                honest = attacker.commit(1_700_000_000_000 + second * 500)
                for body in hostile(honest, attacker.pos.post_apply_checksum):
                    refused.append(await upload(http, srv.url, ATTACKER, body))
                # Its own damaged store may reset its position (409: send a snapshot); that is its business alone.
                assert await upload(http, srv.url, ATTACKER, honest) in (200, 409)
                if second == 2:
                    start_hwm = srv.engine.hwm("victim", "app.db")
                async with http.get(f"{srv.url}/api/databases", headers={"Authorization": ADMIN}) as resp:
                    assert resp.status == 200
                await asyncio.sleep(0.5)
            assert refused and all(400 <= s < 500 for s in refused), refused
            # The victim's backup went through every level meanwhile, and retention ran.
            index = srv.engine.index("victim", "app.db")
            assert index.level(1) and index.level(2) and index.level(9), {lv: len(f) for lv, f in index.levels.items()}
            assert srv.engine.hwm("victim", "app.db") > start_hwm
            assert index.level(0)[0].min_txid > 1  # old L0 files aged out
            assert not srv.engine.status("victim", "app.db").failing
            # The damaged file is either failing the attacker's jobs or left out of its index: never restored from.
            attacker_index = srv.engine.index("attacker", "app.db")
            assert srv.engine.status("attacker", "app.db").failing or not any(
                e.key(layout, "attacker/app.db") == key and e.size == 204 for e in attacker_index)
        await srv.engine.flush("victim", "app.db")
        got = await srv.engine.restore_to("victim", "app.db", tmp_path / "victim-out.db")
        assert got.checksum == victim.pos.post_apply_checksum
    finally:
        srv.stop.set()
        with contextlib.suppress(Exception):
            await srv.task
        victim.close()
        attacker.close()
    argv = ["verify", f"{store_url}/victim/app.db"] + (["--s3-endpoint", endpoint, "--s3-force-path-style"]
                                                        if endpoint else [])
    assert await asyncio.to_thread(main, argv) == 0
