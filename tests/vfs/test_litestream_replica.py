"""A real Litestream 0.5.17 replica reads in place at every sampled instant."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.engine import plan_restore, restore, scan
from sidecar.storage import open_storage
from sidecar.storage.base import parse_rfc3339
from sidecar.vfs import BackupVFS
from tests.conftest import LITESTREAM, load_json

REPLICA = LITESTREAM / "replica"
SAMPLES = load_json(LITESTREAM / "expected.json")["samples"]


def tables(execute: Callable[[str], list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    names = [r[0] for r in execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {n: execute(f'SELECT * FROM "{n}" ORDER BY rowid') for n in names}


async def test_every_sampled_instant_reads_as_restored(make_vfs: Callable[..., BackupVFS], tmp_path: Path) -> None:
    vfs = make_vfs()
    storage = open_storage(f"file://{REPLICA}")
    index = await scan(storage, "")
    for i, sample in enumerate(SAMPLES):
        at = parse_rfc3339(sample["at"])
        out = tmp_path / f"{i}.db"
        await restore(storage, "", plan_restore(index, timestamp=at), out)
        con = sqlite3.connect(out)
        want = tables(lambda sql, c=con: c.execute(sql).fetchall())  # type: ignore[misc]
        con.close()

        def read(t: int = at) -> dict[str, list[tuple[Any, ...]]]:
            c = vfs.connect(f"file://{REPLICA}", timestamp=t)
            try:
                return tables(lambda sql: [tuple(r) for r in c.execute(sql)])
            finally:
                c.close()
        got = await asyncio.to_thread(read)
        assert got == want, sample["at"]
        assert {t: len(r) for t, r in got.items() if t in sample["rows"]} == sample["rows"], sample["at"]
        out.unlink()
    assert vfs.stats(f"file://{REPLICA}").lists == len(SAMPLES)  # one LIST per plan; headers read once
