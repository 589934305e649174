"""`litefs-sidecar ltx …` run as a real process: outputs, exit codes, and nothing written on failure."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.ltx import Version
from sidecar.ltx.decoder import decode
from tests.conftest import GO_V2, LITEFS, load_json, make_db


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_commands_with_examples() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    assert "ltx" in proc.stdout and "examples:" in proc.stdout
    proc = run("ltx", "--help")
    for sub in ("verify", "list", "dump", "checksum", "apply", "encode-db", "compact"):
        assert sub in proc.stdout


def test_list_matches_go_output() -> None:
    expected = load_json(GO_V2 / "expected.json")["cases"]
    for name, case in expected.items():
        proc = run("ltx", "list", GO_V2 / f"{name}.ltx", GO_V2 / f"{name}.lz4.ltx")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == case["ltx_list"], name


def test_checksum_prints_database_checksum() -> None:
    for db in ("fx-wal.db", "fx-nocomp.db"):
        proc = run("ltx", "checksum", LITEFS / "db" / db)
        assert proc.stdout.strip() == (LITEFS / "db" / f"{db}.checksum").read_text().strip()


def test_verify_names_bad_file_without_traceback(tmp_path: Path) -> None:
    good = LITEFS / "per-tx" / "fx-wal.db" / "0000000000000002-0000000000000002.ltx"
    bad = tmp_path / "bad.ltx"
    data = bytearray(good.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    proc = run("ltx", "verify", good, bad)
    assert proc.returncode == 1
    assert f"{good}: ok" in proc.stdout
    assert str(bad) in proc.stderr and "checksum" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert run("ltx", "verify", good).returncode == 0
    proc = run("ltx", "verify", tmp_path / "missing.ltx")
    assert proc.returncode == 1 and "missing.ltx" in proc.stderr and "Traceback" not in proc.stderr


def test_apply_creates_database_and_is_all_or_nothing(tmp_path: Path) -> None:
    files = sorted((LITEFS / "per-tx" / "fx-wal.db").glob("*.ltx"))
    db = tmp_path / "out.db"
    proc = run("ltx", "apply", "--db", db, *files[:5])
    assert proc.returncode == 0, proc.stderr
    first = db.read_bytes()
    # A gap (file 7 after file 5) fails, names the file, and leaves the database untouched.
    proc = run("ltx", "apply", "--db", db, files[6])
    assert proc.returncode == 1 and files[6].name in proc.stderr
    assert db.read_bytes() == first
    proc = run("ltx", "apply", "--db", db, *files[5:])
    assert proc.returncode == 0, proc.stderr
    assert db.read_bytes() == (LITEFS / "db" / "fx-wal.db").read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("fmt", ["v2", "v3"])
@pytest.mark.parametrize("compress", [False, True])
def test_encode_db_then_apply_round_trips(tmp_path: Path, fmt: str, compress: bool) -> None:
    src = make_db(tmp_path / "src.db", rows=500)
    out = tmp_path / "snap.ltx"
    args = ["ltx", "encode-db", "--format", fmt, "-o", out, src] + (["--compress"] if compress else [])
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    h, _, t = decode(out.read_bytes(), Version.V3 if fmt == "v3" else Version.V2)
    assert f"{t.post_apply_checksum:016x}" == run("ltx", "checksum", src).stdout.strip()
    assert h.flags == (1 if compress and fmt == "v2" else 0)
    proc = run("ltx", "apply", "--format", fmt, "--db", tmp_path / "copy.db", out)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "copy.db").read_bytes() == src.read_bytes()
    con = sqlite3.connect(tmp_path / "copy.db")
    assert con.execute("SELECT count(*) FROM t").fetchone() == (500,)
    con.close()


def test_compact_matches_litefs_upload_and_refuses_gaps(tmp_path: Path) -> None:
    per_tx = LITEFS / "per-tx" / "fx-nocomp.db"
    upload = LITEFS / "uploads" / "0066-fx-nocomp.db-0000000000000006-0000000000000007.ltx"
    out = tmp_path / "out.ltx"
    files = [per_tx / "0000000000000007-0000000000000007.ltx", per_tx / "0000000000000006-0000000000000006.ltx"]
    proc = run("ltx", "compact", "-o", out, *files)  # given out of order: sorted by TXID
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == upload.read_bytes()
    gap = tmp_path / "gap.ltx"
    proc = run("ltx", "compact", "-o", gap, per_tx / "0000000000000005-0000000000000005.ltx", files[0])
    assert proc.returncode == 1 and "non-contiguous" in proc.stderr
    assert not gap.exists()


def test_dump_shows_header_pages_trailer() -> None:
    proc = run("ltx", "dump", LITEFS / "per-tx" / "fx-wal.db" / "0000000000000002-0000000000000002.ltx")
    assert proc.returncode == 0
    assert "Min TXID:   0000000000000002" in proc.stdout
    assert proc.stdout.count("Frame #") == 2
    assert "Post-apply checksum:" in proc.stdout


def test_console_script_installed() -> None:
    exe = shutil.which("litefs-sidecar")
    assert exe, "pip install -e . provides the litefs-sidecar command"
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.startswith("litefs-sidecar")
