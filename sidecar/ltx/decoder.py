"""Streaming LTX decoder for v2 (raw and LZ4-framed) and v3 (per-page LZ4 blocks with an index).

    dec = Decoder(f, Version.V2)          # reads and validates the header
    for pgno, page in dec.pages():        # page views are reused: copy one to keep it
        ...
    trailer = dec.close()                 # verifies the file checksum (and a snapshot's database checksum)

Memory is one frame of the file's page size plus, for v3, the page index: never the file. Every failure
raises an `LTXError` naming the field or byte offset (docs/format.md §8), and the decoder is stricter than
Go's: pages must ascend, stay within Commit, skip the lock page, and snapshots must hold every page.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

import lz4.block

from sidecar.ltx.checksum import crc
from sidecar.ltx.errors import ChecksumMismatch, CorruptCompression, InvalidHeader, InvalidPage, LTXError, TruncatedFile
from sidecar.ltx.reader import BufferSource, LZ4FrameSource, NotWhole, Source, StreamSource, decompress_frame
from sidecar.ltx.types import (
    CHECKSUM_FLAG,
    FLAG_COMPRESS_LZ4,
    FLAG_NO_CHECKSUM,
    HEADER_SIZE,
    TRAILER_SIZE,
    BytesLike,
    Header,
    Trailer,
    Version,
    lock_pgno,
)

_V3_PAGE_HEADER = struct.Struct(">IHI")  # pgno, flags, compressed size
_V3_FLAG_SIZE = 0x0001
_from_bytes = int.from_bytes


def lz4_block_bound(page_size: int) -> int:
    """The largest LZ4 block a page of `page_size` bytes can compress to (LZ4_COMPRESSBOUND)."""
    return page_size + page_size // 255 + 16


def detect_version(head: BytesLike, size: int | None = None) -> Version:
    """Guess the flavour from the first ≥ 112 bytes (and the size, if known) (docs/format.md §0)."""
    view = memoryview(head).cast("B")
    if len(view) < HEADER_SIZE:
        raise TruncatedFile(f"file is {len(view)} bytes, shorter than the {HEADER_SIZE}-byte header", offset=0)
    header = Header.unpack(view)
    if header.flags & FLAG_COMPRESS_LZ4:
        return Version.V2
    if header.flags & FLAG_NO_CHECKSUM:
        return Version.V3
    if size is not None and header.page_size > 0:
        body = size - HEADER_SIZE - 4 - TRAILER_SIZE
        if body >= 0 and body % (4 + header.page_size) == 0:
            return Version.V2  # exactly the size of an uncompressed v2 file
    first = bytes(view[100:106])
    if first[:4] != b"\0\0\0\0":
        return Version.V3 if first[4:6] == b"\0\x01" else Version.V2  # v3 frames carry flags 0x0001
    # No pages: v2 has a flagged post-apply checksum right after its 4-byte end marker.
    return Version.V2 if len(first) > 4 and first[4] & 0x80 else Version.V3


def check_trailer(header: Header, trailer: Trailer, file_crc: int, off: int, *, db_crc: int | None = None) -> None:
    """Check a trailer at byte `off` against the CRC of everything before its file checksum, and, when given,
    a snapshot's recomputed database checksum (XOR of its page checksums); raises ChecksumMismatch."""
    if header.no_checksum:
        if trailer.post_apply_checksum:
            raise ChecksumMismatch("post-apply checksum must be zero with the no-checksum flag",
                                   field="post_apply_checksum", offset=off)
    elif not trailer.post_apply_checksum & CHECKSUM_FLAG:
        raise ChecksumMismatch(f"invalid post-apply checksum format: {trailer.post_apply_checksum:016x}",
                               field="post_apply_checksum", offset=off)
    if header.commit == 0 and trailer.post_apply_checksum != CHECKSUM_FLAG and not header.no_checksum:
        raise ChecksumMismatch("post-apply checksum of an empty database must be 8000000000000000",
                               field="post_apply_checksum", offset=off)
    want = CHECKSUM_FLAG | file_crc
    if trailer.file_checksum != want:
        raise ChecksumMismatch(
            f"file checksum mismatch: trailer has {trailer.file_checksum:016x}, data gives {want:016x}",
            field="file_checksum", offset=off + 8)
    if db_crc is not None:
        got = CHECKSUM_FLAG | db_crc
        if got != trailer.post_apply_checksum:
            raise ChecksumMismatch(
                f"post-apply checksum in trailer ({trailer.post_apply_checksum:016x}) does not match "
                f"calculated checksum ({got:016x})", field="post_apply_checksum", offset=off)


class Decoder:
    """Decode one LTX file from a binary stream or a buffer (zero copy for buffers such as mmap)."""

    def __init__(self, src: BinaryIO | BytesLike, version: Version | int, *, verify_snapshot: bool = True) -> None:
        self.version = Version(version)
        self._raw: Source = BufferSource(src) if not hasattr(src, "readinto") else StreamSource(src)  # type: ignore[arg-type]
        head = self._raw.read(HEADER_SIZE)
        self.header = Header.unpack(head)
        self.header.validate(self.version)
        self._crc = crc(head)
        self._body: Source = self._raw
        self._lz4: LZ4FrameSource | None = None
        if self.version == Version.V2 and self.header.flags & FLAG_COMPRESS_LZ4:
            self._lz4 = LZ4FrameSource(self._raw)
            self._body = self._lz4
        self._verify_snapshot = verify_snapshot and self.header.is_snapshot and not self.header.no_checksum
        self._db_crc = 0
        self._index: list[int] = []  # flat (pgno, offset, size) per frame, as the page index should list them
        self._pages_done = False
        self._frames: Iterator[tuple[int, int, memoryview]] | None = None
        self._closed = False
        self.page_count = 0
        self.trailer: Trailer | None = None

    # -- pages -----------------------------------------------------------------------------------------

    def pages(self) -> Iterator[tuple[int, memoryview]]:
        """Yield (pgno, page) in file order; each view is valid only until the next item."""
        if self._pages_done:
            raise LTXError("pages already read")
        page_size = self.header.page_size
        commit = self.header.commit
        lock = lock_pgno(page_size)
        snapshot = self.header.is_snapshot
        verify_db = self._verify_snapshot
        prev = 0
        if self._frames is None:  # one frame reader, resumed by a later call (as `close` makes after a partial read)
            self._frames = self._v3_frames(page_size) if self.version == Version.V3 else self._v2_frames(page_size)
        for frame_off, pgno, page in self._frames:
            if pgno <= prev:
                raise InvalidPage(f"page {pgno} out of order after page {prev}", offset=frame_off)
            if pgno > commit:
                raise InvalidPage(f"page {pgno} beyond commit {commit}", offset=frame_off)
            if pgno == lock:
                raise InvalidPage(f"page {pgno} is the lock page", offset=frame_off)
            if snapshot:
                want = prev + 2 if prev + 1 == lock else prev + 1
                if pgno != want:
                    raise InvalidPage(f"snapshot is missing page {want}: next page is {pgno}", offset=frame_off)
            if verify_db:
                self._db_crc ^= crc(page, crc(pgno.to_bytes(4, "big")))
            prev = pgno
            self.page_count += 1
            yield pgno, page
        if snapshot and commit and prev != commit and not (prev + 1 == lock == commit):
            raise InvalidPage(f"snapshot ends at page {prev}, commit is {commit}", offset=self._raw.offset)
        if self._lz4 is not None:
            self._lz4.finish()
        self._pages_done = True

    def _v2_frames(self, page_size: int) -> Iterator[tuple[int, int, memoryview]]:
        """(offset, pgno, page) of each v2 page frame, checksummed, up to and including the end marker."""
        body = self._body
        whole = body.peek_whole() if isinstance(body, LZ4FrameSource) else \
            body.peek_rest() if isinstance(body, BufferSource) else None
        if whole is not None:
            # The page block is in memory: slice it, and checksum it in one call (the CRC runs over the same
            # bytes in the same order as frame by frame). Every file the sidecar reads takes this path.
            off, end, base = 0, len(whole), self._raw.offset
            while True:
                if off + 4 > end:
                    raise TruncatedFile("unexpected end of file: want 4 bytes", offset=base + off)
                pgno = _from_bytes(whole[off:off + 4], "big")
                if pgno == 0:
                    off += 4
                    break
                if off + 4 + page_size > end:
                    raise TruncatedFile(f"unexpected end of file: want {page_size} bytes", offset=base + off + 4)
                yield base + off, pgno, whole[off + 4:off + 4 + page_size]
                off += 4 + page_size
            self._crc = crc(whole[:off], self._crc)
            body.read(off)
            return
        while True:
            frame_off = self._raw.offset
            hdr = body.read(4)
            self._crc = crc(hdr, self._crc)
            pgno = _from_bytes(hdr, "big")
            if pgno == 0:
                return
            page = body.read(page_size)
            self._crc = crc(page, self._crc)
            yield frame_off, pgno, page

    def _v3_frames(self, page_size: int) -> Iterator[tuple[int, int, memoryview]]:
        while True:
            frame_off = self._raw.offset
            pgno, page = self._read_v3_page(frame_off, page_size)
            if pgno == 0:
                return
            yield frame_off, pgno, page

    def _read_v3_page(self, frame_off: int, page_size: int) -> tuple[int, memoryview]:
        raw = self._raw
        if isinstance(raw, BufferSource) and frame_off + 10 <= len(raw.view):
            # Fast path for buffers: page header and size in one unpack, one CRC call.
            pgno, flags, csize = _V3_PAGE_HEADER.unpack_from(raw.view, frame_off)
            if pgno == 0:
                ph = raw.read(6)
                if flags:
                    raise InvalidPage("page number required", offset=frame_off)
                self._crc = crc(ph, self._crc)
                return 0, ph
            head = raw.read(10)
        else:
            ph = raw.read(6)
            pgno, flags = _from_bytes(ph[:4], "big"), _from_bytes(ph[4:6], "big")
            if pgno == 0:
                if flags:
                    raise InvalidPage("page number required", offset=frame_off)
                self._crc = crc(ph, self._crc)
                return 0, ph
            size_bytes = raw.read(4)
            csize = _from_bytes(size_bytes, "big")
            head = memoryview(bytes(ph) + bytes(size_bytes))
        if flags != _V3_FLAG_SIZE:
            raise InvalidPage(f"invalid page header flags: 0x{flags:04x}", offset=frame_off)
        if csize == 0 or csize > lz4_block_bound(page_size):
            raise InvalidPage(f"page {pgno}: compressed size {csize} out of range", offset=frame_off + 6)
        block = raw.read(csize)
        try:
            page = lz4.block.decompress(block, uncompressed_size=page_size)
        except lz4.block.LZ4BlockError as err:
            raise CorruptCompression(f"page {pgno}: decompress block: {err}", offset=frame_off + 10) from err
        if len(page) != page_size:
            raise CorruptCompression(f"page {pgno}: block decompressed to {len(page)} bytes, want {page_size}",
                                     offset=frame_off + 10)
        self._crc = crc(page, crc(head, self._crc))
        self._index += (pgno, frame_off, 10 + csize)
        return pgno, memoryview(page)

    # -- close -----------------------------------------------------------------------------------------

    def close(self) -> Trailer:
        """Read the rest (index, trailer) and verify every checksum; returns the trailer."""
        if self._closed:
            assert self.trailer is not None
            return self.trailer
        if not self._pages_done:
            for _ in self.pages():
                pass
        if self.version == Version.V3:
            self._read_index()
        off = self._raw.offset
        post_bytes = self._raw.read(8)
        self._crc = crc(post_bytes, self._crc)
        file_bytes = self._raw.read(8)
        trailer = Trailer.unpack(bytes(post_bytes) + bytes(file_bytes))
        if not self._raw.at_eof():
            raise LTXError("unexpected data after the trailer", offset=self._raw.offset)
        check_trailer(self.header, trailer, self._crc, off, db_crc=self._db_crc if self._verify_snapshot else None)
        self._closed = True
        self.trailer = trailer
        return trailer

    def _read_index(self) -> None:
        """Read the v3 page index and require it to describe exactly the frames we read."""
        raw = self._raw
        start = raw.offset
        if isinstance(raw, BufferSource) and len(raw.view) - start >= 24:
            # The index runs up to its 8-byte size and the 16-byte trailer: decode it in one pass.
            data = raw.read(len(raw.view) - start - 24)
            self._crc = crc(data, self._crc)
            values = _uvarints(data, start)
            if not values or values[-1] != 0 or len(values) % 3 != 1:
                raise InvalidPage("page index is malformed", offset=start)
            values.pop()
            if 0 in values[::3]:
                raise InvalidPage("page index has data after its terminator", offset=start)
        else:
            values = []
            while True:
                pgno = self._uvarint()
                if pgno == 0:
                    break
                values += (pgno, self._uvarint(), self._uvarint())
                if len(values) > len(self._index):
                    raise InvalidPage("page index has more entries than the file has pages", offset=raw.offset)
        index_len = raw.offset - start
        size_bytes = raw.read(8)
        self._crc = crc(size_bytes, self._crc)
        if _from_bytes(size_bytes, "big") != index_len:
            raise InvalidPage(f"page index size {_from_bytes(size_bytes, 'big')} != {index_len}", offset=start)
        if values != self._index:
            raise InvalidPage("page index does not match the page frames", offset=start)

    def _uvarint(self) -> int:
        value = shift = 0
        while True:
            b = self._raw.read(1)
            self._crc = crc(b, self._crc)
            byte = b[0]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise InvalidPage("page index varint overflows 64 bits", offset=self._raw.offset)


def _uvarints(data: BytesLike, offset: int) -> list[int]:
    """Every unsigned LEB128 varint in `data`; raises InvalidPage if the last one is cut short."""
    out: list[int] = []
    append = out.append
    value = shift = 0
    for byte in bytes(data):
        if byte < 0x80:
            append(value | (byte << shift))
            value = shift = 0
        else:
            value |= (byte & 0x7F) << shift
            shift += 7
            if shift > 63:
                raise InvalidPage("page index varint overflows 64 bits", offset=offset)
    if shift:
        raise InvalidPage("page index ends inside a varint", offset=offset + len(bytes(data)))
    return out


def decode_v2(data: BytesLike, limit: int = 0, *, strict: bool = False) \
        -> tuple[Header, Trailer, list[tuple[int, memoryview]]]:
    """Decode and verify a whole LTX v2 file held in memory: (header, trailer, [(pgno, page view)]).

    The same checks as `Decoder`, for the sidecar's per-transaction files at a third of the cost: the page
    block is decompressed whole (`decompress_frame`), cut into pages without copying, and checksummed in one
    call. The views point into one buffer that lives as long as they do. With a `limit`, a page block that
    decompresses past it, or an LZ4 frame of another layout, raises NotWhole (before the pages are all in
    memory): the caller then decodes the file streaming. `strict` checks the LZ4 frame's own checksums too,
    which the file checksum makes redundant for reading but not for acknowledging (`decompress_frame`).
    """
    view = memoryview(data).cast("B")
    if len(view) < HEADER_SIZE + 4 + TRAILER_SIZE:
        raise TruncatedFile(f"file is {len(view)} bytes, shorter than an empty LTX v2 file", offset=0)
    head = view[:HEADER_SIZE]
    header = Header.unpack(head)
    header.validate(Version.V2)
    end = len(view) - TRAILER_SIZE
    body = view[HEADER_SIZE:end]
    block = body
    if header.flags & FLAG_COMPRESS_LZ4:
        whole = decompress_frame(body, limit, strict=strict)
        if whole is None:  # an LZ4 frame laid out otherwise than LiteFS writes it: the general path
            if limit:  # which holds every page in memory: the caller's is bounded
                raise NotWhole("an LZ4 frame laid out otherwise than LiteFS writes it")
            dec = Decoder(view, Version.V2)
            copied = [(pgno, memoryview(bytes(page))) for pgno, page in dec.pages()]
            return dec.header, dec.close(), copied
        block = memoryview(whole)
    ps, commit, lock = header.page_size, header.commit, lock_pgno(header.page_size)
    step = 4 + ps
    n, rest = divmod(len(block) - 4, step)
    if rest or len(block) < 4 or bytes(block[-4:]) != b"\0\0\0\0":
        at = HEADER_SIZE + len(block)
        if header.flags & FLAG_COMPRESS_LZ4:
            raise CorruptCompression("the LZ4 frame does not end right after the page block's end marker",
                                     offset=HEADER_SIZE)
        raise TruncatedFile("the page block does not end right before the trailer", offset=at)
    snapshot = header.is_snapshot
    pages: list[tuple[int, memoryview]] = []
    db_crc, prev = 0, 0
    for k in range(n):
        o = k * step
        pgno = _from_bytes(block[o:o + 4], "big")
        if pgno <= prev:
            raise InvalidPage(f"page {pgno} out of order after page {prev}" if pgno else "page number required",
                              offset=HEADER_SIZE + o)
        if pgno > commit:
            raise InvalidPage(f"page {pgno} beyond commit {commit}", offset=HEADER_SIZE + o)
        if pgno == lock:
            raise InvalidPage(f"page {pgno} is the lock page", offset=HEADER_SIZE + o)
        page = block[o + 4:o + step]
        if snapshot:
            if pgno != (prev + 2 if prev + 1 == lock else prev + 1):
                raise InvalidPage(f"snapshot is missing page {prev + 1}: next page is {pgno}", offset=HEADER_SIZE + o)
            db_crc ^= crc(page, crc(block[o:o + 4]))
        pages.append((pgno, page))
        prev = pgno
    if snapshot and commit and prev != commit and not (prev + 1 == lock == commit):
        raise InvalidPage(f"snapshot ends at page {prev}, commit is {commit}", offset=end)
    trailer = Trailer.unpack(view[end:])
    check_trailer(header, trailer, crc(view[end:end + 8], crc(block, crc(head))), end,
                  db_crc=db_crc if snapshot else None)
    return header, trailer, pages


def decode(data: BinaryIO | BytesLike, version: Version | int) -> tuple[Header, list[tuple[int, bytes]], Trailer]:
    """Decode a whole file into (header, [(pgno, page bytes)], trailer); for tests and small files."""
    dec = Decoder(data, version)
    pages = [(pgno, bytes(page)) for pgno, page in dec.pages()]
    return dec.header, pages, dec.close()


def verify(data: BinaryIO | BytesLike, version: Version | int) -> tuple[Header, Trailer]:
    """Fully decode and check one file; raises LTXError naming the problem."""
    dec = Decoder(data, version)
    for _ in dec.pages():
        pass
    return dec.header, dec.close()


__all__ = ["Decoder", "InvalidHeader", "check_trailer", "decode", "decode_v2", "detect_version", "lz4_block_bound",
           "verify"]
