"""The upload log: every accepted upload, of every database, appended to one file and made durable together.

An upload is acknowledged only once it is on disk. Written one file per upload, that costs a file creation
and an fsync each: at a few thousand databases uploading every second, the disk's flushes, not Python, set
the limit. Here concurrent uploads share one append and one `fdatasync` (group commit): while one batch is
being synced, the next gathers.

    <state>/log/<segment, 16 hex>.log      records, in acceptance order
    record = magic "LSU2" | header crc32 (u32) | crc32 (u32) | data length (u64) | cluster length (u16)
             | name length (u16) | cluster | name | data     (big-endian; empty data = the database was deleted)

The header crc32 covers the four fields after it; the other crc32 covers cluster, name and data. A record stays
live until its upload is flushed to the store. Segments roll at `segment_size` and are deleted oldest first, once
nothing in them or before them is live; so a deletion's record outlives every older upload of that database.

On open, the segments are replayed in order. A record cut short by a crash (it was never acknowledged) ends its
segment, and the segment is truncated there. A damaged record with an intact one after it is acknowledged data
lost, and the start is refused; but the bytes a whole header claims are that record's own, so an upload's data
that happens to hold a valid record is never taken for one. Records of version 1 ("LSU1": no header crc32,
written before 2026-12) are still replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from sidecar.errors import SidecarError, StorageError
from sidecar.fsutil import fsync_dir

log = structlog.get_logger("sidecar.engine")

MAGIC = b"LSU2"
HEAD = struct.Struct(">4sIIQHH")  # magic, header crc32, crc32, data length, cluster length, name length
FIELDS = struct.Struct(">IQHH")  # what the header crc32 covers
MAGIC_V1 = b"LSU1"
HEAD_V1 = struct.Struct(">4sIQHH")  # magic, crc32, data length, cluster length, name length
SEGMENT_SIZE = 64 << 20
ROLL_EMPTY = 1 << 20  # a segment this large with nothing live in it is replaced by a new one, freeing its space
IOV_MAX = 1024
SLOW_COMMIT = 0.5  # seconds: a commit slower than this is logged (the disk is struggling)


@dataclass(frozen=True, slots=True)
class Record:
    """One replayed record; `data` is a view into the mapped segment, valid while it is mapped."""

    segment: int
    offset: int
    cluster: str
    name: str
    data: memoryview


def encode_record(cluster: str, name: str, data: bytes) -> list[bytes]:
    """The record as buffers for writev (the data itself is not copied)."""
    c, n = cluster.encode(), name.encode()
    fields = FIELDS.pack(zlib.crc32(data, zlib.crc32(n, zlib.crc32(c))), len(data), len(c), len(n))
    return [MAGIC + zlib.crc32(fields).to_bytes(4, "big") + fields + c + n, data]


def _header(buf: memoryview, offset: int) -> tuple[int, int, int, int, int] | None:
    """(crc32, data length, cluster length, name length, header size) of the header at `offset`, if one is
    whole there: a version 2 header whose own crc32 matches, or a version 1 magic (it has no crc32 of its own)."""
    magic = bytes(buf[offset:offset + 4])
    if magic == MAGIC and offset + HEAD.size <= len(buf):
        _, hcrc, crc, size, clen, nlen = HEAD.unpack_from(buf, offset)
        if zlib.crc32(buf[offset + 8:offset + HEAD.size]) == hcrc:
            return crc, size, clen, nlen, HEAD.size
    elif magic == MAGIC_V1 and offset + HEAD_V1.size <= len(buf):
        _, crc, size, clen, nlen = HEAD_V1.unpack_from(buf, offset)
        return crc, size, clen, nlen, HEAD_V1.size
    return None


def read_record(segment: int, buf: memoryview, offset: int) -> tuple[Record, int] | None:
    """The whole, intact record at `offset` and where the next starts; None if there is none."""
    head = _header(buf, offset)
    if head is None:
        return None
    crc, size, clen, nlen, hsize = head
    start = offset + hsize
    end = start + clen + nlen + size
    if end > len(buf):
        return None
    c, n, data = buf[start:start + clen], buf[start + clen:start + clen + nlen], buf[start + clen + nlen:end]
    if zlib.crc32(data, zlib.crc32(n, zlib.crc32(c))) != crc:
        return None
    try:
        return Record(segment, offset, bytes(c).decode(), bytes(n).decode(), data), end
    except UnicodeDecodeError:
        return None


def read_records(path: Path, segment: int, mm: mmap.mmap) -> tuple[list[Record], int]:
    """The records of a segment, and where its torn tail (a batch cut short by a crash) starts.

    A damaged record with an intact one after it is not a torn tail but acknowledged data lost: an error.
    """
    buf = memoryview(mm)
    out, offset = [], 0
    while (found := read_record(segment, buf, offset)) is not None:
        out.append(found[0])
        offset = found[1]
    at = offset
    head = _header(buf, offset)
    if head is not None and head[4] == HEAD.size:  # a whole v2 header: the bytes it claims are its own
        at = offset + HEAD.size + head[1] + head[2] + head[3] - 1
    while (at := mm.find(MAGIC[:3], at + 1)) >= 0:
        if read_record(segment, buf, at) is not None:
            raise SidecarError(f"{path}: damaged record at offset {offset}, followed by intact records: "
                               "acknowledged uploads would be lost; restore this file from a copy or remove it "
                               "to accept the loss")
    return out, offset


class UploadLog:
    """Append with `await append(...)`; `hold`/`release` a segment per live record; `close` at the end."""

    def __init__(self, directory: Path, *, segment_size: int = SEGMENT_SIZE, commit_delay: float = 0.0,
                 sync: Callable[[int], None] = os.fdatasync,
                 writev: Callable[[int, Sequence[memoryview]], int] = os.writev) -> None:
        self.dir = directory
        self.segment_size = segment_size
        # Group commit: the first upload of a batch waits this long for others to share its fdatasync (as
        # PostgreSQL's commit_delay). At 1,000 uploads/s, 3 ms cut the server's CPU per upload by a quarter.
        self.commit_delay = commit_delay
        # The two system calls of an append, as a seam: tests pass ones that record what each sync covered, write
        # short, or fail.
        self._sync = sync
        self._writev = writev
        self._live: dict[int, int] = {}  # segment -> live records; every segment on disk has a key
        self._maps: list[mmap.mmap] = []
        self._fd = -1
        self._active = 0
        self._size = 0
        self._queue: list[tuple[list[bytes], asyncio.Future[int]]] = []
        self._committer: asyncio.Task[None] | None = None
        # Its own thread: commits never queue behind the store's writes in the default executor.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="upload-log")
        self.commits = 0  # group commits made (for metrics and tests)
        self.disk_full = False  # the last write failed for lack of space
        self._torn = False  # a failed batch could not be cut off: nothing more may follow it in this segment

    def path(self, segment: int) -> Path:
        return self.dir / f"{segment:016x}.log"

    # -- open and replay --------------------------------------------------------------------------------

    def replay(self) -> Iterator[Record]:
        """Every whole record on disk, oldest first; torn tails are cut off. Call once, before `start`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.dir.glob("*.log")):
            try:
                segment = int(path.stem, 16)
            except ValueError:
                continue
            if not path.is_file():
                continue  # not a segment: the state directory of a database `<hex>.log` of a cluster `log`
            self._live[segment] = 0
            size = path.stat().st_size
            if size == 0:
                continue
            with open(path, "r+b") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps.append(mm)
                records, good = read_records(path, segment, mm)
                if good < size:
                    log.warning("upload log: torn record dropped (it was never acknowledged)", file=str(path),
                                offset=good, bytes=size - good)
                    f.truncate(good)
                    os.fsync(f.fileno())
            yield from records

    def start(self) -> None:
        """Open a new segment for appends and delete the replayed segments that nothing holds."""
        self._active = max(self._live, default=0) + 1
        self._open_active()
        self._collect()

    def end_replay(self) -> None:
        """Unmap the replayed segments: call once nothing refers to replayed `Record.data`."""
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:
                pass  # a view still exported: the map is released when it is
        self._maps.clear()

    def _open_active(self) -> None:
        self._fd, self._size = self._open(self._active)
        self._live.setdefault(self._active, 0)

    def _open(self, segment: int) -> tuple[int, int]:
        """Open (creating it durably) a segment for appends: its descriptor and size."""
        fd = os.open(self.path(segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        return fd, size

    # -- liveness ---------------------------------------------------------------------------------------

    def hold(self, segment: int) -> None:
        self._live[segment] += 1

    def release(self, segment: int) -> None:
        self._live[segment] -= 1
        if self._live[segment] == 0:
            self._collect()

    def _collect(self) -> None:
        """Delete the oldest segments while they hold nothing (never the active one); none before `start`: while
        replaying, a segment's records after the one let go are not yet held, and later segments not yet known."""
        if self._fd < 0:
            return
        for segment in sorted(self._live):
            if segment == self._active or self._live[segment]:
                break
            self.path(segment).unlink(missing_ok=True)
            del self._live[segment]

    @property
    def segments(self) -> int:
        return len(self._live)

    @property
    def size(self) -> int:
        """Bytes of every segment on disk."""
        total = 0
        for segment in self._live:
            try:
                total += self.path(segment).stat().st_size
            except FileNotFoundError:
                pass
        return total

    # -- appends ----------------------------------------------------------------------------------------

    async def append(self, cluster: str, name: str, data: bytes) -> int:
        """Append one record and return its segment once it is durable (held: `release` it later)."""
        return await self.enqueue(cluster, name, data)

    def enqueue(self, cluster: str, name: str, data: bytes) -> asyncio.Future[int]:
        """Append one record: a future of its segment, set once the record is durable (held even if nobody awaits
        it: `release` it later). A future, not a task: the caller's work after the commit can be its callback."""
        if self._fd < 0:
            raise StorageError("upload log", "closed", retryable=False)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((encode_record(cluster, name, data), fut))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_loop())
        return fut

    async def _commit_loop(self) -> None:
        while self._queue:
            if self.commit_delay:
                await asyncio.sleep(self.commit_delay)
            batch, self._queue = self._queue, []
            # A full segment rolls; so does one whose every record has reached the store, so that its space
            # comes back at once (a small disk holds less than one segment).
            if self._torn or self._size >= self.segment_size or (
                    self._size >= ROLL_EMPTY and not self._live.get(self._active)):
                try:
                    await self._run(self._roll)
                except OSError as err:  # the batch still goes to the current segment: its size is no hard limit
                    log.warning("upload log: could not start a new segment", file=str(self.path(self._active + 1)),
                                error=str(err))
                    if self._torn:  # not after a torn batch: a replay would take what follows for its bytes
                        self._fail(batch, err)
                        continue
                self._collect()
            segment, start = self._active, self._size
            buffers = [b for bufs, _ in batch for b in bufs]
            t0 = time.perf_counter()
            try:
                await self._run(self._write, buffers)
            except OSError as err:
                self._size = start
                try:
                    os.ftruncate(self._fd, start)  # nothing of a failed batch stays to be replayed
                except OSError:
                    self._torn = True  # its tail is torn: later appends go to a new segment, or fail
                    with contextlib.suppress(OSError):
                        await self._run(self._roll)
                log.error("upload log write failed", file=str(self.path(segment)), error=str(err),
                          uploads=len(batch))
                self._fail(batch, err)
                continue
            self.commits += 1
            self.disk_full = False
            took = time.perf_counter() - t0
            if took > SLOW_COMMIT:
                log.warning("upload log: slow commit", seconds=round(took, 3), records=len(batch))
            for _, fut in batch:
                self._live[segment] += 1  # held even if the waiter is gone; its caller releases on cancel
                if not fut.done():
                    fut.set_result(segment)

    def _fail(self, batch: list[tuple[list[bytes], asyncio.Future[int]]], err: OSError) -> None:
        self.disk_full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        failure = StorageError("upload log", "the server's disk is full" if self.disk_full else
                               f"the server could not write its upload log ({err.strerror})", retryable=True)
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(failure)

    async def _run(self, fn: Callable[..., None], *args: object) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _write(self, buffers: list[bytes]) -> None:
        views = [memoryview(b) for b in buffers if b]
        i = 0
        while i < len(views):
            n = self._writev(self._fd, views[i:i + IOV_MAX])
            self._size += n
            while i < len(views) and n >= len(views[i]):
                n -= len(views[i])
                i += 1
            if n:
                views[i] = views[i][n:]  # a short write: go on from inside this buffer
        self._sync(self._fd)

    def _roll(self) -> None:
        """Append to a new segment; if it cannot be created, nothing changes (the current one stays open)."""
        fd, size = self._open(self._active + 1)
        os.close(self._fd)
        self._fd, self._size = fd, size
        self._active += 1
        self._torn = False
        self._live.setdefault(self._active, 0)

    def abandon(self) -> None:
        """Close without waiting or cleaning up, as a crash would."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._thread.shutdown(wait=False)

    async def close(self) -> None:
        """Wait for the batch being committed, then close the active segment."""
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._thread.shutdown(wait=True)
        self._collect_all_done()

    def _collect_all_done(self) -> None:
        if self._live and all(v == 0 for v in self._live.values()):
            for segment in list(self._live):
                self.path(segment).unlink(missing_ok=True)
                del self._live[segment]
