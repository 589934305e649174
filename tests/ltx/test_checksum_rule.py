"""The CRC and the LTX database checksum (ltx/checksum.py) against Go's ltx on its fixtures, and their edge cases."""

from __future__ import annotations

import pytest

from sidecar.ltx import CHECKSUM_FLAG, lock_pgno
from sidecar.ltx.checksum import checksum_database_file, crc, database_checksum, page_checksum
from tests.conftest import GO_V2, load_json

CASES = load_json(GO_V2 / "expected.json")["cases"]


def pages_of(case: str) -> tuple[bytes, int, list[tuple[int, bytes]]]:
    data = (GO_V2 / f"{case}.db").read_bytes()
    size = CASES[case]["page_size"]
    return data, size, [(i // size + 1, data[i:i + size]) for i in range(0, len(data), size)]


class TestCrc:
    """crc(data, value): CRC-64/ISO as Go's hash/crc64 computes it, continuing from a previous result."""

    def test_check_value(self) -> None:
        assert crc(b"123456789") == 0xB90956C775A41001
        assert crc(b"") == 0

    def test_continues_from_a_previous_result(self) -> None:
        assert crc(b"56789", crc(b"1234")) == crc(b"123456789")
        assert crc(b"123456789", None) == crc(b"123456789")
        assert crc(b"abc", 0) == crc(b"abc")


@pytest.mark.parametrize("case", sorted(CASES))
class TestAgainstGoLtx:
    """Every way of computing a database checksum gives `ltx checksum`'s value for the Go fixtures."""

    def test_database_checksum(self, case: str) -> None:
        _, size, pages = pages_of(case)
        assert f"{database_checksum(pages, size):016x}" == CASES[case]["db_checksum"]
        assert database_checksum(reversed(pages), size) == database_checksum(pages, size)  # order does not matter

    def test_checksum_database_file(self, case: str) -> None:
        data, size, _ = pages_of(case)
        assert f"{checksum_database_file(data, size):016x}" == CASES[case]["db_checksum"]
        assert checksum_database_file(data + b"partial page", size) == checksum_database_file(data, size)

    def test_page_checksums_xor_to_it(self, case: str) -> None:
        _, _, pages = pages_of(case)
        value = 0
        for pgno, page in pages:
            ck = page_checksum(pgno, page)
            assert ck & CHECKSUM_FLAG and ck == CHECKSUM_FLAG | crc(pgno.to_bytes(4, "big") + page)
            value ^= ck
        assert f"{CHECKSUM_FLAG | value:016x}" == CASES[case]["db_checksum"]


class TestEdges:
    """The empty database and the lock page."""

    def test_an_empty_database_is_the_flag_alone(self) -> None:
        assert database_checksum([], 4096) == CHECKSUM_FLAG
        assert checksum_database_file(b"", 4096) == CHECKSUM_FLAG

    @pytest.mark.parametrize("page_size", [512, 4096, 65536])
    def test_the_lock_page_never_counts(self, page_size: int) -> None:
        """A page numbered as SQLite's lock page changes nothing; its neighbours do."""
        one = (1, bytes([7]) * page_size)
        lock = lock_pgno(page_size)
        junk = b"junk" * (page_size // 4)
        assert database_checksum([one, (lock, junk)], page_size) == database_checksum([one], page_size)
        assert database_checksum([one, (lock - 1, junk)], page_size) != database_checksum([one], page_size)
        assert database_checksum([one, (lock + 1, junk)], page_size) != database_checksum([one], page_size)

    def test_page_numbers_count(self) -> None:
        """The same page at another number gives another checksum (the number is hashed with it)."""
        page = bytes(512)
        assert page_checksum(1, page) != page_checksum(2, page)
        assert database_checksum([(1, page)], 512) != database_checksum([(2, page)], 512)
