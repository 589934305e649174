"""The sidecar: watch `<data-dir>/dbs/*/ltx/`, ship each database once per batch interval, prune under the HWM.

    sidecar = await Sidecar.open(config.sidecar, config.engine)
    await sidecar.run(stop)          # until `stop` is set; then ships what is batched within the grace period

One task watches the directory (watchfiles), one ticks every `batch_interval`. A tick, per database (each its own
task, so a slow upload holds back no other database): learn upstream's position when it is unknown or stale, ship
until upstream holds the node's head (≤ 4,096 files and 32 MiB of them per upload), then delete local files that
are older than `retention` and at or below the HWM, never the newest.
On a replica (`.primary` exists) nothing is shipped; each database's HWM is polled (many at once) and the same
pruning rule applies.
Reading upstream's positions (or HWMs) and letting go of it after a demotion are one more task, waited for as the
databases' are: a store that hangs or retries for minutes holds up that call, never the ticks that notice a
demotion, find new databases, prune and keep the gauges.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import watchfiles

from sidecar.config import EngineConfig, SidecarConfig
from sidecar.daemon import litefs_config
from sidecar.daemon.litefs import LiteFSError, LiteFSNode
from sidecar.daemon.local import LocalDB, LocalFile, list_databases, prune_victims
from sidecar.daemon.metrics import Metrics, start_metrics
from sidecar.daemon.ship import DbShipper, Diverged, Shipped
from sidecar.daemon.upstream import Upstream, open_upstream
from sidecar.errors import PosMismatch, SidecarError, UpstreamError
from sidecar.fsutil import write_atomically
from sidecar.log import get_logger
from sidecar.ltx import LTXError, Pos, parse_filename
from sidecar.retry import Backoff
from sidecar.sdnotify import Notifier

log = get_logger("sidecar.daemon")

_CATCH_UP = 64  # uploads per database per tick while catching up after an outage
# HWM calls a replica's poll makes at once: enough that a few databases whose calls hang (a store or server slow for
# them, each waiting up to upstream's timeout) hold back no other's HWM and pruning, few enough that a node with
# thousands of databases does not open as many requests to the server or store every `position_interval`.
_HWM_POLLS = 16
_FOLLOW_AFTER = 3  # ticks in a row in which the probe found new files before a database is followed by name


class Sidecar:
    def __init__(self, config: SidecarConfig, upstream: Upstream, node: LiteFSNode | None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.upstream = upstream
        self.node = node
        self.clock = clock
        self.dbs: dict[str, DbShipper] = {}
        # Each database's part of a tick runs as its own task: one whose upload is slow or stuck is left to finish
        # while the next ticks serve the others (it gets no new task until then).
        self._jobs: dict[str, asyncio.Task[list[Shipped]]] = {}
        # The tick's own call to upstream, one at a time and in order: reading positions (a primary), polling HWMs
        # (a replica) or letting go (a demotion). Left to finish while the next ticks go on, as a job is.
        self._call: asyncio.Task[None] | None = None
        self.backoff: dict[str, Backoff] = {}  # base 0.5 s, capped at `backoff_max` by each call
        self.positions_backoff = Backoff()
        self.metrics = Metrics()
        self.positions_at = -1e18  # when upstream's positions were last read (monotonic)
        self._rewatch = threading.Event()  # read by the watcher's thread
        self._rewatch_async = asyncio.Event()
        self._watched: set[str] = set()
        # Busy databases are followed by name, not watched: while every tick's probe finds the next files, the
        # watcher would only repeat it, at ~6 inotify events per transaction (half the sidecar's CPU at 1,000
        # tx/s). The first tick that finds nothing new puts the database back under the watcher.
        self._following: set[str] = set()
        self._streak: dict[str, int] = {}
        self.url = ""  # the metrics server's, once started
        self._was_primary = False
        self._letting_go = False  # set while a demoted node's ship jobs finish their upload in flight
        self._reported: set[Path] = set()
        self._prune_errors: dict[str, str] = {}  # database -> why its last prune failed
        self.shipped: collections.deque[tuple[str, Shipped]] = collections.deque(maxlen=100_000)  # recent uploads
        self._bind_links()

    def _bind_links(self) -> None:
        """The state kept about upstream (TXID offsets after an import) is only good for that upstream: another
        one (a new or emptied store, another server) gets a fresh start, and the old state is set aside."""
        links = self.config.state_dir / "links"
        marker = links / "upstream.json"
        wanted = self.upstream.identity
        try:
            recorded = json.loads(marker.read_text()).get("upstream")
        except (FileNotFoundError, ValueError, AttributeError):
            recorded = None
        if recorded != wanted and links.is_dir() and any(links.iterdir()):
            aside = self.config.state_dir / f"links.discarded-{int(time.time())}"
            links.rename(aside)
            log.warning("sidecar state of another upstream set aside; starting over from this upstream's positions",
                        was=recorded, now=wanted, moved_to=str(aside))
        write_atomically(marker, json.dumps({"upstream": wanted}))
    @classmethod
    async def open(cls, config: SidecarConfig, engine: EngineConfig) -> Sidecar:
        upstream = await open_upstream(config.upstream, cluster=config.cluster, token=config.token,
                                       state_dir=config.state_dir, engine=engine)
        node = LiteFSNode(config.litefs_url, config.mount_dir) if config.litefs_url else None
        return cls(config, upstream, node)

    # -- databases ---------------------------------------------------------------------------------------

    def _db(self, name: str) -> DbShipper:
        db = self.dbs.get(name)
        if db is None:
            local = LocalDB(name, self.config.data_dir / "dbs" / name / "ltx")
            local.scan()
            state = self.config.state_dir / "links" / self.config.cluster / f"{name}.json"
            db = DbShipper(name, local, self.upstream, self.node, state, self.config.max_files_per_upload)
            self.dbs[name] = db
            self.backoff[name] = Backoff()
            log.info("database found", db=name, files=local.count,
                     head=f"{local.head.max_txid:016x}" if local.head else None)
        return db

    def rescan(self) -> None:
        for name in list_databases(self.config.data_dir):
            self._db(name).local.scan()

    def _changed(self, changes: set[tuple[watchfiles.Change, str]]) -> None:
        prefix = f"{self.config.data_dir / 'dbs'}/"
        snapshots: dict[str, int] = {}  # per database, the newest snapshot in ltx/: listed once per batch
        probed: set[str] = set()
        for change, raw in changes:  # plain string work: there are several events per transaction
            if not raw.startswith(prefix):
                continue
            parts = raw[len(prefix):].split("/")
            if len(parts) != 3 or parts[1] != "ltx":
                continue
            db = self.dbs.get(parts[0])
            if db is None:  # a database forgotten since (its directory is gone); a new one is found by discover()
                continue
            if change == watchfiles.Change.deleted:
                self._deleted_elsewhere(db, Path(raw), snapshots)
                db.local.discard(Path(raw))
            elif (txids := parse_filename(parts[2])) is not None and not db.local.has(txids[1]):
                if db.name not in probed:  # not yet found by the tick's probe: nor, likely, the files named after it,
                    probed.add(db.name)  # which a probe finds at once by name (a stat each, no Path, no sorting)
                    db.local.probe()
                    if db.local.has(txids[1]):
                        continue
                db.local.add(Path(raw))  # out of sequence (a snapshot, a file after a gap)

    def _deleted_elsewhere(self, db: DbShipper, path: Path, snapshots: dict[str, int]) -> None:
        """Someone else deleted a file upstream lacks: LiteFS's own retention is on (it should be off)."""
        f = db.local.get(int(path.name[17:33], 16)) if len(path.name) == 37 else None
        remote = db.remote.txid - db.link.offset if db.remote is not None else 0
        if f is not None and f.path == path and f.max_txid > remote and f.min_txid != 1 and \
                f.max_txid > _newest_snapshot(db.local.dir, snapshots, db.name):
            self.metrics.errors.labels("deleted_unshipped").inc()
            log.error("an LTX file was deleted before it was shipped; run LiteFS with data.retention <= 0 and no "
                      "backup section beside the sidecar", db=db.name, path=str(path))

    async def watch(self, stop: asyncio.Event) -> None:
        """Feed file events from each database's `ltx/` (non-recursive: LiteFS's page writes elsewhere in the data
        directory would cost more CPU than the shipping itself); restarted when a database appears."""
        def wanted(change: watchfiles.Change, path: str) -> bool:
            return path.endswith(".ltx")

        while not stop.is_set():
            self._rewatch.clear()
            self._rewatch_async.clear()
            watched = [db for db in self.dbs.values() if db.name not in self._following and db.local.dir.is_dir()]
            dirs = [db.local.dir for db in watched]
            self._watched = {db.name for db in watched}
            if not dirs:
                await _first(stop, self._rewatch_async)
                continue
            async for changes in watchfiles.awatch(*dirs, watch_filter=wanted, step=50, debounce=400,
                                                   stop_event=_Either(stop, self._rewatch), recursive=False):
                self._changed(changes)
            for name in self._watched:  # files that came while the watch was being rebuilt (LiteFS names them
                if (db := self.dbs.get(name)) is not None:  # in sequence; the periodic rescan is the safety net)
                    db.local.probe()

    def discover(self) -> None:
        """Pick up databases that appeared since the last look, and forget those whose `ltx/` is gone (LiteFS removed
        the database) unless a tick job of theirs is still under way; the watcher then follows what is left."""
        present = list_databases(self.config.data_dir)
        new = [name for name in present if name not in self.dbs]
        gone = set(self.dbs) - set(present) - set(self._jobs)
        for name in new:
            self._db(name)
        for name in sorted(gone):
            self._forget(name)
        if new or gone or set(self.dbs) - self._watched - self._following:
            self._rewatch.set()
            self._rewatch_async.set()

    def _forget(self, name: str) -> None:
        """Drop everything held about a removed database, its metric series included (else they would be exported
        for ever at their last values). Its link file stays: it is what the in-memory link was (every change is
        saved), so a database back under this name carries on exactly as after a restart of the sidecar."""
        db = self.dbs.pop(name)
        self.backoff.pop(name, None)
        self._streak.pop(name, None)
        self._following.discard(name)
        self._prune_errors.pop(name, None)
        self._reported = {path for path in self._reported if path.parent != db.local.dir}
        self.metrics.forget(name)
        log.info("database removed", db=name)

    # -- one tick ------------------------------------------------------------------------------------------

    async def refresh_positions(self) -> None:
        # An upload that lands while the positions are read knows better: one under way when the read starts or
        # ends, or one that set the database's position meanwhile (the read may span ticks: see `tick`).
        busy = set(self._jobs)
        before = {name: db.remote for name, db in self.dbs.items()}
        positions = await self.upstream.positions()
        for name, db in self.dbs.items():
            if name not in busy and name not in self._jobs and db.remote is before.get(name):
                db.remote = positions.get(name, Pos())
        self.positions_at = time.monotonic()

    async def _read_positions(self) -> None:
        try:
            await self.refresh_positions()
            self.positions_backoff.ok()
        except UpstreamError as err:
            delay = self.positions_backoff.fail(time.monotonic(), self.config.backoff_max)
            self._error("upstream", err, db=None, retry_in=round(delay, 2))
            for db in self.dbs.values():
                if db.remote is None:  # not shipped until upstream's position is known: say why
                    db.error = str(err)

    async def tick(self, wait: float | None = None) -> list[Shipped]:
        """One batch: ship every database that is behind, then prune. Returns what was shipped.

        With `wait`, a database still busy after that many seconds goes on in the background (shipping the
        others is not held back by it) and its result counts in a later tick; so does the tick's own call to
        upstream (positions, HWMs, letting go), which a store retrying for minutes would otherwise hold up, and the
        next tick's demotion check with it. Without `wait`, the tick waits for all."""
        self.discover()
        primary = self.node.is_primary() if self.node else True
        self.metrics.primary.set(1 if primary else 0)
        if self._was_primary and not primary:
            await self._let_go()
        self._was_primary = primary
        if self._call is None:
            stale = time.monotonic() - self.positions_at >= self.config.position_interval
            wanted = stale or any(db.remote is None for db in self.dbs.values())
            if primary and wanted and time.monotonic() >= self.positions_backoff.until:
                self._call = asyncio.create_task(self._read_positions(), name="positions")
            elif not primary and stale:
                self._call = asyncio.create_task(self._poll_hwm(), name="hwm poll")
        if self._call is not None:
            await asyncio.wait([self._call], timeout=wait)
            self._reap_call()
        for db in list(self.dbs.values()):
            if db.name not in self._jobs:
                self._jobs[db.name] = asyncio.create_task(self._tick_db(db, primary), name=f"tick {db.name}")
        if self._jobs:
            await asyncio.wait(self._jobs.values(), timeout=wait)
        shipped: list[Shipped] = []
        for name, job in list(self._jobs.items()):
            if job.done():
                del self._jobs[name]
                shipped += job.result()  # an unexpected error stops the sidecar, as before
        return shipped

    def _reap_call(self) -> None:
        """Forget the tick's call to upstream once it is done; it handles the errors it can (an unexpected one stops
        the sidecar, as a job's does)."""
        if self._call is not None and self._call.done():
            call, self._call = self._call, None
            if not call.cancelled():
                call.result()

    def _tasks(self) -> list[asyncio.Task[Any]]:
        """What the ticks left running: the databases' jobs and the call to upstream."""
        return [*self._jobs.values(), *([self._call] if self._call is not None else [])]

    async def _cancel_jobs(self) -> None:
        """Stop what is left of the ticks (a stuck upload, a call to upstream that hangs): safe, nothing above the
        HWM was pruned."""
        jobs = self._tasks()
        self._jobs.clear()
        self._call = None
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def _tick_db(self, db: DbShipper, primary: bool) -> list[Shipped]:
        shipped: list[Shipped] = []
        self._follow(db, db.local.probe())  # files the watcher has not reported yet
        backoff = self.backoff[db.name]
        now = time.monotonic()
        if primary and db.remote is not None and now >= backoff.until:
            try:
                while len(shipped) < _CATCH_UP and not self._letting_go and (s := await db.step()) is not None:
                    shipped.append(s)
                    self._shipped(db, s)
                backoff.ok()
                db.error = ""
            except PosMismatch as err:
                self._error("pos_mismatch", err, db=db.name)
            except (UpstreamError, LiteFSError, Diverged, SidecarError, OSError) as err:
                kind = "diverged" if isinstance(err, Diverged) else \
                    "litefs" if isinstance(err, LiteFSError) else "upstream"
                db.error = str(err)
                delay = backoff.fail(now, self.config.backoff_max)
                self._error(kind, err, db=db.name, retry_in=round(delay, 2))
            except LTXError as err:
                if not self._report_bad(db, err):  # no bad local file explains it: the in-process engine refused the
                    db.error = str(err)  # upload at its door (as `serve` answers 422): the database's error, retried
                    backoff.fail(now, self.config.backoff_max)
        self._prune(db)
        if primary and (hwm := db.local_hwm) is not None:
            db.local.pack(below=hwm)  # shipped files wait only to be pruned: 16 bytes each, not an object
        self._gauges(db, shipped)
        return shipped

    def _follow(self, db: DbShipper, found: int) -> None:
        """Follow a busy database by name (the watcher set aside); watch it again once a tick finds nothing."""
        name = db.name
        if found:
            self._streak[name] = streak = self._streak.get(name, 0) + 1
            if streak >= _FOLLOW_AFTER and name not in self._following:
                self._following.add(name)
                self._rewatch.set()
                self._rewatch_async.set()
                log.debug("following by name", db=name)
            return
        self._streak[name] = 0
        if name in self._following:
            self._following.discard(name)
            head = db.local.head
            if head is not None and not head.path.exists():
                db.local.scan()  # replaced by a snapshot (every other file deleted), or removed by another
            self._rewatch.set()
            self._rewatch_async.set()
            log.debug("watching again", db=name)

    async def _let_go(self) -> None:
        """This node stopped being the primary (`.primary` appeared): let the new primary's sidecar write upstream."""
        log.info("no longer the primary: letting upstream go to the new primary's sidecar")
        # A catch-up still under way would go on uploading (and take back the lease let go below): it stops after the
        # upload in flight, which is waited for (cancelled, it could leave the store with half of it), up to
        # `shutdown_grace`: one that hangs is cancelled then, as at shutdown. So is the tick's call to upstream under
        # way (a positions read would take the lease back).
        self._letting_go = True
        try:
            if (busy := self._tasks()) and (await asyncio.wait(busy, timeout=self.config.shutdown_grace))[1]:
                await self._cancel_jobs()
            self._reap_call()
        finally:
            self._letting_go = False
        for db in self.dbs.values():
            db.remote = None  # re-read before shipping again, should this node become the primary once more
            db.error = ""  # shipping's errors were the primary's; a replica ships nothing to fail
            db.local.unpack()  # a replica matches its files to upstream's by checksum: their headers are kept
        # The release writes to the store (pending uploads, the lease): it is the tick's next call, so a store that
        # hangs holds up no tick, and no positions are read (taking the lease back) before it is done.
        self._call = asyncio.create_task(self._release(), name="let go")

    async def _release(self) -> None:
        try:
            await self.upstream.release()
        except (UpstreamError, SidecarError, OSError) as err:
            self._error("upstream", err, db=None)

    async def _poll_hwm(self) -> None:
        """Replicas: learn each database's HWM, and how local TXIDs map onto upstream's (by checksum). The databases
        are asked at the same time (up to `_HWM_POLLS`), so one whose call hangs holds back no other's HWM."""
        self.positions_at = time.monotonic()
        polls = asyncio.Semaphore(_HWM_POLLS)

        async def poll(db: DbShipper) -> None:
            async with polls:
                await self._poll_db_hwm(db)
        try:
            async with asyncio.TaskGroup() as tg:  # an unexpected error ends the others and the poll, as before
                for db in list(self.dbs.values()):  # ticks go on meanwhile, and find or forget databases
                    tg.create_task(poll(db), name=f"hwm {db.name}")
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:  # raised as it was when the databases were asked one after another
                raise group.exceptions[0] from None
            raise

    async def _poll_db_hwm(self, db: DbShipper) -> None:
        """Learn one database's HWM; an upstream that fails is reported, and the database keeps what it knew."""
        try:
            hwm, pos = await self.upstream.hwm(db.name)
        except (UpstreamError, SidecarError) as err:
            self._error("upstream", err, db=db.name)
            return
        hwm = min(hwm, pos.txid)  # nothing above its own position is durable, whatever an upstream says
        # The newest file whose checksum is upstream's, searched newest first: a replica in step finds it in a header
        # or two, where reading all of them (600,000 files at 1,000 tx/s under a 10-minute retention) took seconds
        # and kept every header in memory. Files below it are not looked at (nor found bad here: a replica ships
        # nothing, and a promoted node's sidecar reads the headers of what it ships).
        match: LocalFile | None = None
        if pos.txid:  # upstream holds nothing: no file to match
            match = next((f for f in db.local.newest() if self._post(db, f) == pos.post_apply_checksum), None)
        if match is not None:
            db.relink(pos.txid - match.max_txid)
            db.hwm = hwm
        elif db.hwm is not None:
            db.hwm = hwm

    def _post(self, db: DbShipper, f: LocalFile) -> int | None:
        """`f`'s post-apply checksum; None if it is bad (reported once) or gone since the listing (a snapshot
        from the primary replaces every file)."""
        if not db.local.good(f):
            return None
        try:
            return db.local.read_header(f)[1].post_apply_checksum
        except FileNotFoundError:
            return None
        except LTXError as err:
            self._report_bad(db, err)
            return None

    def _prune(self, db: DbShipper) -> None:
        victims = prune_victims(db.local.oldest(), db.local_hwm, self.clock(), self.config.retention)
        self._prune_errors.pop(db.name, None)
        if victims:
            try:
                db.local.delete(victims)
            except OSError as err:  # this database's directory only (gone, unwritable): the others go on
                self._prune_errors[db.name] = f"prune: {err}"  # shown until a tick prunes (or has nothing to)
                self._error("prune", err, db=db.name)
                return
            self.metrics.pruned.labels(db.name).inc(len(victims))
            log.debug("pruned", db=db.name, files=len(victims), upto=f"{max(f.max_txid for f in victims):016x}")

    # -- reporting -----------------------------------------------------------------------------------------

    def _shipped(self, db: DbShipper, s: Shipped) -> None:
        now = self.clock()
        self.shipped.append((db.name, s))
        lag_ms = round((now - s.oldest) * 1000) if s.oldest else None
        self.metrics.uploads.labels(db.name, s.kind).inc()
        self.metrics.bytes.labels(db.name).inc(s.bytes)
        self.metrics.last_ship.labels(db.name).set(now)
        log.info("batch_shipped", db=db.name, kind=s.kind, txid=f"{s.min_txid:016x}-{s.max_txid:016x}",
                 files=s.files, bytes=s.bytes, hwm=f"{s.hwm:016x}", lag_ms=lag_ms)

    def _gauges(self, db: DbShipper, shipped: list[Shipped]) -> None:
        """Every tick. Lag: how long the oldest transaction upstream lacks has waited; when this tick shipped
        everything, how long the oldest one it shipped had waited (so a busy database shows its real delay,
        not the 0 of the instant after a ship); 0 when idle."""
        m, name = self.metrics, db.name
        remote_local = (db.remote.txid - db.link.offset) if db.remote is not None else 0
        files, size, first = db.local.backlog(remote_local)
        m.pending_files.labels(name).set(files)
        m.pending_bytes.labels(name).set(size)
        waited = [s.oldest for s in shipped if s.oldest]
        oldest = first if first is not None else min(waited) if waited else None
        m.lag.labels(name).set(0.0 if oldest is None else max(0.0, self.clock() - oldest))
        m.hwm.labels(name).set(db.hwm or 0)
        m.diverged.labels(name).set(1 if db.error or name in self._prune_errors or self.upstream.failing(name) else 0)

    def _error(self, kind: str, err: Exception, *, db: str | None, **extra: object) -> None:
        self.metrics.errors.labels(kind).inc()
        log.warning("ship failed", kind=kind, db=db, error=str(err), **extra)

    def _report_bad(self, db: DbShipper, err: LTXError) -> bool:
        """Report bad local files not reported yet; returns whether there were any."""
        new = db.local.bad - self._reported
        self._reported |= new
        for path in sorted(new):
            self.metrics.errors.labels("bad_file").inc()
            log.error("bad LTX file skipped; it will not be shipped", db=db.name, path=str(path), error=str(err))
        if not new:
            self._error("ltx", err, db=db.name)
        return bool(new)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What `/healthz` answers: each database's positions, error (shipping or pruning it) and failing jobs of an
        in-process engine; `ok` is False while any database has either."""
        dbs = {name: {"remote": str(db.remote) if db.remote else None,
                      "local": f"{db.local.head.max_txid:016x}" if db.local.head else None,
                      "hwm": f"{db.hwm:016x}" if db.hwm is not None else None,
                      "error": db.error or self._prune_errors.get(name) or None,
                      "failing": self.upstream.failing(name) or None}
               for name, db in sorted(self.dbs.items())}
        ok = not any(db["error"] or db["failing"] for db in dbs.values())
        return {"ok": ok, "data_dir": str(self.config.data_dir), "warnings": self.warnings(), "databases": dbs}

    async def run(self, stop: asyncio.Event, *, started: Callable[[Sidecar], None] | None = None) -> None:
        """Watch and ship until `stop`; then ship what is batched within `shutdown_grace` and close."""
        runner = None
        if self.config.metrics_addr:
            try:
                runner, self.url = await start_metrics(self.metrics, self.health, self.config.metrics_addr)
            except OSError as err:
                await self.close()  # nothing else has started; the upstream's connections must not leak
                # errno's own words (asyncio's strerror repeats the address); a resolver error (socket.gaierror,
                # errno < 0: EAI_NONAME) has its words only in strerror
                why = os.strerror(err.errno) if err.errno and err.errno > 0 else err.strerror or str(err)
                failed = SidecarError(f"cannot serve metrics on {self.config.metrics_addr} (--metrics-addr): "
                                      f"{why.lower()}")
                hint = '--metrics-addr HOST:PORT picks another address; --metrics-addr "" turns metrics off'
                failed.hint = hint  # type: ignore[attr-defined]  # cli.main prints it
                raise failed from err
        self.check_litefs()
        for warning in self.warnings():
            log.warning(warning, data_dir=str(self.config.data_dir))
        watcher = asyncio.create_task(self.watch(stop), name="watch")
        self.discover()
        log.info("sidecar started", data_dir=str(self.config.data_dir), upstream=self.config.upstream,
                 cluster=self.config.cluster, databases=sorted(self.dbs), metrics=self.url or None)
        if started:
            started(self)
        notifier = Notifier.from_env()
        notifier.notify("READY=1", f"STATUS=watching {self.config.data_dir}, shipping to {self.config.upstream}")
        pinger = asyncio.create_task(notifier.watchdog(stop), name="watchdog")
        loop = asyncio.get_running_loop()
        next_tick, next_scan = loop.time(), loop.time() + self.config.rescan_interval
        try:
            while not stop.is_set():
                await self.tick(wait=self.config.batch_interval)
                if loop.time() >= next_scan:
                    self.rescan()
                    next_scan = loop.time() + self.config.rescan_interval
                next_tick = max(next_tick + self.config.batch_interval, loop.time())
                try:
                    async with asyncio.timeout(next_tick - loop.time()):
                        await stop.wait()
                except TimeoutError:
                    pass
            notifier.notify("STOPPING=1")
            log.info("stopping: shipping what is batched", grace_s=self.config.shutdown_grace)
            try:
                async with asyncio.timeout(self.config.shutdown_grace):
                    self.rescan()
                    await self.tick()
            except TimeoutError:
                log.warning("shutdown grace period ended before everything was shipped")
        finally:
            stop.set()
            await self._cancel_jobs()
            await watcher
            await pinger
            await self.close()
            if runner is not None:
                await runner.cleanup()
            log.info("sidecar stopped")

    def warnings(self) -> list[str]:
        """What keeps the sidecar from doing its job right now (shown in `/healthz`, logged at start)."""
        if not self.config.data_dir.is_dir():
            return ["data_dir does not exist: no database is watched until LiteFS creates it (check --data-dir)"]
        return []

    def check_litefs(self) -> None:
        """Warn if LiteFS would prune unshipped files or back up on its own (see `litefs_config`)."""
        path = litefs_config.find(self.config.litefs_config)
        if path is None:
            log.info("no litefs.yml found to check; LiteFS must run with data.retention: 0s and no backup section")
            return
        for problem in litefs_config.check(path):
            self.metrics.errors.labels("litefs_config").inc()
            log.error("LiteFS is configured against the sidecar", problem=problem)

    async def close(self) -> None:
        # Bounded as the shipping was: a stop ends within twice the grace whatever the store does.
        await self.upstream.close(within=self.config.shutdown_grace)
        if self.node is not None:
            await self.node.close()


class _Either:
    """For watchfiles' `stop_event`: set when the sidecar stops or the watch must be rebuilt."""

    def __init__(self, stop: asyncio.Event, rewatch: threading.Event) -> None:
        self.stop, self.rewatch = stop, rewatch

    def is_set(self) -> bool:
        return self.stop.is_set() or self.rewatch.is_set()

    def set(self) -> None:
        self.rewatch.set()


def _newest_snapshot(ltx: Path, known: dict[str, int], db: str) -> int:
    """N of the newest snapshot `1-N` in `ltx/` (0 if none), listed once per `known` (a batch of events): LiteFS
    deletes every other file when it takes a snapshot (from the primary's stream, or a restore: docs/litefs.md
    §3), which is no retention at work, and such a batch holds a deletion per file."""
    if db not in known:
        try:
            names = os.listdir(ltx)
        except OSError:
            names = []
        known[db] = max((t[1] for name in names if (t := parse_filename(name)) is not None and t[0] == 1), default=0)
    return known[db]


async def _first(*events: asyncio.Event) -> None:
    """Wait until any of `events` is set."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


__all__ = ["Sidecar"]
