"""Page indexes read whole or by windows find every frame the encoder wrote, and nothing else."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.ltx import FLAG_NO_CHECKSUM, Header, Version
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.pageindex import MAX_PROBES, SparseIndex, Unknown, decode, index_span


def ltx_file(pgnos: list[int], seed: int = 0, page_size: int = 512, snapshot: bool = False) -> bytes:
    """An LTX v3 file holding `pgnos`, with pages of varied compressibility (frame sizes vary)."""
    rng = random.Random(seed)
    out = io.BytesIO()
    commit = max(pgnos)
    enc = Encoder(out, Header(page_size=page_size, commit=commit, min_txid=1 if snapshot else 2,
                              max_txid=2, timestamp=1, flags=FLAG_NO_CHECKSUM), Version.V3)
    for p in pgnos:
        k = rng.randint(0, page_size)
        enc.write_page(p, rng.randbytes(k) + bytes(page_size - k))
    enc.close(0)
    return out.getvalue()


def frames(data: bytes) -> dict[int, tuple[int, int]]:
    """The truth: every frame's (offset, size), walking the frames from the header."""
    out, off = {}, 100
    while True:
        pgno = int.from_bytes(data[off:off + 4], "big")
        if not pgno:
            return out
        size = 10 + int.from_bytes(data[off + 6:off + 10], "big")
        out[pgno] = (off, size)
        off += size


def lookup(data: bytes, index: SparseIndex, pgno: int) -> tuple[tuple[int, int] | None, int]:
    """Find `pgno`, reading windows as asked (bytes held first); returns the answer and how many reads it took."""
    reads = 0
    while True:
        try:
            return index.find(pgno), reads
        except Unknown:
            if index.settle(pgno):
                continue
            start, length, a, b = index.window(pgno)
            run = decode(data[start:start + length], start, aligned_start=a, aligned_end=b)
            assert run is not None
            index.add(run)
            reads += 1


class TestWholeIndex:
    def test_small_file_index_comes_with_its_tail(self) -> None:
        data = ltx_file([1, 2, 3, 7, 9])  # an incremental file
        start, end = index_span(data[-64:], len(data))
        run = decode(data[start:end], start, aligned_start=True, aligned_end=True)
        assert run is not None and dict(zip(run.pgnos, zip(run.offsets, run.sizes, strict=True),
                                            strict=True)) == frames(data)
        idx = SparseIndex(start, end, 10)
        idx.add(run)
        assert idx.complete and idx.find(7) == frames(data)[7] and idx.find(8) is None and idx.find(99) is None

    @settings(max_examples=40, deadline=None)
    @given(st.integers(300, 3000), st.integers(0, 2**32), st.booleans())
    def test_held_bytes_answer_without_reads(self, n: int, seed: int, dense: bool) -> None:
        """A whole index held undecoded answers every page, decoding only small windows of it."""
        rng = random.Random(seed)
        pgnos = list(range(1, n + 1)) if dense else sorted(rng.sample(range(1, 4 * n), n))
        data = ltx_file(pgnos, seed, snapshot=dense)
        truth = frames(data)
        start, end = index_span(data[-64:], len(data))
        idx = SparseIndex(start, end, max(pgnos) + 1)
        idx.hold(start, data[start:end])
        for p in rng.sample(range(1, max(pgnos) + 2), 50):
            got, reads = lookup(data, idx, p)
            assert got == truth.get(p) and reads == 0, p

    def test_tail_that_is_not_an_index_is_refused(self) -> None:
        with pytest.raises(ValueError, match="does not fit"):
            index_span(bytes(64), 1000)


class TestWindows:
    @settings(max_examples=60, deadline=None)
    @given(st.integers(500, 2500), st.integers(0, 2**32), st.booleans())
    def test_every_page_found_by_windows(self, n: int, seed: int, dense: bool) -> None:
        """A snapshot (dense) or a sparse file too big for one window: every page, present or not, is
        answered exactly, in a few windows each, starting from the tail read alone."""
        rng = random.Random(seed)
        pgnos = list(range(1, n + 1)) if dense else sorted(rng.sample(range(1, 4 * n), n))
        data = ltx_file(pgnos, seed, snapshot=dense)
        truth = frames(data)
        window = 1024
        tail_at = len(data) - window
        start, end = index_span(data[tail_at:], len(data))
        assert end - start > 2 * window
        idx = SparseIndex(start, end, max(pgnos) + 1, window)
        tail = decode(data[max(tail_at, start):end], max(tail_at, start), aligned_start=False, aligned_end=True)
        assert tail is not None
        idx.add(tail)
        worst = 0
        for p in rng.sample(range(1, max(pgnos) + 2), 200):
            got, reads = lookup(data, idx, p)
            assert got == truth.get(p), p
            worst = max(worst, reads)
        assert worst <= 6

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 2**32), st.integers(0, 10_000), st.integers(24, 2000))
    def test_any_unaligned_window_decodes_to_true_entries(self, seed: int, at: int, length: int) -> None:
        data = ltx_file(sorted(random.Random(seed).sample(range(1, 2000), 600)), seed)
        truth = frames(data)
        start, end = index_span(data[-64:], len(data))
        at = start + at % (end - start)
        run = decode(data[at:min(end, at + length)], at, aligned_start=False, aligned_end=at + length >= end)
        if run is None:
            return  # too short to align: the caller reads a wider span
        assert start <= run.start and run.end <= end
        for p, o, s in zip(run.pgnos, run.offsets, run.sizes, strict=True):
            assert truth[p] == (o, s)


class TestCorruptIndex:
    def test_overlong_varint_in_an_aligned_span_is_refused(self) -> None:
        """A span read whole between known entries (aligned both ends) that holds a varint of more than 64 bits
        is no index: a ValueError, not "ambiguous, read again", which had the caller re-read it forever."""
        data = bytearray(ltx_file([1, 2, 3, 7, 9]))
        start, end = index_span(data[-64:], len(data))
        data[start + 3:start + 13] = b"\xff" * 10  # ten continuation bytes: 70 bits
        with pytest.raises(ValueError, match="varint"):
            decode(data[start:end], start, aligned_start=True, aligned_end=True)
        idx = SparseIndex(start, end, 10)
        reads = 0
        with pytest.raises(ValueError):
            attempt = 0
            while True:  # the documented find loop of the module's callers (view.py, server/reads.py)
                try:
                    idx.find(7)
                    break
                except Unknown:
                    pass
                s, length, a, b = idx.read_for(7, attempt)
                reads += 1
                assert reads < 10, "the same span is read again and again"
                attempt = attempt + 1 if idx.take(data[s:s + length], s, a, b) else MAX_PROBES
