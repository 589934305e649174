"""LTX value types: header, trailer, position, and the format's constants (docs/format.md §1–2)."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import NamedTuple

from sidecar.ltx.errors import InvalidHeader

MAGIC = b"LTX1"
HEADER_SIZE = 100
TRAILER_SIZE = 16
CHECKSUM_FLAG = 1 << 63
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536
PENDING_BYTE = 0x40000000

# v2 (LiteFS, ltx ≤ v0.3.14): the page block is one LZ4 frame.
FLAG_COMPRESS_LZ4 = 0x1
# v3 (Litestream 0.5, ltx v0.5): the file carries no database checksums.
FLAG_NO_CHECKSUM = 0x2

# Anything the codec reads pages from without copying.
BytesLike = bytes | bytearray | memoryview | mmap.mmap

_HEADER = struct.Struct(">4sIIIQQqQqqIIQ20x")
# litefs-sidecar extension: v3 files with the no-checksum flag (so Litestream can restore them) keep the
# database checksums in the reserved bytes, which every ltx decoder ignores (docs/format.md §2.1) but the
# file checksum covers: pre-apply at 80, post-apply at 88, then this marker at 96.
EXT_MAGIC = b"LFSC"
_EXT = struct.Struct(">QQ4s")
_HEADER_EXT = struct.Struct(">4sIIIQQqQqqIIQQQ4s")  # the header and the extension's place, in one unpack
_TRAILER = struct.Struct(">QQ")


class Version(IntEnum):
    """The on-disk flavour; nothing in the file says which, so callers must know (docs/format.md §0)."""

    V2 = 2  # LiteFS: 4-byte page headers, optional whole-block LZ4 frame
    V3 = 3  # Litestream 0.5: 6-byte page headers, per-page LZ4 blocks, page index


def lock_pgno(page_size: int) -> int:
    """Return the page holding SQLite's PENDING_BYTE; it is never stored nor checksummed."""
    return PENDING_BYTE // page_size + 1


def valid_page_size(page_size: int) -> bool:
    """Whether `page_size` is a power of two from 512 to 65536."""
    return MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE and page_size & (page_size - 1) == 0


def format_txid(txid: int) -> str:
    """TXIDs print as 16 lowercase hex digits everywhere."""
    return f"{txid:016x}"


def parse_txid(text: str) -> int:
    """Parse exactly 16 hex digits (either case) into a TXID."""
    if len(text) != 16:
        raise ValueError(f"invalid TXID {text!r}: want 16 hex digits")
    try:
        return int(text, 16)
    except ValueError:
        raise ValueError(f"invalid TXID {text!r}: want 16 hex digits") from None


def format_timestamp(ms: int) -> str:
    """RFC 3339 with fixed milliseconds, UTC; a time no calendar date holds (past the year 9999) as raw ms."""
    try:
        dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (ValueError, OverflowError, OSError):
        return f"{ms} ms since the epoch"
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Pos:
    """A database position: the last applied TXID and the database checksum after it."""

    txid: int = 0
    post_apply_checksum: int = 0

    def __str__(self) -> str:
        return f"{self.txid:016x}/{self.post_apply_checksum:016x}"

    @property
    def is_zero(self) -> bool:
        return self.txid == 0 and self.post_apply_checksum == 0

    @classmethod
    def parse(cls, text: str) -> Pos:
        """Parse the `%016x/%016x` form used by LiteFS's `<db>-pos` file."""
        text = text.strip()
        if len(text) != 33:
            raise ValueError(f"invalid position {text!r}: want 16 hex digits, '/', 16 hex digits")
        return cls(parse_txid(text[:16]), parse_txid(text[17:]))


class Header(NamedTuple):
    """The 100-byte LTX header (docs/format.md §2.1). `timestamp` is milliseconds since the epoch.

    A NamedTuple rather than a frozen dataclass: the sidecar parses one per LiteFS file, and a frozen
    dataclass sets each of its 14 fields through `object.__setattr__` (4.2 µs a parse, against 1.6).
    """

    page_size: int
    commit: int
    min_txid: int
    max_txid: int
    timestamp: int = 0
    pre_apply_checksum: int = 0
    flags: int = 0
    wal_offset: int = 0
    wal_size: int = 0
    wal_salt1: int = 0
    wal_salt2: int = 0
    node_id: int = 0
    ext_pre_apply_checksum: int = 0  # extension, see EXT_MAGIC
    ext_post_apply_checksum: int = 0

    @property
    def is_snapshot(self) -> bool:
        """A snapshot starts at TXID 1 and holds every page 1..commit."""
        return self.min_txid == 1

    @property
    def no_checksum(self) -> bool:
        return bool(self.flags & FLAG_NO_CHECKSUM)

    @property
    def pre_apply_pos(self) -> Pos:
        return Pos(self.min_txid - 1, self.pre_apply_checksum)

    def replace(self, **changes: int) -> Header:
        return self._replace(**changes)

    @property
    def db_checksums(self) -> tuple[int, int] | None:
        """(pre, post) database checksums carried by the extension, or None."""
        if self.ext_post_apply_checksum:
            return self.ext_pre_apply_checksum, self.ext_post_apply_checksum
        return None

    def pack(self) -> bytes:
        packed = _HEADER.pack(
            MAGIC, self.flags, self.page_size, self.commit, self.min_txid, self.max_txid, self.timestamp,
            self.pre_apply_checksum, self.wal_offset, self.wal_size, self.wal_salt1, self.wal_salt2,
            self.node_id,
        )
        if self.ext_post_apply_checksum:
            ext = _EXT.pack(self.ext_pre_apply_checksum, self.ext_post_apply_checksum, EXT_MAGIC)
            packed = packed[:80] + ext
        return packed

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """Parse 100 bytes; raises InvalidHeader on a bad magic (field validation is `validate`)."""
        if len(data) < HEADER_SIZE:
            raise InvalidHeader(f"header is {len(data)} bytes, want {HEADER_SIZE}", field="header")
        (magic, flags, page_size, commit, min_txid, max_txid, ts, pre, wal_offset, wal_size, salt1, salt2,
         node_id, ext_pre, ext_post, ext_magic) = _HEADER_EXT.unpack_from(data)
        if magic != MAGIC:
            raise InvalidHeader(f"invalid LTX file: magic {bytes(magic)!r}, want b'LTX1'", field="magic")
        if ext_magic != EXT_MAGIC:
            ext_pre = ext_post = 0
        return cls(page_size, commit, min_txid, max_txid, ts, pre, flags, wal_offset, wal_size, salt1, salt2,
                   node_id, ext_pre, ext_post)

    def validate(self, version: Version) -> None:
        """Raise InvalidHeader naming the first field that breaks the rules of `version` (§8)."""
        # The fields as locals, once: the sidecar validates a header per LiteFS file (2.4 → 1.6 µs).
        (page_size, _, min_txid, max_txid, _, pre, flags, wal_offset, wal_size, salt1, salt2, _, ext_pre,
         ext_post) = self
        v2 = version == Version.V2
        if flags & ~(FLAG_COMPRESS_LZ4 if v2 else FLAG_NO_CHECKSUM):
            raise InvalidHeader(f"invalid flags: 0x{flags:08x} for LTX {version.name}", field="flags")
        if not valid_page_size(page_size):
            raise InvalidHeader(f"invalid page size: {page_size}", field="page_size")
        if min_txid == 0:
            raise InvalidHeader("minimum transaction id required", field="min_txid")
        if max_txid == 0:
            raise InvalidHeader("maximum transaction id required", field="max_txid")
        if min_txid > max_txid:
            raise InvalidHeader(f"transaction ids out of order: ({min_txid:016x},{max_txid:016x})", field="min_txid")
        if wal_offset < 0:
            raise InvalidHeader(f"wal offset cannot be negative: {wal_offset}", field="wal_offset")
        if wal_size < 0:
            raise InvalidHeader(f"wal size cannot be negative: {wal_size}", field="wal_size")
        if (salt1 or salt2) and wal_offset == 0:
            raise InvalidHeader("wal offset required if salt exists", field="wal_offset")
        if wal_size and wal_offset == 0:
            raise InvalidHeader("wal offset required if wal size exists", field="wal_offset")
        if v2:
            if (salt1 or salt2) and wal_size == 0:
                raise InvalidHeader("wal size required if salt exists", field="wal_size")
            if wal_offset and wal_size == 0:
                raise InvalidHeader("wal size required if wal offset exists", field="wal_size")
        snapshot = min_txid == 1
        if snapshot:
            if pre:
                raise InvalidHeader("pre-apply checksum must be zero on snapshots", field="pre_apply_checksum")
        elif flags & FLAG_NO_CHECKSUM:
            if pre:
                raise InvalidHeader("pre-apply checksum not allowed with no-checksum flag",
                                    field="pre_apply_checksum")
        elif pre == 0:
            raise InvalidHeader("pre-apply checksum required on non-snapshot files", field="pre_apply_checksum")
        elif not pre & CHECKSUM_FLAG:
            raise InvalidHeader("invalid pre-apply checksum format", field="pre_apply_checksum")
        if ext_post:
            if not ext_post & CHECKSUM_FLAG:
                raise InvalidHeader("invalid extension post-apply checksum format", field="ext_post_apply_checksum")
            if snapshot != (ext_pre == 0) or (ext_pre and not ext_pre & CHECKSUM_FLAG):
                raise InvalidHeader("invalid extension pre-apply checksum", field="ext_pre_apply_checksum")


def db_checksums(header: Header, trailer: Trailer) -> tuple[int, int] | None:
    """A file's (pre-apply, post-apply) database checksums, wherever it keeps them; None if it has none."""
    if not header.no_checksum:
        return header.pre_apply_checksum, trailer.post_apply_checksum
    return header.db_checksums


class Trailer(NamedTuple):
    """The 16-byte trailer: database checksum after applying the file, and the file's own checksum."""

    post_apply_checksum: int
    file_checksum: int

    def pack(self) -> bytes:
        return _TRAILER.pack(self.post_apply_checksum, self.file_checksum)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Trailer:
        post, file_ck = _TRAILER.unpack_from(data)
        return cls(post, file_ck)
