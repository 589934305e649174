"""ltx/compactor.py piece by piece: the contiguity rule, the output header, the checksum hint, the merge, compact().

test_properties.py shows compaction equals sequential application; these pin each rule and message, table-driven
as ltx's TestCompactor_Compact is.
"""

from __future__ import annotations

import io
import random
import tracemalloc

import pytest

from sidecar.ltx import FLAG_COMPRESS_LZ4, FLAG_NO_CHECKSUM, HEADER_SIZE, Header, Trailer, Version
from sidecar.ltx.compactor import check_contiguous, compact, compacted_header, final_checksum_hint, merge_v2
from sidecar.ltx.decoder import decode
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.errors import CompactionError, InvalidHeader, LTXError
from sidecar.ltx.reader import NotWhole
from tests.ltx.chain import PAGE, build_chain, checksum, page, to_v3_no_checksum

F = 1 << 63  # the checksum flag


def h(lo: int, hi: int, pre: int = 0, *, size: int = PAGE, flags: int = 0, commit: int = 3, ts: int = 0,
      ext: tuple[int, int] = (0, 0)) -> Header:
    return Header(page_size=size, commit=commit, min_txid=lo, max_txid=hi, timestamp=ts, pre_apply_checksum=pre,
                  flags=flags, ext_pre_apply_checksum=ext[0], ext_post_apply_checksum=ext[1])


def t(post: int) -> Trailer:
    return Trailer(post, F | 1)


def with_ext(files: list[bytes]) -> list[bytes]:
    """Each v2 file as the engine stores it: v3, no-checksum flag, database checksums in the header extension."""
    out = []
    for data in files:
        buf = io.BytesIO()
        compact([data], buf, version=Version.V2, flags=FLAG_NO_CHECKSUM, out_version=Version.V3)
        out.append(buf.getvalue())
    return out


class TestCheckContiguous:
    """Each file must start right after the previous one ends and, given trailers, continue its checksum."""

    @pytest.mark.parametrize(("headers", "overlap"), [
        ([h(1, 3), h(4, 4, F | 1), h(5, 9, F | 2)], False),
        ([h(1, 3), h(4, 4, F | 1)], True),
        ([h(1, 3), h(2, 5, F | 1)], True),  # v3 overlap: starts inside the previous file, ends beyond it
        ([h(1, 3), h(1, 5)], True),
        ([h(7, 7, F | 1)], False),
    ], ids=["chain", "chain with overlap allowed", "overlap", "overlap from the start", "one file"])
    def test_accepted(self, headers: list[Header], overlap: bool) -> None:
        check_contiguous(headers, allow_overlap=overlap)

    @pytest.mark.parametrize(("headers", "overlap"), [
        ([h(1, 3), h(5, 5, F | 1)], False),
        ([h(1, 3), h(5, 5, F | 1)], True),
        ([h(1, 3), h(2, 5, F | 1)], False),
        ([h(1, 3), h(2, 3, F | 1)], True),  # overlap that ends where the previous one did: nothing new
        ([h(1, 3), h(3, 3, F | 1)], True),
        ([h(1, 3), h(3, 3, F | 1)], False),
    ], ids=["gap", "gap with overlap allowed", "overlap not allowed", "overlap ending at the previous end",
            "repeat", "repeat without overlap"])
    def test_refused(self, headers: list[Header], overlap: bool) -> None:
        with pytest.raises(CompactionError, match=r"^non-contiguous transaction ids in input files: "
                                                  r"\(0000000000000001,0000000000000003\) -> \(") as err:
            check_contiguous(headers, allow_overlap=overlap)
        assert err.value.field == "min_txid"

    def test_overlap_is_refused_unless_allowed(self) -> None:
        """Without `allow_overlap` (as the appliers check chains) a file must start right after the previous one."""
        with pytest.raises(CompactionError, match="non-contiguous"):
            check_contiguous([h(1, 3), h(2, 5, F | 1)])

    def test_page_sizes_must_match(self) -> None:
        with pytest.raises(CompactionError, match=r"^input files have mismatched page sizes: 512 != 1024$") as err:
            check_contiguous([h(1, 3), h(4, 4, F | 1, size=1024)])
        assert err.value.field == "page_size"

    def test_checksums_must_continue(self) -> None:
        headers = [h(1, 3), h(4, 4, F | 5), h(5, 5, F | 6)]
        check_contiguous(headers, [t(F | 5), t(F | 6), t(F | 7)])
        check_contiguous(headers, None)  # headers alone: no checksum to compare
        with pytest.raises(CompactionError, match=r"^input 2 \(0000000000000005\) pre-apply checksum "
                                                  r"8000000000000006 != previous post-apply checksum "
                                                  r"8000000000000009$") as err:
            check_contiguous(headers, [t(F | 5), t(F | 9), t(F | 7)])
        assert err.value.field == "pre_apply_checksum"

    @pytest.mark.parametrize(("headers", "trailers"), [
        ([h(1, 3), h(1, 5)], [t(F | 5), t(F | 6)]),  # a snapshot continues anything
        ([h(1, 3), h(2, 5, F | 9)], [t(F | 5), t(F | 6)]),  # an overlapping file's pre-apply is of another TXID
        ([h(1, 3, flags=FLAG_NO_CHECKSUM), h(4, 5, flags=FLAG_NO_CHECKSUM)], [t(0), t(0)]),  # no checksums
        ([h(1, 3, flags=FLAG_NO_CHECKSUM, ext=(0, F | 5)), h(4, 5, flags=FLAG_NO_CHECKSUM)], [t(0), t(0)]),
    ], ids=["snapshot", "overlap", "no checksums", "no checksums after the first"])
    def test_exempt_from_the_checksum_rule(self, headers: list[Header], trailers: list[Trailer]) -> None:
        check_contiguous(headers, trailers, allow_overlap=True)

    def test_extension_checksums_must_continue(self) -> None:
        """Files that keep their checksums in the header extension are held to the same rule."""
        nc = FLAG_NO_CHECKSUM
        check_contiguous([h(1, 3, flags=nc, ext=(0, F | 5)), h(4, 5, flags=nc, ext=(F | 5, F | 6))], [t(0), t(0)])
        with pytest.raises(CompactionError, match="pre-apply checksum 8000000000000004 != previous post-apply "
                                                  "checksum 8000000000000005"):
            check_contiguous([h(1, 3, flags=nc, ext=(0, F | 5)), h(4, 5, flags=nc, ext=(F | 4, F | 6))],
                             [t(0), t(0)])


class TestCompactedHeader:
    """The output header, field by field (spec/ltx.md §9)."""

    def test_fields_come_from_the_first_and_last_inputs(self) -> None:
        out = compacted_header([h(4, 5, F | 3, commit=9, ts=10), h(6, 8, F | 4, commit=7, ts=20)], FLAG_COMPRESS_LZ4)
        assert out == Header(page_size=PAGE, commit=7, min_txid=4, max_txid=8, timestamp=20,
                             pre_apply_checksum=F | 3, flags=FLAG_COMPRESS_LZ4)

    def test_a_snapshot_first_has_no_pre_apply_checksum(self) -> None:
        assert compacted_header([h(1, 5), h(6, 6, F | 4)], 0).pre_apply_checksum == 0

    def test_no_checksum_inputs_give_their_extension_pre_apply(self) -> None:
        nc = FLAG_NO_CHECKSUM
        out = compacted_header([h(4, 5, flags=nc, ext=(F | 3, F | 4)), h(6, 6, flags=nc, ext=(F | 4, F | 6))], 0)
        assert out.pre_apply_checksum == F | 3

    @pytest.mark.parametrize(("first", "post", "ext"), [
        (h(4, 5, F | 3), F | 9, (F | 3, F | 9)),
        (h(1, 5), F | 9, (0, F | 9)),
        (h(4, 5, F | 3), None, (0, 0)),
        (h(4, 5, flags=FLAG_NO_CHECKSUM), F | 9, (0, 0)),  # no pre-apply checksum known: none written
    ], ids=["incremental", "snapshot", "final checksum unknown", "first input without checksums"])
    def test_no_checksum_output_keeps_checksums_in_the_extension(self, first: Header, post: int | None,
                                                                 ext: tuple[int, int]) -> None:
        out = compacted_header([first, h(6, 6, F | 4)], FLAG_NO_CHECKSUM, post)
        assert out.pre_apply_checksum == 0 and out.flags == FLAG_NO_CHECKSUM
        assert (out.ext_pre_apply_checksum, out.ext_post_apply_checksum) == ext


class TestFinalChecksumHint:
    """The post-apply checksum of the last input, read without decoding it."""

    def test_from_the_trailer_of_a_buffer(self) -> None:
        files, db = build_chain([(3, {1: 1})])
        header = decode(files[0], Version.V2)[0]
        for src in (files[0], bytearray(files[0]), memoryview(files[0])):
            assert final_checksum_hint(src, header) == checksum(db)

    def test_none_from_a_stream(self) -> None:
        files, _ = build_chain([(3, {1: 1})])
        assert final_checksum_hint(io.BytesIO(files[0]), decode(files[0], Version.V2)[0]) is None

    def test_from_the_extension_of_a_no_checksum_file(self) -> None:
        nc = FLAG_NO_CHECKSUM
        assert final_checksum_hint(b"", h(4, 5, flags=nc, ext=(F | 3, F | 4))) == F | 4
        assert final_checksum_hint(b"", h(4, 5, flags=nc)) is None


class TestCompact:
    """compact(): the merge and the output as a whole."""

    def test_the_latest_input_wins_and_pages_past_commit_drop(self) -> None:
        files, db = build_chain([(6, {}), (6, {2: 5, 6: 5}), (5, {2: 7, 3: 7})])
        out = io.BytesIO()
        compact(files[1:], out, version=Version.V2)
        header, pages, trailer = decode(out.getvalue(), Version.V2)
        assert header.commit == 5 and dict(pages) == {2: page(7, 2), 3: page(7, 3)}
        assert trailer.post_apply_checksum == checksum(db)

    def test_one_input_is_copied_whole(self) -> None:
        """A single input is copied whole, its last page (at its commit) included."""
        files, _ = build_chain([(6, {}), (4, {2: 5, 4: 5})])
        out = io.BytesIO()
        compact(files[1:], out, version=Version.V2)
        assert dict(decode(out.getvalue(), Version.V2)[1]) == {2: page(5, 2), 4: page(5, 4)}

    def test_no_input(self) -> None:
        with pytest.raises(CompactionError, match=r"^no input files$"):
            compact([], io.BytesIO(), version=Version.V2)

    def test_a_bad_input_is_named_by_position(self) -> None:
        files, _ = build_chain([(3, {1: 1}), (3, {2: 2})])
        with pytest.raises(InvalidHeader, match=r"^decode header for input 1: invalid LTX file: magic") as err:
            compact([files[0], b"LTX0" + files[1][4:]], io.BytesIO(), version=Version.V2)
        assert err.value.field == "magic"

    def test_flags_and_version_default_to_the_inputs(self) -> None:
        files, _ = build_chain([(3, {1: 1}), (3, {2: 2})], lz4=True)
        out = io.BytesIO()
        header, _ = compact(files, out, version=Version.V2)
        assert header.flags == FLAG_COMPRESS_LZ4
        assert decode(out.getvalue(), Version.V2)[0].flags == FLAG_COMPRESS_LZ4

    def test_streams_compact_like_buffers(self) -> None:
        files, db = build_chain([(3, {1: 1}), (3, {2: 2}), (4, {4: 4})])
        a, b = io.BytesIO(), io.BytesIO()
        compact(files, a, version=Version.V2)
        compact([io.BytesIO(f) for f in files], b, version=Version.V2)
        assert a.getvalue() == b.getvalue()
        assert decode(b.getvalue(), Version.V2)[2].post_apply_checksum == checksum(db)

    @pytest.mark.parametrize("seed", range(20))
    def test_the_in_memory_merge_writes_what_the_streaming_merge_writes(self, seed: int) -> None:
        """Buffers (merged whole, in a dict) and streams (merged one page per input) give the same bytes, and
        both refuse the same damaged input."""
        rng = random.Random(seed)
        txs = [(8, {p: rng.randrange(256) for p in range(1, 9)})]
        for _ in range(rng.randint(1, 12)):
            commit = rng.randint(2, 12)
            txs.append((commit, {rng.randint(1, commit): rng.randrange(256) for _ in range(rng.randint(0, 5))}))
        files, db = build_chain(txs, lz4=rng.random() < 0.5)
        start = rng.randrange(len(files))
        a, b = io.BytesIO(), io.BytesIO()
        compact(files[start:], a, version=Version.V2)
        compact([io.BytesIO(f) for f in files[start:]], b, version=Version.V2)
        assert a.getvalue() == b.getvalue()
        assert decode(a.getvalue(), Version.V2)[2].post_apply_checksum == checksum(db)
        bad = list(files[start:])
        i = rng.randrange(len(bad))
        at = rng.randrange(HEADER_SIZE, len(bad[i]))
        bad[i] = bad[i][:at] + bytes([bad[i][at] ^ 0xFF]) + bad[i][at + 1:]
        with pytest.raises(LTXError):
            compact(bad, io.BytesIO(), version=Version.V2)
        with pytest.raises(LTXError):
            compact([io.BytesIO(f) for f in bad], io.BytesIO(), version=Version.V2)

    def test_inputs_that_decompress_far_past_their_size_are_merged_streaming(self) -> None:
        """An LZ4 input of 0.4 MB whose pages are 100 MB (zero pages compress 255:1; one client's upload, or a
        large transaction) is merged a page at a time, not decompressed whole into memory with its neighbours."""
        out = io.BytesIO()
        enc = Encoder(out, h(2, 2, F | 5, size=4096, flags=FLAG_COMPRESS_LZ4, commit=25_000), Version.V2)
        zeros = bytes(4096)
        for pgno in range(1, 25_001):
            enc.write_page(pgno, zeros)
        enc.close(F | 7)
        data = out.getvalue()
        assert len(data) < 1 << 20
        tracemalloc.start()
        try:
            header, trailer = compact([data], io.BytesIO(), version=Version.V2)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (header.commit, trailer.post_apply_checksum) == (25_000, F | 7)
        assert peak < 64 << 20, f"{peak >> 20} MiB held for 100 MB of pages"  # whole: twice the pages (195 MiB)

    def test_overlap_is_allowed_by_default_only_in_v3(self) -> None:
        files, db = build_chain([(3, {1: 1}), (3, {2: 2}), (4, {4: 4})])
        first, second = io.BytesIO(), io.BytesIO()
        compact(files[0:2], first, version=Version.V2)
        compact(files[1:3], second, version=Version.V2)
        inputs = [first.getvalue(), second.getvalue()]  # TXIDs 1-2, then 2-3
        with pytest.raises(CompactionError, match="non-contiguous"):
            compact(inputs, io.BytesIO(), version=Version.V2)
        out = io.BytesIO()
        header, _ = compact(with_ext(inputs), out, version=Version.V3)
        assert (header.min_txid, header.max_txid, header.ext_post_apply_checksum) == (1, 3, checksum(db))
        assert dict(decode(out.getvalue(), Version.V3)[1]) == db

    def test_extension_checksums_carry_through_compactions(self) -> None:
        """The engine's stored files (v3, no-checksum) keep the first pre-apply and last post-apply checksums."""
        files, db = build_chain([(3, {1: 1}), (3, {2: 2}), (4, {4: 4}), (4, {1: 9})])
        stored = with_ext(files)
        out = io.BytesIO()
        header, trailer = compact(stored[1:], out, version=Version.V3)
        pre = decode(files[0], Version.V2)[2].post_apply_checksum
        assert header.no_checksum and trailer.post_apply_checksum == 0
        assert header.db_checksums == (pre, checksum(db))
        again = io.BytesIO()
        compact([stored[0], out.getvalue()], again, version=Version.V3)
        assert Header.unpack(again.getvalue()[:100]).db_checksums == (0, checksum(db))

    def test_checksummed_output_from_inputs_without_checksums_is_refused(self) -> None:
        files, _ = build_chain([(3, {1: 1}), (3, {2: 2})])
        litestream = to_v3_no_checksum(files)
        out = io.BytesIO()
        header, trailer = compact(litestream, out, version=Version.V3)  # no-checksum in, no-checksum out
        assert header.db_checksums is None and trailer.post_apply_checksum == 0
        with pytest.raises(CompactionError, match=r"^cannot write database checksums from inputs that have none$") \
                as err:
            compact(litestream, io.BytesIO(), version=Version.V3, flags=0)
        assert err.value.field == "flags"

    def test_checksummed_output_ends_with_the_last_post_apply_checksum(self) -> None:
        files, db = build_chain([(3, {1: 1}), (3, {2: 2})])
        out = io.BytesIO()
        header, trailer = compact(with_ext(files), out, version=Version.V3, flags=0)
        assert not header.no_checksum and trailer.post_apply_checksum == checksum(db)


class TestMergeInMemory:
    """`merge_v2`'s bound on the decompressed pages it holds (LZ4 inputs: uncompressed ones are their own pages):
    a page replaced in every file counts once."""

    def test_files_rewriting_the_same_pages_stay_in_memory_past_their_total(self) -> None:
        txs = [(4, {p: 1 for p in range(1, 5)})] + [(4, {2: k, 3: k}) for k in range(2, 62)]
        files, db = build_chain(txs, lz4=True)
        limit = 20 * PAGE  # the pages of ten files; sixty rewrite pages 2 and 3
        headers, trailers, merged, first = merge_v2(iter(files), range(len(files)), limit=limit)
        assert dict(merged) == db and first == 4 and trailers[-1].post_apply_checksum == checksum(db)
        assert len(headers) == len(files)

    def test_files_writing_new_pages_pass_the_limit_and_are_not_merged(self) -> None:
        txs = [(2, {1: 1, 2: 1})] + [(2 * k, {2 * k - 1: k, 2 * k: k}) for k in range(2, 62)]
        files, _ = build_chain(txs, lz4=True)
        with pytest.raises(NotWhole):
            merge_v2(iter(files), range(len(files)), limit=20 * PAGE)
        _, _, merged, _ = merge_v2(iter(files), range(len(files)))  # no limit
        assert len(merged) == 122
