"""`query` reads a backup in place and returns what a full restore of the same instant holds."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main
from sidecar.engine import Engine, plan_restore, restore, scan
from sidecar.engine.index import restore_points
from sidecar.ltx import format_timestamp
from sidecar.storage import open_storage
from tests.s3server import MotoServer
from tests.vfs.conftest import EVENTS, HOUR, READER, T0, Stored, copy_store, rows, start_serving


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(params=["file", "s3", "server"])
async def where(request: pytest.FixtureRequest, stored: Stored, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, list[str]]]:
    """The stored history's URL and the `query` flags to reach it: the local store itself, a copy on S3, or a
    copy served by a server, read with a read-only token (in LITEFS_SIDECAR_TOKEN)."""
    if request.param == "file":
        yield f"file://{stored.root}/c/app.db", []
        return
    if request.param == "server":
        shutil.copytree(stored.root, tmp_path / "store")
        shutil.copytree(stored.root.parent / "state", tmp_path / "state")
        engine = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state",
                                   clock=lambda: T0 + 3 * HOUR)
        await engine.tick()  # what is due at start is done now, not while a query prints its rows
        served = await start_serving(engine)
        monkeypatch.setenv("LITEFS_SIDECAR_TOKEN", READER)
        try:
            yield f"{served.url}/app.db", []
        finally:
            await served.shutdown()
        return
    moto: MotoServer = request.getfixturevalue("moto_server")
    bucket = moto.create_bucket()
    src, dst = open_storage(f"file://{stored.root}"), open_storage(f"s3://{bucket}/backups", endpoint_url=moto.url,
                                                                    force_path_style=True)
    try:
        await copy_store(src, dst)
    finally:
        await dst.close()
    yield f"s3://{bucket}/backups/c/app.db", ["--s3-endpoint", moto.url, "--s3-force-path-style"]


class TestQuery:
    async def test_twenty_instants_match_a_full_restore(self, stored: Stored, where: tuple[str, list[str]],
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Over two hours of writes, compaction and retention, at 20 instants, `query --json` returns the rows
        and the TXID that a full restore of the same instant gives."""
        url, flags = where
        storage = open_storage(f"file://{stored.root}")
        index = await scan(storage, "c/app.db")
        assert {e.level for e in index} == {0, 1, 2, 9}
        points = restore_points(index)
        lo, hi = points[0][1], points[-1][1] + 30_000
        times = [lo + (hi - lo) * i // 19 for i in range(20)]
        times[1], times[2] = points[1][1], points[len(points) // 2][1] + 1  # exactly at one, just after another
        for i, at in enumerate(times):
            out = tmp_path / f"restored-{i}.db"
            result = await restore(storage, "c/app.db", plan_restore(index, timestamp=at), out)
            code, printed, err = await asyncio.to_thread(
                cli, capsys, "query", "--json", "--timestamp", format_timestamp(at), *flags, url, EVENTS)
            assert code == 0, err
            got: dict[str, Any] = json.loads(printed)
            assert got["txid"] == f"{result.txid:016x}", format_timestamp(at)
            assert got["columns"] == ["id", "at", "body"]
            assert got["rows"] == [list(r) for r in rows(out, EVENTS)], format_timestamp(at)
            out.unlink()
        assert [list(r) for r in rows(stored.live)] == got["rows"]  # the last instant is the latest state

    async def test_txid_target_stats_and_errors(self, stored: Stored, where: tuple[str, list[str]],
                                                capsys: pytest.CaptureFixture[str]) -> None:
        url, flags = where
        storage = open_storage(f"file://{stored.root}")
        txid = restore_points(await scan(storage, "c/app.db"))[3][0]
        code, printed, err = await asyncio.to_thread(
            cli, capsys, "query", "--txid", f"{txid:x}", "--stats", *flags, url, "SELECT count(*) AS n FROM events")
        assert code == 0, err
        assert printed.splitlines()[0].strip() == "n" and int(printed.splitlines()[1]) > 0
        assert err.startswith(f"TXID {txid:016x} at ") and "pages fetched" in err and "requests" in err
        code, _, err = await asyncio.to_thread(cli, capsys, "query", "--txid", "ffffff", *flags, url, "SELECT 1")
        assert code == 1 and "beyond the newest restore point" in err
        code, _, err = await asyncio.to_thread(cli, capsys, "query", "--timestamp", "2020-01-01T00:00:00Z", *flags,
                                               url, "SELECT 1")
        assert code == 1 and "before every snapshot" in err
        code, _, err = await asyncio.to_thread(cli, capsys, "query", *flags, url, "SELECT * FROM nope")
        assert code == 1 and "no such table: nope" in err
        code, _, err = await asyncio.to_thread(
            cli, capsys, "query", *flags, url, "INSERT INTO events (at, body) VALUES (1, 'x')")
        assert code == 1 and "readonly" in err.lower()


async def test_a_plain_path_is_a_file_url(stored: Stored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """As for `restore`: a relative path reads the backup there; an empty one fails naming where it looked."""
    monkeypatch.chdir(stored.root)
    code, printed, err = await asyncio.to_thread(cli, capsys, "query", "c/app.db", "SELECT count(*) FROM events")
    assert code == 0, err
    assert int(printed.splitlines()[1]) == len(rows(stored.live))
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err = await asyncio.to_thread(cli, capsys, "query", "empty", "SELECT 1")
    assert code == 1 and f"file://{tmp_path / 'empty'}: no backup files found" in err


@pytest.mark.parametrize("argv", [["--txid", "zz"], ["--txid", "0"], ["--timestamp", "soon"]])
def test_a_malformed_txid_or_time_is_a_usage_error(argv: list[str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 with argparse naming the flag, as `restore` and `admin` do (cli.py's exit status table)."""
    with pytest.raises(SystemExit) as info:
        main(["query", *argv, f"file://{tmp_path}/backups/default/app.db", "SELECT 1"])
    assert info.value.code == 2
    assert f"argument {argv[0]}: {argv[1]!r}: want a" in capsys.readouterr().err
