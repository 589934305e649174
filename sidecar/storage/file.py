"""A local directory as object storage: the embedded default (`file:///path`).

Writes are atomic and durable: a temp file (`.<name>.<random>.tmp`, never listed) in the target's
directory, made durable, then renamed (or, for `if_none_match`, hard-linked, which fails if the name exists),
and the name made durable. Durable means an fsync of the file and then of its directory, or, on Linux 5.8 and
later, a syncfs of the store's file system shared by every write waiting for one (`GroupSync`, a group
commit; it also writes back whatever else is dirty on that file system). An LTX file's timestamp is its mtime,
as Litestream reads it.

Conditional writes hold the semantics S3 gives them, across processes on this host: `if_none_match` is a
`link(2)`, atomic by itself; `if_match` compares and replaces under an exclusive `flock` of
`.<name>.lock` beside the object. An ETag is the object's inode, ctime and size: any replacement changes it.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import fcntl
import functools
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sidecar.errors import NotFound, PreconditionFailed, StorageError
from sidecar.fsutil import GroupSync, fsync_dir
from sidecar.storage.base import ObjectInfo, RequestStats
from sidecar.storage.layout import FILE_LAYOUT

_BIG = 1 << 20  # files above this size are read in a worker thread
_INLINE = 256 << 10  # writes up to this size make their file calls on the loop (see put_bytes)
# While more than one write is under way, a syncfs starts no sooner than this after the last one began, so that more
# join it: each costs a worker thread's GIL handoffs, which on a busy server cost more than the syncfs itself (the
# flushes of a thousand databases made 260 a second; gathered, 42). A lone writer never waits.
GATHER = 0.025
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def etag_of(st: os.stat_result) -> str:
    """The ETag of a stored file: changes whenever the file is replaced or rewritten."""
    return f"{st.st_ino:x}-{st.st_ctime_ns:x}-{st.st_size:x}"


def _timed(op: str) -> Callable[[F], F]:
    """Record each call of a FileStorage method in its `stats` under `op`."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def timed(self: FileStorage, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            ok = False
            try:
                result = await fn(self, *args, **kwargs)
                ok = True
                return result
            finally:
                self.stats.record(op, time.perf_counter() - t0, ok)
        return timed  # type: ignore[return-value]
    return wrap


class FileStorage:
    """Objects are files under `root`; keys are relative paths."""

    layout = FILE_LAYOUT

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"
        self.stats = RequestStats()
        self._group: GroupSync | None = None
        self._group_opened = False
        self._waiting: builtins.list[asyncio.Future[None]] = []  # writers waiting for the next syncfs
        self._syncing: asyncio.Task[None] | None = None
        self._sync_began = -GATHER  # when the last syncfs began (monotonic)
        self._inline = 0  # writes in `_put_inline`

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or "\x00" in key or any(p in ("", ".", "..") for p in parts):
            raise StorageError(key, "invalid key: empty, absolute, or escaping the store")
        return self.root.joinpath(*parts)

    async def check_conditional_writes(self) -> None:
        """Nothing to check: this module enforces them itself (`link(2)`, `flock`)."""

    # A write is staged (written to a temp file beside its key), made durable, published (linked or renamed to its
    # key), and its name made durable. Durability is a group commit where the kernel reports syncfs errors
    # (`GroupSync`: one syncfs for every write waiting, in a worker thread), else an fsync of the file and of its
    # directory. A small write that needs no lock (`put_bytes` of up to `_INLINE` bytes, not compare-and-replace,
    # into a directory on the group's file system) makes its file calls on the loop, microseconds
    # each, and waits for the group's syncfs without holding a
    # thread: the flushes of a thousand databases share a few syncfs calls a second, where each would otherwise
    # cost two fsyncs and a worker thread's GIL handoffs per system call. Other writes run whole in a worker thread.

    @_timed("put")
    async def put_file(self, key: str, path: str | os.PathLike[str], *, timestamp: int | None = None,
                       if_none_match: bool = False, if_match: str | None = None) -> str:
        return await asyncio.to_thread(self._put, key, None, Path(path), timestamp, if_none_match, if_match,
                                       self._group if self._grouped() else None)

    @_timed("put")
    async def put_bytes(self, key: str, data: bytes, *, timestamp: int | None = None,
                        if_none_match: bool = False, if_match: str | None = None) -> str:
        group = self._group if self._grouped() else None
        if group is not None and if_match is None and len(data) <= _INLINE:
            dst = self._path(key)
            try:
                made = _makedirs(dst.parent)
                here = os.stat(dst.parent).st_dev == group.dev
            except OSError as err:
                raise _write_failed(key, err) from err
            if here:
                return await self._put_inline(key, dst, data, timestamp, if_none_match, group, made)
        return await asyncio.to_thread(self._put, key, data, None, timestamp, if_none_match, if_match, group)

    def _grouped(self) -> bool:
        """Whether writes under the root are made durable by a GroupSync (opened at the first write: the root
        may not exist before)."""
        if not self._group_opened:
            try:
                self._group = GroupSync.open(self.root)
            except FileNotFoundError:
                return False  # the first write makes the root: its fsyncs cover it
            self._group_opened = True
        return self._group is not None

    async def _put_inline(self, key: str, dst: Path, data: bytes, timestamp: int | None, if_none_match: bool,
                          group: GroupSync, made: builtins.list[Path]) -> str:
        """A small write whose directory is on the group's file system (`made`: the directories just made for it):
        its file calls on the loop."""
        self._inline += 1
        try:
            tmp, made, covered = self._stage(dst, data, None, timestamp, group, made)
            try:
                if covered is not None:
                    await self._sync()  # the data, before any name points at it
                self._publish(key, tmp, dst, if_none_match, None)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if covered is not None:
                await self._sync()  # the name, and any directory made for it
            else:  # its directory was replaced by a mount since it was checked: fsynced as before
                await asyncio.to_thread(_fsync_dirs, [dst.parent, *made])
            return etag_of(dst.stat())
        except OSError as err:
            raise _write_failed(key, err) from err
        finally:
            self._inline -= 1

    async def _sync(self) -> None:
        """Wait for a syncfs that begins after this call: writers arriving while one runs share the next."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if self._syncing is None or self._syncing.done() or self._syncing.get_loop() is not loop:
            self._waiting = []
            self._syncing = loop.create_task(self._sync_waiting(), name=f"syncfs {self.root}")
        self._waiting.append(done)
        await done

    async def _sync_waiting(self) -> None:
        assert self._group is not None
        await asyncio.sleep(0)  # let the writers ready to wait join the first syncfs
        while self._waiting:
            wait = self._sync_began + GATHER - time.monotonic()
            if wait > 0 and self._inline > 1:  # other writes under way: more will want one
                await asyncio.sleep(wait)
            waiting, self._waiting = self._waiting, []
            self._sync_began = time.monotonic()
            try:
                await asyncio.to_thread(self._group.sync)
            except OSError as err:
                for w in waiting:
                    if not w.done():
                        w.set_exception(OSError(err.errno, err.strerror))
            except BaseException as err:  # cancelled (the loop is closing), or no thread to run it: none waits on
                for w in [*waiting, *self._waiting]:
                    if w.done():
                        continue
                    if isinstance(err, Exception):
                        w.set_exception(err)
                    else:
                        w.cancel()
                self._waiting = []
                if not isinstance(err, Exception):
                    raise
                return
            else:
                for w in waiting:
                    if not w.done():
                        w.set_result(None)

    def _put(self, key: str, data: bytes | None, src: Path | None, timestamp: int | None, if_none_match: bool,
             if_match: str | None, group: GroupSync | None) -> str:
        """A whole write, in a worker thread."""
        dst = self._path(key)
        try:
            tmp, made, covered = self._stage(dst, data, src, timestamp, group)
            try:
                if covered is not None:
                    covered.sync()  # the data, before any name points at it
                self._publish(key, tmp, dst, if_none_match, if_match)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if covered is not None:
                covered.sync()  # the name, and any directory made for it
            else:
                _fsync_dirs([dst.parent, *made])
            return etag_of(dst.stat())
        except OSError as err:
            raise _write_failed(key, err) from err

    @staticmethod
    def _stage(dst: Path, data: bytes | None, src: Path | None, timestamp: int | None, group: GroupSync | None,
               made: builtins.list[Path] | None = None) -> tuple[Path, builtins.list[Path], GroupSync | None]:
        """Write the temp file for `dst`; return it, the directories made for it (`made`: made by the caller
        already), and `group` if that makes it durable (it is on the group's file system), else None: the file is
        then fsynced here."""
        if made is None:
            made = _makedirs(dst.parent)
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        except FileNotFoundError:  # a delete pruned the directory just made empty: make it again
            made = _makedirs(dst.parent)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                if group is not None and not group.covers(f.fileno()):
                    group = None
                if data is not None:
                    f.write(data)
                else:
                    assert src is not None
                    with open(src, "rb") as s:
                        shutil.copyfileobj(s, f, 1 << 20)
                f.flush()
                if timestamp is not None:
                    ns = timestamp * 1_000_000
                    os.utime(f.fileno(), ns=(ns, ns))
                if group is None:
                    os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, made, group

    @staticmethod
    def _publish(key: str, tmp: Path, dst: Path, if_none_match: bool, if_match: str | None) -> None:
        """Give the staged file its key: a link that fails if the key exists, a replace under the key's lock if
        its ETag is `if_match`, else a rename."""
        if if_none_match:
            try:
                os.link(tmp, dst)
            except FileExistsError:
                raise PreconditionFailed(key) from None
            tmp.unlink()
        elif if_match is not None:
            with _locked(dst):
                try:
                    current = etag_of(dst.stat())
                except FileNotFoundError:
                    raise PreconditionFailed(key, "precondition failed: the object is gone") from None
                if current != if_match:
                    raise PreconditionFailed(key)
                os.replace(tmp, dst)
        else:
            os.replace(tmp, dst)

    @_timed("get")
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

    @_timed("get")
    async def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes, str] | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                tag = etag_of(os.fstat(f.fileno()))
                if tag == etag:
                    return None
                return f.read(), tag
        except FileNotFoundError:
            raise NotFound(key) from None
        except OSError as err:
            raise StorageError(key, f"read failed: {err}") from err

    @_timed("get")
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

    async def stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise NotFound(key) from None
        with f:
            while chunk := await asyncio.to_thread(f.read, chunk_size):
                yield chunk

    @_timed("get")
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

    async def local_files(self, keys: Sequence[str], tmpdir: Path) -> builtins.list[Path]:
        paths = [self._path(k) for k in keys]
        for key, path in zip(keys, paths, strict=True):
            if not path.is_file():
                raise NotFound(key)
        return paths

    @_timed("head")
    async def head(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            raise NotFound(key) from None
        return ObjectInfo(key, st.st_size, st.st_mtime_ns // 1_000_000, etag_of(st))

    @_timed("list")
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
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
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
                out.append(ObjectInfo(key, st.st_size, st.st_mtime_ns // 1_000_000, etag_of(st)))
        out.sort(key=lambda o: o.key)
        return out

    @_timed("delete")
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
        changed = set()
        for d in dirs:
            removed = self._prune(d)  # as on S3, a prefix with no object left is no directory either
            changed.add(removed[-1].parent if removed else d)
        for d in changed:
            if d.exists():
                fsync_dir(d)

    def _prune(self, directory: Path) -> builtins.list[Path]:
        """Remove `directory` and its parents below the root while they are empty; return those removed."""
        removed = []
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): stop here
                break
            removed.append(directory)
            directory = directory.parent
        return removed

    async def close(self) -> None:
        if self._group is not None:
            syncing = self._syncing
            if syncing is not None and not syncing.done() and syncing.get_loop() is asyncio.get_running_loop():
                await asyncio.wait([syncing])  # the writes waiting for it
            self._group.close()
        self._group, self._group_opened = None, False


def _fsync_dirs(dirs: builtins.list[Path]) -> None:
    for d in dirs:
        fsync_dir(d)


def _write_failed(key: str, err: OSError) -> StorageError:
    return StorageError(key, f"write failed: {err}", retryable=err.errno in (errno.ENOSPC, errno.EDQUOT))


class _locked:
    """An exclusive flock on `.<name>.lock` beside `path`, for compare-and-replace."""

    def __init__(self, path: Path) -> None:
        self.lock = path.with_name(f".{path.name}.lock")
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


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

