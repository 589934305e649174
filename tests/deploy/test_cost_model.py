"""The cost model against the real engine on a real S3 server (moto over HTTP), on a fake clock.

An active database uploads one transaction a second through `Engine.write_tx` while the engine ticks once a
second, as `Engine.run` does. After a warm-up of one snapshot interval (so retention and snapshots are in steady
state) the requests of the next snapshot interval are counted by kind and must equal tests/deploy/cost_model.py's
formulas exactly. Then the database goes idle and must cost nothing. The schedule is the default one shrunk
(a 30-minute "day", so one simulated hour covers every level); the formulas take the schedule as a parameter.
"""

from __future__ import annotations

import builtins
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from sidecar.engine import Engine, Levels
from sidecar.storage import S3_LAYOUT, ObjectInfo, open_storage
from sidecar.storage.s3 import S3Storage
from tests.deploy import cost_model
from tests.deploy.cost_model import Requests, lease_requests, requests
from tests.deploy.deployfiles import REPO
from tests.engine.history import History
from tests.s3server import MotoServer

T0 = 20_717 * 86400.0  # a day boundary: every level's compaction boundary lines up with the run


def schedule(l0: float) -> Levels:
    """The default levels shrunk so that one run reaches every level's steady state.

    10 s and 60 s L0 intervals get the default 5-minute L1 and a 30-minute "day": a warm-up and a measured
    interval of 30 min each, one simulated hour. The 1-second L0 interval, whose run costs a request or three
    per simulated second, gets the same shape ten times faster. L0 retention just above the L1 interval lets
    L1 cover a file before it ages out, and keeps L0 deletions off the ticks of the snapshot's retention batch.
    """
    if l0 < 10:
        return Levels(l0_interval=l0, l1_interval=30, l2_interval=90, snapshot_interval=180, l0_retention=35,
                      l1_retention=30, l2_retention=90, snapshot_retention=180)
    return Levels(l0_interval=l0, l1_interval=300, l2_interval=900, snapshot_interval=1800, l0_retention=305,
                  l1_retention=300, l2_retention=900, snapshot_retention=1800)


class CountingStorage:
    """A real Storage that counts the object-store requests passing through it, by kind, and what each moved."""

    layout = S3_LAYOUT

    def __init__(self, inner: S3Storage) -> None:
        self.inner = inner
        self.url = inner.url
        self.stats = inner.stats
        self.counts: Counter[str] = Counter()
        self.sizes: dict[str, int] = {}  # key -> bytes uploaded
        self.reads: list[tuple[str, int]] = []  # (key, bytes downloaded)

    def reset(self) -> None:
        self.counts.clear()

    async def put_file(self, key: str, path: str | os.PathLike[str], *, timestamp: int | None = None,
                       if_none_match: bool = False, if_match: str | None = None) -> str:
        self.counts["PUT"] += 1
        self.sizes[key] = os.path.getsize(path)
        return await self.inner.put_file(key, path, timestamp=timestamp, if_none_match=if_none_match,
                                         if_match=if_match)

    async def put_bytes(self, key: str, data: bytes, *, timestamp: int | None = None,
                        if_none_match: bool = False, if_match: str | None = None) -> str:
        self.counts["PUT"] += 1
        self.sizes[key] = len(data)
        return await self.inner.put_bytes(key, data, timestamp=timestamp, if_none_match=if_none_match,
                                          if_match=if_match)

    async def check_conditional_writes(self) -> None:
        await self.inner.check_conditional_writes()  # four requests once, at open: before the counts are reset

    async def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes, str] | None:
        self.counts["GET"] += 1
        return await self.inner.get_if_changed(key, etag)

    async def head(self, key: str) -> ObjectInfo:
        self.counts["HEAD"] += 1
        return await self.inner.head(key)

    async def local_files(self, keys: Sequence[str], tmpdir: Path) -> builtins.list[Path]:
        tmpdir.mkdir(parents=True, exist_ok=True)
        paths = [tmpdir / f"{i:05d}.ltx" for i in range(len(keys))]
        for key, path in zip(keys, paths, strict=True):
            await self.download(key, path)
        return paths

    async def get_bytes(self, key: str) -> bytes:
        self.counts["GET"] += 1
        data = await self.inner.get_bytes(key)
        self.reads.append((key, len(data)))
        return data

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        self.counts["GET"] += 1
        return await self.inner.get_range(key, start, length)

    async def stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        self.counts["GET"] += 1
        async for chunk in self.inner.stream(key, chunk_size):
            yield chunk

    async def download(self, key: str, path: str | os.PathLike[str]) -> int:
        self.counts["GET"] += 1
        n = await self.inner.download(key, path)
        self.reads.append((key, n))
        return n

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        self.counts["LIST"] += 1
        return await self.inner.list(prefix)

    async def delete(self, keys: Sequence[str]) -> None:
        self.counts["DELETE"] += (len(keys) + 999) // 1000
        await self.inner.delete(keys)

    async def close(self) -> None:
        await self.inner.close()

    def measured(self) -> Requests:
        c = self.counts
        return Requests(put=c["PUT"], get=c["GET"], list=c["LIST"], delete=c["DELETE"])


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: the engine fsyncs every upload, and durability is not measured here."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="cost-model-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def store(moto_server: MotoServer) -> AsyncIterator[CountingStorage]:
    inner = open_storage(f"s3://{moto_server.create_bucket()}/backups", endpoint_url=moto_server.url,
                         force_path_style=True)
    assert isinstance(inner, S3Storage)
    counting = CountingStorage(inner)
    yield counting
    await counting.close()


class TestEngineRequests:
    """The engine's requests to S3 are the cost model's formulas."""

    @pytest.mark.parametrize("l0", cost_model.L0_INTERVALS)
    async def test_active_then_idle_database_matches_the_formulas(self, l0: float, store: CountingStorage,
                                                                  fast_dir: Path) -> None:
        levels = schedule(l0)
        window = levels.snapshot_interval
        now = [T0]
        history = History(fast_dir / "live.db")
        engine = await Engine.open(store, fast_dir / "state", levels, clock=lambda: now[0])
        try:
            # Warm-up, then the measured window: each second an upload, then the engine's tick.
            for phase in ("warm-up", "window"):
                for _ in range(int(window)):
                    history.write(n=2)
                    await engine.write_tx("prod", "app.db", history.commit(int(now[0] * 1000)))
                    now[0] += 1
                    await engine.tick()
                if phase == "warm-up":
                    assert store.counts["LIST"] == 2, ("opening an engine with no index lists the store once, and "
                                                       "the copies set aside once")
                    requests_before = store.inner.requests
                    store.reset()
            window_http = store.inner.requests - requests_before
            lease = lease_requests(window, active=True, ttl=engine.leases.ttl)
            assert store.measured() == requests(levels, window, upload_every=1.0) + lease
            # Every request went out exactly once: no retries, no multipart parts the wrapper did not see.
            assert sum(store.counts.values()) == window_http

            # Idle: the last L0 files age out, then nothing at all.
            for _ in range(int(window)):
                now[0] += 1
                await engine.tick()
            store.reset()
            for _ in range(int(3 * window)):
                now[0] += 1
                await engine.tick()
            assert store.measured() == requests(levels, 3 * window, upload_every=None) == Requests()
        finally:
            await engine.close()
            history.close()

        # Each stored file was read once, whole, by the compaction above it: GET bytes = PUT bytes of what was read.
        keys = [key for key, _ in store.reads]
        assert len(keys) == len(set(keys)), "a file was downloaded twice"
        assert all(store.sizes[key] == n for key, n in store.reads)


class TestDocument:
    """docs/cost-model.md shows what the formulas compute."""

    def test_tables_are_the_formulas_output(self) -> None:
        doc = (REPO / "docs" / "cost-model.md").read_text()
        for name, table in (("requests", cost_model.request_table()), ("bytes", cost_model.bytes_table()),
                            ("lease", cost_model.lease_table())):
            m = re.search(rf"<!-- {name} table: python -m tests.deploy.cost_model -->\n(.*?)\n<!-- end -->", doc, re.S)
            assert m, f"docs/cost-model.md has no generated {name} table"
            assert m.group(1).strip() == table, f"the {name} table is stale: run python -m tests.deploy.cost_model"

    def test_steady_state_reads_each_file_once_and_idle_is_free(self) -> None:
        for l0 in cost_model.L0_INTERVALS:
            busy = requests(Levels(l0_interval=l0), cost_model.MONTH, 1.0)
            assert 2 * busy.get == busy.put and busy.list == 0  # each file, and the head object after it
            assert requests(Levels(l0_interval=l0), cost_model.MONTH, None) == Requests()
