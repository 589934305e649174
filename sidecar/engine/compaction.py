"""Compaction: each level is built from the one below at its wall-clock boundaries (docs/levels.md §2).

    L0 ──5 min──▶ L1 ──1 h──▶ L2            each file holds what its source level has beyond the level's newest
    everything ──daily──▶ L9               a snapshot: the fewest files that rebuild the latest state, merged

`sources` and `due_levels` are pure; `Compactor` does the I/O. Compaction only adds files, so uploads and
flushes go on meanwhile; restores and retention wait (the database's `maint` lock).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from pathlib import Path

import structlog

from sidecar.engine.builder import Builder
from sidecar.engine.catalog import Catalog
from sidecar.engine.database import Database
from sidecar.engine.index import DbIndex, FileEntry, continues
from sidecar.engine.levels import Levels, due
from sidecar.engine.restore import plan_restore
from sidecar.errors import SidecarError
from sidecar.ltx import LTXError, Version
from sidecar.ltx.decoder import verify
from sidecar.storage.layout import SNAPSHOT_LEVEL

log = structlog.get_logger("sidecar.engine")


class SourceGap(SidecarError):
    """A level cannot be compacted: its source level skips TXIDs after what the level already holds."""

    code = "EGAP"


def sources(index: DbIndex, level: int) -> list[FileEntry]:
    """The files to compact into one new file of `level`; empty if there is nothing new (pure).

    The source level's files that continue the level's newest file, chained as `plan_restore` chains them: each
    step takes the file reaching furthest (at equal reach the one starting first, so a snapshot), and a file that
    another covers is left out. Overlapping files are redundant, not fatal: a gap healed by a client sending its
    transactions again leaves the stored ones beside those it sent (`4-4`, `5-5` beside `3-5`). A snapshot picked
    supersedes what the chain holds before it. The chain stops at a gap; raises SourceGap if nothing continues the
    level while files lie beyond.
    """
    if level == SNAPSHOT_LEVEL:
        newest = index.newest(SNAPSHOT_LEVEL)
        if index.max_txid == 0 or (newest and newest.max_txid >= index.max_txid):
            return []
        plan = plan_restore(index)
        return [] if len(plan) == 1 and plan[0].level == SNAPSHOT_LEVEL else plan
    newest = index.newest(level)
    after = newest.max_txid if newest else 0
    files = index.level(level - 1)  # sorted by (min_txid, max_txid): snapshots first
    chain: list[FileEntry] = []
    ends = {after: newest.post} if newest else {}  # TXID -> post-apply checksum where the chain's files end
    cur, i = after, 0
    stray: FileEntry | None = None  # the first file that starts where the chain ends but applies on another state
    while True:
        best: FileEntry | None = None
        while i < len(files) and files[i].min_txid <= cur + 1:  # every file that continues `cur`, or lies below it
            e = files[i]
            p = e.min_txid - 1
            if e.max_txid > max(cur, best.max_txid if best else 0):
                if p in ends and not continues(ends[p], e.pre):
                    stray = stray or e  # another history than the chain's (past a lost file)
                else:
                    best = e
            i += 1
        if best is None:
            break
        chain = [best] if best.is_snapshot else [*chain, best]
        cur = best.max_txid
        ends[cur] = best.post
    if not chain and stray is not None:
        raise SourceGap(f"L{level - 1} {stray.min_txid:016x}-{stray.max_txid:016x} applies on another state than "
                        f"L{level} holds at {after:016x} (pre-apply checksum {stray.pre:016x}, not "
                        f"{ends[stray.min_txid - 1]:016x}: another history)")
    if not chain and i < len(files):
        raise SourceGap(f"L{level - 1} skips TXIDs {after + 1:016x}..{files[i].min_txid - 1:016x}")
    return chain


def due_levels(last_run: dict[int, float], now: float, levels: Levels) -> list[int]:
    """The compacted levels (and the snapshot level) whose boundary has passed since they last ran (pure)."""
    return [lv for lv in (*levels.compacted, SNAPSHOT_LEVEL) if due(last_run.get(lv), now, levels.interval(lv))]


class Compactor:
    """Builds level files from the store's files."""

    def __init__(self, builder: Builder, catalog: Catalog, tmpdir: Path) -> None:
        self.builder = builder
        self.catalog = catalog
        self.tmpdir = tmpdir

    async def compact(self, db: Database, level: int) -> FileEntry | None:
        """Build one file of `level` from what its source holds beyond it; None if nothing is new.

        The caller holds `db.maint`.
        """
        inputs = sources(db.index, level)
        if not inputs:
            return None
        storage = self.builder.storage
        keys = [e.key(storage.layout, db.prefix) for e in inputs]
        # Made only by a store that downloads its inputs (a local directory's are read where they are): on a busy
        # server the compactions of thousands of databases made and removed one each.
        tmp = self.tmpdir / f"inputs-{secrets.token_hex(8)}"
        try:
            paths = await storage.local_files(keys, tmp)
            try:
                entry = await self.builder.build(db, level, paths, Version.V3)
            except LTXError as err:  # a damaged input: name the object to look at (the merge knows no keys)
                bad = await asyncio.to_thread(_first_bad, paths, keys)
                if bad is None:
                    raise
                raise type(err)(f"{bad}: {err}", field=err.field) from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # absent unless the store downloaded into it
        db.index.add(entry)
        await self.catalog.stored(db)
        log.info("compacted", cluster=db.cluster, db=db.name, level=level, min_txid=f"{entry.min_txid:016x}",
                 max_txid=f"{entry.max_txid:016x}", inputs=len(inputs), bytes=entry.size)
        return entry


def _first_bad(paths: list[Path], keys: list[str]) -> str | None:
    """The key of the first input that does not decode on its own; None if each does (a break between them)."""
    for path, key in zip(paths, keys, strict=True):
        try:
            with open(path, "rb") as f:
                verify(f, Version.V3)
        except LTXError:
            return key
    return None


__all__ = ["Compactor", "SourceGap", "due_levels", "sources"]
