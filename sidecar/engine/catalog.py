"""Every database the engine knows, and the cache of their indexes in the state directory.

    <state>/<cluster>/<db>/index.json      the database's stored files (engine/index.py), a cache of the store
    <state>/<cluster>/<db>/index.json.log  files added and removed since (IndexCache: a journal, one line each)

The store is the only truth: an index that is missing or unreadable is rebuilt from the store, and so is one that
the store contradicts (`reconcile`: one LIST, then the header of each file the index lacks). engine/identity.py
decides when the whole cache is in doubt or belongs to another store.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import structlog

from sidecar.engine.database import Database
from sidecar.engine.index import DbIndex, FileEntry, IndexCache, scan
from sidecar.engine.pagesums import PageSums
from sidecar.errors import InvalidDatabaseName, SidecarError, validate_cluster_name, validate_db_name
from sidecar.storage.base import ObjectInfo, Storage
from sidecar.storage.layout import QUARANTINE_PREFIX, parse_set_aside, set_aside_prefix

log = structlog.get_logger("sidecar.engine")

INDEX = "index.json"


class Catalog:
    """The databases of one engine, keyed by (cluster, name), with their index cache on disk."""

    def __init__(self, storage: Storage, state_dir: Path) -> None:
        self.storage = storage
        self.state_dir = state_dir
        self._dbs: dict[tuple[str, str], Database] = {}
        self._counts: Counter[str] = Counter()  # databases by cluster
        self._dirty: set[tuple[str, str]] = set()
        self._caches: dict[tuple[str, str], IndexCache] = {}
        self.on_stored: Callable[[Database, FileEntry | None], Awaitable[None]] | None = None

    def __iter__(self) -> Iterator[Database]:
        return iter(list(self._dbs.values()))

    def __len__(self) -> int:
        return len(self._dbs)

    def dir(self, cluster: str, name: str) -> Path:
        return self.state_dir / cluster / name

    def get(self, cluster: str, name: str) -> Database | None:
        return self._dbs.get((cluster, name))

    def require(self, cluster: str, name: str) -> Database:
        db = self._dbs.get((cluster, name))
        if db is None:
            raise SidecarError(f"unknown database {cluster}/{name}")
        return db

    def create(self, cluster: str, name: str, index: DbIndex | None = None) -> Database:
        """The database, added (empty) if the engine has never seen it."""
        db = self._dbs.get((cluster, name))
        if db is None:
            validate_cluster_name(cluster)
            validate_db_name(name)
            db = Database(cluster, name, self.dir(cluster, name), index if index is not None else DbIndex())
            db.refresh_pos()
            if not len(db.index):
                db.sums = PageSums.empty()
            self._dbs[(cluster, name)] = db
            self._counts[cluster] += 1
        return db

    def forget(self, db: Database) -> None:
        """Drop a database and its cache (it was deleted)."""
        if self._dbs.pop((db.cluster, db.name), None) is not None:
            self._counts[db.cluster] -= 1
        self._dirty.discard((db.cluster, db.name))
        self._caches.pop((db.cluster, db.name), None)
        shutil.rmtree(db.dir, ignore_errors=True)

    def clusters(self) -> list[str]:
        return sorted({c for c, _ in self._dbs})

    def databases(self, cluster: str) -> list[str]:
        return sorted(n for c, n in self._dbs if c == cluster)

    def count(self, cluster: str) -> int:
        """How many databases `cluster` has."""
        return self._counts[cluster]

    # -- the cache ------------------------------------------------------------------------------------

    def cached(self) -> list[tuple[str, str]]:
        """(cluster, name) of every database with a directory in the state directory."""
        out = []
        # `log` is the upload log's directory and may be a cluster's as well: its segments are files, a cluster's
        # databases directories.
        for cluster_dir in sorted(p for p in self.state_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            out += [(cluster_dir.name, d.name) for d in sorted(cluster_dir.iterdir()) if d.is_dir()]
        return out

    def load_cached(self) -> None:
        """Every cached index, as it is (the store could not be listed)."""
        for cluster, name in self.cached():
            db = self.create(cluster, name, DbIndex.load(self.dir(cluster, name) / INDEX))
            db.sums = PageSums.load(db.dir)

    async def load(self) -> None:
        """Every cached index, then reconciled with one listing of the store: the cache is only a cache (a crash
        between a flush and its index write, or files deleted from the store, make it wrong). Page checksums are
        loaded as cached; the engine checks them against the position once the upload log is replayed."""
        self.load_cached()
        await self.reconcile()

    async def reconcile(self, cluster: str | None = None, only: Database | None = None, *,
                        following: bool = False) -> list[Database]:
        """Bring indexes in line with one listing of the store (of one cluster, or of one database): files an
        index lacks are added (their headers read), entries whose object is gone are dropped. Returns the
        databases whose index changed. `following`: an engine that reads what another writes (a replica's), for
        which a change is the news it asked for, not a cache found wrong (a warning)."""
        prefix = only.prefix + "/" if only else f"{cluster}/" if cluster else ""
        objects = await self.storage.list(prefix)
        found: dict[str, list[ObjectInfo]] = {}
        for obj in objects:
            parsed = self.storage.layout.parse(obj.key)
            if parsed and parsed.prefix.count("/") == 1:
                found.setdefault(parsed.prefix, []).append(obj)
        changed = []
        for db_prefix, objs in sorted(found.items()):
            c, name = db_prefix.split("/")
            try:
                db = self.create(c, name)
            except InvalidDatabaseName as err:  # not written by an engine (a copied directory): no start stops on it
                log.error("files in the store under a name no database can have: left out (no restore uses them)",
                          key=objs[0].key, files=len(objs), error=str(err))
                continue
            if await self._sync(db, objs):
                changed.append(db)
        for db in self:
            if db.prefix not in found and len(db.index) and (
                    only is db or (only is None and (cluster is None or db.cluster == cluster))):
                db.index = DbIndex()
                changed.append(db)
        for db in changed:
            (log.debug if following else log.warning)(
                "index reconciled with the store", cluster=db.cluster, db=db.name, files=len(db.index),
                hwm=f"{db.hwm:016x}")
            db.refresh_pos()
            await self.save(db)
        return changed

    async def learn_set_aside(self) -> None:
        """Tell every database which copies of its files are set aside in the store, from one listing of the
        quarantine prefix for the whole store (retention deletes them later without listing anything), and warn of
        each database that has any. Copies of a database the engine does not know are only warned of."""
        found: dict[str, dict[str, int]] = {}
        for obj in await self.storage.list(QUARANTINE_PREFIX):
            if (copy := parse_set_aside(obj.key)) is not None:
                found.setdefault(copy.prefix, {})[copy.key] = copy.ms
        for db in self:
            db.set_aside = found.pop(db.prefix, {})
            if db.set_aside:
                log.warning("stored files set aside (of another history): kept until older than the snapshot "
                            "retention, or until the database is deleted", cluster=db.cluster, db=db.name,
                            files=len(db.set_aside), under=set_aside_prefix(db.prefix))
        for prefix, copies in sorted(found.items()):
            log.warning("stored files set aside from a database the store no longer holds: left for a person",
                        files=len(copies), under=set_aside_prefix(prefix))

    async def _sync(self, db: Database, objects: list[ObjectInfo]) -> bool:
        layout = self.storage.layout
        known = {e.key(layout, db.prefix): e for e in db.index}
        listed = {o.key: o for o in objects}
        new = [o for k, o in listed.items() if k not in known or known[k].size != o.size]
        gone = [e for k, e in known.items() if k not in listed or listed[k].size != e.size]
        if not new and not gone:
            return False
        kept = [e for e in db.index if e not in gone]
        added = await scan(self.storage, db.prefix, new, on_bad=self._bad) if new else DbIndex()
        db.index = DbIndex([*kept, *added])
        return True

    async def strays(self, db: Database) -> list[ObjectInfo]:
        """The database's LTX files in the store that its index lacks: one LIST. Under a lease this engine took
        over (and reconciled), only a writer whose lease had run out can have put them there."""
        layout = self.storage.layout
        known = {e.key(layout, db.prefix) for e in db.index}
        out = []
        for obj in await self.storage.list(db.prefix + "/"):
            parsed = layout.parse(obj.key)
            if parsed is not None and parsed.prefix == db.prefix and obj.key not in known:
                out.append(obj)
        return out

    async def stored(self, db: Database, added: FileEntry | None = None) -> None:
        """The database's stored files changed (a flush, a compaction, retention about to delete): the index cache
        is written later (`touch`), and `on_stored` is told now (the engine writes the head object, wakes readers).
        `added`: the change was only this file added (a flush), which lets the head be extended, not replanned."""
        self.touch(db)
        if self.on_stored is not None:
            await self.on_stored(db, added)

    def touch(self, db: Database) -> None:
        """The database's index changed: written by the next `save_dirty` (a crash before it costs only a few
        header reads at the next start, whose reconcile finds what the cache missed)."""
        self._dirty.add((db.cluster, db.name))

    async def save_dirty(self) -> None:
        """Write every changed index (and page checksums) to the cache, all in one worker-thread job: one thread hop
        per database cost more than its two small writes (on a server whose thousands of databases each flush every
        few seconds, half as much CPU again as the uploads' own work). One that cannot be written (a full disk) stays
        dirty for the next time, and the rest go on."""
        held: list[Database] = []
        try:
            for key in list(self._dirty):
                db = self._dbs.get(key)
                if db is None:
                    self._dirty.discard(key)
                elif not db.saving.locked():  # else a save under way (a compaction's) writes it; the next time
                    await db.saving.acquire()  # free: taken at once, no yield
                    held.append(db)
            writes = [(db, self._plan(db, sums=True)) for db in held]
            failed = await asyncio.to_thread(_write_all, writes) if writes else []
        finally:
            for db in held:
                db.saving.release()
        for db, err in failed:
            log.warning("index cache not written; tried again later", cluster=db.cluster, db=db.name, error=str(err))
        bad = {id(db) for db, _ in failed}
        self._dirty.difference_update((db.cluster, db.name) for db in held if id(db) not in bad)

    @staticmethod
    def _bad(key: str, err: Exception) -> None:
        log.error("unreadable file in the store: left out of the index (no restore uses it)", key=key, error=str(err))

    async def save(self, db: Database, *, sums: bool = False) -> None:
        """Write a database's index cache (and, with `sums`, its page checksums); flushes and compactions may both
        be saving, so in turn, each writing the state as of its turn."""
        async with db.saving:
            write = self._plan(db, sums=sums)
            await asyncio.to_thread(write)

    def _plan(self, db: Database, *, sums: bool) -> Callable[[], None]:
        """Take what a save writes now (in the event loop; the caller holds `db.saving`), and return the file I/O
        (for a thread)."""
        cache = self._caches.get((db.cluster, db.name))
        if cache is None:
            cache = self._caches[(db.cluster, db.name)] = IndexCache(db.dir / INDEX)
        index = cache.plan(db.index)
        if not sums or db.sums is None:
            return index
        directory, dump = db.dir, db.sums.dump()

        def both() -> None:
            index()
            PageSums.save(directory, dump)
        return both


def _write_all(writes: list[tuple[Database, Callable[[], None]]]) -> list[tuple[Database, OSError]]:
    """Run each database's save (in a worker thread); returns the ones that failed, with why."""
    failed: list[tuple[Database, OSError]] = []
    for db, write in writes:
        try:
            write()
        except OSError as err:
            failed.append((db, err))
    return failed


__all__ = ["Catalog"]
