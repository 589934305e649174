"""`journal.rewrite`: a change cut short is rolled back by SQLite to exactly the database it started from."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sidecar.vfs import journal

STATE = "SELECT count(*), sum(length(x)) FROM t"


def database(path: Path, page_size: int, rows: int) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute(f"PRAGMA page_size={page_size}")
        con.execute("CREATE TABLE t (x)")
        con.executemany("INSERT INTO t VALUES (?)", [("x" * 1500,)] * rows)
        con.commit()
    finally:
        con.close()


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


class TestRewrite:
    @pytest.mark.parametrize(("old_size", "new_size"), [(1024, 4096), (4096, 1024), (4096, 4096)])
    def test_a_change_of_page_size_cut_short_rolls_back_whole(self, tmp_path: Path, old_size: int,
                                                              new_size: int) -> None:
        """The copy is rebuilt with another page size (a database started over) and dies half-way: the hot
        journal brings back every byte of the old file, whatever its page count in the new size."""
        copy, new = tmp_path / "copy.db", tmp_path / "new.db"
        database(copy, old_size, 7)
        database(new, new_size, 30)
        before = copy.read_bytes()
        assert len(before) % new_size or old_size >= new_size  # the old file is not whole pages of the new size
        data = new.read_bytes()
        commit = len(data) // new_size
        written: list[int] = []

        def page(p: int) -> bytes:
            if len(written) == commit // 2:
                raise OSError("killed")
            written.append(p)
            return data[(p - 1) * new_size:p * new_size]
        with pytest.raises(OSError, match="killed"):
            journal.rewrite(copy, new_size, commit, range(1, commit + 1), page, 99)
        assert written and Path(f"{copy}-journal").exists()
        assert query(copy, "PRAGMA integrity_check") == [("ok",)]  # the first reader rolls it back
        assert copy.read_bytes() == before
