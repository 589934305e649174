"""A local SQLite copy of a backup, kept at its latest state by applying new LTX files, one whole transaction at
a time (what `litestream restore -f` does, safe against crashes).

    first sync:  the latest plan's files are downloaded, merged and checked by `restore`, page 1 stamped,
                 and the result renamed into place;
    each change: the files after the copy's TXID (`head.plan_after`; whole ones, checked as they decode)
                 are merged page by page and written in place through `journal.rewrite`: readers see the
                 old state or the new one, and a crash leaves a hot journal that rolls it back.

The copy's position is kept beside it in `<file>-replica` (JSON: TXID and database checksum, and the TXID
being applied while a change is under way). Page 1's change counter is the TXID plus the copy's salt (low 32
bits), so after a crash the file itself says which of the two it holds. A rebuild in place draws a new salt:
a history started over comes back to TXIDs the copy held with other content, and a reader whose connection
kept SQLite's page cache of the old database would take it for the new one when the counters were equal.
When neither matches (the file was changed by someone else), or the backup's history no longer continues the
copy's (a database restored or recreated upstream, or retention deleted the files after it), the copy is
rebuilt from the latest plan, in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import secrets
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from sidecar.engine.head import Head, ltx_object_key, plan_after
from sidecar.engine.index import FileEntry
from sidecar.engine.restore import restore
from sidecar.errors import NotFound, RestoreError, SidecarError
from sidecar.fsutil import write_atomically
from sidecar.ltx import LTXError, Version, lock_pgno
from sidecar.ltx.decoder import Decoder
from sidecar.storage.file import FileStorage
from sidecar.vfs import journal
from sidecar.vfs.source import Source

log = structlog.get_logger("sidecar.vfs.replica")


@dataclass(frozen=True, slots=True)
class Position:
    """Where the copy is: a TXID, the database checksum after it (0 when the backup has none), its time."""

    txid: int
    checksum: int
    timestamp: int = 0  # ms
    salt: int = 0  # added to the TXID for page 1's change counter; drawn anew at each rebuild in place

    @property
    def counter(self) -> int:
        return (self.txid + self.salt) & 0xFFFFFFFF


class Replica:
    """The SQLite file `path`, kept equal to the backup `source` at its latest state."""

    def __init__(self, source: Source, path: str | os.PathLike[str], *,
                 rewrite: Callable[..., None] = journal.rewrite) -> None:
        self.source = source
        self.path = Path(path)
        self.state = Path(f"{self.path}-replica")
        self._rewrite = rewrite  # journal.rewrite; tests wrap it to die half-way
        self.current: Position | None = None  # as of the last sync

    # -- position -------------------------------------------------------------------------------------

    def position(self) -> Position | None:
        """The copy's position, settling a change a crash interrupted; None when unknown (rebuild)."""
        if not self.path.exists():
            return None
        try:
            doc = json.loads(self.state.read_text())
            pos = _position(doc)
            pending = _position(doc["pending"]) if doc.get("pending") else None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # A hot journal left by a crash is rolled back by the first connection that reads the file.
        con = sqlite3.connect(self.path, timeout=journal.BUSY_TIMEOUT)
        try:
            con.execute("PRAGMA schema_version").fetchall()
        except sqlite3.OperationalError:
            raise  # busy: a reader holds the file (retried)
        except sqlite3.DatabaseError:
            return None  # not a database (any more): the copy is rebuilt, or refused when it is not SQLite
        finally:
            con.close()
        counter = journal.counter_of(self.path)
        for candidate in (pending, pos):
            if candidate is not None and counter == candidate.counter:
                return candidate
        return None

    def _save(self, pos: Position, pending: Position | None = None) -> None:
        doc: dict[str, object] = {"url": self.source.url, **_json(pos)}
        if pending is not None:
            doc["pending"] = _json(pending)
        write_atomically(self.state, json.dumps(doc))  # a temp file left by a failed write is removed
        self.current = pos

    # -- syncing --------------------------------------------------------------------------------------

    async def sync(self, head: Head | None = None) -> tuple[Position, int]:
        """Bring the copy to `head` (default: the latest); returns its position and how many files it applied.

        When a file of the plan is gone (a stale head object: its write failed and retention ran since), the
        latest state is planned from the files instead; nothing is written before every file is downloaded."""
        head = head or await self.source.plan()
        try:
            return await self._sync(head)
        except NotFound as err:
            log.info("a file of the plan is gone; planning by LIST", path=str(self.path), key=err.key)
            return await self._sync(await self.source.plan(listed=True))

    async def _sync(self, head: Head) -> tuple[Position, int]:
        pos = await asyncio.to_thread(self.position)
        if pos is not None and pos != self.current:
            self._save(pos)  # a change a crash interrupted turned out done, or undone
        if pos is not None and pos.txid == head.txid and not _differ(pos.checksum, head.post_apply_checksum):
            return pos, 0
        chain: Sequence[FileEntry] = list(head.plan)
        if pos is not None and pos.txid >= head.txid:
            # The backup is behind the copy, or at its TXID in another state: its history started over (the
            # database was deleted and its node began again from TXID 1).
            log.warning("backup history does not continue the copy; rebuilding it", path=str(self.path),
                        txid=f"{pos.txid:016x}", backup=f"{head.txid:016x}")
        elif pos is not None:
            chain = plan_after(head.plan, pos.txid)
            if chain and chain[0].is_snapshot:  # the latest plan starts over: ask for the files after the copy
                chain = (await self.source.plan(after=pos.txid)).plan
            if not chain[0].is_snapshot and not (_continues(chain[0], pos) and await self._agrees(chain[0], pos)):
                log.warning("backup history does not continue the copy; rebuilding it", path=str(self.path),
                            txid=f"{pos.txid:016x}", next=f"{chain[0].min_txid:016x}")
                chain = head.plan
        new = await self._apply(chain, pos)
        return new, len(chain)

    async def _agrees(self, first: FileEntry, pos: Position) -> bool:
        """Whether the backup's state at the copy's TXID is the copy's, when `first` starts before it (a compacted
        file holds only the pages changed since its start: on another history, it would leave a mix of both).
        One more plan, only when the copy fell behind a compaction; without checksums there is nothing to ask."""
        if first.min_txid > pos.txid or not pos.checksum:
            return True
        try:
            at = await self.source.plan(txid=pos.txid)
        except RestoreError:
            return False  # no longer a restore point: nothing says this history holds the copy's state
        return not _differ(at.post_apply_checksum, pos.checksum)

    async def _apply(self, chain: Sequence[FileEntry], pos: Position | None) -> Position:
        if pos is None and not _is_database(self.path):  # a copy to rebuild in place must be a database
            raise SidecarError(f"{self.path}: exists and is not a SQLite database (not a copy of a backup to "
                               "update); nothing was written")
        last = chain[-1]
        # An empty file (touched, or opened by an app first) is made as a missing one is: in a transaction on it,
        # SQLite would write a new database's page 1 over the one written here.
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        salt = pos.salt if pos is not None and not chain[0].is_snapshot else 0
        if chain[0].is_snapshot and not fresh:  # a rebuild in place: no counter the file had before
            old = await asyncio.to_thread(journal.counter_of, self.path)
            while salt == 0 or (last.max_txid + salt) & 0xFFFFFFFF == old:
                salt = secrets.randbits(32)
        new = Position(last.max_txid, last.post, last.timestamp, salt)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{self.path.name}-", dir=self.path.parent) as tmp:
            local = FileStorage(tmp)
            paths = [Path(tmp) / ltx_object_key(local, "", e) for e in chain]
            for e, p in zip(chain, paths, strict=True):
                p.parent.mkdir(parents=True, exist_ok=True)
                await self.source.download(self.source.key(e), p)
            if chain[0].is_snapshot:
                merged = Path(tmp) / "merged.db"
                await restore(local, "", chain, merged)  # checks every file and the database checksum
                if fresh:
                    await asyncio.to_thread(_publish, merged, self.path, last, new.counter)
                    self._save(new)
                    return new
                self._save(pos or Position(0, 0), pending=new)
                try:
                    await asyncio.shield(asyncio.to_thread(_rewrite_from_db, self.path, merged, last, new.counter))
                except sqlite3.OperationalError:
                    raise  # busy: retried
                except sqlite3.DatabaseError as err:  # SQLite cannot open it: nothing was written to it
                    raise SidecarError(f"{self.path}: a damaged SQLite database ({err}), not a copy to rebuild in "
                                       "place; move it away to make a new copy") from None
            else:
                pages = await asyncio.to_thread(_pages_of_files, paths)
                self._save(pos or Position(0, 0), pending=new)
                # Shielded: a stop waits for a change under way (a kill is safe too: the journal rolls it back).
                await asyncio.shield(asyncio.to_thread(
                    self._rewrite, self.path, last.page_size, last.commit, sorted(pages), pages.__getitem__,
                    new.counter))
            self._save(new)
        return new

    async def follow(self, stop: asyncio.Event) -> None:
        """Apply every new state until `stop` is set (a server: one long-poll per change; a store: one
        conditional GET per poll). Failures are logged once per streak and retried; the copy stays whole."""
        tag: str | None = None
        failures = 0
        while not stop.is_set():
            try:
                follow = asyncio.ensure_future(self.source.follow(tag, 30.0))
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait([follow, stopping], return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not follow.done():
                    follow.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await follow
                    return
                got = follow.result()
                if got is not None:
                    head, new_tag = got
                    pos, files = await self.sync(head)
                    tag = new_tag
                    if files:
                        log.info("replicated", path=str(self.path), txid=f"{pos.txid:016x}", files=files)
                failures = 0
            except (SidecarError, LTXError, OSError, sqlite3.Error) as err:  # sqlite3: a reader held the copy too long
                failures += 1
                if failures == 1:
                    log.warning("replication failed; retrying", path=str(self.path), error=str(err))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(10.0, 0.2 * 2 ** failures))


def _position(doc: dict[str, str]) -> Position:
    return Position(int(doc["txid"], 16), int(doc["checksum"], 16), int(doc.get("timestamp", 0)),
                    int(doc.get("salt", 0)))


def _json(pos: Position) -> dict[str, object]:
    return {"txid": f"{pos.txid:016x}", "checksum": f"{pos.checksum:016x}", "timestamp": pos.timestamp,
            "salt": pos.salt}


def _is_database(path: Path) -> bool:
    """Whether `path` is missing, empty, or starts as a SQLite database does."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        return True
    return head in (b"", b"SQLite format 3\0")


def _differ(a: int, b: int) -> bool:
    """Whether two database checksums say the states differ (0: no checksum, nothing to compare)."""
    return bool(a and b and a != b)


def _continues(first: FileEntry, pos: Position) -> bool:
    """Whether `first` applies on top of the copy: it starts at or before the next TXID, and when it starts
    exactly there, its pre-apply checksum is the copy's (when both are known)."""
    if first.min_txid > pos.txid + 1:
        return False
    if first.min_txid == pos.txid + 1 and first.pre and pos.checksum:
        return first.pre == pos.checksum
    return True


def _pages_of_files(paths: Sequence[Path]) -> dict[int, bytes]:
    """The newest version of every page the files hold, each file fully decoded and checked."""
    pages: dict[int, bytes] = {}
    for path in paths:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                dec = Decoder(mm, Version.V3)
                for pgno, page in dec.pages():
                    pages[pgno] = bytes(page)
                dec.close()
            except LTXError as err:
                raise LTXError(f"{path.name}: {err}") from err
            del dec
    return pages


def _rewrite_from_db(path: Path, merged: Path, last: FileEntry, counter: int) -> None:
    """Rewrite the copy in place with every page of the database file `merged` (a rebuild)."""
    ps, lock = last.page_size, lock_pgno(last.page_size)
    with open(merged, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        journal.rewrite(path, ps, last.commit, (p for p in range(1, last.commit + 1) if p != lock),
                        lambda p: mm[(p - 1) * ps:p * ps], counter)


def _publish(merged: Path, dst: Path, last: FileEntry, counter: int) -> None:
    """Stamp page 1 of a fresh copy and rename it into place (nothing reads it yet)."""
    with open(merged, "r+b") as f:
        page1 = f.read(last.page_size)
        f.seek(0)
        f.write(journal.stamp(page1, counter, last.commit))
        f.flush()
        os.fsync(f.fileno())
    os.replace(merged, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["Position", "Replica"]
