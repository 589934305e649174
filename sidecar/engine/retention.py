"""Retention: delete what no retained restore point needs (docs/levels.md §4, made safe).

`retention_victims` is pure and decides; `Retention` drops the files from the index, then deletes them. The index
cache on disk may be older (it is written every few seconds): every start reconciles it with a listing of the
store, which drops what is gone and finds what a crash left behind.

Copies of files set aside (engine/flush.py) go once older than the snapshot retention, the furthest back a restore
reaches: `expired_set_aside` decides from what the database knows of them, so a database with none costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from sidecar.engine.builder import Fence
from sidecar.engine.catalog import Catalog
from sidecar.engine.database import Database
from sidecar.engine.index import DbIndex, FileEntry
from sidecar.engine.levels import Levels
from sidecar.errors import StorageError
from sidecar.storage.base import Storage
from sidecar.storage.layout import SNAPSHOT_LEVEL

log = structlog.get_logger("sidecar.engine")


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
    # Each level's files are sorted by TXID: the loops stop at the first file that must stay, so a pass costs
    # what it deletes, not the thousands of files a database keeps (it runs every second for every database).
    for level in levels.compacted:
        files = index.level(level)
        cut = ms - int(levels.retention(level) * 1000)
        for i in range(len(files) - 1):
            e = files[i]
            if e.min_txid > floor:  # so is every later file's: none of them ends at or below the floor
                break
            if e.timestamp < cut and e.max_txid <= floor:
                doomed.append(e)
    l1 = index.newest(1)
    covered = max(l1.max_txid if l1 else 0, floor)
    cut = ms - int(levels.l0_retention * 1000)
    l0 = index.level(0)
    for i in range(len(l0) - 1):
        e = l0[i]
        if e.timestamp >= cut or e.max_txid > covered:
            break
        doomed.append(e)
    return doomed


def expired_set_aside(copies: Mapping[str, int], levels: Levels, now: float) -> list[str]:
    """The keys of the set-aside copies (key -> when set aside, epoch ms) older than the snapshot retention at `now`
    (seconds), sorted; pure."""
    cutoff = int(now * 1000) - int(levels.snapshot_retention * 1000)
    return sorted(key for key, ms in copies.items() if ms < cutoff)


class Retention:
    """Applies retention to one database at a time."""

    def __init__(self, storage: Storage, catalog: Catalog, levels: Levels, fence: Fence) -> None:
        self.storage = storage
        self.catalog = catalog
        self.levels = levels
        self.fence = fence

    async def apply(self, db: Database, now: float) -> int:
        """Delete what retention allows at `now`; returns how many files. The caller holds `db.maint`."""
        doomed = retention_victims(db.index, self.levels, now)
        if not doomed:
            return 0
        await self.fence(db)
        db.index.remove(doomed)
        await self.catalog.stored(db)
        try:
            await self.storage.delete([e.key(self.storage.layout, db.prefix) for e in doomed])
        except StorageError as err:
            log.warning("retention delete failed; orphans remain until the index is rebuilt", cluster=db.cluster,
                        db=db.name, error=str(err))
        log.info("retention", cluster=db.cluster, db=db.name, deleted=len(doomed))
        return len(doomed)

    async def delete_expired_set_aside(self, db: Database, now: float) -> int:
        """Delete the database's set-aside copies older than the snapshot retention at `now`; returns how many. They
        are forgotten only once deleted: a failed delete raises (StorageError), and a later pass tries again. The
        caller holds `db.maint`."""
        expired = expired_set_aside(db.set_aside, self.levels, now)
        if not expired:
            return 0
        await self.fence(db)
        await self.storage.delete(expired)
        for key in expired:
            del db.set_aside[key]
        log.info("set-aside files deleted: older than the snapshot retention", cluster=db.cluster, db=db.name,
                 deleted=len(expired), left=len(db.set_aside))
        return len(expired)


__all__ = ["Retention", "expired_set_aside", "retention_victims"]
