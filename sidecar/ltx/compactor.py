"""Compaction: merge N contiguous LTX files into one, as if applying them in order (docs/format.md §9).

A streaming k-way merge by page number holding one page per input: the latest input wins a page, and
pages beyond the last input's Commit are dropped (a shrinking database truncates). Header fields are set
as the reference compactor sets them. Input checksums are verified after the page block is merged, so
callers write the output to a temporary file and keep it only if `compact` returns.

Small v2 inputs held in memory (a flush's uploads: `SMALL_MERGE` bytes in all) are each decoded whole
(`decode_v2`) and merged in a dict instead: the same pages and checks at about half the cost.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

from sidecar.ltx.decoder import Decoder, decode_v2
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.errors import CompactionError, LTXError
from sidecar.ltx.reader import NotWhole
from sidecar.ltx.types import (
    FLAG_NO_CHECKSUM,
    HEADER_SIZE,
    TRAILER_SIZE,
    BytesLike,
    Header,
    Trailer,
    Version,
    db_checksums,
)

SMALL_MERGE = 4 << 20  # bytes of v2 inputs in memory merged whole (decompressed, a few times that)
SMALL_MERGE_PAGES = 8 * SMALL_MERGE  # their pages' bytes, at most: LZ4 expands up to 255 times


def check_contiguous(headers: Sequence[Header], trailers: Sequence[Trailer] | None = None, *,
                     allow_overlap: bool = False) -> None:
    """Raise CompactionError unless each header starts right after the previous one ends.

    With `trailers`, also require each file's pre-apply checksum to equal the previous post-apply
    checksum (files without checksums are exempt). `allow_overlap` accepts v3-style overlap.
    """
    for i in range(1, len(headers)):
        prev, cur = headers[i - 1], headers[i]
        if cur.page_size != prev.page_size:
            raise CompactionError(f"input files have mismatched page sizes: {prev.page_size} != {cur.page_size}",
                                  field="page_size")
        ok = (cur.min_txid <= prev.max_txid + 1 and cur.max_txid > prev.max_txid) if allow_overlap \
            else cur.min_txid == prev.max_txid + 1
        if not ok:
            raise CompactionError(
                f"non-contiguous transaction ids in input files: ({prev.min_txid:016x},{prev.max_txid:016x}) -> "
                f"({cur.min_txid:016x},{cur.max_txid:016x})", field="min_txid")
        if trailers is not None and not cur.is_snapshot and cur.min_txid == prev.max_txid + 1:
            before, after = db_checksums(prev, trailers[i - 1]), db_checksums(cur, trailers[i])
            if before is not None and after is not None and after[0] != before[1]:
                raise CompactionError(
                    f"input {i} ({cur.min_txid:016x}) pre-apply checksum {after[0]:016x} != "
                    f"previous post-apply checksum {before[1]:016x}", field="pre_apply_checksum")


def compacted_header(headers: Sequence[Header], flags: int, post_apply_checksum: int | None = None) -> Header:
    """The output header of compacting `headers` in order (docs/format.md §9.1).

    A no-checksum output keeps the database checksums in the header extension when the inputs have
    them and the final post-apply checksum is known up front.
    """
    first, last = headers[0], headers[-1]
    pre = 0 if first.is_snapshot else (first.pre_apply_checksum if not first.no_checksum
                                        else first.ext_pre_apply_checksum)
    header = Header(
        page_size=first.page_size, commit=last.commit, min_txid=first.min_txid, max_txid=last.max_txid,
        timestamp=last.timestamp, pre_apply_checksum=0 if flags & FLAG_NO_CHECKSUM else pre, flags=flags)
    if flags & FLAG_NO_CHECKSUM and post_apply_checksum and (first.is_snapshot or pre):
        header = header.replace(ext_pre_apply_checksum=pre, ext_post_apply_checksum=post_apply_checksum)
    return header


def final_checksum_hint(src: BinaryIO | BytesLike, header: Header) -> int | None:
    """The post-apply database checksum of a file, read without decoding it (None for streams)."""
    if header.no_checksum:
        return header.ext_post_apply_checksum or None
    if hasattr(src, "readinto"):
        return None
    view = memoryview(src).cast("B")  # type: ignore[arg-type]
    return Trailer.unpack(view[-TRAILER_SIZE:]).post_apply_checksum


def merge_pages(decoders: Sequence[Decoder], commit: int) -> Iterator[tuple[int, memoryview]]:
    """Yield the winning (pgno, page) across decoders in pgno order: the latest input wins, > commit drops."""
    if len(decoders) == 1:
        for pgno, page in decoders[0].pages():
            if pgno <= commit:
                yield pgno, page
        return
    iters = [d.pages() for d in decoders]
    heap: list[tuple[int, int, memoryview]] = []
    for i, it in enumerate(iters):
        for pgno, page in it:
            heap.append((pgno, -i, page))
            break
    heapq.heapify(heap)
    pop, replace = heapq.heappop, heapq.heapreplace
    while heap:
        pgno, neg, page = heap[0]
        if pgno <= commit:
            yield pgno, page
        # Advance the winner and every older input holding the same page.
        while heap and heap[0][0] == pgno:
            _, neg, _ = heap[0]
            nxt = next(iters[-neg], None)
            if nxt is None:
                pop(heap)
            else:
                replace(heap, (nxt[0], neg, nxt[1]))


def compact(inputs: Sequence[BinaryIO | BytesLike], out: BinaryIO, *, version: Version | int,
            flags: int | None = None, out_version: Version | int | None = None,
            allow_overlap: bool | None = None) -> tuple[Header, Trailer]:
    """Merge `inputs` (in TXID order, all of `version`) into one file written to `out`.

    `flags` defaults to the first input's flags; `out_version` to `version`. Raises CompactionError for
    no input, a TXID gap or a checksum break, and the decoder's errors for corrupt input.
    """
    if not inputs:
        raise CompactionError("no input files")
    version = Version(version)
    out_version = Version(out_version if out_version is not None else version)
    in_memory: list[BytesLike] = [src for src in inputs if not hasattr(src, "readinto")]  # type: ignore[misc]
    if version == Version.V2 and len(in_memory) == len(inputs) and \
            sum(memoryview(src).nbytes for src in in_memory) <= SMALL_MERGE:
        try:
            return _compact_small(in_memory, out, flags, out_version, bool(allow_overlap))
        except NotWhole:
            pass  # pages far larger than their files: the streaming merge, one page per input in memory
    decoders = []
    for i, src in enumerate(inputs):
        try:
            decoders.append(Decoder(src, version))
        except LTXError as err:
            raise type(err)(f"decode header for input {i}: {err}", field=err.field) from err
    headers = [d.header for d in decoders]
    if allow_overlap is None:
        allow_overlap = version == Version.V3
    check_contiguous(headers, allow_overlap=allow_overlap)
    if flags is None:
        flags = headers[0].flags
    out_header = compacted_header(headers, flags, final_checksum_hint(inputs[-1], headers[-1]))
    enc = Encoder(out, out_header, out_version)
    for pgno, page in merge_pages(decoders, out_header.commit):
        enc.write_page(pgno, page)
    trailers = [d.close() for d in decoders]
    check_contiguous(headers, trailers, allow_overlap=allow_overlap)
    last = db_checksums(headers[-1], trailers[-1])
    if out_header.db_checksums and (last is None or last[1] != out_header.ext_post_apply_checksum):
        raise CompactionError("last input's post-apply checksum differs from its trailer",
                              field="post_apply_checksum")
    if out_header.no_checksum:
        return out_header, enc.close(0)
    if last is None:
        raise CompactionError("cannot write database checksums from inputs that have none", field="flags")
    return out_header, enc.close(last[1])


def merge_v2(inputs: Iterable[BytesLike], names: Sequence[object], *, allow_overlap: bool = False, limit: int = 0) \
        -> tuple[list[Header], list[Trailer], list[tuple[int, memoryview]], int]:
    """v2 files in memory, each decoded and verified whole (`decode_v2`) and checked to continue the one before
    (`check_contiguous` with trailers), their pages merged in a dict (a later file's page replaces an earlier's):
    ~3x cheaper than the streaming merge. `inputs` may be an iterator: each file is then let go once decoded.
    Errors are prefixed with the file's entry in `names`. Returns headers,
    trailers, the merged pages in order (commit not applied), and how many pages the first file holds. With a
    `limit`, NotWhole once the pages held pass that many bytes (or a file needs the general LZ4 path): nothing is
    merged, the caller merges streaming.

    The pages held: a file's decompressed pages live as long as one of them is the newest of its page number, so
    they are at most the smaller of every file's pages and (pages merged) x (the largest file's pages). Many
    small transactions rewriting the same pages, a second of a busy database, hold a few of them."""
    headers: list[Header] = []
    trailers: list[Trailer] = []
    merged: dict[int, memoryview] = {}
    first_count = held = total = biggest = 0
    for name, data in zip(names, inputs, strict=True):
        try:
            header, trailer, pages = decode_v2(data, max(1, limit - held) if limit else 0)
        except LTXError as err:
            raise type(err)(f"{name}: {err}", field=err.field) from err
        if headers:  # a gap or a checksum break is reported as such, before a later file's damage
            prev = headers[-1]
            if header.min_txid != prev.max_txid + 1 or header.page_size != prev.page_size or \
                    header.pre_apply_checksum != trailers[-1].post_apply_checksum or \
                    (header.flags | prev.flags) & FLAG_NO_CHECKSUM:  # not the usual chain: judged in full
                check_contiguous([prev, header], [trailers[-1], trailer], allow_overlap=allow_overlap)
        else:
            first_count = len(pages)
        headers.append(header)
        trailers.append(trailer)
        merged.update(pages)
        size = len(pages) * header.page_size
        total += size
        biggest = max(biggest, size)
        held = min(total, len(merged) * biggest)
    return headers, trailers, sorted(merged.items()), first_count


def _compact_small(inputs: Sequence[BytesLike], out: BinaryIO, flags: int | None, out_version: Version,
                   allow_overlap: bool) -> tuple[Header, Trailer]:
    """`compact` of v2 files in memory (`merge_v2`)."""
    headers: list[Header] = []
    for i, src in enumerate(inputs):  # the headers first, as the streaming merge reads them: a gap is reported
        try:                          # as such before a later file's damage
            headers.append(Header.unpack(memoryview(src).cast("B")[:HEADER_SIZE]))
        except LTXError as err:
            raise type(err)(f"decode header for input {i}: {err}", field=err.field) from err
    check_contiguous(headers, allow_overlap=allow_overlap)
    _, trailers, pages, _ = merge_v2(inputs, [f"input {i}" for i in range(len(inputs))], allow_overlap=allow_overlap,
                                     limit=SMALL_MERGE_PAGES)
    out_header = compacted_header(headers, headers[0].flags if flags is None else flags,
                                  trailers[-1].post_apply_checksum)
    enc = Encoder(out, out_header, out_version)
    for pgno, page in pages:
        if pgno <= out_header.commit:
            enc.write_page(pgno, page)
    if out_header.no_checksum:
        return out_header, enc.close(0)
    return out_header, enc.close(trailers[-1].post_apply_checksum)


__all__ = ["SMALL_MERGE", "check_contiguous", "compact", "compacted_header", "final_checksum_hint", "merge_pages",
           "merge_v2"]
