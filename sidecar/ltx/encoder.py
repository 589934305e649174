"""LTX encoder for v2 (raw, or the page block as one LZ4 frame) and v3 (per-page LZ4 blocks + index).

    enc = Encoder(f, header, Version.V2)
    enc.write_page(1, page)               # ascending pgno, never the lock page, ≤ commit
    trailer = enc.close(post_apply_checksum)   # snapshots may pass None: the encoder computes it

Given the same header, pages and post-apply checksum, an uncompressed v2 file is byte-identical to Go's
(docs/format.md §7). Output is buffered and written in large chunks; the caller owns fsync.
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

import lz4.block
import lz4.frame

from sidecar.ltx.checksum import crc
from sidecar.ltx.errors import InvalidHeader, InvalidPage, LTXError
from sidecar.ltx.types import (
    CHECKSUM_FLAG,
    FLAG_COMPRESS_LZ4,
    BytesLike,
    Header,
    Trailer,
    Version,
    lock_pgno,
)

_FLUSH_AT = 1 << 20
_V3_PAGE_HEADER = struct.Struct(">IHI")


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Encoder:
    """Write one LTX file to a binary stream."""

    def __init__(self, f: BinaryIO, header: Header, version: Version | int) -> None:
        self.version = Version(version)
        header.validate(self.version)
        self.header = header
        self._f = f
        self._lock = lock_pgno(header.page_size)
        self._prev = 0
        self._db_crc = 0
        self._closed = False
        self.page_count = 0
        self.size = 0  # bytes written to f so far
        packed = header.pack()
        self._crc = crc(packed)
        self._out = bytearray(packed)
        self._lz4: lz4.frame.LZ4FrameCompressor | None = None
        self._pending = bytearray()  # uncompressed v2 block bytes waiting for the LZ4 compressor
        self._index: list[tuple[int, int, int]] = []
        if self.version == Version.V2 and header.flags & FLAG_COMPRESS_LZ4:
            # LiteFS's settings: 64 KiB independent blocks, content checksum, no block checksums (§2.2).
            self._lz4 = lz4.frame.LZ4FrameCompressor(
                block_size=lz4.frame.BLOCKSIZE_MAX64KB, block_linked=False, content_checksum=True,
                block_checksum=False, auto_flush=False)
            self._out += self._lz4.begin()

    def write_page(self, pgno: int, data: BytesLike) -> None:
        """Append one page; pages must ascend, stay ≤ commit and skip the lock page."""
        h = self.header
        if self._closed:
            raise LTXError("encoder closed")
        if len(data) != h.page_size:
            raise InvalidPage(f"page {pgno}: {len(data)} bytes, want {h.page_size}")
        if pgno <= self._prev:
            raise InvalidPage(f"page {pgno} out of order after page {self._prev}")
        if pgno > h.commit:
            raise InvalidPage(f"page {pgno} beyond commit {h.commit}")
        if pgno == self._lock:
            raise InvalidPage(f"page {pgno} is the lock page")
        if h.min_txid == 1:
            want = self._prev + 2 if self._prev + 1 == self._lock else self._prev + 1
            if pgno != want:
                raise InvalidPage(f"nonsequential page numbers in snapshot: page {pgno}, want {want}")
        pgno_bytes = pgno.to_bytes(4, "big")
        page_crc = crc(data, crc(pgno_bytes))
        self._db_crc ^= page_crc
        self._prev = pgno
        self.page_count += 1
        if self.version == Version.V3:
            block = lz4.block.compress(data, store_size=False)
            ph = _V3_PAGE_HEADER.pack(pgno, 1, len(block))
            self._index.append((pgno, self.size + len(self._out), len(ph) + len(block)))
            self._crc = crc(data, crc(ph, self._crc))
            self._out += ph
            self._out += block
        else:
            self._crc = crc(data, crc(pgno_bytes, self._crc))
            if self._lz4 is not None:
                self._pending += pgno_bytes
                self._pending += data
                if len(self._pending) >= _FLUSH_AT:
                    self._out += self._lz4.compress(self._pending)
                    self._pending.clear()
            else:
                self._out += pgno_bytes
                self._out += data
        if len(self._out) >= _FLUSH_AT:
            self._flush()

    @property
    def pages_checksum(self) -> int:
        """FLAG | XOR of the checksums of the pages written so far (the database's, once every page is)."""
        return CHECKSUM_FLAG | self._db_crc

    def _flush(self) -> None:
        self._f.write(self._out)
        self.size += len(self._out)
        self._out.clear()

    def close(self, post_apply_checksum: int | None = None) -> Trailer:
        """Write the end marker, index and trailer; a snapshot's post-apply checksum may be computed."""
        if self._closed:
            raise LTXError("encoder closed")
        h = self.header
        computed = CHECKSUM_FLAG | self._db_crc
        if post_apply_checksum is None:
            if h.no_checksum:
                post_apply_checksum = 0
            elif h.is_snapshot:
                post_apply_checksum = computed
            else:
                raise InvalidHeader("post-apply checksum required on non-snapshot files",
                                    field="post_apply_checksum")
        if h.no_checksum:
            if post_apply_checksum:
                raise InvalidHeader("post-apply checksum must be zero with the no-checksum flag",
                                    field="post_apply_checksum")
        else:
            if not post_apply_checksum & CHECKSUM_FLAG:
                raise InvalidHeader("invalid post-apply checksum format", field="post_apply_checksum")
            if h.commit == 0 and post_apply_checksum != CHECKSUM_FLAG:
                raise InvalidHeader("post-apply checksum must be 8000000000000000 for an empty database",
                                    field="post_apply_checksum")
            if h.is_snapshot and post_apply_checksum != computed:
                raise InvalidHeader(f"snapshot post-apply checksum {post_apply_checksum:016x} does not match "
                                    f"its pages ({computed:016x})", field="post_apply_checksum")
        if h.is_snapshot and h.commit and self._prev != h.commit and not (self._prev + 1 == self._lock == h.commit):
            raise InvalidPage(f"snapshot ends at page {self._prev}, commit is {h.commit}")
        if self.version == Version.V3:
            end = b"\0" * 6
            index = bytearray()
            for pgno, offset, size in self._index:
                index += _uvarint(pgno)
                index += _uvarint(offset)
                index += _uvarint(size)
            index += b"\0"
            tail = end + index + len(index).to_bytes(8, "big")
            self._crc = crc(tail, self._crc)
            self._out += tail
        else:
            end = b"\0" * 4
            self._crc = crc(end, self._crc)
            if self._lz4 is not None:
                self._pending += end
                self._out += self._lz4.compress(self._pending)
                self._pending.clear()
                self._out += self._lz4.flush()
            else:
                self._out += end
        post = post_apply_checksum.to_bytes(8, "big")
        self._crc = crc(post, self._crc)
        trailer = Trailer(post_apply_checksum, CHECKSUM_FLAG | self._crc)
        self._out += trailer.pack()
        self._flush()
        self._closed = True
        return trailer


def encode(header: Header, pages: list[tuple[int, BytesLike]], version: Version | int,
           post_apply_checksum: int | None = None) -> bytes:
    """Encode a whole file in memory; for tests and small files."""
    buf = io.BytesIO()
    enc = Encoder(buf, header, version)
    for pgno, data in pages:
        enc.write_page(pgno, data)
    enc.close(post_apply_checksum)
    return buf.getvalue()


__all__ = ["Encoder", "encode"]
