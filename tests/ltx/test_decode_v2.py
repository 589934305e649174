"""decode_v2, the sidecar's whole-file v2 decoder: the same pages, headers and refusals as the streaming Decoder."""

from __future__ import annotations

import lz4.frame
import pytest

from sidecar.ltx import (
    CHECKSUM_FLAG,
    FLAG_COMPRESS_LZ4,
    HEADER_SIZE,
    TRAILER_SIZE,
    CorruptCompression,
    Header,
    InvalidPage,
    LTXError,
    Trailer,
    Version,
)
from sidecar.ltx.checksum import crc
from sidecar.ltx.decoder import decode, decode_v2
from sidecar.ltx.reader import NotWhole, decompress_frame
from tests.conftest import GO_V2, LITEFS
from tests.ltx.chain import build_chain

FILES = sorted([*LITEFS.glob("per-tx/*/*.ltx"), *GO_V2.glob("*.ltx")])


def streaming(data: bytes) -> tuple[object, object, list[tuple[int, bytes]]] | str:
    try:
        header, pages, trailer = decode(data, Version.V2)
    except LTXError as err:
        return type(err).__name__
    return header, trailer, pages


def whole(data: bytes) -> tuple[object, object, list[tuple[int, bytes]]] | str:
    try:
        header, trailer, pages = decode_v2(data)
    except LTXError as err:
        return type(err).__name__
    return header, trailer, [(pgno, bytes(page)) for pgno, page in pages]


def test_fixtures_are_read_alike() -> None:
    read = [path for path in FILES if not isinstance(streaming(path.read_bytes()), str)]
    assert len(read) >= 20
    for path in read:
        data = path.read_bytes()
        assert whole(data) == streaming(data), path.name


@pytest.mark.parametrize("lz4", [False, True])
def test_chains_with_snapshots_and_shrinks_are_read_alike(lz4: bool) -> None:
    files, _ = build_chain([(6, {p: 1 for p in range(1, 7)}), (6, {2: 2, 5: 2}), (3, {1: 3}), (8, {7: 4, 8: 4})],
                           lz4=lz4)
    for data in files:
        assert whole(data) == streaming(data)
        assert not isinstance(whole(data), str)


def test_every_byte_flip_is_refused_as_the_streaming_decoder_does() -> None:
    """Except in the LZ4 frame's descriptor (block size, header checksum) and its content checksum: xxh32 is not
    recomputed, the LTX file checksum covering the same decompressed bytes (the pages stay identical)."""
    data = (LITEFS / "per-tx" / "fx-wal.db" / "0000000000000001-0000000000000001.ltx").read_bytes()
    assert data[HEADER_SIZE + 4] & 0x04  # a content checksum is there
    metadata = {HEADER_SIZE + 5, HEADER_SIZE + 6, *range(len(data) - TRAILER_SIZE - 4, len(data) - TRAILER_SIZE)}
    original = whole(data)
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= mask
            ours, theirs = whole(bytes(bad)), streaming(bytes(bad))
            if isinstance(ours, str):
                assert isinstance(theirs, str), (i, mask)
            elif i in metadata:
                assert ours == original, (i, mask)
            else:
                assert ours == theirs, (i, mask)


def test_truncations_are_refused() -> None:
    data = (LITEFS / "per-tx" / "fx-wal.db" / "0000000000000001-0000000000000001.ltx").read_bytes()
    for n in range(len(data)):
        assert isinstance(whole(data[:n]), str), n
    assert whole(data + b"\0") == "CorruptCompression"  # the frame no longer ends right before the trailer


class TestDecompressFrame:
    BLOCK = bytes(range(256)) * 700  # 175 KiB: three 64 KiB blocks

    def test_independent_blocks_as_litefs_writes_them(self) -> None:
        frame = lz4.frame.compress(self.BLOCK, block_size=lz4.frame.BLOCKSIZE_MAX64KB, block_linked=False,
                                   content_checksum=True, store_size=False)
        assert decompress_frame(frame) == self.BLOCK

    @pytest.mark.parametrize("options", [
        {"block_linked": True}, {"block_checksum": True}, {"store_size": True}, {"content_checksum": False},
    ], ids=str)
    def test_other_layouts_are_left_to_lz4_frame(self, options: dict[str, bool]) -> None:
        settings = {"block_size": lz4.frame.BLOCKSIZE_MAX64KB, "block_linked": False, "content_checksum": True,
                    "store_size": False, **options}
        assert decompress_frame(lz4.frame.compress(self.BLOCK, **settings)) is None

    def test_a_file_in_another_layout_is_still_decoded(self) -> None:
        """decode_v2 falls back to the streaming decoder for a frame it does not take apart itself."""
        files, _ = build_chain([(3, {1: 1, 2: 1, 3: 1})], lz4=True)
        data = files[0]
        block = lz4.frame.decompress(data[HEADER_SIZE:-TRAILER_SIZE])
        relinked = lz4.frame.compress(block, block_linked=True, block_checksum=True)
        other = data[:HEADER_SIZE] + relinked + data[-TRAILER_SIZE:]
        assert data[4:8] == FLAG_COMPRESS_LZ4.to_bytes(4, "big")
        assert whole(other) == streaming(data)

    def test_a_broken_frame_is_refused(self) -> None:
        """(A flipped literal decodes to other bytes: the LTX file checksum is what refuses that file.)"""
        frame = lz4.frame.compress(self.BLOCK[:1000], block_linked=False, store_size=False, content_checksum=True)
        oversized = frame[:7] + (len(frame) | 0x1000).to_bytes(4, "little") + frame[11:]
        for bad in (oversized, frame[:-5], frame[:-4] + b"\0\0\0\0" + frame[-4:]):
            with pytest.raises(CorruptCompression):
                decompress_frame(bad)

    def test_one_block_frames_take_the_short_path_with_the_same_checks(self) -> None:
        """A transaction's frame is one block then the end mark: decoded without the block loop, and refused
        or cut short (NotWhole) exactly as the loop would."""
        page = self.BLOCK[:5000]
        frame = lz4.frame.compress(page, block_size=lz4.frame.BLOCKSIZE_MAX64KB, block_linked=False,
                                   content_checksum=True, store_size=False)
        assert int.from_bytes(frame[7:11], "little") + 15 == len(frame) - 4  # one block, as the short path wants
        assert decompress_frame(frame, strict=True) == page
        with pytest.raises(NotWhole):
            decompress_frame(frame, limit=4999)
        assert decompress_frame(frame, limit=5000) == page
        trailing = frame[:-4] + bytes(4) + frame[-4:]  # a second end mark: data after the first
        with pytest.raises(CorruptCompression, match="after the LZ4 frame's end mark"):
            decompress_frame(trailing)
        wrong_sum = frame[:-4] + bytes(a ^ 0xFF for a in frame[-4:])
        assert decompress_frame(wrong_sum) == page  # the LTX file checksum covers the bytes...
        with pytest.raises(CorruptCompression, match="content checksum"):
            decompress_frame(wrong_sum, strict=True)  # ...and strict checks the frame's own as well
        size = int.from_bytes(frame[7:11], "little")
        broken = frame[:11] + b"\xff" * size + frame[11 + size:]  # literal lengths running past the block's end
        with pytest.raises(CorruptCompression, match="corrupt LZ4 block"):
            decompress_frame(bytes(broken))



def _v2_file(pgnos: list[int], commit: int) -> bytes:
    """An uncompressed v2 file holding `pgnos` in that order, every checksum right."""
    ps = 4096
    header = Header(page_size=ps, commit=commit, min_txid=5, max_txid=5, timestamp=1,
                    pre_apply_checksum=CHECKSUM_FLAG | 7).pack()
    block = b"".join(p.to_bytes(4, "big") + bytes([p % 251]) * ps for p in pgnos) + bytes(4)
    post = (CHECKSUM_FLAG | 9).to_bytes(8, "big")
    return header + block + Trailer(CHECKSUM_FLAG | 9, CHECKSUM_FLAG | crc(post, crc(block, crc(header)))).pack()


@pytest.mark.parametrize(("pgnos", "commit", "why", "at"), [
    ([1, 3, 2], 4, "page 2 out of order after page 3", 2),
    ([0, 1], 4, "page number required", 0),
    ([1, 1], 4, "page 1 out of order after page 1", 1),
    ([1, 2, 9], 4, "page 9 beyond commit 4", 2),
    ([1, 262145], 262146, "page 262145 is the lock page", 1),
], ids=str)
def test_bad_page_numbers_are_named_page_by_page(pgnos: list[int], commit: int, why: str, at: int) -> None:
    """Which page, at which offset, for what reason."""
    with pytest.raises(InvalidPage, match=why) as ours:
        decode_v2(_v2_file(pgnos, commit))
    with pytest.raises(LTXError):  # the streaming decoder takes a page number 0 for the end of the pages
        decode(_v2_file(pgnos, commit), Version.V2)
    assert ours.value.offset == HEADER_SIZE + at * (4 + 4096)
    assert whole(_v2_file([1, 2, 9], 9)) == streaming(_v2_file([1, 2, 9], 9))


def test_strict_refuses_every_byte_flip_the_streaming_decoder_refuses() -> None:
    """`strict` (the server's door) checks the LZ4 frame's own checksums as lz4.frame does: no flip is let through."""
    data = (LITEFS / "per-tx" / "fx-wal.db" / "0000000000000001-0000000000000001.ltx").read_bytes()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        try:
            header, trailer, pages = decode_v2(bytes(bad), strict=True)
            ours: object = (header, trailer, [(pgno, bytes(page)) for pgno, page in pages])
        except LTXError as err:
            ours = type(err).__name__
        theirs = streaming(bytes(bad))
        assert isinstance(ours, str) == isinstance(theirs, str), i
        if not isinstance(ours, str):
            assert ours == theirs, i


def test_a_frame_past_the_limit_is_left_to_the_streaming_decoder() -> None:
    """LZ4 expands up to 255 times: a small file may stand for a large page block, never decompressed whole."""
    files, _ = build_chain([(300, {p: 0 for p in range(1, 301)})], lz4=True, size=4096)  # 1.2 MB of pages
    assert len(files[0]) < 20_000
    with pytest.raises(NotWhole):
        decode_v2(files[0], limit=1 << 20)
    assert whole(files[0]) == streaming(files[0])  # without a limit it is decoded whole
