"""Small file-system helpers shared by the storage, the engine, the sidecar and the emulator."""

from __future__ import annotations

import mmap
import os
import tempfile
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


__all__ = ["close_map", "fsync_dir", "map_files", "write_atomically"]
