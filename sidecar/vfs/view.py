"""One state of a database, read in place: its plan's files, where each page's newest version is, the pages.

A `View` is built for one `Head` (a plan ending at one TXID) and never changes, which is what lets a read
transaction see exactly one TXID. Reading page p:

1. resolve p: the newest file of the plan whose page index lists p (indexes are read at open, one ranged
   read per file, and decoded around the pages asked for; a big one is read a window at a time:
   `sidecar.ltx.pageindex`); the answer is remembered. From a backup server (`remote`), none of this:
   the server resolves pages and sends their frames (`PageServer.pages`);
2. the page cache, keyed by (file, pgno): a stored file never changes, so cached pages stay valid when a
   follower moves to a newer view that still uses the file;
3. otherwise one ranged read of p's frame plus, when misses have been near each other (a scan), the frames
   of the next pages that sit right after it in the same file (read-ahead doubles up to READ_AHEAD pages):
   one request for a run of neighbours. Frames are checked (pgno, flags, size) and decompressed (LZ4 block).

A small file (up to `pageindex.WHOLE` bytes) is read whole at open, so its pages cost no further request.
Only the event loop's thread calls the async methods; `read_cached` is safe from any thread.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable

import lz4.block

from sidecar.engine.head import Head
from sidecar.engine.index import FileEntry
from sidecar.errors import SidecarError
from sidecar.ltx import lock_pgno
from sidecar.ltx.pageindex import MAX_PROBES, TAIL, WHOLE, SparseIndex, Unknown, index_span, tail_length
from sidecar.vfs.source import PageServer, Source

READ_AHEAD = 64  # most neighbouring pages fetched with a missed one, once reads are sequential
INDEX_CONCURRENCY = 16  # files whose index is read at once
_FRAME = struct.Struct(">IHI")


class CorruptBackup(SidecarError):
    """A stored file does not hold what its index says."""

    code = "ECORRUPT"


class PageCache:
    """An LRU of decompressed pages by (file key, pgno), bounded in bytes; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._pages: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            page = self._pages.get(key)
            if page is not None:
                self._pages.move_to_end(key)
            return page

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._pages

    def put(self, key: tuple[str, int], page: bytes) -> None:
        with self._lock:
            old = self._pages.pop(key, None)
            if old is not None:
                self.size -= len(old)
            if len(page) > self.capacity:
                return
            self._pages[key] = page
            self.size += len(page)
            while self.size > self.capacity:
                _, evicted = self._pages.popitem(last=False)
                self.size -= len(evicted)


class FileIndex:
    """One stored file of a plan: where its pages are, and its bytes when it is small."""

    def __init__(self, entry: FileEntry, key: str) -> None:
        self.entry = entry
        self.key = key
        # The page cache's name for this file: its key alone would be reused by another file once a database is
        # deleted and started over (the same TXIDs, the same names); its time, size and checksum tell them apart.
        self.cache_key = f"{key}@{entry.timestamp}:{entry.size}:{entry.post:016x}"
        self.sparse: SparseIndex | None = None
        self.raw: bytes | None = None  # the whole file, when small

    async def load(self, source: Source, location: tuple[int, int] | None) -> None:
        """Read the page index (and the whole file when small): one ranged read, two when the index turns out
        longer than the tail read and short enough to read whole. Entries are decoded as pages are asked for."""
        size, top = self.entry.size, self.entry.commit + 1
        if size <= WHOLE:
            self.raw = await source.read(self.key, 0, size)
            start, end = self._span(self.raw[-TAIL:], size)
            self.sparse = SparseIndex(start, end, top)
            self.sparse.hold(start, self.raw[start:end])
            return
        if location is not None:
            start, length = location
            self.sparse = SparseIndex(start, start + length, top)
            if length <= TAIL:
                self.sparse.hold(start, await source.read(self.key, start, length))
            return
        tail_at = size - tail_length(size)
        tail = await source.read(self.key, tail_at, size - tail_at)
        start, end = self._span(tail, size)
        self.sparse = SparseIndex(start, end, top)
        if start < tail_at and end - start <= TAIL:
            tail = await source.read(self.key, start, tail_at - start) + tail  # the rest of a mid-size index
            tail_at = start
        begin = max(start, tail_at)
        self.sparse.hold(begin, tail[begin - tail_at:end - tail_at])

    def _span(self, tail: bytes, size: int) -> tuple[int, int]:
        try:
            return index_span(tail, size)
        except ValueError as err:
            raise CorruptBackup(f"{self.key}: {err}") from None

    def find(self, pgno: int) -> tuple[int, int] | None:
        """(offset, size) of the page's frame, None if this file does not hold it; raises Unknown."""
        assert self.sparse is not None
        while True:
            try:
                return self.sparse.find(pgno)
            except Unknown:
                if not self._settle(pgno):
                    raise

    def _settle(self, pgno: int) -> bool:
        assert self.sparse is not None
        try:
            return self.sparse.settle(pgno)
        except ValueError as err:
            raise CorruptBackup(f"{self.key}: {err}") from None

    async def locate(self, source: Source, pgno: int) -> tuple[int, int] | None:
        """As `find`, reading windows of the index as needed."""
        assert self.sparse is not None
        attempt = 0
        while True:
            try:
                return self.find(pgno)
            except Unknown:
                pass
            start, length, a, b = self.sparse.read_for(pgno, attempt)
            data = await source.read(self.key, start, length)
            try:
                attempt = attempt + 1 if self.sparse.take(data, start, a, b) else MAX_PROBES
            except ValueError as err:
                raise CorruptBackup(f"{self.key}: {err}") from None

    async def frames(self, source: Source, start: int, length: int) -> bytes:
        if self.raw is not None:
            return self.raw[start:start + length]
        return await source.read(self.key, start, length)


class View:
    """The database at `head.txid`: pages resolved through `head.plan`, read through `cache`."""

    def __init__(self, head: Head, source: Source, cache: PageCache, files: list[FileIndex], *,
                 remote: bool = False) -> None:
        self.head = head
        self.remote = remote  # pages resolved by the source (a PageServer): no index is read here
        self.source = source
        self.cache = cache
        self.files = files  # in plan order: later files win
        self.page_size = head.page_size
        self.size = head.commit * head.page_size
        self._lock_pgno = lock_pgno(head.page_size)
        self._where: dict[int, tuple[int, int, int]] = {}  # pgno -> (file, offset, size), remembered
        self._keys: dict[int, str] = {}  # remote: pgno -> cache key of the file its page came from
        self._cache_keys = {f.key: f.cache_key for f in files}
        self._ahead = 0
        self._stream_end = -1 << 40

    @classmethod
    async def open(cls, head: Head, source: Source, cache: PageCache, known: dict[str, FileIndex], *,
                   remote: bool = False) -> View:
        """Read the page index of every file of the plan not in `known` (which it adds them to); with `remote`
        (the source is a PageServer) none: the source resolves pages."""
        if remote:
            return cls(head, source, cache, [FileIndex(e, source.key(e)) for e in head.plan], remote=True)
        files = []
        todo = []
        for i, e in enumerate(head.plan):
            key = source.key(e)
            f = known.get(key)
            if f is None or f.entry != e:
                f = FileIndex(e, key)
                todo.append((f, head.indexes[i] if head.indexes else None))
            files.append(f)
        sem = asyncio.Semaphore(INDEX_CONCURRENCY)

        async def load(f: FileIndex, loc: tuple[int, int] | None) -> None:
            async with sem:
                await f.load(source, loc)
        await asyncio.gather(*(load(f, loc) for f, loc in todo))
        for f, _ in todo:
            known[f.key] = f
        return cls(head, source, cache, files)

    @property
    def keys(self) -> Iterable[str]:
        """The files whose indexes this view reads (none when the source resolves pages)."""
        return () if self.remote else (f.key for f in self.files)

    # -- reading --------------------------------------------------------------------------------------

    def read_cached(self, offset: int, amount: int, salt: int = 0) -> bytes | None:
        """The bytes at `offset` if every page they span is cached (or resolved to zeros); else None. `salt` is
        added to the change counter (see `_patched`)."""
        out = []
        for pgno, lo, hi in self._spans(offset, amount):
            page = self._cached_page(pgno)
            if page is None:
                return None
            out.append(page[lo:hi])
        return self._patched(offset, b"".join(out), salt)

    async def read(self, offset: int, amount: int, salt: int = 0) -> bytes:
        """The bytes at `offset` (short at the end of the database), reading pages as needed."""
        out = []
        for pgno, lo, hi in self._spans(offset, amount):
            page = self._cached_page(pgno)
            if page is None:
                page = await self._fetch(pgno)
            out.append(page[lo:hi])
        return self._patched(offset, b"".join(out), salt)

    def _spans(self, offset: int, amount: int) -> list[tuple[int, int, int]]:
        ps = self.page_size
        end = min(offset + amount, self.size)
        spans = []
        pos = offset
        while pos < end:
            pgno, lo = pos // ps + 1, pos % ps
            hi = min(ps, lo + end - pos)
            spans.append((pgno, lo, hi))
            pos += hi - lo
        return spans

    def _patched(self, offset: int, data: bytes, salt: int) -> bytes:
        """Rewrite header fields SQLite trusts, if `data` covers them (bytes 18–31 and 92–95 of page 1).

        File format versions 1/1 (rollback journal: a WAL-mode database needs no -wal or -shm here);
        the change counter and "version valid for" set to the TXID (plus the connection's `salt`, which it
        changes when it comes back to a TXID it read in another history) low 32 bits, so SQLite drops its page
        cache exactly when a new transaction sees another state; the database size to the commit.
        """
        if offset >= 96 or not data:
            return data
        buf = bytearray(data)
        counter = ((self.head.txid + salt) & 0xFFFFFFFF).to_bytes(4, "big")
        for at, value in ((18, b"\x01\x01"), (24, counter), (28, self.head.commit.to_bytes(4, "big")),
                          (92, counter)):
            for i, byte in enumerate(value):
                if 0 <= at + i - offset < len(buf):
                    buf[at + i - offset] = byte
        return bytes(buf)

    def _cached_page(self, pgno: int) -> bytes | None:
        if pgno == self._lock_pgno:
            return bytes(self.page_size)  # never stored: SQLite never reads it either
        if self.remote:
            key = self._keys.get(pgno)
            page = self.cache.get((key, pgno)) if key is not None else None
            if page is not None:
                self.source.stats.cache_hits += 1
            return page
        where = self._resolve_known(pgno)
        if where is None:
            return None
        page = self.cache.get((self.files[where[0]].cache_key, pgno))
        if page is not None:
            self.source.stats.cache_hits += 1
        return page

    async def _resolve(self, pgno: int) -> tuple[int, int, int]:
        where = self._where.get(pgno)
        if where is not None:
            return where
        for i in range(len(self.files) - 1, -1, -1):
            loc = await self.files[i].locate(self.source, pgno)
            if loc is not None:
                if len(self._where) > 1 << 16:
                    self._where.clear()  # bounded memory; re-resolving costs no request for read indexes
                found = self._where[pgno] = (i, *loc)
                return found
        raise CorruptBackup(f"TXID {self.head.txid:016x}: page {pgno} is in no file of the plan "
                            f"(commit {self.head.commit})")

    def _resolve_known(self, pgno: int) -> tuple[int, int, int] | None:
        """As `_resolve` without reading any index: None when that would be needed."""
        where = self._where.get(pgno)
        if where is not None:
            return where
        for i in range(len(self.files) - 1, -1, -1):
            try:
                loc = self.files[i].find(pgno)
            except Unknown:
                return None
            if loc is not None:
                found = self._where[pgno] = (i, *loc)
                return found
        return None

    def _read_ahead(self, pgno: int) -> int:
        """How many pages after a missed `pgno` to fetch with it.

        A miss near the previous read (a scan, with the B-tree's interior pages read out of order among its
        leaves) doubles the read-ahead, up to READ_AHEAD pages; a jump elsewhere resets it.
        """
        near = abs(pgno - self._stream_end) <= max(8, 2 * self._ahead)
        self._ahead = min(READ_AHEAD, max(1, self._ahead * 2)) if near else 0
        return self._ahead

    async def _fetch_remote(self, pgno: int) -> bytes:
        assert isinstance(self.source, PageServer)
        count = min(1 + self._read_ahead(pgno), self.head.commit - pgno + 1)
        got = await self.source.pages(self.head.txid, pgno, count, self.head.post_apply_checksum)
        self._stream_end = pgno + count
        if len(self._keys) > 1 << 16:
            self._keys.clear()
        wanted = None
        for q, key, frame in got:
            page = self._decompress(key, q, frame, 0, len(frame))
            ck = self._cache_keys.get(key, key)
            self.cache.put((ck, q), page)
            self._keys[q] = ck
            self.source.stats.pages_fetched += 1
            if q == pgno:
                wanted = page
        if wanted is None:
            raise CorruptBackup(f"TXID {self.head.txid:016x}: the server sent no page {pgno}")
        return wanted

    async def _fetch(self, pgno: int) -> bytes:
        if self.remote:
            return await self._fetch_remote(pgno)
        i, off, size = await self._resolve(pgno)
        f = self.files[i]
        cached = self.cache.get((f.cache_key, pgno))
        if cached is not None:
            return cached
        self._read_ahead(pgno)
        run = [(pgno, off, size)]
        end = off + size
        for q in range(pgno + 1, pgno + 1 + self._ahead):
            if q > self.head.commit or q == self._lock_pgno:
                break
            loc = self._resolve_known(q)
            if loc is None or loc[0] != i or loc[1] != end:
                break  # not the next frame of the same file
            run.append((q, loc[1], loc[2]))
            end += loc[2]
        self._stream_end = run[-1][0] + 1
        data = await f.frames(self.source, off, end - off)
        if len(data) != end - off:
            raise CorruptBackup(f"{f.key}: {end - off} bytes wanted at offset {off}, got {len(data)}")
        wanted = b""
        pos = 0
        for q, _, qsize in run:
            if q == pgno or (f.cache_key, q) not in self.cache:  # a cached neighbour rode along: one read is cheaper
                page = self._decompress(f.key, q, data, pos, qsize)
                self.cache.put((f.cache_key, q), page)
                self.source.stats.pages_fetched += 1
                if q == pgno:
                    wanted = page
            pos += qsize
        return wanted

    def _decompress(self, key: str, pgno: int, data: bytes, pos: int, size: int) -> bytes:
        got, flags, csize = _FRAME.unpack_from(data, pos)
        if got != pgno or flags != 1 or csize != size - 10:
            raise CorruptBackup(f"{key}: frame for page {pgno} holds page {got}, flags {flags:#x}, size {csize}")
        try:
            page = lz4.block.decompress(data[pos + 10:pos + size], uncompressed_size=self.page_size)
        except lz4.block.LZ4BlockError as err:
            raise CorruptBackup(f"{key}: page {pgno}: {err}") from None
        if len(page) != self.page_size:
            raise CorruptBackup(f"{key}: page {pgno} decompressed to {len(page)} bytes")
        return bytes(page)


__all__ = ["CorruptBackup", "FileIndex", "PageCache", "View"]
