"""The restore's merge: stored LTX v3 files into one SQLite file, on every core, every checksum verified.

The database's page numbers are cut into ranges, one per core (spec/ltx.md §2.2–2.4, §9). A range is
assembled window by window (4 MiB of database in a reused buffer, written while the next one fills); for
each window every file's frames in it are read, newest file first, so the first file to fill a slot is
the one whose page wins. Every frame of every file is decompressed once and checksummed in file order,
placed or not: a range returns, per file, the CRC of its stretch of the file's checksummed stream, and the
stretches combine (`crc_combine`) into the file checksum, checked with the page index and trailer at the
end. The ranges run in the calling thread and in forked worker processes: python-lz4 does release the GIL,
but a page's 2 µs call is too short for two threads to gain anything (measured: none), while two
processes halve the time.

    ranges:  [1 ............ lo₂) [lo₂ ............ commit]  + the frames beyond commit (checked only)
    window:  for file in newest..oldest: frames in [wlo, whi) → decompress, CRC, place if slot empty
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import lz4.block
from fastcrc import crc64

from sidecar.errors import RestoreError
from sidecar.fsutil import close_map, map_files
from sidecar.ltx import (
    HEADER_SIZE,
    CorruptCompression,
    Header,
    InvalidPage,
    LTXError,
    Trailer,
    TruncatedFile,
    Version,
    lock_pgno,
)
from sidecar.ltx.checksum import crc, crc_combine, database_checksum_from_pages
from sidecar.ltx.decoder import check_trailer, lz4_block_bound, verify

Progress = Callable[[int, int], None]  # (bytes of input done, bytes of input in all)

_WINDOW = 4 << 20  # bytes of database assembled per write (at most 1,024 pages)
_PARALLEL_MIN_BYTES = 64 << 20  # stored bytes below which one range in the calling thread is quicker
_FRAME = struct.Struct(">IHI")  # v3 page header: pgno, flags, compressed size
_NO_PAGE = 1 << 32  # above every page number


@dataclass(frozen=True, slots=True)
class _Stretch:
    """What one range read of one file: the CRC and length of that part of its checksummed stream."""

    crc: int
    length: int
    frames: int
    end: int  # offset after the last frame read; the tail range stops at the end marker
    db: int  # XOR of the page checksums, for a snapshot that carries its own database checksum


@dataclass(frozen=True, slots=True)
class Merged:
    """What `merge` wrote: the database checksum it computed, the pages and their size."""

    checksum: int
    pages: int
    page_size: int


def merge(paths: Sequence[Path], out: Path, progress: Progress | None = None, *,
          ranges: int | None = None, names: Sequence[str] | None = None) -> Merged:
    """Merge the v3 files at `paths` (in TXID order, the first a snapshot) into the SQLite file `out`, fsynced.

    Raises RestoreError naming the file (by `names`, its stored key, when given: a download's local name means
    nothing to the reader) for any corrupt input, and for a page no file holds. `ranges` (default: one per core
    for a large merge) is how many parts the pages are cut into.
    """
    labels = list(names) if names is not None else [p.name for p in paths]
    with ExitStack() as stack:
        maps = map_files(stack, paths)
        total = sum(len(mm) for mm in maps)
        headers = [_read_header(mm, label) for mm, label in zip(maps, labels, strict=True)]
        commit, page_size = headers[-1].commit, headers[-1].page_size
        if any(h.page_size != page_size for h in headers):
            raise RestoreError("restore plan mixes page sizes")
        if ranges is None:
            ranges = _cores() if total >= _PARALLEL_MIN_BYTES else 1
        bounds = _split(commit, page_size, ranges)
        local = [str(p) for p in paths]
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                results = _run_ranges(local, labels, str(out), bounds, commit, total, progress)
            except _MissingPage as err:
                # A page no file holds: a plan short of a file, or a corrupt header (a flipped commit) that only
                # the file checksum, read at the end, would tell. Blame the file when one is corrupt.
                raise _corrupt_file(maps, labels) or err from None
            # Every window is written by now, the lock page's as zeros; the size is set only after that, so a
            # corrupt commit never makes a file of terabytes first.
            os.ftruncate(fd, commit * page_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        after = before = pages = 0
        for r_after, r_before, r_pages, _ in results:
            after, before, pages = after ^ r_after, before ^ r_before, pages + r_pages
        for i, (mm, label, header) in enumerate(zip(maps, labels, headers, strict=True)):
            _check_file(mm, label, header, [r[3][i] for r in results])
    if progress:
        progress(total, total)
    # Each placed page's CRC alone, from the file checksums' chain: crc(page, h) = crc(page) ⊕ M·h, M linear,
    # so XOR of crc(page) = XOR of the chain values after the pages ⊕ M·(XOR of the values before them).
    page_crcs = after ^ crc_combine(before, 0, page_size)
    return Merged(database_checksum_from_pages(page_crcs, commit, page_size), pages, page_size)


class _MissingPage(RestoreError):
    """No file of the plan holds a page within commit."""


def _corrupt_file(maps: Sequence[mmap.mmap], names: Sequence[str]) -> RestoreError | None:
    """The first input that does not decode and verify whole, named; None if every one does. Error path only."""
    for mm, name in zip(maps, names, strict=True):
        try:
            verify(mm, Version.V3)
        except LTXError as err:
            return RestoreError(f"corrupt backup file: {name}: {err}")
    return None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _read_header(mm: mmap.mmap, name: str) -> Header:
    try:
        header = Header.unpack(mm[:HEADER_SIZE])
        header.validate(Version.V3)
    except LTXError as err:
        raise RestoreError(f"corrupt backup file: {name}: {err}") from err
    return header


def _split(commit: int, page_size: int, n: int) -> list[tuple[int, int]]:
    """Cut pages 1..commit into `n` ranges [lo, hi) of whole windows; the last one ends past commit."""
    per_window = _window_pages(page_size)
    windows = -(-commit // per_window)
    n = max(1, min(n, windows))
    cuts = [1 + (windows * k // n) * per_window for k in range(n)] + [commit + 1]
    return [(cuts[k], cuts[k + 1]) for k in range(n)]


def _window_pages(page_size: int) -> int:
    """Pages assembled per write."""
    return max(1, min(_WINDOW // page_size, 1024))


_RangeResult = tuple[int, int, int, list[_Stretch]]  # (XORs of chain values after, before placed pages,
                                                      # pages placed, per file)


def _run_ranges(paths: list[str], names: list[str], out: str, bounds: list[tuple[int, int]], commit: int,
                total: int, progress: Progress | None) -> list[_RangeResult]:
    """Merge every range: the first in this thread, the others in forked processes."""
    tail = len(bounds) - 1
    if len(bounds) == 1:
        return [_merge_range(paths, names, out, *bounds[0], commit, True, progress, total)]
    # Imported here, not at the top: every `litefs-sidecar run` imports this module (through the engine) and
    # never restores this big; multiprocessing and its executor add ~30 ms to its start.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork, not spawn: a spawned worker would import the whole CLI again (~0.3 s); the child runs only
    # _merge_range, which takes no lock another thread could hold.
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(len(bounds) - 1, mp_context=ctx) as pool:
        futures = [pool.submit(_merge_range, paths, names, out, lo, hi, commit, k == tail)
                   for k, (lo, hi) in enumerate(bounds) if k]
        # Progress is the first range's, as a share of the whole: the ranges are of one size and run together.
        first = _merge_range(paths, names, out, *bounds[0], commit, False, progress, total)
        return [first, *(f.result() for f in futures)]


def _merge_range(paths: list[str], names: list[str], out: str, lo: int, hi: int, commit: int, tail: bool,
                 progress: Progress | None = None, total: int = 0) -> _RangeResult:
    """Assemble pages [lo, hi) of the database into `out`, reading and checking every frame of every file
    whose page number falls in the range (and, for the `tail` range, every frame after it)."""
    with ExitStack() as stack:
        maps = map_files(stack, [Path(p) for p in paths])
        merger = _RangeMerger(maps, names, lo)
        ps, lock = merger.page_size, merger.lock
        per_window = _window_pages(ps)
        after = before = pages = 0
        taken = bytearray(per_window)
        zeros = bytes(ps)
        with WindowWriter(out, per_window * ps) as writer:
            for wlo in range(lo, hi, per_window):
                whi = min(wlo + per_window, hi)
                n = whi - wlo
                win = writer.buffer()
                taken[:n] = bytes(n)
                for i in reversed(range(len(maps))):  # newest first: the first to fill a slot wins
                    a, b, placed = merger.scan(i, whi, wlo, win, taken)
                    after, before, pages = after ^ a, before ^ b, pages + placed
                if wlo <= lock < whi:
                    win[(lock - wlo) * ps:(lock - wlo + 1) * ps] = zeros
                    taken[lock - wlo] = 1
                missing = taken.find(0, 0, n)
                if missing >= 0:
                    raise _MissingPage(f"restore plan is missing page {wlo + missing} (commit is {commit})")
                writer.write(win[:n * ps], (wlo - 1) * ps)
                if progress:
                    progress(min(total * (whi - lo) // max(hi - lo, 1), total - 1), total)
        if tail:
            for i in range(len(maps)):
                merger.scan(i, _NO_PAGE, 0, memoryview(b""), taken)  # beyond commit: checked, not written
    return after, before, pages, merger.stretches()


class WindowWriter:
    """Writes windows at their offsets from a second thread, while the next window is assembled in the other
    of two buffers. Whole 4 KiB blocks bypass the page cache (O_DIRECT) where the file system allows it: the
    kernel then copies nothing, and this VM pays ~1 ms of CPU per MiB of new page cache (measured: 1 GiB
    written with 0.05 s of CPU this way, 0.3–1.7 s through the cache). The final fsync is the caller's."""

    _ALIGN = 4096

    def __init__(self, path: str, size: int, *, direct: bool = True) -> None:
        self._fd = os.open(path, os.O_WRONLY)
        self._direct_fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                pass  # the file system has no O_DIRECT: everything goes through the page cache
        # Anonymous maps are page-aligned, as O_DIRECT needs its buffers to be.
        self._buffers = [mmap.mmap(-1, max(size, 1)) for _ in range(2)]
        self._views = [memoryview(b) for b in self._buffers]
        self._pending: list[Future[None] | None] = [None, None]
        self._next = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="restore-write")

    def buffer(self) -> memoryview:
        """The buffer to assemble the next window in, once its previous write is done."""
        k = self._next
        pending = self._pending[k]
        if pending is not None:
            pending.result()
            self._pending[k] = None
        return self._views[k]

    def write(self, data: memoryview, offset: int) -> None:
        """Write `data` (a slice of the last `buffer()`) at `offset`, in the background."""
        self._pending[self._next] = self._pool.submit(self._write, data, offset)
        self._next ^= 1

    def _write(self, data: memoryview, offset: int) -> None:
        whole = len(data) - len(data) % self._ALIGN if self._direct_fd >= 0 and offset % self._ALIGN == 0 else 0
        if whole:
            _write_all(self._direct_fd, data[:whole], offset)
        if whole < len(data):
            _write_all(self._fd, data[whole:], offset + whole)
            if hasattr(os, "posix_fadvise"):
                # Start writing back now (on Linux, POSIX_FADV_DONTNEED starts writeback of dirty pages and
                # drops none of them): the final fsync finds little left, and no dirty-memory throttling.
                os.posix_fadvise(self._fd, offset + whole, len(data) - whole, os.POSIX_FADV_DONTNEED)

    def __enter__(self) -> WindowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for pending in self._pending:
                if pending is not None and exc[0] is None:
                    pending.result()
        finally:
            self._pool.shutdown(wait=True)
            for fd in (self._fd, self._direct_fd):
                if fd >= 0:
                    os.close(fd)
            for view, buf in zip(self._views, self._buffers, strict=True):
                view.release()
                close_map(buf)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class _RangeMerger:
    """Per-file reading state of one range: where each file is, its CRC so far, the last page seen."""

    def __init__(self, views: list[mmap.mmap], names: list[str], lo: int) -> None:
        self.views = views
        self.names = names
        self.headers = [Header.unpack(v[:HEADER_SIZE]) for v in views]
        self.page_size = self.headers[-1].page_size
        self.lock = lock_pgno(self.page_size)
        self.bound = lz4_block_bound(self.page_size)
        self.crcs = [0] * len(views)
        self.lengths = [0] * len(views)
        self.frames = [0] * len(views)
        self.db_crcs = [0] * len(views)  # a snapshot that carries a checksum is checked against it alone
        self.offsets = []
        self.prevs = []
        for i, v in enumerate(views):  # skip the frames of earlier ranges, reading only their headers
            off, prev = HEADER_SIZE, 0
            try:
                while True:
                    pgno, _, csize = _FRAME.unpack_from(v, off)
                    if pgno == 0 or pgno >= lo:
                        break
                    off, prev = off + 10 + csize, pgno
            except struct.error:
                raise self._error(i, TruncatedFile("unexpected end of file in a page frame", offset=off)) from None
            self.offsets.append(off)
            self.prevs.append(prev)

    def _error(self, i: int, err: LTXError) -> RestoreError:
        return RestoreError(f"corrupt backup file: {self.names[i]}: {err}")

    def scan(self, i: int, stop: int, wlo: int, win: memoryview, taken: bytearray) -> tuple[int, int, int]:
        """Read file `i`'s frames up to page `stop`, placing the pages it is first to claim in `win` (whose
        slot 0 is page `wlo`; `taken` marks the slots filled); returns the XORs of the file's CRC chain
        after and before each placed page (the page's own CRC follows from them), and the pages placed."""
        v = self.views[i]
        off, c, prev = self.offsets[i], self.crcs[i], self.prevs[i]
        header = self.headers[i]
        snapshot, fcommit = header.is_snapshot, header.commit
        check_db = snapshot and not header.no_checksum
        ps, lock, bound, limit = self.page_size, self.lock, self.bound, len(v) - 24 - 6
        place = stop != _NO_PAGE
        decompress, unpack, go_iso = lz4.block.decompress, _FRAME.unpack_from, crc64.go_iso
        frames, after, before, placed, db = 0, 0, 0, 0, 0
        try:
            while True:
                pgno, flags, csize = unpack(v, off)
                if pgno == 0 or pgno >= stop:
                    break
                if flags != 1:  # v3 sized LZ4 block
                    raise InvalidPage(f"invalid page header flags: 0x{flags:04x}", offset=off)
                if not 0 < csize <= bound:
                    raise InvalidPage(f"page {pgno}: compressed size {csize} out of range", offset=off + 6)
                if off + 10 + csize > limit:
                    raise TruncatedFile(f"page {pgno}: frame runs past the end of the file", offset=off)
                if pgno <= prev:
                    raise InvalidPage(f"page {pgno} out of order after page {prev}", offset=off)
                if pgno > fcommit:
                    raise InvalidPage(f"page {pgno} beyond commit {fcommit}", offset=off)
                if pgno == lock:
                    raise InvalidPage(f"page {pgno} is the lock page", offset=off)
                if snapshot and pgno != (prev + 2 if prev + 1 == lock else prev + 1):
                    raise InvalidPage(f"snapshot is missing page {prev + 1}: next page is {pgno}", offset=off)
                try:  # size passed by position: python-lz4 decodes keyword names on every call
                    page = decompress(v[off + 10:off + 10 + csize], ps)
                except lz4.block.LZ4BlockError as err:
                    raise CorruptCompression(f"page {pgno}: decompress block: {err}", offset=off + 10) from err
                if len(page) != ps:
                    raise CorruptCompression(f"page {pgno}: block decompressed to {len(page)} bytes, want {ps}",
                                             offset=off + 10)
                h = go_iso(v[off:off + 10], c)
                c = go_iso(page, h)
                if place and not taken[pgno - wlo]:
                    slot = pgno - wlo
                    taken[slot] = 1
                    win[slot * ps:(slot + 1) * ps] = page
                    after ^= c  # the chain values around the page: its own CRC follows from them
                    before ^= h
                    placed += 1
                if check_db:
                    db ^= go_iso(page, go_iso(pgno.to_bytes(4, "big")))
                prev = pgno
                off += 10 + csize
                frames += 1
        except struct.error:
            raise self._error(i, TruncatedFile("unexpected end of file in a page frame", offset=off)) from None
        except LTXError as err:
            raise self._error(i, err) from err
        if pgno == 0 and flags:
            raise self._error(i, InvalidPage("page number required", offset=off))
        if not place and snapshot and fcommit and prev != fcommit and not (prev + 1 == lock == fcommit):
            raise self._error(i, InvalidPage(f"snapshot ends at page {prev}, commit is {fcommit}", offset=off))
        self.offsets[i], self.crcs[i], self.prevs[i] = off, c, prev
        self.lengths[i] += frames * (10 + ps)  # the stream holds each frame's 10-byte head and its page
        self.frames[i] += frames
        self.db_crcs[i] ^= db
        return after, before, placed

    def stretches(self) -> list[_Stretch]:
        return [_Stretch(*t) for t in zip(self.crcs, self.lengths, self.frames, self.offsets, self.db_crcs,
                                          strict=True)]


_HIGH_BIT = bytes(b >> 7 for b in range(256))  # translate table: 1 for a varint's continuation bytes


def _check_file(mm: mmap.mmap, name: str, header: Header, stretches: Sequence[_Stretch]) -> None:
    """Combine the ranges' stretches into the file checksum and check it, the index and the trailer."""
    size = len(mm)
    c = crc(mm[:HEADER_SIZE])
    for s in stretches:
        c = crc_combine(c, s.crc, s.length)
    end = stretches[-1].end  # the end marker
    frames = sum(s.frames for s in stretches)
    try:
        index_size = int.from_bytes(mm[size - 24:size - 16], "big")
        if end + 6 + index_size != size - 24:
            raise InvalidPage(f"page index size {index_size} != {size - 24 - end - 6}", offset=end + 6)
        index = mm[end + 6:size - 24]
        entries, rest = divmod(len(index) - index.translate(_HIGH_BIT).count(1) - 1, 3)
        if index[-1:] != b"\0" or rest or entries != frames:
            raise InvalidPage(f"page index does not list the file's {frames} page frames", offset=end + 6)
        c = crc(mm[end:size - 8], c)  # end marker, index, its size, post-apply checksum
        db = None
        if header.is_snapshot and not header.no_checksum:
            db = 0
            for s in stretches:
                db ^= s.db
        check_trailer(header, Trailer.unpack(mm[size - 16:]), c, size - 16, db_crc=db)
    except LTXError as err:
        raise RestoreError(f"corrupt backup file: {name}: {err}") from err


__all__ = ["Merged", "WindowWriter", "merge"]
