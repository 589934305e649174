"""The backup engine: accepts LTX uploads, makes them durable, flushes them to the object store as L0,
compacts levels on schedule, applies retention, and restores.

Where a transaction lives, in order:

    accepted upload ──fsync──▶ <state>/log/ (uploadlog.py)       (acknowledged: durable on this host)
                    ──flush──▶ store L0 (every l0_interval)       (now counted in the HWM)
                    ──compact─▶ L1 (5 min), L2 (1 h), L9 (daily snapshot)

The store is the source of truth; the state directory holds the log of pending uploads and a cache of
each database's store index (`<state>/<cluster>/<db>/index.json`), which `scan` rebuilds when it is lost.
The high-water mark (HWM) is the highest TXID durable in the store. All store objects are LTX v3 with the
no-checksum flag that Litestream requires, carrying LiteFS's database checksums in the header extension.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import structlog

from sidecar.engine import head as heads
from sidecar.engine.index import DbIndex, FileEntry, restore_points, scan, write_atomically
from sidecar.engine.levels import Levels, due
from sidecar.engine.restore import RestoreResult, map_files, plan_restore, restore
from sidecar.engine.uploadlog import Record, UploadLog
from sidecar.errors import PosMismatch, SidecarError, StorageError, validate_db_name
from sidecar.ltx import (
    FLAG_COMPRESS_LZ4,
    FLAG_NO_CHECKSUM,
    Header,
    LTXError,
    Pos,
    Trailer,
    Version,
    lock_pgno,
)
from sidecar.ltx.compactor import compact
from sidecar.ltx.decoder import Decoder
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.errors import InvalidHeader
from sidecar.ltx.sqlite import database_checksum_of, encode_db, sqlite_page_size
from sidecar.storage.base import SNAPSHOT_LEVEL, Storage, parse_ltx_key

log = structlog.get_logger("sidecar.engine")

Clock = Callable[[], float]

BIG_UPLOAD = 8 << 20  # an upload this large (a snapshot) is flushed at once, not held in memory
FLUSH_CONCURRENCY = 16  # databases flushed at once by a tick
FLUSH_BUDGET = 0.25  # seconds of a tick after which no further flush starts (the rest wait for the next)
SMALL_FLUSH = 4 << 20  # pending uploads up to this size are compacted in memory, without a temporary file


@dataclass
class Pending:
    """An accepted upload, durable in the upload log, waiting (in memory) for the next flush."""

    header: Header
    post: int
    arrived: float
    segment: int  # of the upload log, released once flushed
    data: bytes


@dataclass
class DbState:
    """Everything the engine knows about one database."""

    cluster: str
    name: str
    dir: Path
    index: DbIndex
    pending: list[Pending] = field(default_factory=list)
    pos: Pos = field(default_factory=Pos)
    page_size: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # uploads, and whatever needs no upload meanwhile
    flushing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one flush at a time (taken after `lock`)
    maint: asyncio.Lock = field(default_factory=asyncio.Lock)  # compaction, retention, restores
    saving: asyncio.Lock = field(default_factory=asyncio.Lock)  # index.json writes, in order
    uploading: int = 0  # uploads being validated or written right now
    last_run: dict[int, float] = field(default_factory=dict)
    last_upload: float = 0.0

    @property
    def prefix(self) -> str:
        return f"{self.cluster}/{self.name}"

    @property
    def hwm(self) -> int:
        return self.index.max_txid


@dataclass(frozen=True, slots=True)
class DbStatus:
    """A database's position, HWM and size, for the operator API and metrics."""

    cluster: str
    name: str
    pos: Pos
    hwm: int
    pending_files: int
    stored_bytes: int
    files: int
    last_upload: float


class Engine:
    """One engine per store. Use `await Engine.open(...)`, then `write_tx`, `tick` (or `run`), `close`."""

    def __init__(self, storage: Storage, state_dir: str | os.PathLike[str], levels: Levels | None = None, *,
                 clock: Clock = time.time) -> None:
        self.storage = storage
        self.state_dir = Path(state_dir)
        self.levels = levels or Levels()
        self.clock = clock
        self.dbs: dict[tuple[str, str], DbState] = {}
        self.log = UploadLog(self.state_dir / "log")
        # Called with (level, seconds) after each flush (level 0) and compaction: the server's metrics.
        self.timed: Callable[[int, float], None] = lambda level, seconds: None
        # Notified whenever a database's stored files change (flush, compaction, retention): readers' long-polls.
        self.stored = asyncio.Condition()
        self._heads: dict[str, bytes] = {}  # head object last stored, by database prefix
        self._lock_fd = -1
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------------

    @classmethod
    async def open(cls, storage: Storage, state_dir: str | os.PathLike[str], levels: Levels | None = None, *,
                   clock: Clock = time.time) -> Engine:
        engine = cls(storage, state_dir, levels, clock=clock)
        try:
            await engine._load()
        except BaseException:
            engine.abandon()
            raise
        return engine

    async def _load(self) -> None:
        """Read every database's index and pending uploads; rebuild lost indexes from the store."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_state_dir()
        known: set[tuple[str, str]] = set()
        for cluster_dir in sorted(p for p in self.state_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for db_dir in sorted(p for p in cluster_dir.iterdir() if p.is_dir()):
                known.add((cluster_dir.name, db_dir.name))
        indexes: dict[tuple[str, str], DbIndex] = {}
        missing = [k for k in known if DbIndex.load(self._db_dir(*k) / "index.json") is None]
        if not known or missing:
            indexes.update(await self._scan_store())
        for key in known:
            idx = DbIndex.load(self._db_dir(*key) / "index.json")
            if idx is not None:
                indexes[key] = idx
        for (cluster, name), idx in indexes.items():
            st = DbState(cluster, name, self._db_dir(cluster, name), idx)
            idx.save(st.dir / "index.json")
            self.dbs[(cluster, name)] = st
        for cluster, name in known - set(indexes):
            self.dbs[(cluster, name)] = DbState(cluster, name, self._db_dir(cluster, name), DbIndex())
        for st in self.dbs.values():
            self._refresh_pos(st)
        for record in self.log.replay():
            await self._replay(record)
        self.log.end_replay()
        self.log.start()

    async def _scan_store(self) -> dict[tuple[str, str], DbIndex]:
        """One LIST of the whole store, then each database's headers."""
        objects = await self.storage.list("")
        prefixes = set()
        for obj in objects:
            parsed = parse_ltx_key(self.storage.kind, obj.key)
            if parsed and parsed[0].count("/") == 1:
                prefixes.add(parsed[0])
        out = {}
        for prefix in sorted(prefixes):
            cluster, name = prefix.split("/")
            out[(cluster, name)] = await scan(self.storage, prefix)
            log.info("index rebuilt from store", cluster=cluster, db=name, files=len(out[(cluster, name)]))
        return out

    def _lock_state_dir(self) -> None:
        """One engine per state directory: a second would replay and append to the same upload log."""
        fd = os.open(self.state_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SidecarError(f"{self.state_dir}: in use by another engine (another `serve` or `run` with this "
                               "state directory); give each its own") from None
        self._lock_fd = fd

    def abandon(self) -> None:
        """Let go of the state directory without flushing anything, as a crash would (tests use this)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self.log.abandon()
        self._closed = True

    async def _replay(self, record: Record) -> None:
        """Take back one logged upload: pending again unless already flushed; a deletion drops what came before."""
        key = (record.cluster, record.name)
        if not record.data:
            st = self.dbs.get(key)
            if st is not None:
                self._drop_pending(st)
                if not len(st.index):
                    del self.dbs[key]
            return
        what = f"{self.log.path(record.segment)} at offset {record.offset} ({record.cluster}/{record.name})"
        header, post = _check_upload(record.data, what)
        st = self._state(record.cluster, record.name, create=True)
        if header.max_txid <= st.index.max_txid:
            return  # flushed before the crash
        continues = header.min_txid == st.pos.txid + 1 and header.pre_apply_checksum == st.pos.post_apply_checksum
        if not (continues or (header.is_snapshot and header.max_txid > st.pos.txid)):
            log.error("upload log: record does not continue its database; skipped", record=what,
                      pos=f"{st.pos.txid:016x}", min_txid=f"{header.min_txid:016x}")
            return
        if header.is_snapshot and st.pending:
            await self._flush(st)
        self.log.hold(record.segment)
        st.pending.append(Pending(header, post, self.clock(), record.segment, bytes(record.data)))
        st.pos, st.page_size = Pos(header.max_txid, post), header.page_size

    def _drop_pending(self, st: DbState) -> None:
        for p in st.pending:
            self.log.release(p.segment)
        st.pending = []

    def _refresh_pos(self, st: DbState) -> None:
        if st.pending:
            last = st.pending[-1]
            st.pos, st.page_size = Pos(last.header.max_txid, last.post), last.header.page_size
        else:
            head = st.index.head()
            st.pos = Pos(head.max_txid, head.post) if head else Pos()
            st.page_size = head.page_size if head else 0

    async def close(self) -> None:
        """Flush every pending upload to the store, then let go of the state directory.

        If the store cannot take them (it is down), they stay in the upload log, acknowledged and durable, and
        the next start flushes them; closing goes on regardless.
        """
        if self._closed:
            return
        try:
            await self.flush_all()
        except (StorageError, OSError) as err:
            pending = sum(len(st.pending) for st in self.dbs.values())
            log.warning("closing with uploads not yet in the store; they stay in the upload log for the next start",
                        uploads=pending, error=str(err))
        await self.log.close()
        self._closed = True
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    async def run(self, stop: asyncio.Event, period: float = 1.0) -> None:
        """Tick until `stop` is set; a failing tick is logged and retried on the next one."""
        while not stop.is_set():
            try:
                await self.tick()
            except (SidecarError, LTXError, OSError) as err:
                log.error("engine tick failed", error=str(err))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)

    # -- queries --------------------------------------------------------------------------------------

    def _db_dir(self, cluster: str, name: str) -> Path:
        return self.state_dir / cluster / name

    def get(self, cluster: str, name: str) -> DbState | None:
        return self.dbs.get((cluster, name))

    def _state(self, cluster: str, name: str, create: bool = False) -> DbState:
        validate_db_name(cluster)
        validate_db_name(name)
        st = self.dbs.get((cluster, name))
        if st is None:
            if not create:
                raise SidecarError(f"unknown database {cluster}/{name}")
            st = DbState(cluster, name, self._db_dir(cluster, name), DbIndex())
            self.dbs[(cluster, name)] = st
        return st

    def clusters(self) -> list[str]:
        return sorted({c for c, _ in self.dbs})

    def databases(self, cluster: str) -> list[str]:
        return sorted(n for c, n in self.dbs if c == cluster)

    def positions(self, cluster: str) -> dict[str, Pos]:
        return {n: st.pos for (c, n), st in sorted(self.dbs.items()) if c == cluster and not st.pos.is_zero}

    def pos(self, cluster: str, name: str) -> Pos:
        st = self.dbs.get((cluster, name))
        return st.pos if st else Pos()

    def hwm(self, cluster: str, name: str) -> int:
        st = self.dbs.get((cluster, name))
        return st.hwm if st else 0

    def status(self, cluster: str, name: str) -> DbStatus:
        st = self._state(cluster, name)
        return DbStatus(cluster, name, st.pos, st.hwm, len(st.pending), st.index.size, len(st.index), st.last_upload)

    def index(self, cluster: str, name: str) -> DbIndex:
        return self._state(cluster, name).index

    def restore_points(self, cluster: str, name: str) -> list[tuple[int, int, int]]:
        return restore_points(self._state(cluster, name).index)

    # -- writes ---------------------------------------------------------------------------------------

    async def write_tx(self, cluster: str, name: str, data: bytes) -> int:
        """Validate one LTX v2 upload, make it durable, and return the HWM.

        Contiguous means min TXID = current TXID + 1 and pre-apply checksum = current post-apply
        checksum; a snapshot (min TXID 1) beyond the current TXID is also accepted. Anything else raises
        PosMismatch with the current position, and nothing is stored.
        """
        st = self._state(cluster, name, create=True)
        st.uploading += 1
        try:
            return await self._write_tx(st, name, data)
        finally:
            st.uploading -= 1

    async def _write_tx(self, st: DbState, name: str, data: bytes) -> int:
        header, post = await _validate_upload(data, f"{st.cluster}/{name}")
        async with st.lock:
            if st.page_size and header.page_size != st.page_size and not header.is_snapshot:
                raise InvalidHeader(f"{st.cluster}/{name}: page size {header.page_size} differs from the "
                                    f"database's {st.page_size}", field="page_size")
            if header.is_snapshot:
                if header.max_txid <= st.pos.txid:
                    raise PosMismatch(name, st.pos, f"snapshot at TXID {header.max_txid:016x} is not ahead")
                if st.pending:
                    await self._flush(st)
            elif header.min_txid != st.pos.txid + 1 or header.pre_apply_checksum != st.pos.post_apply_checksum:
                raise PosMismatch(name, st.pos, f"upload {header.min_txid:016x}-{header.max_txid:016x} with "
                                                f"pre-apply checksum {header.pre_apply_checksum:016x} does not "
                                                f"continue")
            accept = asyncio.ensure_future(self._accept(st, header, post, data))
            try:
                await asyncio.shield(accept)  # once logged, the upload is accepted even if its request is gone
            except asyncio.CancelledError:
                await asyncio.wait([accept])
                if not accept.cancelled():
                    accept.exception()
                raise
            if self.levels.l0_interval <= 0 or len(data) > BIG_UPLOAD:
                await self._flush(st)
            return st.hwm

    async def _accept(self, st: DbState, header: Header, post: int, data: bytes) -> None:
        segment = await self.log.append(st.cluster, st.name, data)
        now = self.clock()
        st.pending.append(Pending(header, post, now, segment, data))
        st.pos, st.page_size, st.last_upload = Pos(header.max_txid, post), header.page_size, now

    async def flush_all(self) -> None:
        for st in list(self.dbs.values()):
            if st.pending:
                async with st.lock:
                    await self._flush(st)

    async def flush(self, cluster: str, name: str) -> int:
        st = self._state(cluster, name)
        async with st.lock:
            await self._flush(st)
        return st.hwm

    async def _flush(self, st: DbState) -> None:
        """Compact the uploads pending now into one L0 file in the store.

        Uploads go on meanwhile (unless the caller holds `st.lock`): they only ever add to the end of
        `st.pending`, and only a flush removes from its front.
        """
        async with st.flushing:
            if not st.pending:
                return
            t0 = time.perf_counter()
            batch = list(st.pending)
            entry = await self._compact_to_store(st, 0, [p.data for p in batch], Version.V2)
            st.index.add(entry)
            await self._save_index(st)
            st.pending = st.pending[len(batch):]
            for p in batch:
                self.log.release(p.segment)
        self.timed(0, time.perf_counter() - t0)
        log.info("flushed", cluster=st.cluster, db=st.name, level=0, min_txid=f"{entry.min_txid:016x}",
                 max_txid=f"{entry.max_txid:016x}", uploads=len(batch), bytes=entry.size)

    async def _save_index(self, st: DbState) -> None:
        """Write the index cache; flushes and compactions of a database may both be saving, so in turn, each
        writing the state as of its turn. Then the head object, and wake whoever waits for a change."""
        async with st.saving:
            await asyncio.to_thread(write_atomically, st.dir / "index.json", st.index.to_json())
            await self._store_head(st)
        async with self.stored:
            self.stored.notify_all()

    async def _store_head(self, st: DbState) -> None:
        """Write `<db>/head.json` (`sidecar.engine.head`), so readers follow the latest state without a LIST.

        Retention calls this before deleting, so followers move off files before they go; a retention pass
        that only deleted files older than the latest plan leaves it as it was, and costs no PUT. A failure is
        only logged: the files and the index are what restores rely on, and the next change writes it again.
        """
        latest = heads.latest(st.index)
        data = heads.encode(latest) if latest is not None else b""
        if not data or self._heads.get(st.prefix) == data:
            return
        try:
            await self.storage.put_bytes(heads.head_key(st.prefix), data)
            self._heads[st.prefix] = data
        except StorageError as err:
            log.warning("head object not written; readers see this change with the next one", cluster=st.cluster,
                        db=st.name, error=str(err))

    async def _compact_to_store(self, st: DbState, level: int, inputs: Sequence[Path | bytes],
                                version: Version) -> FileEntry:
        """Merge local files or uploads into one v3 file and store it at `level`; returns its index entry."""
        size = sum(len(i) if isinstance(i, bytes) else SMALL_FLUSH + 1 for i in inputs)
        if size <= SMALL_FLUSH:
            out = io.BytesIO()
            if size > 256 << 10:
                header, _ = await asyncio.to_thread(_compact_inputs, inputs, out, version)
            else:
                header, _ = _compact_inputs(inputs, out, version)
            data = out.getvalue()
            entry = FileEntry.from_header(level, header, len(data))
            await self.storage.put_bytes(entry.key(self.storage.kind, st.prefix), data, timestamp=header.timestamp)
            return entry
        tmpdir = self.state_dir / ".tmp"
        tmpdir.mkdir(exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix="compact-", suffix=".ltx", dir=tmpdir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            header, _ = await asyncio.to_thread(_compact_file, inputs, tmp, version)
            entry = FileEntry.from_header(level, header, tmp.stat().st_size)
            await self.storage.put_file(entry.key(self.storage.kind, st.prefix), tmp, timestamp=header.timestamp)
            return entry
        finally:
            tmp.unlink(missing_ok=True)

    # -- levels ---------------------------------------------------------------------------------------

    async def tick(self, now: float | None = None) -> None:
        """Run what is due: flushes, compactions at their boundaries, snapshots, retention."""
        now = self.clock() if now is None else now
        lv = self.levels
        due_flush = [st for st in self.dbs.values() if st.pending and now - st.pending[0].arrived >= lv.l0_interval]
        if due_flush:
            # Many at a time, as each mostly waits on the store; oldest first, and no new one started once
            # this tick has spent FLUSH_BUDGET seconds, so a wave of them (every database of a restarted
            # server comes due at once) is spread over several ticks instead of stalling uploads.
            due_flush.sort(key=lambda st: st.pending[0].arrived)
            sem = asyncio.Semaphore(FLUSH_CONCURRENCY)
            until = time.perf_counter() + FLUSH_BUDGET

            async def flush(st: DbState) -> None:
                async with sem:
                    if time.perf_counter() < until:
                        await self._flush(st)
            failed = [r for r in await asyncio.gather(*map(flush, due_flush), return_exceptions=True) if r]
            if failed:
                raise failed[0]
        for st in list(self.dbs.values()):
            # Compaction only adds files and retention only removes what flushes never touch, so
            # uploads go on meanwhile; restores take `maint` so their inputs stay put.
            async with st.maint:
                for level in (*lv.compacted, SNAPSHOT_LEVEL):
                    if due(st.last_run.get(level), now, lv.interval(level)):
                        await self._compact_level(st, level)
                        st.last_run[level] = now
                await self._retain(st, now)

    async def compact_level(self, cluster: str, name: str, level: int) -> FileEntry | None:
        st = self._state(cluster, name)
        async with st.maint:
            return await self._compact_level(st, level)

    async def _compact_level(self, st: DbState, level: int) -> FileEntry | None:
        """Build one file of `level` from what its source level holds beyond it; None if nothing new."""
        idx = st.index
        if level == SNAPSHOT_LEVEL:
            newest = idx.newest(SNAPSHOT_LEVEL)
            if idx.max_txid == 0 or (newest and newest.max_txid >= idx.max_txid):
                return None
            plan = plan_restore([e for e in idx if e.level != SNAPSHOT_LEVEL or e.max_txid <= idx.max_txid])
            if len(plan) == 1 and plan[0].level == SNAPSHOT_LEVEL:
                return None
            sources = plan
        else:
            newest = idx.newest(level)
            seek = newest.max_txid + 1 if newest else 1
            sources = [e for e in idx.level(level - 1) if e.min_txid >= seek or (e.is_snapshot and e.max_txid >= seek)]
            snaps = [i for i, e in enumerate(sources) if e.is_snapshot]
            if snaps:
                sources = sources[snaps[-1]:]  # a snapshot supersedes everything before it
            if not sources:
                return None
            if not sources[0].is_snapshot and sources[0].min_txid != seek:
                log.error("cannot compact: gap in source level", cluster=st.cluster, db=st.name, level=level,
                          want=f"{seek:016x}", got=f"{sources[0].min_txid:016x}")
                return None
        t0 = time.perf_counter()
        async with self._local_copies(st, sources) as paths:
            entry = await self._compact_to_store(st, level, paths, Version.V3)
        idx.add(entry)
        await self._save_index(st)
        self.timed(level, time.perf_counter() - t0)
        log.info("compacted", cluster=st.cluster, db=st.name, level=level, min_txid=f"{entry.min_txid:016x}",
                 max_txid=f"{entry.max_txid:016x}", inputs=len(sources), bytes=entry.size,
                 seconds=round(time.perf_counter() - t0, 3))
        return entry

    @asynccontextmanager
    async def _local_copies(self, st: DbState, entries: Sequence[FileEntry]) -> AsyncIterator[list[Path]]:
        """Local paths of stored files: the files themselves for file://, downloads otherwise."""
        keys = [e.key(self.storage.kind, st.prefix) for e in entries]
        root = getattr(self.storage, "root", None)
        if self.storage.kind == "file" and root is not None:
            yield [Path(root) / k for k in keys]
            return
        (self.state_dir / ".tmp").mkdir(exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix="inputs-", dir=self.state_dir / ".tmp"))
        try:
            paths = [tmpdir / f"{i:05d}.ltx" for i in range(len(keys))]
            sem = asyncio.Semaphore(16)

            async def fetch(key: str, path: Path) -> None:
                async with sem:
                    await self.storage.download(key, path)
            await asyncio.gather(*(fetch(k, p) for k, p in zip(keys, paths, strict=True)))
            yield paths
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    # -- retention ------------------------------------------------------------------------------------

    async def _retain(self, st: DbState, now: float) -> None:
        """Delete what no retained restore point needs (spec/compaction-levels.md §8, made safe)."""
        doomed = retention_victims(st.index, self.levels, now)
        if not doomed:
            return
        st.index.remove(doomed)
        await self._save_index(st)  # forget first: a crash leaves orphans, never dangling entries
        try:
            await self.storage.delete([e.key(self.storage.kind, st.prefix) for e in doomed])
        except StorageError as err:
            log.warning("retention delete failed; orphans remain until the index is rebuilt", error=str(err))
        log.info("retention", cluster=st.cluster, db=st.name, deleted=len(doomed))

    # -- restore --------------------------------------------------------------------------------------

    async def restore_to(self, cluster: str, name: str, out: str | os.PathLike[str], *, txid: int | None = None,
                         timestamp: int | None = None, integrity_check: bool = False) -> RestoreResult:
        """Restore a stored database into the SQLite file `out` (pending uploads are flushed first)."""
        st = self._state(cluster, name)
        async with st.lock:
            await self._flush(st)
        async with st.maint:
            plan = plan_restore(st.index, txid=txid, timestamp=timestamp)
            return await restore(self.storage, st.prefix, plan, out, integrity_check=integrity_check)


    async def snapshot_file(self, cluster: str, name: str, out: str | os.PathLike[str], *,
                            timestamp: int | None = None, txid: int | None = None,
                            compress: bool = True) -> tuple[Header, Trailer]:
        """Write an LTX v2 snapshot (TXIDs 1..N) of the stored state, latest or at a target, to `out`.

        This is what `GET /db/snapshot` serves to LiteFS: its MaxTXID and post-apply checksum equal
        the position it represents.
        """
        with tempfile.TemporaryDirectory(prefix="snap-", dir=self._tmp()) as tmp:
            db = Path(tmp) / "db"
            result = await self.restore_to(cluster, name, db, timestamp=timestamp, txid=txid)

            def encode() -> tuple[Header, Trailer]:
                with open(db, "rb") as src, open(out, "wb") as dst:
                    h, t = encode_db(src, dst, version=Version.V2, compress=compress, txid=result.txid,
                                     timestamp=result.timestamp)
                    dst.flush()
                    os.fsync(dst.fileno())
                return h, t
            header, trailer = await asyncio.to_thread(encode)
        if trailer.post_apply_checksum != result.checksum:
            raise SidecarError(f"{cluster}/{name}: snapshot checksum {trailer.post_apply_checksum:016x} != restored "
                               f"{result.checksum:016x}")
        return header, trailer

    async def write_state(self, cluster: str, name: str, db_path: str | os.PathLike[str]) -> Pos:
        """Append the SQLite file at `db_path` as the next transaction: every page, one new TXID.

        Operator restores and uploads use this, as LiteFS Cloud did: history is kept (the previous
        state stays restorable) and a LiteFS primary finds the server ahead and pulls the snapshot.
        """
        st = self._state(cluster, name, create=True)
        with tempfile.TemporaryDirectory(prefix="state-", dir=self._tmp()) as tmp:
            ltx = Path(tmp) / "next.ltx"
            pos = st.pos

            def encode() -> None:
                with open(db_path, "rb") as src, open(ltx, "wb") as dst:
                    encode_head(src, dst, pos, int(self.clock() * 1000))
            await asyncio.to_thread(encode)
            data = await asyncio.to_thread(ltx.read_bytes)
        await self.write_tx(cluster, name, data)
        async with st.lock:
            await self._flush(st)
        return st.pos

    async def delete_database(self, cluster: str, name: str) -> int:
        """Forget a database and delete every stored file of it; returns how many files were deleted."""
        st = self._state(cluster, name)
        async with st.lock, st.flushing, st.maint:
            # The deletion's record: the pending uploads before it are not replayed. Segments go oldest
            # first, so it stays on disk as long as any of them does.
            self.log.release(await self.log.append(cluster, name, b""))
            self._drop_pending(st)
            files = list(st.index)
            keys = [e.key(self.storage.kind, st.prefix) for e in files]
            await self.storage.delete([heads.head_key(st.prefix), *keys])
            self._heads.pop(st.prefix, None)
            shutil.rmtree(st.dir, ignore_errors=True)
            del self.dbs[(cluster, name)]
        return len(files)

    async def clone(self, cluster: str, name: str, to_cluster: str, to_name: str) -> Pos:
        """Copy a database's latest state into another cluster/name as its new head."""
        with tempfile.TemporaryDirectory(prefix="clone-", dir=self._tmp()) as tmp:
            db = Path(tmp) / "db"
            await self.restore_to(cluster, name, db)
            return await self.write_state(to_cluster, to_name, db)

    def _tmp(self) -> Path:
        path = self.state_dir / ".tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path


def encode_head(src: BinaryIO, dst: BinaryIO, pos: Pos, timestamp: int) -> tuple[Header, Trailer]:
    """An LTX v2 file taking a database at `pos` to the state in `src`: every page, TXID pos+1.

    At position zero this is a plain snapshot. Otherwise it is an incremental file that writes every
    page (and truncates to the new size), which any LTX reader applies on top of `pos`.
    """
    if pos.is_zero:
        return encode_db(src, dst, version=Version.V2, compress=True, txid=1, timestamp=timestamp)
    src.seek(0, os.SEEK_END)
    size = src.tell()
    src.seek(0)
    page_size = sqlite_page_size(src.read(100))
    if size % page_size:
        raise SidecarError(f"database size {size} is not a multiple of its page size {page_size}")
    commit = size // page_size
    header = Header(page_size=page_size, commit=commit, min_txid=pos.txid + 1, max_txid=pos.txid + 1,
                    timestamp=timestamp, pre_apply_checksum=pos.post_apply_checksum, flags=FLAG_COMPRESS_LZ4)
    enc = Encoder(dst, header, Version.V2)
    lock = lock_pgno(page_size)
    src.seek(0)
    for pgno in range(1, commit + 1):
        page = src.read(page_size)
        if pgno != lock:
            enc.write_page(pgno, page)
    src.seek(0)
    post, _ = database_checksum_of(src, page_size)
    return header, enc.close(post)


def retention_victims(index: DbIndex, levels: Levels, now: float) -> list[FileEntry]:
    """The files retention may delete at `now` (seconds); pure.

    - Snapshots older than their retention go, except the newest and the newest one before the window
      (the base that restore points at the start of the window are built on).
    - L1/L2 files older than their retention go only when the base snapshot covers them.
    - L0 files older than L0 retention go, oldest first with no holes, only when L1 covers them.
    Each level's newest file always stays.
    """
    ms = int(now * 1000)
    doomed: list[FileEntry] = []
    snaps = index.level(SNAPSHOT_LEVEL)
    cutoff = ms - int(levels.snapshot_retention * 1000)
    old = [e for e in snaps[:-1] if e.timestamp < cutoff]
    base = old[-1] if old else None
    doomed += old[:-1]
    floor = base.max_txid if base else 0
    for level in levels.compacted:
        files = index.level(level)
        cut = ms - int(levels.retention(level) * 1000)
        doomed += [e for e in files[:-1] if e.timestamp < cut and e.max_txid <= floor]
    l1 = index.newest(1)
    covered = max(l1.max_txid if l1 else 0, floor)
    cut = ms - int(levels.l0_retention * 1000)
    for e in index.level(0)[:-1]:
        if e.timestamp >= cut or e.max_txid > covered:
            break
        doomed.append(e)
    return doomed


def _check_upload(data: bytes | memoryview, what: str) -> tuple[Header, int]:
    """Decode and verify a whole v2 upload; return its header and post-apply checksum."""
    try:
        dec = Decoder(data, Version.V2)
        for _pgno, _page in dec.pages():
            pass
        trailer = dec.close()
    except LTXError as err:
        raise LTXError(f"{what}: invalid LTX upload: {err}", field=err.field) from err
    return dec.header, trailer.post_apply_checksum


async def _validate_upload(data: bytes, what: str) -> tuple[Header, int]:
    if len(data) > 1 << 20:
        return await asyncio.to_thread(_check_upload, data, what)
    return _check_upload(data, what)


def _compact_inputs(inputs: Sequence[Path | bytes], dst: BinaryIO, version: Version) -> tuple[Header, Trailer]:
    """Compact local files or uploads (all of `version`) into one v3 no-checksum file with extension checksums."""
    with ExitStack() as stack:
        paths = [i for i in inputs if isinstance(i, Path)]
        maps = iter(map_files(stack, paths))
        srcs = [next(maps) if isinstance(i, Path) else i for i in inputs]
        return compact(srcs, dst, version=version, flags=FLAG_NO_CHECKSUM, out_version=Version.V3,
                       allow_overlap=True)


def _compact_file(inputs: Sequence[Path | bytes], out: Path, version: Version) -> tuple[Header, Trailer]:
    """As `_compact_inputs`, into the file `out` (not fsynced: the store's put makes the copy it keeps durable)."""
    with open(out, "wb") as dst:
        return _compact_inputs(inputs, dst, version)


__all__ = ["DbState", "DbStatus", "Engine", "encode_head", "retention_victims"]
