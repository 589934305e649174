"""CRC-64 as Go's hash/crc64 ISO table, and the LTX database checksum (docs/format.md §3–4)."""

from __future__ import annotations

from collections.abc import Iterable

from fastcrc import crc64

from sidecar.ltx.types import CHECKSUM_FLAG, BytesLike, lock_pgno

_go_iso = crc64.go_iso


def crc(data: BytesLike, value: int | None = None) -> int:
    """CRC-64/GO-ISO of `data`, continuing from `value` (a previous result) when given."""
    return _go_iso(data) if value is None else _go_iso(data, value)


# CRC combination (spec/ltx.md §1: the CRC is reflected, with all-ones init and final xor, like zlib's
# crc32): crc(A ‖ B) = crc(A)·x^(8·len B) ⊕ crc(B) in GF(2)[x] modulo the polynomial. Polynomials are
# held reflected, x^0 in bit 63.
_POLY = 0xD800000000000000


def _multmodp(a: int, b: int) -> int:
    """a(x)·b(x) modulo the polynomial, both reflected."""
    m = 1 << 63
    p = 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table = [1 << 62]  # x^1
    for _ in range(63):
        table.append(_multmodp(table[-1], table[-1]))  # x^(2^k)
    return table


_X2N = _x2n_table()


def crc_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC of A ‖ B from crc1 = crc(A), crc2 = crc(B) and len2 = len(B), without reading either."""
    p, k = 1 << 63, 3  # x^0; x^(8·len2) = product of x^(2^k) over the set bits of len2, shifted by 3
    while len2:
        if len2 & 1:
            p = _multmodp(_X2N[k & 63], p)
        len2 >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


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


def database_checksum_from_pages(page_crcs: int, commit: int, page_size: int) -> int:
    """The database checksum from `page_crcs`, the XOR of crc(page) over every page 1..commit but the lock
    page, each CRC'd alone: the page numbers' part is added here in O(1), not once per page.

    Why it holds: crc(data, v) = crc(data) ⊕ M·v with M linear (it depends only on len(data)), so the XOR of
    crc(page_p, crc(be32(p))) over the pages is page_crcs ⊕ M·(XOR of crc(be32(p))); and crc(be32(p)) is
    C ⊕ L(p) for a linear L and C = crc(be32(0)), so that XOR is crc(be32(XOR of p)) ⊕ C, plus C again when
    the number of pages is odd.
    """
    lock = lock_pgno(page_size)
    count, xor = commit, _xor_upto(commit)
    if lock <= commit:
        count, xor = count - 1, xor ^ lock
    zero = _go_iso(b"\0\0\0\0")
    numbers = _go_iso(xor.to_bytes(4, "big")) ^ (zero if count % 2 == 0 else 0)
    blank = bytes(page_size)
    return CHECKSUM_FLAG | page_crcs ^ _go_iso(blank, numbers) ^ _go_iso(blank)


def _xor_upto(n: int) -> int:
    """1 ^ 2 ^ … ^ n."""
    return (n, 1, n + 1, 0)[n % 4]


def checksum_database_file(data: BytesLike, page_size: int) -> int:
    """Database checksum of a whole SQLite file held in a buffer (mmap, bytes)."""
    view = memoryview(data).cast("B")
    n = len(view) // page_size
    return database_checksum(((i + 1, view[i * page_size:(i + 1) * page_size]) for i in range(n)), page_size)
