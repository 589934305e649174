"""Operator operations: restore a stored database, serve a snapshot, append a state as the new head, clone, delete.

Restores flush the database's pending uploads first (so "latest" means what was acknowledged) and hold its
`maint` lock only while they read the store, never its upload lock while they wait on the store: a slow store
delays the restore, not the database's uploads.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from sidecar.engine.catalog import Catalog
from sidecar.engine.database import Database
from sidecar.engine.restore import RestoreResult, plan_restore, restore
from sidecar.engine.uploadlog import UploadLog
from sidecar.errors import SidecarError
from sidecar.ltx import Header, Pos, Trailer, Version
from sidecar.ltx.sqlite import encode_db, sqlite_page_size
from sidecar.storage.base import Storage
from sidecar.storage.layout import set_aside_prefix

WriteTx = Callable[[str, str, bytes], Awaitable[int]]


class Operations:
    """Restore, snapshot, write_state, clone and delete, over one engine's components."""

    def __init__(self, storage: Storage, catalog: Catalog, flush: Callable[[Database], Awaitable[None]],
                 log: UploadLog, tmpdir: Path, write_tx: WriteTx, clock: Callable[[], float]) -> None:
        self.storage = storage
        self.catalog = catalog
        self.flush = flush
        self.log = log
        self.tmpdir = tmpdir
        self.write_tx = write_tx
        self.clock = clock

    def tmp(self, prefix: str) -> tempfile.TemporaryDirectory[str]:
        """A private temporary directory under the state directory (same file system as the outputs)."""
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=prefix, dir=self.tmpdir)

    async def restore_to(self, db: Database, out: str | os.PathLike[str], *, txid: int | None = None,
                         timestamp: int | None = None, integrity_check: bool = False) -> RestoreResult:
        """Restore the database into the SQLite file `out` (pending uploads are flushed first)."""
        await self.flush(db)
        async with db.maint:
            plan = plan_restore(db.index, txid=txid, timestamp=timestamp)
            return await restore(self.storage, db.prefix, plan, out, integrity_check=integrity_check)

    async def snapshot_file(self, db: Database, out: str | os.PathLike[str], *, timestamp: int | None = None,
                            txid: int | None = None, compress: bool = True) -> tuple[Header, Trailer]:
        """Write an LTX v2 snapshot (TXIDs 1..N) of the stored state, latest or at a target, to `out`.

        This is what `GET /db/snapshot` serves to LiteFS: its MaxTXID and post-apply checksum equal the position
        it represents.
        """
        with self.tmp("snap-") as tmp:
            path = Path(tmp) / "db"
            result = await self.restore_to(db, path, timestamp=timestamp, txid=txid)

            def encode() -> tuple[Header, Trailer]:
                with open(path, "rb") as src, open(out, "wb") as dst:
                    h, t = encode_db(src, dst, version=Version.V2, compress=compress, txid=result.txid,
                                     timestamp=result.timestamp)
                    dst.flush()
                    os.fsync(dst.fileno())
                return h, t
            header, trailer = await asyncio.to_thread(encode)
        if trailer.post_apply_checksum != result.checksum:
            raise SidecarError(f"{db.prefix}: snapshot checksum {trailer.post_apply_checksum:016x} != restored "
                               f"{result.checksum:016x}")
        return header, trailer

    async def write_state(self, cluster: str, name: str, db_path: str | os.PathLike[str]) -> Pos:
        """Append the SQLite file at `db_path` as the next transaction: every page, one new TXID.

        Operator restores and uploads use this, as LiteFS Cloud did: history is kept (the previous state stays
        restorable) and a LiteFS primary finds the server ahead and pulls the snapshot.
        """
        # Not created here: write_tx creates it, and leaves nothing behind if it refuses the state.
        db = self.catalog.get(cluster, name)
        with self.tmp("state-") as tmp:
            ltx = Path(tmp) / "next.ltx"
            pos = db.pos if db is not None else Pos()

            def encode() -> bytes:
                with open(db_path, "rb") as src, open(ltx, "wb") as dst:
                    # A state of another page size (from before a VACUUM that changed it) is a snapshot at the next
                    # TXID: only a snapshot may change a database's page size.
                    same = db is None or not db.page_size or sqlite_page_size(src.read(100)) == db.page_size
                    encode_db(src, dst, version=Version.V2, compress=True, onto=pos if same else None,
                              txid=pos.txid + 1, timestamp=int(self.clock() * 1000))
                return ltx.read_bytes()
            data = await asyncio.to_thread(encode)
        await self.write_tx(cluster, name, data)
        db = self.catalog.require(cluster, name)
        await self.flush(db)
        return db.pos

    async def clone(self, db: Database, to_cluster: str, to_name: str) -> Pos:
        """Copy a database's latest state into another cluster/name as its new head."""
        with self.tmp("clone-") as tmp:
            path = Path(tmp) / "db"
            await self.restore_to(db, path)
            return await self.write_state(to_cluster, to_name, path)

    async def delete(self, db: Database) -> int:
        """Forget a database and delete every stored file of it, and the copies set aside from it; returns how many
        files were deleted."""
        async with db.lock, db.flushing, db.maint:
            # The deletion's record: the pending uploads before it are not replayed. Segments go oldest first,
            # so it stays on disk as long as any of them does.
            self.log.release(await self.log.append(db.cluster, db.name, b""))
            for p in db.pending:
                self.log.release(p.segment)
            db.pending = []
            layout = self.storage.layout
            # And what the index lacks (a retention delete that failed, a late write): left, it would bring the
            # database back at the next start's reconcile.
            files = {e.key(layout, db.prefix) for e in db.index} | {
                o.key for o in await self.storage.list(db.prefix + "/")
                if (parsed := layout.parse(o.key)) is not None and parsed.prefix == db.prefix}
            # The copies first: a crash midway leaves files that bring the database back (its copies with it), not
            # copies of a database that is gone.
            copies = await self._set_aside(db)
            await self.storage.delete([*copies, layout.head_key(db.prefix), *sorted(files)])
            db.deleted = True
            self.catalog.forget(db)
        return len(copies) + len(files)

    async def _set_aside(self, db: Database) -> list[str]:
        """The keys of every copy set aside from `db`: those it knows, and those a listing of its own quarantine
        prefix finds (set aside by another engine that wrote the cluster before this one)."""
        listed = await self.storage.list(set_aside_prefix(db.prefix))
        return sorted(db.set_aside.keys() | {o.key for o in listed})


__all__ = ["Operations"]
