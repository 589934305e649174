"""Fixtures for the invariant tests: real databases and their LTX histories, engines on a local store, a server.

Builders are handed out as fixtures (factories), so the test modules import nothing from each other.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import aiohttp
import pytest

from sidecar.engine import DbIndex, Engine, FileEntry, Levels
from sidecar.ltx import Version
from sidecar.ltx.decoder import decode
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.sqlite import encode_db
from sidecar.storage import open_storage
from sidecar.storage.base import SNAPSHOT_LEVEL
from tests.engine.history import History
from tests.server.conftest import Running, start_server

T0 = 1_790_000_000.0  # a fixed epoch second


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    """A real SQLite database whose commits are LiteFS-style LTX v2 uploads."""
    h = History(tmp_path / "live.db")
    yield h
    h.close()


ForkHistory = Callable[[History, str], History]


@pytest.fixture
def fork(tmp_path: Path) -> Iterator[ForkHistory]:
    """`fork(h, name)`: a second primary that shares `h`'s history so far and goes its own way from here."""
    made: list[History] = []

    def make(h: History, name: str) -> History:
        path = tmp_path / name
        shutil.copyfile(h.path, path)  # rollback journal: the file is complete after each commit
        other = History(path, page_size=h.page_size, seed=len(made) + 100)
        other.pages, other.pos = dict(h.pages), h.pos
        other.checksums, other.times = dict(h.checksums), dict(h.times)
        made.append(other)
        return other

    yield make
    for h in made:
        h.close()


Renumber = Callable[[bytes, int], bytes]


@pytest.fixture
def renumber() -> Renumber:
    """`renumber(upload, min_txid)`: the same LTX v2 upload (pages, checksums) moved to other TXIDs."""

    def make(data: bytes, min_txid: int) -> bytes:
        header, pages, trailer = decode(data, Version.V2)
        moved = header.replace(min_txid=min_txid, max_txid=min_txid + header.max_txid - header.min_txid)
        out = io.BytesIO()
        enc = Encoder(out, moved, Version.V2)
        for pgno, page in pages:
            enc.write_page(pgno, page)
        enc.close(trailer.post_apply_checksum)
        return out.getvalue()

    return make


OpenEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def open_engine(tmp_path: Path, clock: Clock) -> AsyncIterator[OpenEngine]:
    """`await open_engine(name, levels=...)`: an engine on the store and state directory `<tmp>/<name>/`."""
    opened: list[Engine] = []

    async def make(name: str = "a", levels: Levels | None = None) -> Engine:
        storage = open_storage(f"file://{tmp_path / name / 'store'}")
        engine = await Engine.open(storage, tmp_path / name / "state", levels or Levels(), clock=clock)
        opened.append(engine)
        return engine

    yield make
    for engine in opened:
        await engine.close()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    """A real backup server on 127.0.0.1 (every upload flushed to its local store at once)."""
    srv = await start_server(tmp_path / "server")
    yield srv
    if not srv.task.done():
        await srv.shutdown()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


Files = Callable[[Path], dict[str, bytes]]


@pytest.fixture
def files() -> Files:
    """`files(dir)`: every file under a directory with its bytes, to compare a store or state before and after."""

    def read(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    return read


SnapshotOf = Callable[[History, int], bytes]


@pytest.fixture
def snapshot_of() -> SnapshotOf:
    """`snapshot_of(h, txid)`: an LTX v2 snapshot (TXIDs 1..txid) of `h`'s live database, as LiteFS sends one."""

    def make(h: History, txid: int) -> bytes:
        out = io.BytesIO()
        with open(h.path, "rb") as db:
            encode_db(db, out, version=Version.V2, compress=True, txid=txid, timestamp=txid * 1000)
        return out.getvalue()

    return make


MakeIndex = Callable[..., DbIndex]


@pytest.fixture
def make_index() -> MakeIndex:
    """`make_index(n, ...)`: the index of a database that committed TXIDs 1..n, one every `step` seconds from T0.

    Level 0 holds flushes of `l0_every` TXIDs from `l0_from` (older ones already gone); levels 1 and 2 hold
    compactions of `l1_every` and `l2_every` TXIDs from TXID 1 up to `l1_upto` and `l2_upto` (a level that lags
    stops short); `snapshots` lists the TXIDs of the snapshots (1..t). A file's timestamp is its last TXID's.
    """

    def make(n: int, *, step: float = 60.0, l0_every: int = 1, l0_from: int = 1, l1_every: int = 5,
             l1_upto: int | None = None, l2_every: int = 30, l2_upto: int | None = None,
             snapshots: Sequence[int] = ()) -> DbIndex:
        def ts(txid: int) -> int:
            return int((T0 + txid * step) * 1000)

        def runs(level: int, first: int, upto: int, every: int) -> list[FileEntry]:
            ends = range(first + every - 1, upto + 1, every)
            return [FileEntry(level, end - every + 1, end, ts(end), 100) for end in ends]

        entries = runs(0, l0_from, n, l0_every)
        entries += runs(1, 1, n if l1_upto is None else l1_upto, l1_every)
        entries += runs(2, 1, n if l2_upto is None else l2_upto, l2_every)
        entries += [FileEntry(SNAPSHOT_LEVEL, 1, t, ts(t), 100) for t in snapshots]
        return DbIndex(entries)

    return make
