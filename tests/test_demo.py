"""The README's first command: the demo runs, ships, and ends with a verified point-in-time restore."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main

ROW = re.compile(r"^\s+\d+\s+(app\d\.db)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)$", re.M)


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
    assert ROW.search(out)  # live progress lines
    # The last line's command works as printed: the directory was kept.
    last = out.strip().splitlines()[-1]
    assert last == f"restore points: litefs-sidecar ls file://{tmp_path}/backups/default/app1.db"
    assert main(last.split("litefs-sidecar ", 1)[1].split()) == 0


def test_demo_in_a_temporary_directory_points_nowhere_it_deleted(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --dir it suggests --dir, not an `ls` of the directory it has just removed; the lag column shows
    how long shipped transactions waited (they trail the node while it writes), not 0.00 on every row."""
    assert main(["demo", "--seconds", "3", "--rate", "100"]) == 0
    out = capsys.readouterr().out
    assert "litefs-sidecar-demo-" not in out.split("point-in-time restore of each database")[1]
    assert out.strip().splitlines()[-1].endswith("run it with --dir DIR")
    lags = [float(row[4]) for row in ROW.findall(out)]
    assert lags and max(lags) > 0


def test_ctrl_c_stops_the_demo_cleanly(tmp_path: Path) -> None:
    """Interrupted mid-run: exit 130, the sidecar stopped and its connections closed; no traceback."""
    # A shell runs background jobs with SIGINT ignored, and a child inherits that: Python would then never see
    # the Ctrl+C this test sends. Give the demo the default disposition, as a terminal's foreground job has.
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "demo", "--seconds", "60", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the table's first row: the sidecar is shipping
            if ROW.match(line.rstrip("\n")):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "Traceback" not in err and "Unclosed" not in err, err


@pytest.mark.parametrize("argv", [["--seconds", "0"], ["--seconds", "-1"], ["--seconds", "nan"],
                                  ["--databases", "0"]])
def test_a_value_that_makes_no_demo_is_a_usage_error(argv: list[str], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 with argparse naming the flag, before anything runs or is written."""
    with pytest.raises(SystemExit) as info:
        main(["demo", *argv, "--dir", str(tmp_path / "demo")])
    assert info.value.code == 2
    assert f"argument {argv[0]}: {argv[1]!r}: want a" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
