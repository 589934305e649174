"""Disk full: the state directory on a small tmpfs fills with a backlog while the store is down. Uploads are then
refused (503, /readyz says why, no server path in the message); once the store is back and 10% of the backlog's
size is freed, the HWM moves again and everything acknowledged reaches the store."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.engine import Engine
from sidecar.ltx import Pos
from sidecar.storage import open_storage
from tests.engine.history import History
from tests.faults import FaultProxy
from tests.s3server import MotoServer, free_port
from tests.server.conftest import wait_up

TOKEN = "tok-diskfull-0123456789abc"
SIZE = 24 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs (root can mount one; elsewhere the test cannot build its disk and says so)."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(where)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root): no disk to fill")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_a_full_disk_refuses_then_recovers_with_little_freed(small_disk: Path, moto_server: MotoServer,
                                                                   tmp_path: Path) -> None:
    proxy = FaultProxy(moto_server.url)
    await proxy.start()
    bucket = moto_server.create_bucket()
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (SIZE // 10))  # what the operator frees later: 10% of what the backlog fills
    port = free_port()
    env = {**os.environ, "LITEFS_SIDECAR_SERVER_TOKENS": f"c {TOKEN}", "PYTHONPATH": os.pathsep.join(sys.path)}
    log = open(tmp_path / "serve.log", "ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "--storage", f"s3://{bucket}/b", "--s3-endpoint", proxy.url,
        "--s3-force-path-style", "--state-dir", str(small_disk / "state"), "--addr", f"127.0.0.1:{port}",
        "--l0-interval", "1s", "--max-pending-bytes", "0", "--max-hwm-lag", "0", "--log-format", "json",
        env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    histories = [History(tmp_path / f"db{i}.db", seed=i) for i in range(2)]
    acked: dict[str, Pos] = {}
    try:
        await wait_up(url)
        async with aiohttp.ClientSession() as http:
            async def send(h: History, body: bytes) -> tuple[int, dict[str, str]]:
                async with http.post(f"{url}/db/tx", params={"db": h.path.name}, data=body,
                                     headers={"Authorization": TOKEN}) as r:
                    return r.status, (await r.json() if r.status != 200 else {})

            for h in histories:  # while the store is up: the server takes the cluster's lease
                h.write()
                assert (await send(h, h.commit(1)))[0] == 200
                acked[h.path.name] = h.pos
            proxy.faults.down = True  # the store is down: the backlog stays on the small disk
            full = None
            for _ in range(2000):
                for h in histories:
                    h.write(n=40)  # ~100 KB transactions
                    status, body = await send(h, h.commit(1))
                    if status == 200:
                        acked[h.path.name] = h.pos
                    else:
                        full = (status, body)
                        h.pos = acked[h.path.name]  # not accepted: the client resends it later
                        h.pages = {}  # (the next commit from the History then holds every page again)
                        break
                if full:
                    break
            assert full is not None and full[0] == 503 and "disk is full" in full[1]["error"], full
            assert str(small_disk) not in full[1]["error"]  # no server path in a client-facing message
            async with http.get(f"{url}/readyz") as r:
                assert r.status == 503 and (await r.json())["code"] == "EDISKFULL"

            proxy.faults.down = False  # the store is back; the operator frees 10% of the backlog's size
            filler.unlink()

            async def caught_up() -> bool:
                for h in histories:
                    async with http.get(f"{url}/db/hwm", params={"db": h.path.name},
                                        headers={"Authorization": TOKEN}) as r:
                        if int((await r.json())["hwm"], 16) < acked[h.path.name].txid:
                            return False
                return True
            async with asyncio.timeout(120):
                while not await caught_up():  # noqa: ASYNC110 (another process's state)
                    await asyncio.sleep(0.5)
            async with http.get(f"{url}/readyz") as r:
                assert r.status == 200 or (await r.json())["code"] == "EDISKFULL"
        proc.terminate()
        await proc.wait()
        storage = open_storage(f"s3://{bucket}/b", endpoint_url=moto_server.url, force_path_style=True)
        engine = await Engine.open(storage, tmp_path / "checker")
        for h in histories:
            got = await engine.restore_to("c", h.path.name, tmp_path / f"{h.path.name}.out")
            assert Pos(got.txid, got.checksum) == acked[h.path.name]
        await engine.close()
        await storage.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        await proxy.stop()
        for h in histories:
            h.close()
