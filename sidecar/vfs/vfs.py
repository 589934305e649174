"""The SQLite VFS: APSW calls these methods from SQLite's thread; the backup is read on an event loop thread.

    SQLite ── xOpen/xLock/xRead/xFileControl ──▶ BackupFile ── pinned View ──▶ page cache (hit: same thread)
                                                     │ miss: run_coroutine_threadsafe(...).result()
                                                     ▼
                                  LoopThread: Backup (Source, FileIndexes, follower task) ──▶ store / server

One `BackupVFS` per process owns one event loop thread, and one `Backup` per URL (shared by every
connection to it: its source, page cache, read indexes and follower). Each connection's file pins one
`View` (one TXID) from the moment SQLite takes the shared lock that starts a read transaction until it
drops it; only then, at the next transaction's start, does it move to the follower's newest view or to a
target a pragma set. A file that vanished (compaction or retention deleted it) is planned around: the same
TXID is planned again from the files that now exist and the read goes on; when that TXID can no longer be
rebuilt, a transaction that has not read anything yet moves to the target's new plan, and one that has gets
SQLITE_BUSY (the next transaction re-plans).

URI parameters: `txid=HEX`, `timestamp=RFC3339`, `follow=1`. Pragmas, per connection:
`litefs_txid` and `litefs_timestamp` (read the state's TXID/time, or set a target: a value, or `latest`),
`litefs_lag` (seconds since the state read was last known to be the newest stored one; for a
time-travel target, since it was planned).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import apsw
import structlog

from sidecar.engine.head import Head
from sidecar.errors import NotFound, RestoreError, SidecarError
from sidecar.ltx import LTXError, format_timestamp
from sidecar.storage.base import parse_rfc3339
from sidecar.vfs.source import PageServer, Source, Stats, open_source
from sidecar.vfs.view import FileIndex, PageCache, View

log = structlog.get_logger("sidecar.vfs")

T = TypeVar("T")
VFS_NAME = "litefs-sidecar"
FOLLOW_WAIT = 30.0  # seconds a long-poll waits for a change
_NONE, _SHARED = apsw.SQLITE_LOCK_NONE, apsw.SQLITE_LOCK_SHARED


class LoopThread:
    """An asyncio event loop running in its own thread; other threads hand it coroutines and wait."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for its result (or exception)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("LoopThread.call from its own thread would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class Target:
    """What a connection reads: the latest state (followed or not), a TXID, or a time."""

    def __init__(self, txid: int | None = None, timestamp: int | None = None, follow: bool = False) -> None:
        if txid is not None and timestamp is not None:
            raise SidecarError("give a TXID or a timestamp, not both")
        if follow and (txid is not None or timestamp is not None):
            raise SidecarError("follow reads the latest state: it takes no TXID or timestamp")
        self.txid, self.timestamp, self.follow = txid, timestamp, follow

    @property
    def latest(self) -> bool:
        return self.txid is None and self.timestamp is None

    @classmethod
    def parse(cls, txid: str | None = None, timestamp: str | None = None, follow: bool = False) -> Target:
        """From text: a hex TXID, an RFC 3339 time; SidecarError naming the bad one."""
        return cls(_parse_txid(txid) if txid else None, _parse_time(timestamp) if timestamp else None, follow)


class Backup:
    """One database's backup, shared by every connection to its URL: source, caches, follower."""

    def __init__(self, source: Source, cache_bytes: int, *, remote: bool = False) -> None:
        self.source = source
        self.remote = remote  # the source resolves pages (a server): no page index is read here
        self.cache = PageCache(cache_bytes)
        self.indexes: dict[str, FileIndex] = {}
        self.latest: View | None = None  # the newest state known (kept current while someone follows)
        self.confirmed = 0.0  # wall time when `latest` was last known to be the newest stored state
        self.superseded: dict[int, float] = {}  # id(view) -> when a newer state was seen
        self.views: list[View] = []  # every view pinned by an open file, for pruning `indexes`
        self.followers = 0
        self._follower: asyncio.Task[None] | None = None

    async def view(self, target: Target) -> View:
        """A view of `target`, planned now (a follower's newest view, when one is being kept current)."""
        if target.follow and self._follower is not None and self.latest is not None:
            return self.latest
        head = await self.source.plan(txid=target.txid, timestamp=target.timestamp)
        try:
            view = await self.view_of(head)
        except NotFound:
            if not target.latest:
                raise
            view = await self.view_of(await self._listed(head))
        if target.latest:
            self._install(view)
        return view

    async def view_at(self, txid: int) -> View:
        """The same TXID planned again from the files that exist now (after a file vanished)."""
        self.indexes.clear()  # some of their files are gone; views that hold them keep their own references
        return await self.view_of(await self.source.plan(txid=txid))

    async def view_of(self, head: Head) -> View:
        if self.latest is not None and self.latest.head == head:
            return self.latest
        return await View.open(head, self.source, self.cache, self.indexes, remote=self.remote)

    async def _listed(self, head: Head) -> Head:
        """The latest state planned from the files, when `head` (from the head object) names one that is gone: the
        object is stale (its write failed and retention ran since, or retention ran while this reader planned)."""
        log.info("the head object names a deleted file; planning by LIST", url=self.source.url,
                 txid=f"{head.txid:016x}")
        return await self.source.plan(listed=True)

    def _install(self, view: View) -> None:
        now = time.time()
        if self.latest is not None and self.latest is not view:
            self.superseded[id(self.latest)] = now
        self.latest = view
        self.confirmed = now
        self.prune()

    def prune(self) -> None:
        """Forget the indexes of files no open view uses."""
        used = {k for v in [*self.views, *([self.latest] if self.latest else [])] for k in v.keys}
        for key in [k for k in self.indexes if k not in used]:
            del self.indexes[key]
        live = {id(v) for v in self.views}
        self.superseded = {k: t for k, t in self.superseded.items() if k in live}

    def lag(self, view: View) -> float:
        if view is self.latest:
            return max(0.0, time.time() - self.confirmed)
        return max(0.0, time.time() - self.superseded.get(id(view), self.confirmed))

    # -- following ------------------------------------------------------------------------------------

    def start_following(self) -> None:
        self.followers += 1
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow(), name="vfs-follower")

    async def stop_following(self) -> None:
        self.followers -= 1
        if self.followers == 0 and self._follower is not None:
            task, self._follower = self._follower, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self) -> None:
        """Keep `latest` current: one long-poll per change from a server, one conditional GET per poll from a
        store. Failures are logged once per streak and retried with backoff; readers keep their view."""
        tag: str | None = None
        failures = 0
        while True:
            try:
                asked = time.time()
                got = await self.source.follow(tag, FOLLOW_WAIT)
                if got is not None:
                    head, new_tag = got
                    try:
                        view = await self.view_of(head)
                    except NotFound:
                        view = await self.view_of(await self._listed(head))
                    self._install(view)
                    tag = new_tag  # only once its view is ready: a failure asks again
                self.confirmed = asked
                failures = 0
            except (SidecarError, LTXError, OSError) as err:  # LTXError: a stored file's header is unreadable
                failures += 1
                if failures == 1:
                    log.warning("following failed; retrying", url=self.source.url, error=str(err))
                await asyncio.sleep(random.uniform(0, min(10.0, 0.2 * 2 ** failures)))

    async def close(self) -> None:
        if self._follower is not None:
            self.followers = 1
            await self.stop_following()
        await self.source.close()


class BackupFile(apsw.VFSFile):
    """One connection's database file: a pinned view of one backup."""

    def __init__(self, vfs: BackupVFS, backup: Backup, target: Target) -> None:
        self.vfs = vfs
        self.backup = backup
        self.target = target
        self.lock = _NONE
        self.reads = 0  # xRead calls since the transaction began
        self.replan = False  # the pinned TXID became unreadable: plan the target again at the next start
        self.next_view: View | None = None  # set by a pragma during a transaction
        # Page 1's change counter is the TXID plus `salt`; `shown` is the counter SQLite last read and the state
        # it stood for. Back at that TXID in another history (a database started over), the salt changes:
        # equal counters would keep SQLite's page cache of the old database.
        self.salt = 0
        self.shown: tuple[int, tuple[int, int, int]] | None = None
        self.view = vfs.loop.call(backup.view(target))
        backup.views.append(self.view)
        if target.follow:
            vfs.loop.call(_start_following(backup))

    def _pin(self, view: View) -> None:
        """Read `view` from now on (the backup keeps the indexes of pinned views' files)."""
        if self.shown is not None and _state(view) != self.shown[1] and self._counter(view) == self.shown[0]:
            self.salt += 1
        if self.view is not view:
            if self.view in self.backup.views:
                self.backup.views.remove(self.view)
            self.backup.views.append(view)
        self.view = view

    # -- transactions ---------------------------------------------------------------------------------

    def xLock(self, level: int) -> None:
        if self.lock == _NONE and level >= _SHARED:
            self._begin()
        self.lock = level

    def xUnlock(self, level: int) -> None:
        self.lock = level

    def xCheckReservedLock(self) -> bool:
        return False

    def _begin(self) -> None:
        """A read transaction starts: choose the view it will see, whole."""
        self.reads = 0
        if self.next_view is not None:
            view, self.next_view = self.next_view, None
        elif self.replan:
            view = self.vfs.loop.call(self.backup.view(self.target))
        elif self.target.follow and self.backup.latest is not None:
            view = self.backup.latest
        else:
            return
        self.replan = False
        self._pin(view)

    # -- reads ----------------------------------------------------------------------------------------

    def _counter(self, view: View) -> int:
        return (view.head.txid + self.salt) & 0xFFFFFFFF

    def xRead(self, amount: int, offset: int) -> bytes:
        self.reads += 1
        data = self.view.read_cached(offset, amount, self.salt)
        if data is None:
            try:
                data = self.vfs.loop.call(self.view.read(offset, amount, self.salt))
            except NotFound as err:
                data = self._read_after_vanish(err, amount, offset)
        if offset < 28 and offset + amount > 24:  # the change counter (bytes 24-27) was read
            self.shown = (self._counter(self.view), _state(self.view))
        return data

    def _read_after_vanish(self, err: NotFound, amount: int, offset: int) -> bytes:
        """A file of the pinned plan is gone: read the same TXID from the files that exist now."""
        txid = self.view.head.txid
        log.info("file vanished; planning the same TXID again", key=err.key, txid=f"{txid:016x}")
        try:
            again = self.vfs.loop.call(self.backup.view_at(txid))
            old, new = self.view.head.post_apply_checksum, again.head.post_apply_checksum
            if old and new and old != new:  # the database was started over: another state at this TXID
                raise RestoreError(f"TXID {txid:016x} now holds another state")
            self._pin(again)
        except RestoreError:
            if self.reads > 1 or self.lock == _NONE:
                self.replan = True
                raise apsw.BusyError(f"TXID {txid:016x} can no longer be read ({err.key} was deleted by "
                                     "compaction or retention); retry the transaction") from None
            self._pin(self.vfs.loop.call(self.backup.view(self.target)))  # nothing read yet: move on
        return self.vfs.loop.call(self.view.read(offset, amount, self.salt))

    def xFileSize(self) -> int:
        return self.view.size

    def xSectorSize(self) -> int:
        return 4096

    def xDeviceCharacteristics(self) -> int:
        return 0

    def xWrite(self, data: bytes, offset: int) -> None:
        raise apsw.ReadOnlyError("a backup is read-only")

    def xTruncate(self, newsize: int) -> None:
        raise apsw.ReadOnlyError("a backup is read-only")

    def xSync(self, flags: int) -> None:
        return None

    def xClose(self) -> None:
        if self.view in self.backup.views:
            self.backup.views.remove(self.view)
        if self.target.follow and not self.vfs.loop.loop.is_closed():  # after vfs.close(), nothing follows
            self.vfs.loop.call(self.backup.stop_following())

    # -- pragmas --------------------------------------------------------------------------------------

    def xFileControl(self, op: int, ptr: int) -> bool:
        if op != apsw.SQLITE_FCNTL_PRAGMA:
            return False
        pragma = apsw.VFSFcntlPragma(ptr)
        name = (pragma.name or "").lower()
        if name not in ("litefs_txid", "litefs_timestamp", "litefs_lag"):
            return False
        value = pragma.value
        if value is not None:
            if name == "litefs_lag":
                raise SidecarError("PRAGMA litefs_lag is read-only")
            self._retarget(name, value.strip().strip("'\""))
        view = self.next_view or self.view
        if name == "litefs_txid":
            pragma.result = f"{view.head.txid:016x}"
        elif name == "litefs_timestamp":
            pragma.result = format_timestamp(view.head.timestamp)
        else:
            pragma.result = f"{self.backup.lag(view):.3f}"
        return True

    def _retarget(self, name: str, value: str) -> None:
        if value.lower() == "latest":
            target = Target(follow=self.target.follow)
        elif name == "litefs_txid":
            target = Target(txid=_parse_txid(value))
        else:
            target = Target(timestamp=_parse_time(value))
        view = self.vfs.loop.call(self.backup.view(target))  # first: a target refused leaves the connection as it was
        if self.target.follow and not target.latest:
            self.vfs.loop.call(self.backup.stop_following())
        self.target = target
        if self.lock == _NONE:
            self._pin(view)
        else:
            self.next_view = view  # this transaction keeps its TXID; the next one sees the new target


def _state(view: View) -> tuple[int, int, int]:
    """What tells two states of a database apart: its TXID, checksum and time."""
    return view.head.txid, view.head.post_apply_checksum, view.head.timestamp


async def _start_following(backup: Backup) -> None:
    backup.start_following()


def _parse_txid(text: str) -> int:
    try:
        txid = int(text, 16)
    except ValueError:
        raise SidecarError(f"txid {text!r}: want a hex transaction ID") from None
    if txid <= 0:
        raise SidecarError(f"txid {text!r}: want a TXID above 0")
    return txid


def _parse_time(text: str) -> int:
    try:
        return parse_rfc3339(text)
    except ValueError:
        raise SidecarError(f"timestamp {text!r}: want RFC 3339, e.g. 2026-11-24T09:00:00Z") from None


class BackupVFS(apsw.VFS):
    """A read-only SQLite VFS over backups; `connect(url)` opens one. Close it when done (it owns a thread)."""

    def __init__(self, name: str = VFS_NAME, *, cache_bytes: int = 10 << 20, token: str = "",
                 poll_interval: float = 1.0, server_pages: bool = True, **s3_options: Any) -> None:
        """`server_pages`: through a backup server, let it resolve pages (`/db/pages`: fewest requests and
        bytes); False reads the stored files by range and resolves pages here, as from a store."""
        super().__init__(name, "")
        self.vfs_name = name
        self.server_pages = server_pages
        self.cache_bytes = cache_bytes
        self.token = token
        self.poll_interval = poll_interval
        self.s3_options = s3_options
        self.loop = LoopThread(f"{name}-loop")
        self.backups: dict[str, Backup] = {}
        self._lock = threading.Lock()

    def connect(self, url: str, *, txid: int | None = None, timestamp: int | None = None,
                follow: bool = False) -> apsw.Connection:
        """A read-only connection to the backup at `url`, at a TXID, a time (ms) or the latest state."""
        Target(txid, timestamp, follow)  # refuse bad combinations before SQLite sees them
        params: dict[str, str] = {"mode": "ro"}
        if txid is not None:
            params["txid"] = f"{txid:016x}"
        if timestamp is not None:
            params["timestamp"] = format_timestamp(timestamp)
        if follow:
            params["follow"] = "1"
        uri = f"file:{quote(url, safe='/:@')}?{urlencode(params)}"
        return apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI, vfs=self.vfs_name)

    def backup(self, url: str) -> Backup:
        """The shared state of `url`, opened on first use."""
        with self._lock:
            found = self.backups.get(url)
            if found is None:
                source = open_source(url, token=self.token, poll_interval=self.poll_interval, **self.s3_options)
                remote = self.server_pages and isinstance(source, PageServer)
                found = self.backups[url] = Backup(source, self.cache_bytes, remote=remote)
            return found

    def stats(self, url: str) -> Stats:
        return self.backup(url).source.stats

    def xOpen(self, name: str | apsw.URIFilename | None, flags: list[int]) -> apsw.VFSFile:
        if name is None or not flags[0] & apsw.SQLITE_OPEN_MAIN_DB:
            return apsw.VFSFile("", name, flags)  # temp files for sorting: the default VFS's
        url = name.filename() if isinstance(name, apsw.URIFilename) else name
        target = Target()
        if isinstance(name, apsw.URIFilename):
            target = Target.parse(name.uri_parameter("txid"), name.uri_parameter("timestamp"),
                                  name.uri_boolean("follow", False))
        flags[1] = apsw.SQLITE_OPEN_READONLY
        return BackupFile(self, self.backup(url), target)

    def xAccess(self, pathname: str, flags: int) -> bool:
        if "://" in pathname:
            return False  # no -journal, -wal or -shm beside a backup
        return bool(super().xAccess(pathname, flags))

    def xFullPathname(self, name: str) -> str:
        return name if "://" in name else str(super().xFullPathname(name))

    def close(self) -> None:
        """Close every backup's source and stop the loop thread; open connections must be closed first."""
        backups, self.backups = list(self.backups.values()), {}
        for b in backups:
            self.loop.call(b.close())
        self.loop.stop()
        self.unregister()

    def __enter__(self) -> BackupVFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["VFS_NAME", "Backup", "BackupFile", "BackupVFS", "LoopThread", "Target"]
