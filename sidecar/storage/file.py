"""A local directory as object storage: the embedded default (`file:///path`).

Writes are atomic and durable: a temp file (`.<name>.<random>.tmp`, never listed) in the target's
directory, fsync, rename, fsync of the directory. An LTX file's timestamp is its mtime, as Litestream
reads it.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from sidecar.errors import NotFound, StorageError
from sidecar.fsutil import fsync_dir
from sidecar.storage.base import ObjectInfo

_BIG = 1 << 20  # files above this size are read in a worker thread


class FileStorage:
    """Objects are files under `root`; keys are relative paths."""

    kind = "file"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or "\x00" in key or any(p in ("", ".", "..") for p in parts):
            raise StorageError(key, "invalid key: empty, absolute, or escaping the store")
        return self.root.joinpath(*parts)

    # Writes always run in a worker thread: however small, they end in fsyncs, which must not stall the loop.

    async def put_file(self, key: str, path: str | os.PathLike[str], *, timestamp: int | None = None) -> None:
        await asyncio.to_thread(self._put, self._path(key), key, None, Path(path), timestamp)

    async def put_bytes(self, key: str, data: bytes, *, timestamp: int | None = None) -> None:
        await asyncio.to_thread(self._put, self._path(key), key, data, None, timestamp)

    def _put(self, dst: Path, key: str, data: bytes | None, src: Path | None, timestamp: int | None) -> None:
        try:
            made = _makedirs(dst.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    if data is not None:
                        f.write(data)
                    else:
                        assert src is not None
                        with open(src, "rb") as s:
                            shutil.copyfileobj(s, f, 1 << 20)
                    f.flush()
                    os.fsync(f.fileno())
                if timestamp is not None:
                    ns = timestamp * 1_000_000
                    os.utime(tmp, ns=(ns, ns))
                os.replace(tmp, dst)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            for d in [dst.parent, *made]:
                fsync_dir(d)
        except OSError as err:
            raise StorageError(key, f"write failed: {err}", retryable=False) from err

    async def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            if path.stat().st_size > _BIG:
                return await asyncio.to_thread(path.read_bytes)
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(key) from None
        except OSError as err:
            raise StorageError(key, f"read failed: {err}") from err

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise NotFound(key) from None
        except OSError as err:
            raise StorageError(key, f"read failed: {err}") from err

    async def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes, str] | None:
        # The ETag comes from the open file's own fstat, so it always describes the bytes returned: a
        # replace (temp file + rename) makes a new inode.
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                tag = f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"
                if tag == etag:
                    return None
                return f.read(), tag
        except FileNotFoundError:
            raise NotFound(key) from None
        except OSError as err:
            raise StorageError(key, f"read failed: {err}") from err

    async def stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise NotFound(key) from None
        with f:
            while chunk := await asyncio.to_thread(f.read, chunk_size):
                yield chunk

    async def download(self, key: str, path: str | os.PathLike[str]) -> int:
        src = self._path(key)
        dst = Path(path)
        tmp = dst.with_name(f".{dst.name}.tmp")
        try:
            await asyncio.to_thread(shutil.copyfile, src, tmp)
            os.replace(tmp, dst)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            raise NotFound(key) from None
        return dst.stat().st_size

    async def head(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            raise NotFound(key) from None
        return ObjectInfo(key, st.st_size, st.st_mtime_ns // 1_000_000)

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return await asyncio.to_thread(self._list, prefix)

    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        out = []
        base = self.root
        # Walk only the directory the prefix names, when it names one.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = base.joinpath(*head.split("/")) if head else base
        if not start.is_dir():
            return []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            for name in filenames:
                if name.startswith("."):
                    continue  # temp files
                full = Path(dirpath) / name
                key = full.relative_to(base).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue
                out.append(ObjectInfo(key, st.st_size, st.st_mtime_ns // 1_000_000))
        out.sort(key=lambda o: o.key)
        return out

    async def delete(self, keys: Sequence[str]) -> None:
        dirs = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink()
                dirs.add(path.parent)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise StorageError(key, f"delete failed: {err}") from err
        for d in dirs:
            fsync_dir(d)

    async def close(self) -> None:
        return None


def _makedirs(path: Path) -> builtins.list[Path]:
    """Create missing directories; return the parents whose entries changed (to fsync)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not missing:
        return []
    path.mkdir(parents=True, exist_ok=True)
    return [m.parent for m in missing]
