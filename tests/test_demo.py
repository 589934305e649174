"""The README's first command: the demo runs, ships, and ends with a verified point-in-time restore."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from sidecar.cli import main


def test_demo_ships_and_restores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--seconds", "3", "--rate", "50", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    results = re.findall(r"(app\d\.db): TXID (\d+) .* (\d+) rows, .* = node, integrity_check ok  OK", out)
    assert [r[0] for r in results] == ["app1.db", "app2.db"]
    for name, _, rows in results:  # the restored files are real SQLite databases with the rows it reported
        con = sqlite3.connect(tmp_path / f"restored-{name}")
        try:
            assert con.execute("SELECT count(*) FROM events").fetchone()[0] == int(rows) > 0
        finally:
            con.close()
    assert re.search(r"^\s+\d+\s+app1\.db\s+\d+\s+\d+", out, re.M)  # live progress lines
