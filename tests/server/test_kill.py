"""`serve` SIGKILLed while uploads stream in: every acknowledged upload survives, none is half-applied.

Uploads wait in the upload log for the 10 s L0 flush, so most of them are in the log, not the store, at each kill.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import aiohttp

from sidecar.engine import Engine
from sidecar.ltx import Pos
from sidecar.storage import open_storage
from tests.engine.history import History
from tests.server.client import BackupClient
from tests.server.conftest import ADMIN, TOKEN, serving

KILLS = 5


async def test_acknowledged_uploads_survive_sigkill(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(f"default {TOKEN}\n")
    args = ("--addr", "127.0.0.1:0", "--tokens-file", str(tmp_path / "tokens"), "--storage",
            f"file://{tmp_path / 'store'}", "--state-dir", str(tmp_path / "state"))
    env = {"LITEFS_SIDECAR_SERVER_ADMIN_TOKEN": ADMIN}
    rng = random.Random(5)
    history = History(tmp_path / "live.db")
    files: dict[int, bytes] = {}  # txid -> its upload, to resend what was not acknowledged
    acked = Pos()
    async with aiohttp.ClientSession() as http:
        for kill in range(KILLS + 1):
            async with serving(tmp_path, *args, env=env) as served:
                client = BackupClient(http, served.url, TOKEN)
                pos = (await client.pos_map()).get("app.db", Pos())
                # Everything acknowledged before the kill is there; at most the upload in flight is beyond it.
                assert pos.txid >= acked.txid, (kill, pos, acked)
                assert pos.txid <= acked.txid + 1
                assert pos == Pos() or pos.post_apply_checksum == history.checksums[pos.txid]
                if kill == KILLS:
                    break

                async def upload(client: BackupClient, start: int) -> None:
                    nonlocal acked
                    txid = start
                    while True:
                        if txid not in files:
                            history.write()
                            files[txid] = history.commit(1_790_000_000_000 + txid)
                        await client.write_tx("app.db", files[txid])  # a PosMismatchError would fail the test
                        acked = Pos(txid, history.checksums[txid])
                        txid += 1

                task = asyncio.create_task(upload(client, pos.txid + 1))
                await asyncio.sleep(rng.uniform(0.3, 1.2))
                served.proc.send_signal(signal.SIGKILL)
                await served.proc.wait()
                try:
                    await task
                except (aiohttp.ClientError, OSError):
                    pass  # the connection died with the server
        assert acked.txid > 10  # the kills came while uploads were flowing
        # Everything comes back from the store once flushed: a clean stop flushes.
        async with serving(tmp_path, *args, env=env) as served:
            assert await served.stop() == 0
    engine = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "check")
    top = engine.pos("default", "app.db").txid
    assert top >= acked.txid
    result = await engine.restore_to("default", "app.db", tmp_path / "out.db", integrity_check=True)
    assert result.checksum == history.checksums[top]
    await engine.close()
    history.close()
