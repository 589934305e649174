"""Our restore of a real Litestream 0.5.17 replica matches every sampled instant, and the CLI reports it."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.engine import plan_restore, restore, scan
from sidecar.storage import open_storage
from sidecar.storage.base import parse_rfc3339
from tests.conftest import LITESTREAM, load_json

REPLICA = LITESTREAM / "replica"
SAMPLES = load_json(LITESTREAM / "expected.json")["samples"]


def dump_digest(path: Path) -> str:
    con = sqlite3.connect(path)
    try:
        return hashlib.sha256("".join(line + "\n" for line in con.iterdump()).encode()).hexdigest()
    finally:
        con.close()


async def test_every_instant_restores_to_its_digest(tmp_path: Path) -> None:
    storage = open_storage(f"file://{REPLICA}")
    try:
        index = await scan(storage, "")
        assert len(index) == 142
        for i, sample in enumerate(SAMPLES):
            out = tmp_path / f"{i}.db"
            plan = plan_restore(index, timestamp=parse_rfc3339(sample["at"]))
            result = await restore(storage, "", plan, out, integrity_check=True)
            assert result.timestamp <= parse_rfc3339(sample["at"])
            assert dump_digest(out) == sample["sha256_dump"], sample["at"]
            out.unlink()
    finally:
        await storage.close()


def test_cli_restore_prints_what_it_restored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample = SAMPLES[-1]  # the instant `litestream restore -timestamp` itself rejects
    out = tmp_path / "out.db"
    assert main(["restore", "--timestamp", sample["at"], "--integrity-check", "-o", str(out), f"file://{REPLICA}"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("restored TXID ") and "integrity_check ok" in printed
    assert dump_digest(out) == sample["sha256_dump"]


def test_cli_target_before_oldest_point_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.db"
    assert main(["restore", "--timestamp", "2020-01-01T00:00:00Z", "-o", str(out), f"file://{REPLICA}"]) == 1
    err = capsys.readouterr().err
    assert "before every snapshot" in err and "oldest restore point" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_ls_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", f"file://{REPLICA}"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("\nL9") >= 3 and "\nL0" in listing
    out = tmp_path / "x.db"
    assert main(["restore", "--dry-run", "-o", str(out), f"file://{REPLICA}"]) == 0
    plan = capsys.readouterr().out
    assert plan.splitlines()[0].startswith("L9") and "would restore TXID" in plan
    assert not out.exists()
