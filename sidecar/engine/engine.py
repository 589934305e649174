"""The backup engine: accepts LTX uploads, makes them durable, flushes them to the object store as L0,
compacts levels on schedule, applies retention, and restores.

Where a transaction lives, in order:

    accepted upload ──fsync──▶ <state>/log/ (uploadlog.py)       (acknowledged: durable on this host)
                    ──flush──▶ store L0 (every l0_interval)       (now counted in the HWM)
                    ──compact─▶ L1 (5 min), L2 (1 h), L9 (daily snapshot)

The store is the source of truth; the state directory holds the log of pending uploads and a cache of each
database's store index (catalog.py). The high-water mark (HWM) is the highest TXID durable in the store: where a
restore's chain of stored files ends, so never past a gap in it (a file lost or deleted by hand).

`Engine` is a facade over its parts, one per job:

    accept.Intake        verify and log uploads          flush.Flusher        pending uploads → L0
    compaction.Compactor L1, L2, L9 on their schedule    retention.Retention  what no restore point needs
    operations.Operations restore, snapshot, clone, …    catalog.Catalog      the databases and their indexes

Every per-database job fails alone: the failure is logged with the cluster and database, counted, shown in
`status()`, and retried with backoff at later ticks, while every other database's jobs go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from sidecar.config import EngineConfig
from sidecar.engine import head as heads
from sidecar.engine.accept import Intake, check_continues, check_header, check_upload
from sidecar.engine.builder import Builder, Fence, Timed
from sidecar.engine.catalog import Catalog
from sidecar.engine.compaction import Compactor, due_levels, sources
from sidecar.engine.database import Database, DbStatus, Pending
from sidecar.engine.flush import Flusher, FlushQueue, Limit, due, due_at
from sidecar.engine.identity import StateBinding, store_identity
from sidecar.engine.index import DbIndex, FileEntry, restore_points
from sidecar.engine.lease import Leases, NotOwner
from sidecar.engine.levels import Levels
from sidecar.engine.operations import Operations
from sidecar.engine.pagesums import PageSums
from sidecar.engine.restore import RestoreResult, plan_restore
from sidecar.engine.retention import Retention, expired_set_aside, retention_victims
from sidecar.engine.uploadlog import Record, UploadLog
from sidecar.errors import NotFound, PosMismatch, PreconditionFailed, SidecarError, StorageError
from sidecar.fsutil import write_atomically
from sidecar.ltx import Header, LTXError, Pos, Trailer
from sidecar.storage.base import RequestStats, Storage
from sidecar.storage.layout import SNAPSHOT_LEVEL

log = structlog.get_logger("sidecar.engine")

Clock = Callable[[], float]

HELD_FILE = "leases.json"
SAVE_EVERY = 5.0  # seconds between writes of the changed index caches
BIG_UPLOAD = 8 << 20  # an upload this large (a snapshot) is flushed at once, not held in memory


class Backpressure(SidecarError):
    """The store is not keeping up with what is acknowledged: the upload is refused for now (HTTP 503)."""

    code = "EBACKPRESSURE"
    http_status = 503

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyDatabases(SidecarError):
    """An upload would create a database in a cluster already holding `max_databases`: refused (HTTP 403)."""

    code = "ETOOMANYDBS"
    http_status = 403


class Engine:
    """One engine per store. Use `await Engine.open(...)`, then `write_tx`, `tick` (or `run`), `close`."""

    def __init__(self, storage: Storage, state_dir: str | os.PathLike[str], levels: Levels | None = None, *,
                 clock: Clock = time.time, timed: Timed | None = None, fence: Fence | None = None,
                 leases: Leases | None = None, max_skew: float = 3600.0, verify_checksums: bool = True,
                 max_pending_bytes: int = 0, max_hwm_lag: float = 0.0, commit_delay: float = 0.0,
                 max_databases: int = 0) -> None:
        self.storage = storage
        self._own_leases = leases is None
        # Leases run on the engine's clock, so tests driving a fake clock drive the leases too.
        self.leases = leases or Leases(storage, clock=clock, monotonic=time.monotonic if clock is time.time else clock)
        self.state_dir = Path(state_dir)
        self.levels = levels or Levels()
        self.clock = clock
        self.tmpdir = self.state_dir / ".tmp"
        self.uploadlog = UploadLog(self.state_dir / "log", commit_delay=commit_delay)
        self.binding = StateBinding(self.state_dir)
        self.catalog = Catalog(storage, self.state_dir)
        self.catalog.on_stored = self._stored
        # Notified whenever a database's stored files change (flush, compaction, retention): readers' long-polls.
        self.stored = asyncio.Condition()
        self._heads: dict[str, bytes] = {}  # head object last stored, by database prefix
        self._latest: dict[str, tuple[DbIndex, heads.Head]] = {}  # the latest head computed, of that index
        self._fence_extra = fence
        self.builder = Builder(storage, self.tmpdir, timed=timed, fence=self._fence)
        self.flusher = Flusher(self.builder, self.catalog, self.uploadlog, self._flushed, clock)
        self.flush_queue = FlushQueue()
        self.limit = Limit()
        self.flushes = 0  # L0 files written, for /metrics
        self.flush_seconds = 0.0
        self.pending_bytes = 0  # acknowledged upload bytes not yet in the store
        self.max_pending_bytes = max_pending_bytes
        self.max_hwm_lag = max_hwm_lag
        self.max_databases = max_databases  # per cluster; 0: no ceiling
        self.intake = Intake(self.uploadlog, clock, self._flush, max_skew=max_skew,
                             verify_checksums=verify_checksums)
        self.compactor = Compactor(self.builder, self.catalog, self.tmpdir)
        self.retention = Retention(storage, self.catalog, self.levels, self._fence)
        self.ops = Operations(storage, self.catalog, self._flush, self.uploadlog, self.tmpdir, self.write_tx,
                              clock)
        self._lock_fd = -1
        self._closed = False
        self._store_checked = True  # False while the store could not be checked at start
        self.store_id = ""  # the store's identity (identity.py), once checked; the bound one's while unreachable
        self._owning: dict[str, asyncio.Lock] = {}
        self._held_before: set[str] = set()  # clusters this state directory's engine has held (<state>/leases.json)
        # Clusters whose indexes are current under the lease held now: set once a takeover's reconcile is done, so
        # no upload is taken against an index that misses the previous owner's last files.
        self._current: set[str] = set()
        self._foreign: dict[str, float] = {}  # cluster -> until when another engine holds its lease (engine clock)
        self._renewing: dict[str, asyncio.Task[None]] = {}  # background lease renewals, one per cluster
        self._store_trouble: set[str] = set()  # clusters whose last lease renewal failed on a store error
        self._wanted: dict[str, float] = {}  # cluster -> when a client last needed this engine to write it
        self.quarantined = 0  # upload log records refused at replay
        # Clusters taken over from another engine -> (next sweep, the gap before it): see `_sweep`.
        self._sweeps: dict[str, tuple[float, float]] = {}
        self.strays_deleted = 0  # files found by sweeps, for /metrics
        self._saved = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------------

    @classmethod
    async def open(cls, storage: Storage, state_dir: str | os.PathLike[str], levels: Levels | None = None, *,
                   clock: Clock = time.time, timed: Timed | None = None, fence: Fence | None = None,
                   leases: Leases | None = None, max_skew: float = 3600.0, verify_checksums: bool = True,
                   max_pending_bytes: int = 0, max_hwm_lag: float = 0.0, max_databases: int = 0) -> Engine:
        engine = cls(storage, state_dir, levels, clock=clock, timed=timed, fence=fence, leases=leases,
                     max_skew=max_skew, verify_checksums=verify_checksums, max_pending_bytes=max_pending_bytes,
                     max_hwm_lag=max_hwm_lag, max_databases=max_databases)
        try:
            await engine._load()
        except BaseException:
            engine.abandon()
            raise
        return engine

    @classmethod
    async def from_config(cls, storage: Storage, config: EngineConfig, state_dir: str | os.PathLike[str] | None = None,
                          *, addr: str = "", owner: str | None = None) -> Engine:
        """An engine as the configuration's `engine` section says; `addr` is where this process takes requests
        (written into its leases, so other processes can forward to it)."""
        leases = Leases(storage, owner, addr, ttl=config.lease_ttl, skew=config.lease_skew)
        engine = cls(storage, state_dir or config.state_dir, levels_of(config), leases=leases,
                     max_skew=config.max_clock_skew, verify_checksums=config.verify_checksums,
                     max_pending_bytes=config.max_pending_bytes, max_hwm_lag=config.max_hwm_lag,
                     commit_delay=config.commit_delay, max_databases=config.max_databases)
        engine._own_leases = owner is None
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
        if self._own_leases:
            self.leases.owner = self.binding.owner()  # a restart is the same owner: it takes its leases back at once
        try:
            self._held_before = set(json.loads((self.state_dir / HELD_FILE).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            self._held_before = set()
        try:
            await self._check_store(started=False)
        except StorageError as err:
            if not err.retryable or self.binding.recorded() is None:
                raise
            # Open from the cache so uploads are taken (into the upload log) while the store is down; nothing is
            # written to the store until it has been checked.
            log.warning("store unreachable at start: opening from the cache; it is checked once the store answers",
                        store=self.storage.url, error=str(err))
            self.catalog.load_cached()
            self._store_checked = False
            # The store this state directory belongs to, as far as it knows: if the store answers as another, the
            # check stops the engine. Left empty, the sidecar took it for another store and discarded its state
            # about this one (the TXID offsets after an import), then imported over the node's newer writes.
            self.store_id = self.binding.recorded() or ""
        for db in self.catalog:
            if db.sums is not None and db.sums.txid < db.index.max_txid:
                db.sums = None  # older than the store: rebuilt below
            elif db.sums is None and db.pos.is_zero and not len(db.index):
                db.sums = PageSums.empty()
        for record in self.uploadlog.replay():
            await self._replay(record)
        self.uploadlog.end_replay()
        self.uploadlog.start()
        for db in self.catalog:
            if db.sums is not None and not db.sums.matches(db.pos):
                db.sums = None  # the cached page checksums are of another state: the next tick rebuilds them
            if db.pending:
                self.pending_bytes += sum(len(p.data) for p in db.pending)
                self.flush_queue.add(db, due_at(db, self.levels.l0_interval))

    async def _fence(self, db: Database) -> float:
        """Called before every write to the store: raises if this engine may not write `db` now; returns the
        seconds the write may take (it must end while the lease holds: lease.py)."""
        if not self._store_checked:
            raise StorageError(self.storage.url, "not checked since start (it was unreachable); nothing is written "
                               "until it is", retryable=True)
        left = self.leases.fence(db.cluster)
        if self._fence_extra is not None:
            await self._fence_extra(db)
        return left

    async def _check_store(self, *, started: bool) -> None:
        """Check the store enforces conditional writes (leases and write-once files rest on them; this is before the
        first: the identity's), bind the state directory to its identity, then reconcile every index with it and
        learn the copies set aside."""
        await self.storage.check_conditional_writes()  # ConditionalWritesIgnored: a configuration error, never retried
        identity = await store_identity(self.storage)
        recorded = self.binding.recorded()
        if recorded is not None and recorded != identity.id:
            if started:
                raise SidecarError(f"{self.state_dir}: the store {self.storage.url} is another store than this state "
                                   f"directory's ({identity.id}, not {recorded}); restart to rebuild from it")
            moved = self.binding.set_aside(recorded)
            log.warning("state directory belonged to another store: its cache and upload log are set aside, and "
                        "everything is rebuilt from this store", store=self.storage.url, was=recorded,
                        now=identity.id, moved_to=str(moved))
        self.binding.bind(identity, self.storage.url)
        self.store_id = identity.id
        if started:
            for db in await self.catalog.reconcile():
                self._trim_pending(db)
        else:
            await self.catalog.load()
        await self.catalog.learn_set_aside()
        self._store_checked = True

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

    async def _replay(self, record: Record) -> None:
        """Take back one logged upload: pending again unless already flushed; a deletion drops what came before."""
        db = self.catalog.get(record.cluster, record.name)
        if not record.data:
            if db is not None:
                for p in db.pending:
                    self.uploadlog.release(p.segment)
                db.pending = []
                db.refresh_pos()
                if not len(db.index):
                    self.catalog.forget(db)
            return
        what = f"{self.uploadlog.path(record.segment)} at offset {record.offset} ({record.cluster}/{record.name})"
        try:  # the door's checks again: a record an older version accepted must not stop the start
            checked = check_upload(record.data, what)
            check_header(checked.header, self.clock(), self.intake.max_skew, what)
            db = self.catalog.create(record.cluster, record.name)
        except (LTXError, SidecarError) as err:
            self._quarantine(record, err)
            return
        header = checked.header
        if not await self.intake.replay(db, checked, record.segment, bytes(record.data), what):
            if header.max_txid > db.index.max_txid:
                log.error("upload log: record does not continue its database; skipped", record=what,
                          pos=f"{db.pos.txid:016x}", min_txid=f"{header.min_txid:016x}")

    def _quarantine(self, record: Record, err: Exception) -> None:
        """Keep a bad upload log record aside (`<state>/quarantine/`), say where, and go on without it."""
        path = self.state_dir / "quarantine" / f"{record.segment:016x}-{record.offset:016x}.ltx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(record.data)
        self.quarantined += 1
        log.error("upload log: record refused at replay and quarantined", file=str(self.uploadlog.path(record.segment)),
                  offset=record.offset, cluster=record.cluster, db=record.name, error=str(err), kept=str(path))

    def abandon(self) -> None:
        """Let go of the state directory without flushing anything, as a crash would (tests use this)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self.uploadlog.abandon()
        self._closed = True

    async def close(self, *, within: float | None = None) -> None:
        """Flush every pending upload to the store, then let go of the state directory.

        If the store cannot take them (it is down, or hangs past `within` seconds), they stay in the upload log,
        acknowledged and durable, and the next start flushes them; closing goes on regardless. `within` bounds
        the flushes and the lease release together, so that a stop ends within the platform's kill timeout
        (not an `asyncio.timeout` around the call: the upload log and the state directory are closed whatever).
        """
        if self._closed:
            return
        deadline = None if within is None else asyncio.get_running_loop().time() + within
        for task in self._renewing.values():
            task.cancel()
        await asyncio.gather(*self._renewing.values(), return_exceptions=True)
        try:
            async with asyncio.timeout_at(deadline):
                for db in self.catalog:  # each alone: one database the store refuses keeps no other's uploads back
                    try:
                        await self._flush(db)
                    except (StorageError, OSError, SidecarError, LTXError) as err:
                        log.warning("closing with uploads not yet in the store; they stay in the upload log for "
                                    "the next start", cluster=db.cluster, db=db.name, uploads=len(db.pending),
                                    error=str(err))
        except TimeoutError:
            for db in self.catalog:
                if db.pending:
                    log.warning("closing with uploads not yet in the store; they stay in the upload log for "
                                "the next start", cluster=db.cluster, db=db.name, uploads=len(db.pending),
                                error=f"the store did not answer within {within:g}s")
        await self.uploadlog.close()
        try:
            await self.catalog.save_dirty()
        except OSError as err:
            log.warning("index cache not written; the next start rebuilds it from the store", error=str(err))
        for cluster in list(self.leases.held):
            try:  # past the deadline, one more second: a store that answers lets the next owner in at once
                async with asyncio.timeout_at(None if deadline is None else max(
                        deadline, asyncio.get_running_loop().time() + 1)):
                    await self.leases.release(cluster)
            except (StorageError, TimeoutError) as err:
                log.warning("lease not released; it expires by itself", cluster=cluster, error=str(err) or "timeout")
        self._closed = True
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    async def run(self, stop: asyncio.Event, period: float = 1.0) -> None:
        """Until `stop` is set: flush what comes due (as many at once as the store sustains), tick the rest every
        `period`, renew leases. Jobs fail alone (see `tick`); anything else ends the loop with its error."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._renewals(stop), name="lease renewals")
            tg.create_task(self._flush_loop(stop), name="flushes")
            while not stop.is_set():
                await self.tick(flush=False)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), period)

    async def _flush_loop(self, stop: asyncio.Event) -> None:
        """Flush each database as it comes due, up to `limit` at once; no per-tick budget caps the rate."""
        running: dict[asyncio.Task[bool], Database] = {}
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                now = self.clock()
                for db in self.flush_queue.pop_due(now, max(0, self.limit.n - len(running))):
                    if db.pending and db.job("flush").backoff.ready(now) and self.leases.holds(db.cluster):
                        running[asyncio.create_task(self._job(db, "flush", now, self._flush(db)))] = db
                    elif db.pending:  # not yet: the tick takes its lease or its backoff ends
                        self.flush_queue.add(db, now + 0.5)
                nxt = self.flush_queue.next_at()
                if running and len(running) >= self.limit.n:
                    timeout = None  # full: wait for one to finish
                else:
                    timeout = 0.5 if nxt is None else min(0.5, max(0.0, nxt - now))
                done, _ = await asyncio.wait([*running, stopping], timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    db = running.pop(task, None)  # type: ignore[arg-type]
                    if db is None:
                        continue
                    (self.limit.success if task.result() else self.limit.failure)()
                    if db.pending:
                        self.flush_queue.add(db, due_at(db, self.levels.l0_interval))
        finally:
            stopping.cancel()
            if running:
                await asyncio.wait(running)

    async def _renewals(self, stop: asyncio.Event) -> None:
        """Every third of the lease TTL: renew the leases of busy clusters, let idle ones go."""
        every = self.leases.ttl / 3
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if stop.is_set():
                return
            now = self.clock()
            for cluster in list(self.leases.held):
                dbs = [db for db in self.catalog if db.cluster == cluster]
                # A job under way (a compaction reading a large database's files for longer than the TTL) counts:
                # let go under it, its write would be refused at the end, and so again at every retry.
                busy = now - self._wanted.get(cluster, 0.0) < self.leases.ttl or any(
                    db.pending or db.uploading or now - db.last_upload < self.leases.ttl or db.maint.locked()
                    or db.flushing.locked() for db in dbs)
                async with self._owning.setdefault(cluster, asyncio.Lock()):  # one renewal at a time (If-Match)
                    try:
                        if not self.leases.holds(cluster):
                            continue
                        if not busy:
                            await self.leases.release(cluster)
                        elif self.leases.due(cluster):
                            await self.leases.renew(cluster)
                    except NotOwner as err:
                        self._lost(cluster, err)
                    except StorageError as err:
                        log.warning("lease renewal failed; writes stop when it runs out", cluster=cluster,
                                    error=str(err))

    def _lost(self, cluster: str, err: NotOwner) -> None:
        """Another engine took the cluster: what this one acknowledged but never stored is its clients' to resend."""
        dropped = 0
        for db in self.catalog:
            if db.cluster == cluster and db.pending:
                for p in db.pending:
                    self.uploadlog.release(p.segment)
                dropped += len(db.pending)
                db.pending = []
                db.refresh_pos()
                db.sums = None
        self.leases.drop(cluster)
        self._current.discard(cluster)
        self._sweeps.pop(cluster, None)  # the new owner sweeps
        log.warning("lease lost: another engine writes this cluster now", cluster=cluster, error=str(err),
                    dropped_uploads=dropped)

    async def own(self, cluster: str, *, provisional: bool = False) -> None:
        """Make sure this engine writes `cluster`, taking its lease if it is free (and rebuilding the cluster's
        indexes from the store if another engine wrote it meanwhile). Raises NotOwner if another engine holds it.

        `provisional`: if the store cannot be reached to take the lease, go on (to accept uploads into the upload
        log) as long as this state directory held the cluster last; nothing is written to the store until the
        lease is taken, and if another engine took it meanwhile, the uploads are dropped for their clients to send
        again."""
        self._wanted[cluster] = self.clock()
        if self.leases.holds(cluster) and not self.leases.due(cluster) and cluster in self._current:
            return
        if provisional and self.leases.ours(cluster) and (
                (self.leases.holds(cluster) and cluster in self._current) or cluster in self._store_trouble
                or self._renewal_running(cluster)):
            # An upload never waits on the store for a lease this engine holds, or held until the store stopped
            # answering. (A process that was merely paused past its lease takes it back, or learns it lost it,
            # before it accepts anything.)
            self._renew_soon(cluster)
            return
        async with self._owning.setdefault(cluster, asyncio.Lock()):
            if not self.leases.holds(cluster) or cluster not in self._current:
                self._current.discard(cluster)
                try:
                    fresh = await self.leases.acquire(cluster)
                except StorageError:
                    if provisional and cluster in self._held_before:
                        return
                    raise
                if cluster not in self._held_before:
                    self._held_before.add(cluster)
                    await asyncio.to_thread(write_atomically, self.state_dir / HELD_FILE,
                                            json.dumps(sorted(self._held_before)))
                if not fresh:
                    for db in await self.catalog.reconcile(cluster):
                        self._trim_pending(db)
                    gap = 2 * self.leases.ttl
                    self._sweeps[cluster] = (self.clock() + gap, gap)
                self._current.add(cluster)
            elif self.leases.due(cluster):  # a third of the TTL old: renew while it is used
                try:
                    await self.leases.renew(cluster)
                except NotOwner as err:
                    self._lost(cluster, err)
                    raise
                except StorageError:
                    if not self.leases.holds(cluster):
                        raise
                    log.warning("lease renewal failed; retried at the next use", cluster=cluster)

    async def _stored(self, db: Database, added: FileEntry | None = None) -> None:
        """A database's stored files changed: write its head object, and wake whoever waits for a change."""
        await self._store_head(db, added)
        async with self.stored:
            self.stored.notify_all()

    async def _store_head(self, db: Database, added: FileEntry | None = None) -> None:
        """Write `<db>/head.json` (engine/head.py), so readers follow the latest state without a LIST.

        After a flush (`added`) the head is the last one and that file; other changes plan it again.
        Retention calls this before deleting, so followers move off files before they go; a change that leaves
        the latest plan as it was costs no PUT. A failure is only logged: the files and the index are what restores
        rely on, and the next change writes it again.
        """
        known = self._latest.get(db.prefix)
        prev = known[1] if known is not None and known[0] is db.index else None  # not of an index since replaced
        latest = heads.extended(prev, added, db.index) if added is not None else None
        if latest is None:
            latest = heads.latest(db.index)
        if latest is None:
            self._latest.pop(db.prefix, None)
            return
        self._latest[db.prefix] = (db.index, latest)
        data = heads.encode(latest)
        if self._heads.get(db.prefix) == data:
            return
        try:
            async with asyncio.timeout(await self._fence(db)):
                await self.storage.put_bytes(self.storage.layout.head_key(db.prefix), data)
            self._heads[db.prefix] = data
        except (StorageError, NotOwner, TimeoutError) as err:
            log.warning("head object not written; readers see this change with the next one", cluster=db.cluster,
                        db=db.name, error=str(err))

    def advertise(self, addr: str) -> None:
        """Where this engine's process takes requests, written into the leases it takes from now on."""
        self.leases.addr = addr

    def _renew_soon(self, cluster: str) -> None:
        """Renew (or take back) this engine's lease in the background, one attempt at a time per cluster."""
        task = self._renewing.get(cluster)
        if task is None or task.done():
            self._renewing[cluster] = asyncio.create_task(self._renew_now(cluster), name=f"lease {cluster}")

    def _renewal_running(self, cluster: str) -> bool:
        task = self._renewing.get(cluster)
        return task is not None and not task.done()

    async def _renew_now(self, cluster: str) -> None:
        try:
            await self.own(cluster)
            self._store_trouble.discard(cluster)
        except NotOwner as err:
            self._store_trouble.discard(cluster)
            self._lost(cluster, err)
        except StorageError as err:
            self._store_trouble.add(cluster)
            log.warning("lease renewal failed; writes wait until it succeeds", cluster=cluster, error=str(err))

    def owns(self, cluster: str) -> bool:
        """Whether this engine writes `cluster` now; asking counts as using it (its lease is kept)."""
        self._wanted[cluster] = self.clock()
        return self.leases.holds(cluster)

    async def refresh(self, cluster: str, name: str) -> None:
        """Read one database's state from the store again (for an engine that does not write its cluster)."""
        db = self.catalog.create(cluster, name)
        if not self.leases.holds(cluster):
            await self.catalog.reconcile(only=db, following=True)

    async def release(self, cluster: str) -> None:
        """Flush the cluster's pending uploads and let its lease go, so another engine may take it at once."""
        for db in self.catalog:
            if db.cluster == cluster and db.pending and self.leases.holds(cluster):
                await self._flush(db)
        await self.leases.release(cluster)

    # -- queries: copies, never the engine's own state ------------------------------------------------

    def clusters(self) -> list[str]:
        return self.catalog.clusters()

    def databases(self, cluster: str) -> list[str]:
        return self.catalog.databases(cluster)

    async def all_clusters(self) -> list[str]:
        """The clusters this engine knows and those any engine on the store has written (from their leases)."""
        try:
            leased = await self.leases.clusters()
        except StorageError:
            leased = []
        return sorted(set(self.catalog.clusters()) | set(leased))

    def exists(self, cluster: str, name: str) -> bool:
        return self.catalog.get(cluster, name) is not None

    def positions(self, cluster: str) -> dict[str, Pos]:
        return {db.name: db.pos for db in sorted(self.catalog, key=lambda d: d.name)
                if db.cluster == cluster and not db.pos.is_zero}

    def busy(self, cluster: str, name: str) -> bool:
        """Whether an upload of the database is being accepted right now."""
        db = self.catalog.get(cluster, name)
        return bool(db and db.uploading)

    def pos(self, cluster: str, name: str) -> Pos:
        db = self.catalog.get(cluster, name)
        return db.pos if db else Pos()

    def hwm(self, cluster: str, name: str) -> int:
        db = self.catalog.get(cluster, name)
        return db.hwm if db else 0

    def status(self, cluster: str, name: str) -> DbStatus:
        return self.catalog.require(cluster, name).status()

    def statuses(self) -> list[DbStatus]:
        return [db.status() for db in self.catalog]

    def index(self, cluster: str, name: str) -> DbIndex:
        """A copy of a database's index of stored files."""
        return self.catalog.require(cluster, name).index.copy()

    def restore_points(self, cluster: str, name: str) -> list[tuple[int, int, int]]:
        return restore_points(self.catalog.require(cluster, name).index)

    def observe_builds(self, timed: Timed) -> None:
        """Call `timed(level, seconds)` after each flush (level 0) and compaction: the server's metrics."""
        self.builder.timed = timed

    def store_stats(self) -> RequestStats:
        """The store's request counts and durations, by operation (live; read, never change)."""
        return self.storage.stats

    @property
    def log_bytes(self) -> int:
        """Bytes of the upload log on disk (grows while the store is behind)."""
        return self.uploadlog.size

    @property
    def disk_full(self) -> bool:
        """Whether the state directory's disk refused the last upload log write for lack of space."""
        return self.uploadlog.disk_full

    @property
    def log_commits(self) -> int:
        return self.uploadlog.commits

    @property
    def log_segments(self) -> int:
        return self.uploadlog.segments

    # -- uploads --------------------------------------------------------------------------------------

    async def write_tx(self, cluster: str, name: str, data: bytes) -> int:
        """Validate one LTX v2 upload, make it durable, and return the HWM.

        Raises PosMismatch (with the current position; nothing is stored) when the upload does not continue
        the database, or while another upload of it is in progress.
        """
        await self.own(cluster, provisional=True)
        new = self.catalog.get(cluster, name) is None
        if new:
            self._check_room(cluster, name)
        db = self.catalog.create(cluster, name)
        if db.uploading:
            raise PosMismatch(name, db.pos, "another upload of this database is in progress")
        db.uploading += 1
        try:
            self._check_pressure(db)
            if db.sums is None and self.intake.verify_checksums:
                await self._rebuild_sums(db)  # lost, or the cluster was taken over: read them from the store now
            await self.intake.accept(db, data)
        except BaseException:
            # A refused first upload leaves no database behind (the operator's list would show one that has nothing).
            if new and db.uploading == 1 and db.pos.is_zero and not db.pending and not len(db.index) \
                    and self.catalog.get(cluster, name) is db:
                self.catalog.forget(db)
            raise
        finally:
            db.uploading -= 1
        self.pending_bytes += len(data)
        if self.levels.l0_interval <= 0 or len(data) > BIG_UPLOAD:
            # The upload is accepted whatever the store says now: it is in the upload log and the position has
            # moved (a client told to retry would find nothing to resend). A failed flush is recorded on the database
            # and retried with the others; the HWM answered says what the store holds.
            now = self.clock()
            if not await self._job(db, "flush", now, self._flush(db)) and db.pending:
                self.flush_queue.add(db, now)
        elif db.pending:
            self.flush_queue.add(db, due_at(db, self.levels.l0_interval))
        return db.hwm

    def _check_room(self, cluster: str, name: str) -> None:
        """Refuse a new database in a cluster at its ceiling: each costs memory, objects and a share of every tick,
        and a cluster creating them without end would take those from every other cluster."""
        if self.max_databases and self.catalog.count(cluster) >= self.max_databases:
            raise TooManyDatabases(f"{cluster}/{name}: cluster {cluster!r} already has {self.max_databases} databases "
                                   "(engine.max_databases); delete one or raise the ceiling")

    def _check_pressure(self, db: Database) -> None:
        """Refuse (503, Retry-After) while the store cannot keep up: rather a retried upload than a log that grows
        until the disk is full and an HWM that lags without bound."""
        if self.max_pending_bytes and self.pending_bytes > self.max_pending_bytes:
            raise Backpressure(f"{self.pending_bytes} bytes of acknowledged uploads wait for the store (ceiling "
                               f"{self.max_pending_bytes}); retry shortly", retry_after=2)
        if self.max_hwm_lag and db.pending and self.clock() - db.pending[0].arrived > self.max_hwm_lag:
            raise Backpressure(f"{db.prefix}: the store holds nothing newer than "
                               f"{self.clock() - db.pending[0].arrived:.0f}s ago (ceiling {self.max_hwm_lag:g}s); "
                               "retry shortly", retry_after=2)

    def _flushed(self, db: Database, nbytes: int, seconds: float) -> None:
        self.flushes += 1
        self.flush_seconds += seconds
        self.pending_bytes = max(0, self.pending_bytes - nbytes)

    def precheck(self, cluster: str, name: str, header: Header) -> None:
        """Refuse an upload by its header alone, before its body is read: insane fields, or (when this engine writes
        the cluster) a position it does not continue. `write_tx` checks everything again."""
        check_header(header, self.clock(), self.intake.max_skew, f"{cluster}/{name}")
        db = self.catalog.get(cluster, name)
        if db is None:
            self._check_room(cluster, name)
        if db is not None and self.leases.holds(cluster):
            check_continues(db, header)

    async def _flush(self, db: Database) -> None:
        """Flush a database's pending uploads now, as the owner of its cluster."""
        if db.pending:
            await self.own(db.cluster)
            await self.flusher.flush(db)

    async def flush(self, cluster: str, name: str) -> int:
        """Flush one database's pending uploads now; returns its HWM."""
        db = self.catalog.require(cluster, name)
        await self._flush(db)
        return db.hwm

    async def flush_all(self) -> None:
        for db in self.catalog:
            await self._flush(db)

    # -- the schedule ---------------------------------------------------------------------------------

    async def tick(self, now: float | None = None, *, flush: bool = True) -> None:
        """Run what is due: flushes (unless `flush` is False: `run` flushes in its own loop), compactions at their
        boundaries, snapshots, retention; every few seconds, write the changed index caches.

        Each database's jobs run apart: one failing is recorded on that database (and retried after a backoff),
        never stopping another's.
        """
        now = self.clock() if now is None else now
        lv = self.levels
        if not self._store_checked:
            try:
                await self._check_store(started=True)
            except StorageError as err:
                log.warning("store still unreachable; nothing is written to it until it answers", error=str(err))
                return
        mine = await self._owned([db for db in self.catalog if self._has_work(db, now)], now)
        for db in mine:
            if db.resync:
                await self._job(db, "resync", now, self._resync(db))
            if db.sums is None and self.intake.verify_checksums and db.job("checksums").backoff.ready(now):
                await self._job(db, "checksums", now, self._rebuild_sums(db))
        ready = [db for db in due(mine, now, lv.l0_interval) if db.job("flush").backoff.ready(now)] if flush else []
        await self._jobs(ready, "flush", now, self.flusher.flush)  # oldest first
        sweeping = [db for db in mine if self._sweep_due(db.cluster, now)]
        if sweeping:
            await self._jobs(sweeping, "sweep", now, self._sweep)
            for c in {db.cluster for db in sweeping} & self._sweeps.keys():  # (a lease lost meanwhile is not)
                _, gap = self._sweeps[c]
                if gap >= self.levels.l1_interval:
                    del self._sweeps[c]  # the last: a PUT still in flight this long after the takeover is not
                else:
                    gap = min(2 * gap, self.levels.l1_interval)
                    self._sweeps[c] = (now + gap, gap)
        for db in mine:
            # Compaction only adds files and retention only removes what flushes never touch, so uploads go on
            # meanwhile; restores take `maint` so their inputs stay put.
            async with db.maint:
                for level in due_levels(db.last_run, now, lv):
                    name = f"L{level}" if level != SNAPSHOT_LEVEL else "snapshot"
                    if db.job(name).backoff.ready(now) and await self._job(db, name, now,
                                                                           self.compactor.compact(db, level)):
                        db.last_run[level] = now
                if db.job("retention").backoff.ready(now):
                    await self._job(db, "retention", now, self.retention.apply(db, now))
                # A job of its own: a copy the store fails to delete is retried after a backoff, and never holds
                # back the retention of the database's files.
                if db.set_aside and db.job("set_aside").backoff.ready(now):
                    await self._job(db, "set_aside", now, self.retention.delete_expired_set_aside(db, now))
        self.pending_bytes = sum(len(p.data) for db in self.catalog for p in db.pending)  # recounted: drift-free
        if time.monotonic() - self._saved >= SAVE_EVERY:
            self._saved = time.monotonic()
            await self.catalog.save_dirty()

    def _has_work(self, db: Database, now: float) -> bool:
        """Whether any job of the database would write to the store now (no I/O; a level due with nothing new to
        compact is marked as run)."""
        if db.resync or (db.sums is None and self.intake.verify_checksums) or db.pending:
            return True
        if self._sweep_due(db.cluster, now):
            return True
        for level in due_levels(db.last_run, now, self.levels):
            try:
                if sources(db.index, level):
                    return True
            except SidecarError:
                return True  # a gap: the job reports it
            db.last_run[level] = now  # nothing new to compact at this boundary
        return bool(retention_victims(db.index, self.levels, now) or expired_set_aside(db.set_aside, self.levels, now))

    async def _owned(self, dbs: list[Database], now: float) -> list[Database]:
        """The databases of `dbs` whose cluster this engine writes (taking free leases); the rest are another's
        (left alone until that engine's lease would expire). A lease the store fails to give is a failure of each
        database's "lease" job: their work waits."""
        owned: set[str] = set()
        for cluster in sorted({db.cluster for db in dbs}):
            if self._foreign.get(cluster, 0.0) > now:
                continue
            mine = [db for db in dbs if db.cluster == cluster]
            if not all(db.job("lease").backoff.ready(now) for db in mine):
                continue
            try:
                await self.own(cluster)
            except NotOwner as err:
                self._foreign[cluster] = err.holder.expires / 1000 if err.holder else now + self.leases.ttl
                log.debug("cluster written by another engine; its jobs are theirs", cluster=cluster, error=str(err))
                if any(db.pending for db in mine):  # acknowledged while this engine held it (or thought it would)
                    self._lost(cluster, err)
                continue
            except StorageError as err:
                for db in mine:
                    self._failed(db, "lease", now, err)
                continue
            owned.add(cluster)
            self._foreign.pop(cluster, None)
            for db in mine:
                self._succeeded(db, "lease")
        return [db for db in dbs if db.cluster in owned]

    async def _jobs(self, dbs: list[Database], name: str, now: float,
                    work: Callable[[Database], Awaitable[object]]) -> None:
        """Run one job on each of `dbs`, many at a time (each mostly waits on the store), up to `limit`."""
        sem = asyncio.Semaphore(self.limit.n)

        async def one(db: Database) -> None:
            async with sem:
                await self._job(db, name, now, work(db))
        await asyncio.gather(*map(one, dbs))

    async def _job(self, db: Database, name: str, now: float, work: Awaitable[object]) -> bool:
        """Run one job of one database; a failure is recorded on it and logged, never raised."""
        try:
            await work
        except (SidecarError, LTXError, OSError) as err:
            if isinstance(err, NotFound | PreconditionFailed):
                db.resync = True  # the store contradicts the index: rebuild it from the store at the next tick
            self._failed(db, name, now, err)
            return False
        self._succeeded(db, name)
        return True

    def _failed(self, db: Database, name: str, now: float, err: Exception) -> None:
        health = db.job(name)
        health.failures += 1
        health.last_error = str(err)
        delay = health.backoff.fail(now)
        # A failure or two is often the store's passing trouble (retried with backoff); from the third in a row a
        # person should look.
        level = log.error if health.backoff.failures >= 3 else log.warning
        level("job failed", cluster=db.cluster, db=db.name, job=name, error=str(err),
              failures=health.backoff.failures, retry_in=round(delay, 1))

    def _succeeded(self, db: Database, name: str) -> None:
        health = db.job(name)
        if health.backoff.failures:
            log.info("job recovered", cluster=db.cluster, db=db.name, job=name, after=health.backoff.failures)
        health.backoff.ok()

    def _sweep_due(self, cluster: str, now: float) -> bool:
        """Whether the cluster's databases are due a sweep: only while this engine holds the cluster, so a sweep
        never takes a lease by itself (an idle cluster let go is swept once its writes bring it back)."""
        return self._sweeps.get(cluster, (math.inf, 0.0))[0] <= now and self.leases.holds(cluster)

    async def _sweep(self, db: Database) -> None:
        """Delete the database's files that its index lacks. After a takeover's reconcile only this engine writes
        the cluster, so such a file is a late write of a previous owner: a request that reached the store after its
        lease had run out (a process paused mid-PUT; S3 has no fencing token). It starts above where this engine
        took over, or repeats what is stored: it is no part of this engine's history, and a reader that listed the
        store would see it overlap the files that are. Sweeps run twice the lease TTL after a takeover, then at
        doubling gaps up to `l1_interval`, whenever this engine holds the cluster then; the one at that gap is the
        last (every restart is a takeover: a LIST per database for ever after would cost more than the rare late
        PUT it could still find)."""
        async with db.flushing, db.maint:  # none of this engine's own writes is between the store and the index
            strays = await self.catalog.strays(db)
            if not strays:
                return
            async with asyncio.timeout(await self._fence(db)):
                await self.storage.delete([o.key for o in strays])
        self.strays_deleted += len(strays)
        for o in strays:
            log.warning("stray file deleted: written by an engine after its lease had run out", cluster=db.cluster,
                        db=db.name, key=o.key, size=o.size)

    async def _resync(self, db: Database) -> None:
        """Rebuild a database's index from the store, and keep only the pending uploads that still continue it."""
        if db.cluster in self._sweeps:
            # Taken over from another engine: a file the index lacks is that engine's late write (see `_sweep`), not
            # history to adopt. One at the key of a flush of this engine's would otherwise replace its acknowledged
            # uploads with the previous owner's (a primary that failed over meanwhile wrote other ones).
            await self._sweep(db)
        async with db.lock, db.flushing:
            await self.catalog.reconcile(only=db)
            db.resync = False
            self._trim_pending(db)

    def _trim_pending(self, db: Database) -> None:
        """After the index was rebuilt: keep only the pending uploads that still continue what the store holds."""
        keep: list[Pending] = []
        drop: list[Pending] = []
        for p in db.pending:
            # The newest TXID stored, past a gap in the chain too: an acknowledged upload continuing it is kept (the
            # HWM, which clients prune under, still stops before the gap).
            head = keep[-1].header.max_txid if keep else db.index.max_txid
            (keep if p.header.min_txid == head + 1 or (p.header.is_snapshot and p.header.max_txid > head)
             else drop).append(p)
        for p in drop:
            self.uploadlog.release(p.segment)
        if drop:
            log.warning("acknowledged uploads dropped: they do not continue what the store holds; the client "
                        "sends them again", cluster=db.cluster, db=db.name, uploads=len(drop),
                        hwm=f"{db.hwm:016x}")
        db.pending = keep
        db.refresh_pos()
        if db.sums is not None and not db.sums.matches(db.pos):
            db.sums = None  # rebuilt at the next tick

    async def _rebuild_sums(self, db: Database) -> None:
        """Rebuild a database's page checksums: its stored state at the HWM, then its pending uploads on top."""
        async with db.maint:
            head = db.index.restorable_head()
            if head is None:
                sums = PageSums.empty()
            else:
                plan = plan_restore(db.index, txid=head.max_txid)
                keys = [e.key(self.storage.layout, db.prefix) for e in plan]
                with self.tmp("sums-") as tmp:
                    paths = await self.storage.local_files(keys, Path(tmp))
                    sums = await asyncio.to_thread(PageSums.of_files, paths, head.max_txid)
        async with db.lock:
            for p in db.pending:
                if p.header.max_txid > sums.txid:
                    checked = check_upload(p.data, db.prefix)
                    sums.apply(sums.change(p.header, checked.crcs, checked.post, db.prefix), p.header.page_size)
            if not sums.matches(db.pos):
                raise SidecarError(f"{db.prefix}: page checksums rebuilt from the store give {sums.checksum:016x} at "
                                   f"TXID {sums.txid:016x}, not the position {db.pos}")
            db.sums = sums
        log.info("page checksums rebuilt", cluster=db.cluster, db=db.name, pages=sums.commit, txid=f"{sums.txid:016x}")

    async def compact_level(self, cluster: str, name: str, level: int) -> FileEntry | None:
        db = self.catalog.require(cluster, name)
        async with db.maint:
            return await self.compactor.compact(db, level)

    # -- operations -----------------------------------------------------------------------------------

    async def restore_to(self, cluster: str, name: str, out: str | os.PathLike[str], *, txid: int | None = None,
                         timestamp: int | None = None, integrity_check: bool = False) -> RestoreResult:
        """Restore a stored database into the SQLite file `out` (pending uploads are flushed first)."""
        return await self.ops.restore_to(self.catalog.require(cluster, name), out, txid=txid, timestamp=timestamp,
                                         integrity_check=integrity_check)

    async def snapshot_file(self, cluster: str, name: str, out: str | os.PathLike[str], *,
                            timestamp: int | None = None, txid: int | None = None,
                            compress: bool = True) -> tuple[Header, Trailer]:
        """An LTX v2 snapshot of the stored state (latest or at a target) in `out`: what LiteFS pulls."""
        return await self.ops.snapshot_file(self.catalog.require(cluster, name), out, timestamp=timestamp,
                                            txid=txid, compress=compress)

    async def write_state(self, cluster: str, name: str, db_path: str | os.PathLike[str]) -> Pos:
        """Append the SQLite file at `db_path` as the database's next transaction."""
        return await self.ops.write_state(cluster, name, db_path)

    async def clone(self, cluster: str, name: str, to_cluster: str, to_name: str) -> Pos:
        """Copy a database's latest state into another cluster/name as its new head."""
        return await self.ops.clone(self.catalog.require(cluster, name), to_cluster, to_name)

    async def delete_database(self, cluster: str, name: str) -> int:
        """Forget a database and delete every stored file of it; returns how many files were deleted."""
        db = self.catalog.require(cluster, name)
        try:
            return await self.ops.delete(db)
        finally:
            if self.catalog.get(cluster, name) is None:  # its head goes with it (a loop of creates and deletes)
                self._heads.pop(db.prefix, None)
                self._latest.pop(db.prefix, None)

    def tmp(self, prefix: str = "tmp-") -> contextlib.AbstractContextManager[str]:
        """A private temporary directory on the state directory's file system (removed on exit)."""
        return self.ops.tmp(prefix)


def levels_of(engine: EngineConfig) -> Levels:
    """The engine section's intervals and retentions (the same names as Levels' fields)."""
    return Levels(l0_interval=engine.l0_interval, l1_interval=engine.l1_interval, l2_interval=engine.l2_interval,
                  snapshot_interval=engine.snapshot_interval, l0_retention=engine.l0_retention,
                  l1_retention=engine.l1_retention, l2_retention=engine.l2_retention,
                  snapshot_retention=engine.snapshot_retention)


__all__ = ["Backpressure", "Engine", "TooManyDatabases", "levels_of"]
