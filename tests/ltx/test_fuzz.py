"""Hypothesis keeps fuzzing the codec's entry points with damaged real files (fields overwritten with edge values,
cut short, the file checksum recomputed or not): every outcome is a result or the codec's own error, and the
in-memory and streaming decoders agree on what they accept."""

from __future__ import annotations

import io
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.ltx import HEADER_SIZE, Header, LTXError, Version
from sidecar.ltx.checksum import crc
from sidecar.ltx.decoder import decode, decode_v2, detect_version
from sidecar.ltx.pageindex import SparseIndex, Unknown, index_span
from sidecar.ltx.reader import NotWhole, decompress_frame
from sidecar.ltx.sqlite import Applier
from sidecar.ltx.types import Trailer
from tests.conftest import GO_V2, LITEFS, LITESTREAM

FILES = [
    ((LITEFS / "per-tx" / "fx-nocomp.db" / "0000000000000001-0000000000000001.ltx").read_bytes(), Version.V2),
    ((LITEFS / "per-tx" / "fx-wal.db" / "0000000000000002-0000000000000002.ltx").read_bytes(), Version.V2),
    ((GO_V2 / "tiny-512.lz4.ltx").read_bytes(), Version.V2),
    ((GO_V2 / "tiny-512.ltx").read_bytes(), Version.V2),
    ((LITESTREAM / "replica" / "ltx" / "9" / "0000000000000001-0000000000000001.ltx").read_bytes(), Version.V3),
    ((LITESTREAM / "replica" / "ltx" / "0" / "000000000000003e-000000000000003e.ltx").read_bytes(), Version.V3),
]

# (where, width, value): `where` picks the header, the first bytes after it, the tail, or anywhere
edits = st.tuples(st.sampled_from(["header", "body", "tail", "any"]), st.integers(0, 1 << 20),
                  st.sampled_from([1, 2, 4, 8, 12]),
                  st.one_of(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 1 << 31, 1 << 63, (1 << 96) - 1]),
                            st.integers(0, (1 << 96) - 1)))


def damaged(data: bytes, changes: list[tuple[str, int, int, int]], cut: int | None, fix: bool) -> bytes:
    out = bytearray(data)
    for where, at, width, value in changes:
        base, span = {"header": (0, HEADER_SIZE), "body": (HEADER_SIZE, 64), "tail": (max(0, len(out) - 64), 64),
                      "any": (0, len(out))}[where]
        at = min(base + at % span, len(out) - 1)
        out[at:at + width] = (value % (1 << (8 * width))).to_bytes(width, "big")[:len(out) - at]
    if cut is not None:
        del out[cut % len(out):]
    if fix and len(out) >= 24:
        out[-8:] = ((1 << 63) | crc(bytes(out[:-8]))).to_bytes(8, "big")
    return bytes(out)


def outcome(fn: object) -> tuple[str, object]:
    try:
        return "ok", fn()  # type: ignore[operator]
    except LTXError as err:
        return "error", type(err)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(FILES))), st.lists(edits, max_size=3), st.one_of(st.none(), st.integers(0, 1 << 20)),
       st.booleans())
def test_damaged_files_raise_only_ltx_errors(k: int, changes: list[tuple[str, int, int, int]], cut: int | None,
                                            fix: bool) -> None:
    original, version = FILES[k]
    data = damaged(original, changes, cut, fix)
    for v in (Version.V2, Version.V3):  # the wrong flavour too: nothing in a file says which it is
        buffered = outcome(lambda v=v: decode(data, v)[1])  # type: ignore[misc]
        streamed = outcome(lambda v=v: decode(io.BytesIO(data), v)[1])  # type: ignore[misc]
        assert buffered[0] == streamed[0] and (buffered[0] == "error" or buffered[1] == streamed[1])
        if v == Version.V2:
            # The in-memory decoder, checking the LZ4 frame's own checksums as the streaming one does.
            whole = outcome(lambda: [(p, bytes(page)) for p, page in decode_v2(data, strict=True)[2]])
            assert whole[0] == buffered[0] and (whole[0] == "error" or whole[1] == buffered[1])
            try:
                outcome(lambda: decode_v2(data, 1 << 12))
            except NotWhole:
                pass
    outcome(lambda: detect_version(data, len(data)))
    outcome(lambda: Header.unpack(data).validate(version))
    if len(data) >= 16:
        Trailer.unpack(data[-16:])
    try:
        outcome(lambda: decompress_frame(data[HEADER_SIZE:-16], 1 << 16, strict=True))
    except NotWhole:
        pass
    with tempfile.TemporaryFile() as f:
        outcome(lambda: Applier(f).apply(data, version))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([4, 5]), st.lists(edits, min_size=1, max_size=3), st.sampled_from(range(1, 40)))
def test_damaged_page_indexes_answer_or_raise_value_error(k: int, changes: list[tuple[str, int, int, int]],
                                                          pgno: int) -> None:
    """The page index read by windows (the VFS, the read server) answers, or says the index is corrupt, and
    never asks for the same bytes forever."""
    original, _ = FILES[k]
    data = damaged(original, [("tail", *c[1:]) for c in changes], None, False)
    try:
        start, end = index_span(data[-64:], len(data))
    except ValueError:
        return
    index = SparseIndex(start, end, 40, window_size=32)
    attempt = 0
    try:
        for _ in range(20):
            try:
                index.find(pgno)
                return
            except Unknown:
                pass
            at, length, a, b = index.read_for(pgno, attempt)
            assert start <= at and at + length <= end
            attempt = attempt + 1 if index.take(data[at:at + length], at, a, b) else 4
        raise AssertionError("no answer after 20 reads of the index")
    except ValueError:
        pass
