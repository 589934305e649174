"""Back-pressure: when the store cannot keep up, uploads get 503 with Retry-After instead of a log that grows
without bound; the HWM lag and the pending bytes stay near their ceilings, and nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from sidecar.engine import Engine, Levels
from sidecar.ltx import Pos
from sidecar.server import Scope, ServerConfig, serve
from sidecar.storage.s3 import S3Storage
from tests.engine.history import History
from tests.faults import FaultProxy
from tests.s3server import MotoServer

TOKEN = "tok-pressure-0123456789abcd"


async def test_a_slow_store_pushes_back_and_loses_nothing(moto_server: MotoServer, tmp_path: Path) -> None:
    proxy = FaultProxy(moto_server.url)
    await proxy.start()
    store = S3Storage(moto_server.create_bucket(), "p", endpoint_url=proxy.url, force_path_style=True)
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0.2), max_hwm_lag=1.0,
                               max_pending_bytes=200_000)
    stop = asyncio.Event()
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(engine, ServerConfig(tokens={TOKEN: Scope("c")}), "127.0.0.1", 0, stop=stop,
                                     grace=10, started=started.set_result))
    url = await started
    histories = [History(tmp_path / f"db{i}.db", seed=i) for i in range(3)]
    refused: list[str] = []
    acked: dict[str, Pos] = {}
    worst_pending = 0
    try:
        async with aiohttp.ClientSession() as http:
            for h in histories:  # each database's first upload, while the store is quick
                h.write()
                async with http.post(f"{url}/db/tx", params={"db": h.path.name}, data=h.commit(1),
                                     headers={"Authorization": TOKEN}) as resp:
                    assert resp.status == 200
            proxy.faults.put_latency = 2.5  # now every flush takes longer than the lag allowed

            async def client(h: History) -> None:
                body = None
                for _ in range(40):
                    if body is None:
                        h.write()
                        body = h.commit(1_700_000_000_000)
                    async with http.post(f"{url}/db/tx", params={"db": h.path.name}, data=body,
                                         headers={"Authorization": TOKEN}) as resp:
                        if resp.status == 200:
                            body = None  # acknowledged: the next one
                            acked[h.path.name] = h.pos
                        else:
                            assert resp.status == 503 and (await resp.json())["code"] == "EBACKPRESSURE"
                            refused.append(resp.headers["Retry-After"])
                    await asyncio.sleep(0.1)

            async def watch() -> None:
                nonlocal worst_pending
                while True:
                    worst_pending = max(worst_pending, engine.pending_bytes)
                    await asyncio.sleep(0.05)
            watcher = asyncio.create_task(watch())
            await asyncio.gather(*(client(h) for h in histories))
            watcher.cancel()
            assert refused and all(int(r) >= 1 for r in refused)
            assert worst_pending < 200_000 + 3 * 64_000  # the ceiling, plus uploads in flight when it was reached
            proxy.faults.put_latency = 0.0
            for h in histories:  # everything acknowledged reaches the store
                await engine.flush("c", h.path.name)
                got = await engine.restore_to("c", h.path.name, tmp_path / f"{h.path.name}.out")
                last = acked[h.path.name]  # the last upload acknowledged is what the store now holds
                assert engine.pos("c", h.path.name) == last
                assert Pos(got.txid, got.checksum) == last
    finally:
        stop.set()
        await task
        await store.close()
        await proxy.stop()
        for h in histories:
            h.close()
