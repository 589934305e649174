"""Flushing: each database's pending uploads become one L0 file in the store, and the HWM moves.

Each database flushes at its own phase of the L0 interval: at the first point of its grid (`phase(db) + k ×
l0_interval`) at or after its oldest pending upload arrived, so a busy database makes one L0 file per interval and
an upload waits less than one interval. The phase is spread evenly over the interval by a hash of the database's
prefix: databases that started together (a fleet's nodes after a deploy, a server's restart) flush a few at a
time all along the interval instead of all at once, which kept every upload waiting behind a wave of flushes
every interval (p99 latency 0.3–0.6 s at 800 databases). A flush takes what is pending at its start,
up to `MAX_BATCH` bytes (so a backlog needs bounded memory and temporary space, flushed in several files); uploads
go on meanwhile (they only append to `pending`, and only a flush removes from its front), so a flush never holds
the upload lock while it waits on the store.

The engine's flush loop (engine.py) keeps as many flushes in flight as the store sustains: `Limit` raises the
number additively while flushes succeed and halves it when the store fails or throttles (AIMD, as TCP does), within
bounds. `FlushQueue` knows when each database comes due, so the loop never scans every database.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import time
import zlib
from collections.abc import Callable

import structlog

from sidecar.engine.builder import Builder
from sidecar.engine.catalog import Catalog
from sidecar.engine.database import Database, Pending
from sidecar.engine.index import FileEntry
from sidecar.engine.uploadlog import UploadLog
from sidecar.errors import NotFound, PreconditionFailed
from sidecar.log import debugging
from sidecar.ltx import HEADER_SIZE, Header, LTXError, Version
from sidecar.storage.layout import set_aside_key

log = structlog.get_logger("sidecar.engine")

MAX_BATCH = 64 << 20  # bytes of pending uploads in one L0 file


def phase(prefix: str, interval: float) -> float:
    """Where in each L0 interval the database at `prefix` flushes: in [0, interval), the same in every process."""
    return zlib.crc32(prefix.encode()) / 2**32 * interval


def due_at(db: Database, interval: float) -> float:
    """When `db`, which has pending uploads, comes due: the first point of its grid at or after its oldest one."""
    arrived = db.pending[0].arrived
    if interval <= 0:
        return arrived
    start = phase(db.prefix, interval)
    return start + math.ceil((arrived - start) / interval) * interval


def due(dbs: list[Database], now: float, interval: float) -> list[Database]:
    """The databases due at `now`, oldest pending upload first (pure)."""
    out = [db for db in dbs if db.pending and due_at(db, interval) <= now]
    out.sort(key=lambda db: db.pending[0].arrived)
    return out


def batch(db: Database, limit: int = MAX_BATCH) -> int:
    """How many of the pending uploads the next flush takes: all, or as many as fit in `limit` bytes (at least one),
    and never a snapshot with what precedes it."""
    size = 0
    for i, p in enumerate(db.pending):
        if i and p.header.is_snapshot:
            return i  # a snapshot starts a file of its own: the states before it stay restorable
        size += len(p.data)
        if size > limit and i:
            return i
    return len(db.pending)


class Limit:
    """How many flushes may be in flight: additive increase on success, multiplicative decrease on failure."""

    def __init__(self, start: float = 16, low: float = 4, high: float = 256) -> None:
        self.value, self.low, self.high = start, low, high

    @property
    def n(self) -> int:
        return int(self.value)

    def success(self) -> None:
        self.value = min(self.high, self.value + 1 / self.value)  # +1 per window of `value` flushes

    def failure(self) -> None:
        self.value = max(self.low, self.value / 2)


class FlushQueue:
    """When each database with pending uploads comes due (a heap; a database is in it at most once)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Database]] = []
        self._queued: set[int] = set()
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, db: Database, at: float) -> None:
        if id(db) not in self._queued:
            self._queued.add(id(db))
            heapq.heappush(self._heap, (at, next(self._seq), db))

    def pop_due(self, now: float, n: int) -> list[Database]:
        """Up to `n` databases due at `now`, oldest first."""
        out: list[Database] = []
        while self._heap and len(out) < n and self._heap[0][0] <= now:
            _, _, db = heapq.heappop(self._heap)
            self._queued.discard(id(db))
            out.append(db)
        return out

    def next_at(self) -> float | None:
        return self._heap[0][0] if self._heap else None


class Flusher:
    """Moves pending uploads into the store as L0 files."""

    def __init__(self, builder: Builder, catalog: Catalog, log_: UploadLog,
                 flushed: Callable[[Database, int, float], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.builder = builder
        self.catalog = catalog
        self.log = log_
        self.flushed = flushed  # (database, bytes of uploads flushed, seconds): the engine's accounting
        self.clock = clock  # the engine's: when a file is set aside, which its retention counts from

    async def flush(self, db: Database) -> None:
        """Compact the uploads pending now (up to MAX_BATCH bytes) into one L0 file in the store. Uploads that the
        store holds already as one L0 file (the same TXIDs and database checksums) count as flushed."""
        async with db.flushing:
            if not db.pending:
                return
            t0 = time.perf_counter()
            taken = db.pending[:batch(db)]
            stored = False
            try:
                entry = await self.builder.build(db, 0, [p.data for p in taken], Version.V2, in_memory=True)
            except PreconditionFailed:
                # Write-once: the key is taken. A client sending again what the store already holds (after a gap
                # in the stored chain, it sends from the position it is told) meets its own file: nothing to write.
                # A file of another history past the end of the chain (a node that never had the TXIDs past a lost
                # file) is set aside, and the write tried again. Anything else (a reachable file, a stray write the
                # index lacks) stands: the error is raised, and the index rebuilt.
                same = await self._already_stored(db, taken)
                if same is not None:
                    entry, stored = same, True
                elif await self._set_aside(db, taken):
                    entry = await self.builder.build(db, 0, [p.data for p in taken], Version.V2, in_memory=True)
                else:
                    raise
            if not stored:
                db.index.add(entry)
                await self.catalog.stored(db, added=entry)
            db.pending = db.pending[len(taken):]
            for p in taken:
                self.log.release(p.segment)
        if self.flushed:
            self.flushed(db, sum(len(p.data) for p in taken), time.perf_counter() - t0)
        # A routine flush is logged at debug level, as per-second uploads are: one line per database per interval is
        # noise on a server of thousands (and cost a sixtieth of its CPU per upload). Below debug, none is built.
        if stored or debugging("sidecar.engine"):
            (log.info if stored else log.debug)(
                "flushed", cluster=db.cluster, db=db.name, level=0, min_txid=f"{entry.min_txid:016x}",
                max_txid=f"{entry.max_txid:016x}", uploads=len(taken), bytes=entry.size,
                **({"already_stored": True} if stored else {}))

    async def _already_stored(self, db: Database, taken: list[Pending]) -> FileEntry | None:
        """The stored L0 file holding exactly the transactions of `taken`: the same TXIDs and the same database
        checksums before and after, as the index knows it and its header in the store confirms; None if none."""
        first, last = taken[0].header, taken[-1]
        sums = (0 if first.is_snapshot else first.pre_apply_checksum, last.post)
        entry = _l0_file(db, taken)
        if entry is None or (entry.pre, entry.post) != sums:
            return None
        storage = self.builder.storage
        try:
            header = Header.unpack(await storage.get_range(entry.key(storage.layout, db.prefix), 0, HEADER_SIZE))
        except (NotFound, LTXError):
            return None
        return entry if (header.min_txid, header.max_txid) == (entry.min_txid, entry.max_txid) and \
            header.db_checksums == sums else None

    async def _set_aside(self, db: Database, taken: list[Pending]) -> bool:
        """Move the stored L0 file in the way of `taken` under the store's quarantine prefix, if it is garbage to
        every restore: a file the index knows (its header in the store confirms it) that no chain from a snapshot
        reaches, starting past the HWM, so the file of another history than the one stored below it (past a lost
        file). False (nothing touched) otherwise. A copy is kept for a person (and the database told of it, for
        retention to delete once older than the snapshot retention); then the file is deleted."""
        async with db.maint:  # no compaction, retention or restore reads the index meanwhile
            other = _l0_file(db, taken)
            # Every file a chain reaches ends at or below the HWM: one starting past it is reached by none.
            if other is None or other.min_txid <= db.index.hwm:
                return False
            storage = self.builder.storage
            key = other.key(storage.layout, db.prefix)
            try:
                data = await storage.get_bytes(key)
                header = Header.unpack(data[:HEADER_SIZE])
            except (NotFound, LTXError):
                return False
            seen = FileEntry.from_header(0, header, len(data))
            if (seen.min_txid, seen.max_txid, seen.pre, seen.post) != (other.min_txid, other.max_txid, other.pre,
                                                                      other.post):
                return False
            await self.builder.fence(db)
            ms = int(self.clock() * 1000)
            kept = set_aside_key(key, ms)
            await storage.put_bytes(kept, data, timestamp=header.timestamp)
            db.set_aside[kept] = ms
            db.index.remove([other])
            await self.catalog.stored(db)
            await storage.delete([key])
        log.warning("stored file of another history set aside: an upload continuing the stored chain needs its "
                    "key, and no restore reaches it", cluster=db.cluster, db=db.name, key=key, kept=kept,
                    pre=f"{other.pre:016x}", hwm=f"{db.index.hwm:016x}")
        return True


def _l0_file(db: Database, taken: list[Pending]) -> FileEntry | None:
    """The stored L0 file with exactly the TXIDs of `taken` (the key their flush writes), as the index knows it."""
    span = (taken[0].header.min_txid, taken[-1].header.max_txid)
    files = db.index.level(0)
    i = bisect.bisect_left(files, span, key=lambda e: (e.min_txid, e.max_txid))
    return files[i] if i < len(files) and (files[i].min_txid, files[i].max_txid) == span else None


__all__ = ["MAX_BATCH", "FlushQueue", "Flusher", "Limit", "batch", "due", "due_at", "phase"]
