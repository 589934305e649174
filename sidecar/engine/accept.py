"""Accepting uploads: verify at the door, then make durable, then acknowledge.

    upload ──verify──▶ upload log (fsync) ──▶ pending ──▶ acknowledged

Verifying means, before anything is stored:

- the file: every page and the file checksum decode (docs/format.md §8);
- the header: a page size equal to the database's, a timestamp no later than now plus the allowed clock skew,
  TXIDs that leave room to grow; a commit within SQLite's limits that only grows by pages the upload holds;
- contiguity: the min TXID is the current TXID + 1 and the pre-apply checksum is the current post-apply
  checksum (docs/litefs.md §9); a snapshot (min TXID 1) beyond the current TXID replaces everything. Anything
  else is `PosMismatch` with the current position;
- the claimed post-apply checksum: recomputed from the database's page checksums (pagesums.py) exactly as
  LiteFS computes it. A lie is `ChecksumMismatch`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sidecar.engine.database import Database, Pending
from sidecar.engine.pagesums import MAX_COMMIT, Change, PageSums, page_crc
from sidecar.engine.uploadlog import UploadLog
from sidecar.errors import PosMismatch, SidecarError
from sidecar.ltx import Header, LTXError, Pos, Version, format_timestamp
from sidecar.ltx.decoder import Decoder, decode_v2
from sidecar.ltx.errors import InvalidHeader
from sidecar.ltx.reader import NotWhole

BIG = 1 << 20  # uploads larger than this are verified in a worker thread
WHOLE_LIMIT = 4 << 20  # uploads whose pages decompress to more than this are verified streaming (bounded memory)

Clock = Callable[[], float]
Flush = Callable[[Database], Awaitable[None]]


MAX_TXID = (1 << 63) - 1  # TXIDs stay within a signed 64-bit integer (SQLite, JSON readers)


@dataclass(frozen=True, slots=True)
class Checked:
    """A verified upload: its header, claimed post-apply checksum, and the CRC of each page it holds."""

    header: Header
    post: int
    crcs: dict[int, int]


def check_upload(data: bytes | memoryview, what: str) -> Checked:
    """Decode and verify a whole v2 upload: every page, the file checksum."""
    try:
        try:  # in memory: a third of the streaming decoder's cost, for the usual upload (a second of changes)
            header, trailer, pages = decode_v2(data, limit=WHOLE_LIMIT, strict=True)
        except NotWhole:  # a large page block: streaming, in bounded memory
            dec = Decoder(data, Version.V2)
            crcs = {pgno: page_crc(pgno, page) for pgno, page in dec.pages()}
            header, trailer = dec.header, dec.close()
        else:
            crcs = {pgno: page_crc(pgno, page) for pgno, page in pages}
    except LTXError as err:
        raise LTXError(f"{what}: invalid LTX upload: {err}", field=err.field) from err
    return Checked(header, trailer.post_apply_checksum, crcs)


def check_header(header: Header, now: float, skew: float, what: str) -> None:
    """Raise InvalidHeader for a header no sane LiteFS writes (the position is checked apart)."""
    if header.timestamp > (now + skew) * 1000:
        raise InvalidHeader(f"{what}: header timestamp {format_timestamp(header.timestamp)} is more than {skew:g}s "
                            "past this server's clock", field="timestamp")
    if header.max_txid > MAX_TXID:
        raise InvalidHeader(f"{what}: header max_txid {header.max_txid:016x} exceeds {MAX_TXID:016x}",
                            field="max_txid")
    if header.commit > MAX_COMMIT:
        raise InvalidHeader(f"{what}: header commit {header.commit} exceeds SQLite's limit of {MAX_COMMIT} pages",
                            field="commit")


def check_continues(db: Database, header: Header) -> None:
    """Raise unless an upload with `header` applies on top of the database's current position."""
    what = f"{db.cluster}/{db.name}"
    if db.deleted:  # the upload waited for the database while it was deleted: it continues nothing now
        raise PosMismatch(db.name, Pos(), "the database was deleted")
    if db.page_size and header.page_size != db.page_size and not header.is_snapshot:
        raise InvalidHeader(f"{what}: page size {header.page_size} differs from the database's {db.page_size}",
                            field="page_size")
    if header.is_snapshot:
        if header.max_txid <= db.pos.txid:
            raise PosMismatch(db.name, db.pos, f"snapshot at TXID {header.max_txid:016x} is not ahead")
    elif header.min_txid != db.pos.txid + 1:
        raise PosMismatch(db.name, db.pos, f"upload {header.min_txid:016x}-{header.max_txid:016x} does not "
                                           f"continue TXID {db.pos.txid:016x}")
    elif header.pre_apply_checksum != db.pos.post_apply_checksum:
        raise PosMismatch(db.name, db.pos, f"upload {header.min_txid:016x}-{header.max_txid:016x} has pre-apply "
                                           f"checksum {header.pre_apply_checksum:016x}, not the current "
                                           f"{db.pos.post_apply_checksum:016x}")


class ChecksumsUnknown(SidecarError):
    """The database's page checksums are being rebuilt from the store; the upload may come again shortly."""

    code = "EREBUILDING"
    http_status = 503


class Intake:
    """Validates uploads against their database and appends them to the upload log."""

    def __init__(self, log: UploadLog, clock: Clock, flush: Flush, *, max_skew: float = 3600.0,
                 verify_checksums: bool = True) -> None:
        self.log = log
        self.clock = clock
        self.flush = flush  # called (under the database's lock) before a snapshot replaces pending uploads
        self.max_skew = max_skew
        self.verify_checksums = verify_checksums

    async def accept(self, db: Database, data: bytes) -> Header:
        """Verify one upload, make it durable, and add it to the database's pending uploads."""
        what = f"{db.cluster}/{db.name}"
        if len(data) > BIG:
            checked = await asyncio.to_thread(check_upload, data, what)
        else:
            checked = check_upload(data, what)
        header = checked.header
        check_header(header, self.clock(), self.max_skew, what)
        async with db.lock:
            check_continues(db, header)
            change = self._change(db, checked, what)
            if header.is_snapshot and db.pending:
                await self.flush(db)
            # Once logged, the upload is accepted even if its request is gone: the bookkeeping is the commit's
            # callback (run before this task resumes, and with the lock still held if it was cancelled meanwhile).
            logged = self.log.enqueue(db.cluster, db.name, data)
            failed: list[Exception] = []

            def done(fut: asyncio.Future[int]) -> None:
                try:
                    self._logged(db, checked, change, data, fut)
                except Exception as err:  # the request fails with it, as it would had this run in the request
                    failed.append(err)
            logged.add_done_callback(done)
            try:
                await asyncio.shield(logged)
            except asyncio.CancelledError:
                if not logged.done():
                    await asyncio.wait([logged])
                if not logged.cancelled():
                    logged.exception()
                raise
            if failed:
                raise failed[0]
        return header

    def _change(self, db: Database, checked: Checked, what: str) -> Change | None:
        """The upload's effect on the page checksums (verifying its post-apply checksum), None if not checked."""
        if not self.verify_checksums:
            db.sums = None
            return None
        if db.sums is None:
            if not checked.header.is_snapshot:
                raise ChecksumsUnknown(f"{what}: page checksums are being rebuilt from the store; retry shortly")
            db.sums = PageSums.empty(checked.header.page_size)
        return db.sums.change(checked.header, checked.crcs, checked.post, what)

    def _logged(self, db: Database, checked: Checked, change: Change | None, data: bytes,
                logged: asyncio.Future[int]) -> None:
        """The upload is in the upload log: it is pending now, and the database's position moves."""
        if logged.cancelled() or logged.exception() is not None:
            return
        segment = logged.result()
        now = self.clock()
        header = checked.header
        db.pending.append(Pending(header, checked.post, now, segment, data))
        db.pos, db.page_size, db.last_upload = Pos(header.max_txid, checked.post), header.page_size, now
        if change is not None and db.sums is not None:
            db.sums.apply(change, header.page_size)

    async def replay(self, db: Database, checked: Checked, segment: int, data: bytes, what: str) -> bool:
        """Take back one logged upload at start; False (and nothing changes) if it no longer applies."""
        header = checked.header
        if header.max_txid <= db.index.max_txid:
            return False  # flushed before the crash
        try:
            check_continues(db, header)
        except (PosMismatch, LTXError):
            return False
        if db.sums is not None and db.sums.txid < header.max_txid:
            try:
                db.sums.apply(db.sums.change(header, checked.crcs, checked.post, what), header.page_size)
            except LTXError:
                db.sums = None  # the cached table is of another history: rebuilt from the store later
        # A snapshot after pending uploads is not flushed over them here (replay writes nothing to the store, which
        # may be down): the flush ends a batch before it (flush.batch), so it still reaches the store on its own.
        self.log.hold(segment)
        db.pending.append(Pending(header, checked.post, self.clock(), segment, data))
        db.pos, db.page_size = Pos(header.max_txid, checked.post), header.page_size
        return True


__all__ = ["Checked", "ChecksumsUnknown", "Intake", "check_continues", "check_header", "check_upload"]
