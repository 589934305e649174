"""Upload bodies: local LTX files compacted into one LTX v2 file, renumbered into upstream's TXIDs when needed.

LiteFS's own backup client compacts up to 256 per-transaction files into one upload with NodeID 0, zero WAL
fields and the last transaction's timestamp (docs/litefs.md §10.2). We do the same (up to 4,096 files by default:
a second of a busy database in one upload, not one upload per 256 transactions), and can also give the result
other TXIDs and another pre-apply checksum. That is only sound when the first input holds every page (a
snapshot, or the transaction LiteFS writes for `POST /import`): such a file takes any state to its own.
"""

from __future__ import annotations

import io
import mmap
import os
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from sidecar.fsutil import map_files
from sidecar.ltx import FLAG_COMPRESS_LZ4, Header, LTXError, Pos, Trailer, Version
from sidecar.ltx.compactor import SMALL_MERGE_PAGES, check_contiguous, compacted_header, merge_pages, merge_v2
from sidecar.ltx.decoder import Decoder
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.reader import NotWhole
from sidecar.ltx.sqlite import Applier, database_checksum_of, encode_db, sqlite_page_size
from sidecar.ltx.types import BytesLike, lock_pgno

_MAP_AT = 4 << 20
_FIRST_READ = 1 << 16


def compact_files(paths: Sequence[str | Path], *, min_txid: int | None = None, max_txid: int | None = None,
                  pre: int | None = None, compress: bool | None = None) -> tuple[bytes, Header, int]:
    """Compact `paths` (one unbroken chain) into one LTX v2 upload; returns (body, header, post-apply checksum).

    `min_txid`, `max_txid` and `pre` renumber the result; the caller guarantees the first input holds every
    page. `compress` LZ4s the page block (default: as the first input). Every input's checksums are verified;
    a broken file raises LTXError naming it.
    """
    changes = {k: v for k, v in (("min_txid", min_txid), ("max_txid", max_txid), ("pre_apply_checksum", pre))
               if v is not None}
    decoders: list[Decoder] = []
    merged: list[tuple[int, memoryview]] | None = None
    with ExitStack() as stack:
        try:  # every per-transaction file, read and decoded one at a time: only the newest pages are kept
            headers, trailers, merged, first_count = merge_v2(map(_read_small, paths), paths, limit=SMALL_MERGE_PAGES)
        except NotWhole:  # a big file (a snapshot), or pages far larger than their files (LZ4 expands up to 255
            merged = None  # times): a streaming merge holding one page per input
        if merged is None:
            decoders = [_decoder(path, _load(stack, path)) for path in paths]
            headers = [d.header for d in decoders]
            check_contiguous(headers)
        lz4 = headers[0].flags & FLAG_COMPRESS_LZ4 if compress is None else (FLAG_COMPRESS_LZ4 if compress else 0)
        header = compacted_header(headers, lz4).replace(**changes)
        out = io.BytesIO()
        enc = Encoder(out, header, Version.V2)
        for pgno, page in merge_pages(decoders, header.commit) if merged is None else merged:
            if pgno <= header.commit:
                enc.write_page(pgno, page)
        if decoders:
            trailers = [_close(path, d) for path, d in zip(paths, decoders, strict=True)]
            check_contiguous(headers, trailers)
            first_count = decoders[0].page_count
        post = trailers[-1].post_apply_checksum
        rebased = pre is not None and pre != headers[0].pre_apply_checksum
        if rebased and not (headers[0].is_snapshot or is_full(headers[0], first_count)):
            raise LTXError(f"{paths[0]}: cannot renumber onto another state: the first file does not hold "
                           f"every page", field="min_txid")
        enc.close(post)
        return out.getvalue(), header, post


def _decoder(path: str | Path, data: BytesLike) -> Decoder:
    try:
        return Decoder(data, Version.V2)
    except LTXError as err:
        raise type(err)(f"{path}: {err}", field=err.field) from err


def _close(path: str | Path, d: Decoder) -> Trailer:
    try:
        return d.close()
    except LTXError as err:
        raise type(err)(f"{path}: {err}", field=err.field) from err


def _read_small(path: str | Path) -> bytes:
    """A per-transaction file's bytes; NotWhole for a big one (a snapshot), which is mapped and streamed instead."""
    # os.open/os.read rather than open().read(), and no fstat for a file that fits the first read: three
    # system calls per file, and the sidecar reads every file. (A regular file's read is short only at its
    # end; were it not, the file checksum would fail and the file be checked again by LocalDB.check.)
    fd = _open(path)
    try:
        data = os.read(fd, _FIRST_READ)
        if len(data) < _FIRST_READ:
            return data
        if os.fstat(fd).st_size >= _MAP_AT:
            raise NotWhole(f"{path} is {_MAP_AT} bytes or more")
        while more := os.read(fd, 1 << 20):  # to the end, as f.read() does, should the file be longer
            data += more
        return data
    finally:
        os.close(fd)


def _open(path: str | Path) -> int:
    """Open for reading without updating the access time: LiteFS's files are read once, and the first read of a
    file written since its last access would otherwise dirty its inode (1.5 µs of a 5 µs open-read-close, and a
    journal write). O_NOATIME needs the file's owner (or CAP_FOWNER); as anyone else, the plain open."""
    global _noatime
    if _noatime:
        try:
            return os.open(path, os.O_RDONLY | _noatime)
        except PermissionError:
            _noatime = 0
    return os.open(path, os.O_RDONLY)


_noatime = getattr(os, "O_NOATIME", 0)


def _load(stack: ExitStack, path: str | Path) -> bytes | mmap.mmap:
    """Small files are read; big ones (snapshots) are mapped."""
    try:
        return _read_small(path)
    except NotWhole:
        return map_files(stack, [Path(path)])[0]


def is_full(header: Header, page_count: int) -> bool:
    """Whether a file holds every page 1..commit (the lock page excepted)."""
    lock = lock_pgno(header.page_size)
    return page_count == header.commit - (1 if header.commit >= lock else 0)


def encode_state(db: bytes, *, onto: Pos, max_txid: int, timestamp: int, compress: bool = True) -> tuple[bytes, int]:
    """A SQLite file as one LTX v2 file taking upstream at `onto` to it; a snapshot when `onto` is zero.

    Returns (body, post-apply checksum).
    """
    out = io.BytesIO()
    _, trailer = encode_db(io.BytesIO(db), out, version=Version.V2, compress=compress, txid=max_txid,
                           timestamp=timestamp, onto=onto)
    return out.getvalue(), trailer.post_apply_checksum


def snapshot_to_db(data: bytes) -> tuple[bytes, Pos]:
    """The SQLite file an LTX v2 snapshot describes, and its position (checksums verified)."""
    with tempfile.TemporaryFile() as out:  # the applier needs a real file (it truncates)
        pos = Applier(out).apply(data, Version.V2)
        out.seek(0)
        return out.read(), pos


def import_checksums(db: bytes) -> set[int]:
    """The post-apply checksums LiteFS may record after `POST /import` of `db`.

    LiteFS zeroes page 1's change counter (bytes 24–27) and schema cookie (40–43) before writing the import
    (docs/litefs.md §3); both variants are accepted.
    """
    page_size = sqlite_page_size(db[:100])
    commit = int.from_bytes(db[28:32], "big") or len(db) // page_size
    body = bytearray(db[:commit * page_size])
    plain, _ = database_checksum_of(io.BytesIO(body), page_size)
    body[24:28] = body[40:44] = bytes(4)
    zeroed, _ = database_checksum_of(io.BytesIO(body), page_size)
    return {plain, zeroed}


__all__ = ["compact_files", "encode_state", "import_checksums", "is_full", "snapshot_to_db"]
