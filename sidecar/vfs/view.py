"""One state of a database, read in place: its plan's files, where each page's newest version is, the pages.

A `View` is built for one `Head` (a plan ending at one TXID) and never changes, which is what lets a read
transaction see exactly one TXID. Reading page p:

1. resolve p: the newest file of the plan whose page index lists p (indexes are read at open, one ranged
   read per file, big ones a window at a time: `pageindex`); the answer is remembered;
2. the page cache, keyed by (file, pgno): a stored file never changes, so cached pages stay valid when a
   follower moves to a newer view that still uses the file;
3. otherwise one ranged read of p's frame plus, when misses have been near each other (a scan), the frames
   of the next pages that sit right after it in the same file (read-ahead doubles up to READ_AHEAD pages):
   one request for a run of neighbours. Frames are checked (pgno, flags, size) and decompressed (LZ4 block).

A small file (up to `pageindex.TAIL` bytes) is read whole at open, so its pages cost no further request.
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
from sidecar.ltx.pageindex import TAIL, SparseIndex, Unknown, decode, index_span
from sidecar.vfs.source import Source

READ_AHEAD = 64  # most neighbouring pages fetched with a missed one, once reads are sequential
MAX_PROBES = 4  # index windows tried for one page before reading the whole span around it
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
        self.sparse: SparseIndex | None = None
        self.raw: bytes | None = None  # the whole file, when small

    async def load(self, source: Source, location: tuple[int, int] | None) -> None:
        """Read the page index (and the whole file when small): one ranged read."""
        size, top = self.entry.size, self.entry.commit + 1
        if size <= TAIL:
            self.raw = await source.read(self.key, 0, size)
            self._whole(self.raw, 0, size)
            return
        if location is not None:
            start, length = location
            self.sparse = SparseIndex(start, start + length, top)
            if length <= TAIL:
                data = await source.read(self.key, start, length)
                self._add(data, start, True, True)
            return
        tail_at = size - TAIL
        tail = await source.read(self.key, tail_at, TAIL)
        start, end = self._span(tail, size)
        self.sparse = SparseIndex(start, end, top)
        begin = max(start, tail_at)
        self._add(tail[begin - tail_at:end - tail_at], begin, begin == start, True)

    def _span(self, tail: bytes, size: int) -> tuple[int, int]:
        try:
            return index_span(tail, size)
        except ValueError as err:
            raise CorruptBackup(f"{self.key}: {err}") from None

    def _whole(self, raw: bytes, base: int, size: int) -> None:
        start, end = self._span(raw[-TAIL:], size)
        self.sparse = SparseIndex(start, end, self.entry.commit + 1)
        self._add(raw[start - base:end - base], start, True, True)

    def _add(self, data: bytes, start: int, aligned_start: bool, aligned_end: bool) -> bool:
        assert self.sparse is not None
        try:
            run = decode(data, start, aligned_start=aligned_start, aligned_end=aligned_end)
        except ValueError as err:
            raise CorruptBackup(f"{self.key}: {err}") from None
        if run is None:
            return False
        self.sparse.add(run)
        return True

    def find(self, pgno: int) -> tuple[int, int] | None:
        """(offset, size) of the page's frame, None if this file does not hold it; raises Unknown."""
        assert self.sparse is not None
        return self.sparse.find(pgno)

    async def locate(self, source: Source, pgno: int) -> tuple[int, int] | None:
        """As `find`, reading windows of the index as needed."""
        assert self.sparse is not None
        probes = 0
        while True:
            try:
                return self.sparse.find(pgno)
            except Unknown:
                pass
            start, length, a, b = self.sparse.window(pgno)
            if probes >= MAX_PROBES:
                # Interpolation is not converging: read everything between the known entries around pgno.
                sp, self.sparse.window_size = self.sparse.window_size, 1 << 62
                start, length, a, b = self.sparse.window(pgno)
                self.sparse.window_size = sp
            data = await source.read(self.key, start, length)
            if not self._add(data, start, a, b):
                probes = MAX_PROBES  # an ambiguous window: read the aligned span next
            probes += 1

    async def frames(self, source: Source, start: int, length: int) -> bytes:
        if self.raw is not None:
            return self.raw[start:start + length]
        return await source.read(self.key, start, length)


class View:
    """The database at `head.txid`: pages resolved through `head.plan`, read through `cache`."""

    def __init__(self, head: Head, source: Source, cache: PageCache, files: list[FileIndex]) -> None:
        self.head = head
        self.source = source
        self.cache = cache
        self.files = files  # in plan order: later files win
        self.page_size = head.page_size
        self.size = head.commit * head.page_size
        self._lock_pgno = lock_pgno(head.page_size)
        self._where: dict[int, tuple[int, int, int]] = {}  # pgno -> (file, offset, size), remembered
        self._ahead = 0
        self._stream_end = -1 << 40

    @classmethod
    async def open(cls, head: Head, source: Source, cache: PageCache, known: dict[str, FileIndex]) -> View:
        """Read the page index of every file of the plan not in `known` (which it adds them to)."""
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
        return (f.key for f in self.files)

    # -- reading --------------------------------------------------------------------------------------

    def read_cached(self, offset: int, amount: int) -> bytes | None:
        """The bytes at `offset` if every page they span is cached (or resolved to zeros); else None."""
        out = []
        for pgno, lo, hi in self._spans(offset, amount):
            page = self._cached_page(pgno)
            if page is None:
                return None
            out.append(page[lo:hi])
        return self._patched(offset, b"".join(out))

    async def read(self, offset: int, amount: int) -> bytes:
        """The bytes at `offset` (short at the end of the database), reading pages as needed."""
        out = []
        for pgno, lo, hi in self._spans(offset, amount):
            page = self._cached_page(pgno)
            if page is None:
                page = await self._fetch(pgno)
            out.append(page[lo:hi])
        return self._patched(offset, b"".join(out))

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

    def _patched(self, offset: int, data: bytes) -> bytes:
        """Rewrite header fields SQLite trusts, if `data` covers them (bytes 18–31 and 92–95 of page 1).

        File format versions 1/1 (rollback journal: a WAL-mode database needs no -wal or -shm here);
        the change counter and "version valid for" set to the TXID's low 32 bits, so SQLite drops its page
        cache exactly when a new transaction sees another TXID; the database size to the commit.
        """
        if offset >= 96 or not data:
            return data
        buf = bytearray(data)
        counter = (self.head.txid & 0xFFFFFFFF).to_bytes(4, "big")
        for at, value in ((18, b"\x01\x01"), (24, counter), (28, self.head.commit.to_bytes(4, "big")),
                          (92, counter)):
            for i, byte in enumerate(value):
                if 0 <= at + i - offset < len(buf):
                    buf[at + i - offset] = byte
        return bytes(buf)

    def _cached_page(self, pgno: int) -> bytes | None:
        if pgno == self._lock_pgno:
            return bytes(self.page_size)  # never stored: SQLite never reads it either
        where = self._resolve_known(pgno)
        if where is None:
            return None
        page = self.cache.get((self.files[where[0]].key, pgno))
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

    async def _fetch(self, pgno: int) -> bytes:
        i, off, size = await self._resolve(pgno)
        f = self.files[i]
        # A miss near the previous read (a scan, with the B-tree's interior pages read out of order among
        # its leaves) doubles the read-ahead, up to READ_AHEAD pages; a jump elsewhere resets it.
        near = abs(pgno - self._stream_end) <= max(8, 2 * self._ahead)
        self._ahead = min(READ_AHEAD, max(1, self._ahead * 2)) if near else 0
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
            if q == pgno or (f.key, q) not in self.cache:  # a cached neighbour rode along: one read is cheaper
                page = self._decompress(f.key, q, data, pos, qsize)
                self.cache.put((f.key, q), page)
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
