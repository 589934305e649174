"""Small file-system helpers shared by the storage, the engine, the sidecar and the emulator."""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a file created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kernel_reports_syncfs_errors() -> bool:
    """Linux 5.8 and later: earlier kernels' syncfs(2) returned 0 even when writeback failed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        major, minor = (int(x) for x in platform.release().split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


_LIBC = ctypes.CDLL(None, use_errno=True) if _kernel_reports_syncfs_errors() else None


class GroupSync:
    """Makes the writes of many threads durable with one syncfs(2) for all of them: a group commit.

    `sync()` returns once a syncfs of the file system holding `root` that began after the call has ended
    without an error; every write made before the call, file data and directory entries alike, is then on
    stable storage, as if each file and each directory it changed had been fsynced. Callers that arrive while a
    syncfs runs share the next one, so N concurrent writers cost about two syncfs calls, not 2N fsyncs.

    Only files on the same file system as `root` are covered (`covers`). The cost is a syncfs: it also writes
    back whatever else is dirty on that file system. `GroupSync.open` returns None where syncfs is not known to
    report errors (before Linux 5.8, or not Linux): fsync each file there.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.dev = os.fstat(fd).st_dev
        self._cond = threading.Condition()
        self._started = 0  # syncs begun; one runs at a time, so they also end in this order
        self._ended = 0
        self._running = False
        self._failed: dict[int, OSError] = {}  # recent syncs that failed, by number

    @classmethod
    def open(cls, root: Path) -> GroupSync | None:
        if _LIBC is None:
            return None
        return cls(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    def covers(self, fd: int) -> bool:
        """Whether the open file `fd` is on the file system this syncs."""
        return os.fstat(fd).st_dev == self.dev

    def sync(self) -> None:
        """Block until every write made before this call is durable; OSError if the syncfs covering it failed."""
        with self._cond:
            want = self._started + 1  # the first syncfs to begin after this call
            while self._ended < want:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started = n = self._started + 1
                self._cond.release()
                try:
                    err = 0 if _LIBC.syncfs(self._fd) == 0 else ctypes.get_errno()  # type: ignore[union-attr]
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._ended = n
                    self._cond.notify_all()
                if err:
                    self._failed[n] = OSError(err, f"syncfs: {os.strerror(err)}")
                    while len(self._failed) > 256:
                        del self._failed[min(self._failed)]
            failure = self._failed.get(want)
        if failure is not None:
            raise OSError(failure.errno, failure.strerror)

    def close(self) -> None:
        os.close(self._fd)


@contextmanager
def atomic_output(path: Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Write `path` through a temp file beside it, renamed over `path` only if the block ends without an error
    (the temp file is removed otherwise): a reader, or a crash, sees the old file or the new one, never a mix.
    `durable` fsyncs the file before the rename and the directory after it; `durable=False` skips both (the
    emulator's "LiteFS without fsync" mode)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # writers never share one
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomically(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Replace the small file `path` with `data` as one step (`atomic_output`), making its directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, durable=durable) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def map_files(stack: ExitStack, paths: Sequence[Path]) -> list[mmap.mmap]:
    """Map each file read-only; the maps close when `stack` does."""
    maps = []
    for path in paths:
        f = stack.enter_context(open(path, "rb"))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        stack.callback(close_map, mm)
        maps.append(mm)
    return maps


def close_map(mm: mmap.mmap) -> None:
    """Close a map; one whose buffer is still exported (a view on an error path) is left to the GC."""
    try:
        mm.close()
    except BufferError:
        pass  # a decoder's page view outlives the map only on error paths; GC releases it


__all__ = ["GroupSync", "close_map", "fsync_dir", "map_files", "write_atomically"]
