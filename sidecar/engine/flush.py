"""Flushing: each database's pending uploads become one L0 file in the store, and the HWM moves.

A database is due once its oldest pending upload is `l0_interval` old. A flush takes what is pending at its
start; uploads go on meanwhile (they only append to `pending`, and only a flush removes from its front), so a
flush never holds the upload lock while it waits on the store.
"""

from __future__ import annotations

import structlog

from sidecar.engine.builder import Builder
from sidecar.engine.catalog import Catalog
from sidecar.engine.database import Database
from sidecar.engine.uploadlog import UploadLog
from sidecar.ltx import Version

log = structlog.get_logger("sidecar.engine")


def due(dbs: list[Database], now: float, interval: float) -> list[Database]:
    """The databases whose oldest pending upload is `interval` old at `now`, oldest first (pure)."""
    out = [db for db in dbs if db.pending and now - db.pending[0].arrived >= interval]
    out.sort(key=lambda db: db.pending[0].arrived)
    return out


class Flusher:
    """Moves pending uploads into the store as L0 files."""

    def __init__(self, builder: Builder, catalog: Catalog, log_: UploadLog) -> None:
        self.builder = builder
        self.catalog = catalog
        self.log = log_

    async def flush(self, db: Database) -> None:
        """Compact the uploads pending now into one L0 file in the store (nothing if none)."""
        async with db.flushing:
            if not db.pending:
                return
            batch = list(db.pending)
            entry = await self.builder.build(db, 0, [p.data for p in batch], Version.V2)
            db.index.add(entry)
            await self.catalog.save(db, sums=True)
            db.pending = db.pending[len(batch):]
            for p in batch:
                self.log.release(p.segment)
        log.info("flushed", cluster=db.cluster, db=db.name, level=0, min_txid=f"{entry.min_txid:016x}",
                 max_txid=f"{entry.max_txid:016x}", uploads=len(batch), bytes=entry.size)


__all__ = ["Flusher", "due"]
