"""Build one LTX file from inputs and put it in the store: the only place the engine writes data objects.

Flushes (pending uploads → L0) and compactions (a level's files → the next) both end here. The output is
LTX v3 with the no-checksum flag Litestream requires, carrying LiteFS's database checksums in the header
extension (docs/format.md §2.1). Every object is written with `If-None-Match: *`: no writer, however stale,
can replace a file another wrote (docs/format.md §5). Before each write the `fence` is asked whether this
engine may still write the database (engine/lease.py); it raises when it may not.

Flushes are built in memory (their inputs already are, at most 64 MiB: flush.py), so the HWM moves even on a full
disk; compactions' larger outputs go to a temporary file under the state directory, one at a time.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

from sidecar.engine.database import Database
from sidecar.engine.index import FileEntry
from sidecar.fsutil import map_files
from sidecar.ltx import FLAG_NO_CHECKSUM, Header, Trailer, Version
from sidecar.ltx.compactor import compact
from sidecar.storage.base import Storage

SMALL = 4 << 20  # inputs up to this size are compacted in memory, without a temporary file
THREAD = 256 << 10  # inputs above this size are compacted in a worker thread

Fence = Callable[[Database], Awaitable[float | None]]  # raises if no write may start; else the seconds it may take
Timed = Callable[[int, float], None]


async def _no_fence(db: Database) -> float | None:
    return None


class Builder:
    """Compact inputs into one v3 file of a level and store it; returns its index entry."""

    def __init__(self, storage: Storage, tmpdir: Path, *, fence: Fence = _no_fence,
                 timed: Timed | None = None) -> None:
        self.storage = storage
        self.tmpdir = tmpdir
        self.fence = fence
        self.timed = timed
        self._big = asyncio.Semaphore(1)  # one large output on local disk at a time

    def key(self, db: Database, entry: FileEntry) -> str:
        return self.storage.layout.ltx_key(db.prefix, entry.level, entry.min_txid, entry.max_txid)

    async def build(self, db: Database, level: int, inputs: Sequence[Path | bytes], version: Version, *,
                    in_memory: bool = False) -> FileEntry:
        """Merge local files or uploads (all of `version`, in TXID order) into one file of `level` in the store.
        `in_memory` builds it in memory whatever its size (flushes: their inputs are in memory already, bounded,
        and a flush must work on a full disk)."""
        t0 = time.perf_counter()
        size = sum(len(i) if isinstance(i, bytes) else os.stat(i).st_size for i in inputs)
        if size <= SMALL or in_memory:
            out = io.BytesIO()
            if size > THREAD:
                header, _ = await asyncio.to_thread(compact_inputs, inputs, out, version)
            else:
                header, _ = compact_inputs(inputs, out, version)
            data = out.getvalue()
            entry = FileEntry.from_header(level, header, len(data))
            await self._fenced(db, self.storage.put_bytes(self.key(db, entry), data, timestamp=header.timestamp,
                                                          if_none_match=True))
        else:
            async with self._big:
                self.tmpdir.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(prefix="build-", suffix=".ltx", dir=self.tmpdir)
                os.close(fd)
                tmp = Path(name)
                try:
                    header, _ = await asyncio.to_thread(_compact_file, inputs, tmp, version)
                    entry = FileEntry.from_header(level, header, tmp.stat().st_size)
                    await self._fenced(db, self.storage.put_file(self.key(db, entry), tmp,
                                                                 timestamp=header.timestamp, if_none_match=True))
                finally:
                    tmp.unlink(missing_ok=True)
        if self.timed:
            self.timed(level, time.perf_counter() - t0)
        return entry


    async def _fenced(self, db: Database, write: Coroutine[Any, Any, object]) -> None:
        """Run a write to the store while this engine may write `db`: it ends while the lease holds, or not at all.
        The fence is asked again each time the seconds it gave run out, so a write longer than the lease's TTL goes
        on while the lease is renewed, and is cancelled (the fence's error raised) once it is not."""
        try:
            left = await self.fence(db)
        except BaseException:
            write.close()  # never started
            raise
        task = asyncio.ensure_future(write)
        try:
            while not (await asyncio.wait([task], timeout=left))[0]:
                left = await self.fence(db)
            task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def compact_inputs(inputs: Sequence[Path | bytes], dst: BinaryIO, version: Version) -> tuple[Header, Trailer]:
    """Compact local files or uploads (all of `version`) into one v3 no-checksum file with extension checksums."""
    with ExitStack() as stack:
        paths = [i for i in inputs if isinstance(i, Path)]
        maps = iter(map_files(stack, paths))
        srcs = [next(maps) if isinstance(i, Path) else i for i in inputs]
        return compact(srcs, dst, version=version, flags=FLAG_NO_CHECKSUM, out_version=Version.V3,
                       allow_overlap=True)


def _compact_file(inputs: Sequence[Path | bytes], out: Path, version: Version) -> tuple[Header, Trailer]:
    """As `compact_inputs`, into the file `out` (not fsynced: the store's put makes the copy it keeps durable)."""
    with open(out, "wb") as dst:
        return compact_inputs(inputs, dst, version)


__all__ = ["Builder", "compact_inputs"]
