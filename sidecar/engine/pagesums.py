"""The checksum of every page of a database, so each upload's claimed checksums can be checked at the door.

LiteFS's database checksum is the XOR of one CRC-64 per page (docs/format.md §4). Keeping each page's CRC (8
bytes a page) lets the engine compute, for an upload, the checksum the database will have after it, exactly as
LiteFS does: the pages it writes replace theirs, pages above a shrinking commit drop out, and the lock page never
counts. An upload whose post-apply checksum differs from that is refused before anything is stored.

    sums = PageSums.empty(4096)
    change = sums.change(header, pages)      # pure: what the upload would do; raises ChecksumMismatch
    sums.apply(change)                       # once the upload is durable

The table is cached beside the index (`pages.bin`: magic, TXID, page size, count, then one u64 per page, big-
endian). It is written over itself, without fsync: at load it is trusted only if its TXID and checksum are the
database's position, and otherwise rebuilt from the store (`from_pages`, over a restore's merged pages). A write
torn by a crash mixes two tables, whose XOR is not the position's checksum, so the same check catches it.
"""

from __future__ import annotations

import array
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from sidecar.fsutil import map_files
from sidecar.ltx import CHECKSUM_FLAG, Header, Pos, Version, lock_pgno
from sidecar.ltx.checksum import crc
from sidecar.ltx.compactor import merge_pages
from sidecar.ltx.decoder import Decoder
from sidecar.ltx.errors import ChecksumMismatch, InvalidHeader

MAGIC = b"LSPS"
HEAD = struct.Struct(">4sQII")  # magic, txid, page size, page count
FILE = "pages.bin"
MAX_COMMIT = 0xFFFFFFFE  # SQLite's largest page number


def page_crc(pgno: int, page: bytes | memoryview) -> int:
    """One page's part of the database checksum (without the flag bit)."""
    return crc(page, crc(pgno.to_bytes(4, "big")))


@dataclass(frozen=True, slots=True)
class Change:
    """What one upload does to the table: new CRCs by page, the new commit and checksum, the new position."""

    crcs: dict[int, int]
    commit: int
    value: int
    pos: Pos
    replace: bool  # a snapshot: every page is new


class PageSums:
    """Per-page CRCs of one database at one position (`txid`); `value` is their XOR (the checksum, flag off)."""

    def __init__(self, page_size: int, crcs: array.array[int] | None = None, txid: int = 0) -> None:
        self.page_size = page_size
        self.crcs: array.array[int] = crcs if crcs is not None else array.array("Q")
        self.txid = txid
        self.value = 0
        for c in self.crcs:
            self.value ^= c

    @classmethod
    def empty(cls, page_size: int = 0) -> PageSums:
        return cls(page_size)

    @property
    def commit(self) -> int:
        return len(self.crcs)

    @property
    def checksum(self) -> int:
        return CHECKSUM_FLAG | self.value

    @classmethod
    def from_pages(cls, page_size: int, commit: int, pages: Iterable[tuple[int, bytes | memoryview]],
                   txid: int) -> PageSums:
        """The table of a whole database, from its pages (any order; missing pages count as zeros)."""
        crcs = array.array("Q", bytes(8 * commit))
        seen = bytearray(commit)
        lock = lock_pgno(page_size)
        for pgno, page in pages:
            if pgno != lock and pgno <= commit:
                crcs[pgno - 1] = page_crc(pgno, page)
                seen[pgno - 1] = 1
        zeros = bytes(page_size)
        for i in range(commit):
            if not seen[i] and i + 1 != lock:
                crcs[i] = page_crc(i + 1, zeros)
        return cls(page_size, crcs, txid)

    def change(self, header: Header, crcs: dict[int, int], post: int, what: str) -> Change:
        """What applying an upload with `header` and page CRCs `crcs` gives; raises if its checksums lie.

        `crcs` maps each page the upload holds to its CRC. The caller has checked that the upload continues this
        table's position (TXID and pre-apply checksum).
        """
        ps, commit = header.page_size, header.commit
        if commit > MAX_COMMIT:
            raise InvalidHeader(f"{what}: commit {commit} exceeds SQLite's limit of {MAX_COMMIT} pages", field="commit")
        lock = lock_pgno(ps)
        if header.is_snapshot:
            value = 0
            for c in crcs.values():
                value ^= c
            replace = True
        else:
            if ps != self.page_size and self.commit:
                raise InvalidHeader(f"{what}: page size {ps} differs from the database's {self.page_size}",
                                    field="page_size")
            old = self.commit
            missing = [p for p in range(old + 1, commit + 1) if p != lock and p not in crcs]
            if missing:
                raise InvalidHeader(f"{what}: header commit grows from {old} to {commit} pages but page {missing[0]} "
                                    "is not in the upload", field="commit")
            value = self.value
            for pgno in range(commit + 1, old + 1):  # a shrink drops these pages
                if pgno != lock:
                    value ^= self.crcs[pgno - 1]
            for pgno, c in crcs.items():
                if pgno <= old:
                    value ^= self.crcs[pgno - 1]
                value ^= c
            replace = False
        if CHECKSUM_FLAG | value != post:
            raise ChecksumMismatch(f"{what}: upload {header.min_txid:016x}-{header.max_txid:016x} claims post-apply "
                                   f"checksum {post:016x}, but its pages give {CHECKSUM_FLAG | value:016x}",
                                   field="post_apply_checksum")
        return Change(crcs, commit, value, Pos(header.max_txid, post), replace)

    def apply(self, change: Change, page_size: int) -> None:
        """Make the table describe the database after the upload `change` came from."""
        if change.replace or not self.page_size:
            self.crcs = array.array("Q", bytes(8 * change.commit))
            self.page_size = page_size
        elif change.commit < len(self.crcs):
            del self.crcs[change.commit:]
        elif change.commit > len(self.crcs):
            self.crcs.extend([0] * (change.commit - len(self.crcs)))
        for pgno, c in change.crcs.items():
            self.crcs[pgno - 1] = c
        self.value = change.value
        self.txid = change.pos.txid

    @classmethod
    def of_files(cls, paths: Sequence[Path], txid: int) -> PageSums:
        """The table of the database a restore plan's files (LTX v3, in plan order) rebuild, at `txid`."""
        with ExitStack() as stack:
            decoders = [Decoder(mm, Version.V3) for mm in map_files(stack, paths)]
            last = decoders[-1].header
            sums = cls.from_pages(last.page_size, last.commit, merge_pages(decoders, last.commit), txid)
            for d in decoders:
                d.close()
            return sums

    def matches(self, pos: Pos) -> bool:
        return self.txid == pos.txid and (pos.is_zero or self.checksum == pos.post_apply_checksum)

    # -- the cache --------------------------------------------------------------------------------------

    def dump(self) -> bytes:
        """The table as `pages.bin` holds it (a copy: the table may change while it is written)."""
        crcs = array.array("Q", self.crcs)
        if sys.byteorder == "little":
            crcs.byteswap()
        return HEAD.pack(MAGIC, self.txid, self.page_size, len(crcs)) + crcs.tobytes()

    @staticmethod
    def save(directory: Path, dump: bytes) -> None:
        """Write `pages.bin` over the one there: no new file and none freed per save (thousands of databases saved
        every few seconds made and freed as many inodes, which file systems pay for when allocating the next)."""
        path = directory / FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            view, done = memoryview(dump), 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
            os.ftruncate(fd, len(view))
        finally:
            os.close(fd)

    @classmethod
    def load(cls, directory: Path) -> PageSums | None:
        try:
            data = (directory / FILE).read_bytes()
            magic, txid, page_size, n = HEAD.unpack_from(data)
        except (FileNotFoundError, struct.error):
            return None
        if magic != MAGIC or len(data) != HEAD.size + 8 * n:
            return None
        crcs = array.array("Q")
        crcs.frombytes(data[HEAD.size:])
        if sys.byteorder == "little":
            crcs.byteswap()
        return cls(page_size, crcs, txid)


__all__ = ["Change", "PageSums", "page_crc"]
