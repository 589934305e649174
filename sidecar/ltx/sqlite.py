"""SQLite files and LTX: snapshot a database into LTX, apply LTX files to a database (docs/format.md §10).

Pure: binary file objects in, no paths. SQLite stores the page size at header offset 16 (1 = 65536).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

from sidecar.ltx.checksum import crc, database_checksum_from_pages
from sidecar.ltx.compactor import check_contiguous
from sidecar.ltx.decoder import Decoder
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.errors import ChecksumMismatch, InvalidHeader, LTXError
from sidecar.ltx.types import (
    CHECKSUM_FLAG,
    FLAG_COMPRESS_LZ4,
    FLAG_NO_CHECKSUM,
    BytesLike,
    Header,
    Pos,
    Trailer,
    Version,
    db_checksums,
    lock_pgno,
    valid_page_size,
)

SQLITE_MAGIC = b"SQLite format 3\0"


def sqlite_page_size(head: BytesLike) -> int:
    """Page size from a SQLite header's first 18+ bytes; raises InvalidHeader if it is no database."""
    view = memoryview(head).cast("B")
    if len(view) < 100 or bytes(view[:16]) != SQLITE_MAGIC:
        raise InvalidHeader("not a SQLite database (bad header)", field="sqlite_header")
    size = int.from_bytes(view[16:18], "big")
    size = 65536 if size == 1 else size
    if not valid_page_size(size):
        raise InvalidHeader(f"invalid SQLite page size {size}", field="page_size")
    return size


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    return os.pread(f.fileno(), n, offset)


def db_pages(db: BinaryIO, page_size: int, commit: int) -> Iterator[tuple[int, memoryview]]:
    """Pages 1..`commit` of a database file, read in 4 MiB chunks, without the lock page (docs/format.md §4).

    The one loop over a database's pages: checksums and encoders build on it. Raises LTXError if the file
    ends before `commit` pages.
    """
    lock = lock_pgno(page_size)
    chunk_pages = max(1, (1 << 22) // page_size)
    db.seek(0)
    pgno = 1
    while pgno <= commit:
        data = memoryview(db.read(min(chunk_pages, commit - pgno + 1) * page_size))
        if len(data) < page_size:
            raise LTXError(f"database ends before page {pgno} of {commit}")
        for i in range(len(data) // page_size):
            if pgno != lock:
                yield pgno, data[i * page_size:(i + 1) * page_size]
            pgno += 1


def database_checksum_of(f: BinaryIO, page_size: int | None = None) -> tuple[int, int]:
    """Return (checksum, page count) of a whole database file; an empty file is (FLAG, 0)."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
        return CHECKSUM_FLAG, 0
    if page_size is None:
        f.seek(0)
        page_size = sqlite_page_size(f.read(100))
    n = size // page_size
    value = 0
    for pgno, page in db_pages(f, page_size, n):
        value ^= crc(page, crc(pgno.to_bytes(4, "big")))
    return CHECKSUM_FLAG | value, n


def encode_db(db: BinaryIO, out: BinaryIO, *, version: Version | int = Version.V2, compress: bool = False,
              txid: int | None = None, timestamp: int = 0, node_id: int = 0, checksums: bool = True,
              onto: Pos | None = None) -> tuple[Header, Trailer]:
    """Write the database in `db` to `out` as one LTX file with every page (the lock page skipped).

    Without `onto` (or at position zero), a snapshot: TXIDs 1..`txid` (default 1). On top of a position
    `onto`, the transaction that takes a database at `onto` to this state: TXIDs onto+1..`txid` (default onto+1),
    pre-apply checksum `onto`'s, and every page written (truncating to the new size), so any LTX reader
    applies it on top of `onto`. Commit is the file size in pages. v2 `compress` sets the LZ4 flag; v3 is
    always compressed and `checksums=False` writes Litestream's no-checksum flavour.
    """
    version = Version(version)
    base = onto if onto is not None and not onto.is_zero else Pos()
    db.seek(0, os.SEEK_END)
    size = db.tell()
    db.seek(0)
    page_size = sqlite_page_size(db.read(100))
    if size % page_size:
        raise InvalidHeader(f"database size {size} is not a multiple of its page size {page_size}",
                            field="page_size")
    commit = size // page_size
    flags = 0
    if version == Version.V2 and compress:
        flags = FLAG_COMPRESS_LZ4
    elif version == Version.V3 and not checksums:
        flags = FLAG_NO_CHECKSUM
    header = Header(page_size=page_size, commit=commit, min_txid=base.txid + 1,
                    max_txid=txid if txid is not None else base.txid + 1, timestamp=timestamp,
                    pre_apply_checksum=base.post_apply_checksum if checksums else 0, flags=flags, node_id=node_id)
    enc = Encoder(out, header, version)
    for pgno, page in db_pages(db, page_size, commit):
        enc.write_page(pgno, page)
    # Every page was written, so the checksum of what was written is the database's.
    return header, enc.close(None if header.is_snapshot or not checksums else enc.pages_checksum)


class Applier:
    """Apply LTX files in order to a database file opened for read and write, checking every checksum.

    The position starts at `pos` (zero for a new or empty database). Each file must be a snapshot or
    continue the position; the running database checksum is updated page by page and compared with
    each file's post-apply checksum (skipped for files without checksums).
    """

    def __init__(self, db: BinaryIO, pos: Pos | None = None) -> None:
        self._db = db
        self.pos = pos or Pos()
        self.page_size = 0
        self.commit = 0
        self._checksum: int | None = None  # without FLAG; None until known

    def _load(self, page_size: int) -> None:
        db = self._db
        db.seek(0, os.SEEK_END)
        size = db.tell()
        if size and size % page_size:
            raise InvalidHeader(f"database size {size} is not a multiple of page size {page_size}",
                                field="page_size")
        if size:
            existing = sqlite_page_size(_read_at(db, 0, 100))
            if existing != page_size:
                raise InvalidHeader(f"page size {page_size} differs from the database's {existing}",
                                    field="page_size")
        self.page_size = page_size
        self.commit = size // page_size
        checksum, _ = database_checksum_of(db, page_size) if size else (CHECKSUM_FLAG, 0)
        self._checksum = checksum & ~CHECKSUM_FLAG

    def apply(self, src: BinaryIO | BytesLike, version: Version | int) -> Pos:
        """Apply one file; returns the new position. Raises before writing if it does not continue."""
        dec = Decoder(src, version)
        h = dec.header
        if not h.is_snapshot:
            if h.min_txid != self.pos.txid + 1:
                raise ChecksumMismatch(
                    f"file {h.min_txid:016x}-{h.max_txid:016x} does not continue position {self.pos}",
                    field="min_txid")
            pre = h.ext_pre_apply_checksum if h.no_checksum else h.pre_apply_checksum
            if pre and self.pos.post_apply_checksum and pre != self.pos.post_apply_checksum:
                raise ChecksumMismatch(
                    f"pre-apply checksum {pre:016x} != position checksum "
                    f"{self.pos.post_apply_checksum:016x}", field="pre_apply_checksum")
        if h.is_snapshot:
            self.page_size, self.commit = h.page_size, 0  # a snapshot replaces every page
        elif self._checksum is None or self.page_size != h.page_size:
            self._load(h.page_size)
        db, ps = self._db, h.page_size
        fd = db.fileno()
        lock = lock_pgno(ps)
        value = 0 if h.is_snapshot else (self._checksum or 0)
        grown: set[int] = set()  # pages written beyond the old commit
        for pgno, page in dec.pages():
            if pgno <= self.commit:
                old = os.pread(fd, ps, (pgno - 1) * ps)
                value ^= crc(old, crc(pgno.to_bytes(4, "big")))
            else:
                grown.add(pgno)
            os.pwrite(fd, page, (pgno - 1) * ps)
            value ^= crc(page, crc(pgno.to_bytes(4, "big")))
        trailer = dec.close()
        if h.commit < self.commit:
            for pgno in range(h.commit + 1, self.commit + 1):
                if pgno != lock:
                    old = os.pread(fd, ps, (pgno - 1) * ps)
                    value ^= crc(old, crc(pgno.to_bytes(4, "big")))
        elif h.commit > self.commit + len(grown):
            # Growth without every new page written leaves zero-filled pages; they count as zeros. Counted in
            # O(1), not page by page: a header may claim billions of pages (a hostile file, 2**32 of them, kept
            # this loop busy for hours before the post-apply checksum refused it).
            zeros = bytes(ps)
            value ^= _zero_pages(h.commit, ps) ^ _zero_pages(self.commit, ps)
            for pgno in grown:
                value ^= crc(zeros, crc(pgno.to_bytes(4, "big")))
        db.truncate(h.commit * ps)
        self.commit = h.commit
        self._checksum = value
        got = CHECKSUM_FLAG | value
        sums = db_checksums(h, trailer)
        if sums is not None and got != sums[1]:
            raise ChecksumMismatch(
                f"post-apply checksum mismatch after {h.min_txid:016x}-{h.max_txid:016x}: file says "
                f"{sums[1]:016x}, database gives {got:016x}", field="post_apply_checksum")
        self.pos = Pos(h.max_txid, sums[1] if sums is not None else 0)
        return self.pos


def _zero_pages(commit: int, page_size: int) -> int:
    """The database checksum of pages 1..`commit` all zeros (bit 63 aside, which FLAG sets anyway)."""
    count = commit - (lock_pgno(page_size) <= commit)
    return database_checksum_from_pages(crc(bytes(page_size)) if count % 2 else 0, commit, page_size)


def apply_files(db: BinaryIO, files: Iterable[BinaryIO | BytesLike], version: Version | int,
                pos: Pos | None = None) -> Pos:
    """Apply `files` in order to `db`; returns the final position."""
    applier = Applier(db, pos)
    for f in files:
        applier.apply(f, version)
    return applier.pos


def check_chain(headers: Sequence[Header], trailers: Sequence[Trailer]) -> None:
    """Raise CompactionError unless the files form one gap-free chain of checksums."""
    check_contiguous(headers, trailers)


__all__ = ["Applier", "apply_files", "check_chain", "database_checksum_of", "db_pages", "encode_db", "sqlite_page_size"]
