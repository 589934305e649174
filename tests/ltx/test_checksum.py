"""The checksum algebra the parallel restore relies on, against fastcrc run over the whole data."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.ltx import lock_pgno
from sidecar.ltx.checksum import crc, crc_combine, database_checksum, database_checksum_from_pages


class TestCrcCombine:
    @given(a=st.binary(max_size=3000), b=st.binary(max_size=3000))
    def test_combining_two_crcs_is_the_crc_of_the_concatenation(self, a: bytes, b: bytes) -> None:
        assert crc_combine(crc(a), crc(b), len(b)) == crc(a + b)

    def test_a_long_stretch(self) -> None:
        a, b = random.Random(1).randbytes(100), bytes(5_000_000) + b"x"
        assert crc_combine(crc(a), crc(b), len(b)) == crc(a + b)


class TestDatabaseChecksumFromPages:
    @pytest.mark.parametrize(("page_size", "commit"), [
        (512, 0), (512, 1), (512, 2), (512, 3), (512, 4), (4096, 101),
        (65536, 16384), (65536, 16385), (65536, 16386), (65536, 16387),  # below, at and past the lock page
    ])
    def test_equals_the_checksum_over_numbered_pages(self, page_size: int, commit: int) -> None:
        rng = random.Random(commit)
        blank = bytes(page_size)
        lock = lock_pgno(page_size)
        pages = [(p, rng.randbytes(page_size) if p % 997 < 3 else blank)
                 for p in range(1, commit + 1) if p != lock]
        value = 0
        for _, data in pages:
            value ^= crc(data)
        assert database_checksum_from_pages(value, commit, page_size) == database_checksum(pages, page_size)
