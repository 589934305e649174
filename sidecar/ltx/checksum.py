"""CRC-64 as Go's hash/crc64 ISO table, and the LTX database checksum (docs/format.md §3–4)."""

from __future__ import annotations

from collections.abc import Iterable

from fastcrc import crc64

from sidecar.ltx.types import CHECKSUM_FLAG, BytesLike, lock_pgno

_go_iso = crc64.go_iso


def crc(data: BytesLike, value: int | None = None) -> int:
    """CRC-64/GO-ISO of `data`, continuing from `value` (a previous result) when given."""
    return _go_iso(data) if value is None else _go_iso(data, value)


def page_checksum(pgno: int, data: BytesLike) -> int:
    """FLAG | CRC64(be32(pgno) ‖ page): one page's contribution to the database checksum."""
    return CHECKSUM_FLAG | _go_iso(data, _go_iso(pgno.to_bytes(4, "big")))


def database_checksum(pages: Iterable[tuple[int, BytesLike]], page_size: int) -> int:
    """FLAG | XOR of page checksums over (pgno, data); the lock page never counts."""
    lock = lock_pgno(page_size)
    value = 0
    for pgno, data in pages:
        if pgno != lock:
            value ^= _go_iso(data, _go_iso(pgno.to_bytes(4, "big")))
    return CHECKSUM_FLAG | value


def checksum_database_file(data: BytesLike, page_size: int) -> int:
    """Database checksum of a whole SQLite file held in a buffer (mmap, bytes)."""
    view = memoryview(data).cast("B")
    n = len(view) // page_size
    return database_checksum(((i + 1, view[i * page_size:(i + 1) * page_size]) for i in range(n)), page_size)
