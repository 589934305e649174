"""`restore`, `ls` and `verify` as a new user types them: relative paths, a store's root, where the output goes."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main
from sidecar.commands import backup as backup_cmd
from sidecar.engine import Engine, Levels
from sidecar.ltx import Version, format_timestamp
from sidecar.ltx.decoder import decode
from sidecar.ltx.encoder import encode
from sidecar.storage import open_storage
from sidecar.storage.layout import set_aside_key
from tests.engine.history import History

T0 = 1_790_000_000_000


@pytest.fixture
async def store(tmp_path: Path) -> Path:
    """`backups/` holding default/app.db (3 transactions) and prod/shop.db (2), as `serve` or `run` lay it out."""
    root = tmp_path / "backups"
    engine = await Engine.open(open_storage(f"file://{root}"), tmp_path / "state", Levels(l0_interval=0))
    try:
        for cluster, name, n in (("default", "app.db", 3), ("prod", "shop.db", 2)):
            history = History(tmp_path / f"{cluster}-{name}")
            for i in range(n):
                history.write()
                await engine.write_tx(cluster, name, history.commit(T0 + i * 1000))
            history.close()
    finally:
        await engine.close()
        await engine.storage.close()
    return root


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


class TestPaths:
    async def test_a_relative_path_is_a_file_url(self, store: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.chdir(store.parent)
        assert await cli("ls", "./backups/default/app.db") == 0
        assert "0000000000000003" in capsys.readouterr().out
        assert await cli("verify", "backups/default/app.db") == 0
        assert "ok: 3 files, latest TXID 0000000000000003" in capsys.readouterr().out
        assert await cli("restore", "--txid", "2", "-o", "out.db", "./backups/default/app.db") == 0
        assert capsys.readouterr().out.startswith("restored TXID 0000000000000002 at ")
        assert (store.parent / "out.db").stat().st_size > 0

    async def test_ls_on_a_store_root_lists_its_backups(self, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
        url = f"file://{store}"
        assert await cli("ls", url) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"{url} is not one database's backup; it holds 2:", f"  {url}/default/app.db", f"  {url}/prod/shop.db"]
        assert await cli("ls", str(store / "prod")) == 0  # a cluster's directory, as a path
        assert capsys.readouterr().out.splitlines()[1:] == [f"  file://{store}/prod/shop.db"]

    @pytest.mark.parametrize("verb", ["verify", "restore"])
    async def test_verify_or_restore_of_a_root_names_the_backups(self, verb: str, store: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
        url = f"file://{store}"
        argv = [verb, url] if verb == "verify" else [verb, "-o", str(tmp_path / "out.db"), url]
        assert await cli(*argv) == 1
        assert capsys.readouterr().err.splitlines() == [
            f"litefs-sidecar: {url} is not one database's backup; {verb} one of the 2 it holds:",
            f"  {url}/default/app.db", f"  {url}/prod/shop.db"]
        assert not (tmp_path / "out.db").exists()

    async def test_ls_counts_the_copies_set_aside_from_the_backup(self, store: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
        """Copies of a backup's files set aside at the store's root are counted, with the oldest's time; another
        database's (`app.dbx`) are not, and a backup with none says nothing of them."""
        for prefix, ms in (("default/app.db", T0 + 5000), ("default/app.db", T0), ("default/app.dbx", T0 - 1000)):
            copy = store / set_aside_key(f"{prefix}/ltx/0/{2:016x}-{2:016x}.ltx", ms)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(b"an LTX file of another history")
        assert await cli("ls", str(store / "default" / "app.db")) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"set aside: 2 files (oldest {format_timestamp(T0)})"
        assert await cli("ls", str(store / "prod" / "shop.db")) == 0
        assert "set aside" not in capsys.readouterr().out

    async def test_an_empty_place_says_so(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert await cli("ls", str(tmp_path)) == 1
        assert capsys.readouterr().err == f"litefs-sidecar: {tmp_path}: no backup files found\n"


class TestOutput:
    async def test_a_place_the_system_refuses_is_one_line_naming_it(self, store: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
        """An output the system will not take (here /proc, where no file can be made; a full disk alike) is the
        system's error on one line, naming the file: no traceback."""
        assert await cli("restore", "-o", "/proc/self/out.db", str(store / "default" / "app.db")) == 1
        err = capsys.readouterr().err
        assert err.startswith("litefs-sidecar: [Errno ") and "'/proc/self/" in err and len(err.splitlines()) == 1

    async def test_a_missing_output_directory_is_refused_not_created(self, store: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
        """As `admin download -o` and `cp` do: exit 1 naming the directory, and nothing is created."""
        out = tmp_path / "missing" / "dir" / "x.db"
        for dry in ([], ["--dry-run"]):
            assert await cli("restore", *dry, "-o", str(out), f"file://{store}/default/app.db") == 1
            assert capsys.readouterr().err == f"litefs-sidecar: -o {out}: {out.parent} does not exist\n"
        assert not (tmp_path / "missing").exists()


class TestRestoreSafety:
    """A restored file is never read through another state's -wal; malformed content is a reported problem."""

    async def test_a_stale_wal_beside_the_output_is_refused(self, store: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
        out = tmp_path / "app.db"
        out.write_bytes(b"old database")
        (tmp_path / "app.db-wal").write_bytes(b"old wal")
        (tmp_path / "app.db-shm").write_bytes(b"old shm")
        assert await cli("restore", "-o", str(out), str(store / "default" / "app.db")) == 1
        err = capsys.readouterr().err
        assert "app.db-wal, app.db-shm" in err and "--force" in err
        assert out.read_bytes() == b"old database" and (tmp_path / "app.db-wal").exists()  # nothing changed

    async def test_force_replaces_the_database_and_removes_its_wal(self, store: Path, tmp_path: Path) -> None:
        out = tmp_path / "app.db"
        out.write_bytes(b"old database")
        (tmp_path / "app.db-wal").write_bytes(b"old wal")
        assert await cli("restore", "--force", "-o", str(out), str(store / "default" / "app.db")) == 0
        assert not (tmp_path / "app.db-wal").exists()
        con = sqlite3.connect(out)
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("SELECT count(*) FROM events").fetchone()[0] > 0
        con.close()

    async def test_verify_reports_malformed_sqlite_content(self, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
        """Every LTX checksum holds, but the pages are not a database SQLite can read: a problem, not a traceback."""
        db = tmp_path / "bad.db"
        good = sqlite3.connect(db)
        good.execute("CREATE TABLE t (x)")
        good.commit()
        good.close()
        data = bytearray(db.read_bytes())
        data[100:] = b"\xa5" * (len(data) - 100)  # the header stays SQLite's; the b-tree pages are garbage
        db.write_bytes(bytes(data) + b"\xa5" * 4096)
        backup = tmp_path / "store" / "c" / "bad.db" / "ltx" / "9"
        backup.mkdir(parents=True)
        assert await cli("ltx", "encode-db", "--format", "v3", "-o",
                         str(backup / "0000000000000001-0000000000000001.ltx"), str(db)) == 0
        capsys.readouterr()
        assert await cli("verify", str(tmp_path / "store" / "c" / "bad.db")) == 1
        err = capsys.readouterr().err
        assert "integrity_check" in err and "Traceback" not in err


async def test_verify_checks_the_database_checksum_a_snapshot_carries(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A snapshot whose stored post-apply checksum is not its pages' (file checksum intact) is a problem: a restore
    to that point would fail, so verify names the file rather than saying ok."""
    root = tmp_path / "backups"
    engine = await Engine.open(open_storage(f"file://{root}"), tmp_path / "state", Levels(l0_interval=0))
    history = History(tmp_path / "live.db")
    for i in range(3):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(T0 + i * 1000))
    await engine.compact_level("c", "app.db", 9)
    history.write()
    await engine.write_tx("c", "app.db", history.commit(T0 + 3000))
    await engine.close()
    await engine.storage.close()
    history.close()
    snapshot = root / "c" / "app.db" / "ltx" / "9" / "0000000000000001-0000000000000003.ltx"
    header, pages, _ = decode(snapshot.read_bytes(), Version.V3)
    assert header.db_checksums is not None
    snapshot.write_bytes(encode(header.replace(ext_post_apply_checksum=header.ext_post_apply_checksum ^ 1), pages,
                                Version.V3))
    assert await cli("verify", str(root / "c" / "app.db")) == 1
    err = capsys.readouterr().err
    assert "ltx/9/0000000000000001-0000000000000003.ltx: post-apply checksum in header extension" in err
    assert await cli("restore", "--txid", "3", "-o", str(tmp_path / "at3.db"), str(root / "c" / "app.db")) == 1


def _sqlite(path: Path, page_size: int, rows: int) -> Path:
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA page_size={page_size}")
    con.execute("CREATE TABLE IF NOT EXISTS t (x)")
    con.executemany("INSERT INTO t VALUES (?)", [("x" * 200,) for _ in range(rows)])
    con.commit()
    con.close()
    return path


async def test_verify_follows_the_chain_past_a_snapshot_in_l0(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A state of another page size is stored as a snapshot in L0 (TXIDs 1-3 among 1-1, 2-2, 4-4): no gap, as
    every restore shows; verify says ok, and still names a broken checksum chain and a real gap."""
    root = tmp_path / "backups"
    engine = await Engine.open(open_storage(f"file://{root}"), tmp_path / "state", Levels(l0_interval=0))
    for page_size, rows in ((4096, 10), (4096, 10), (512, 10), (512, 10), (512, 10)):
        await engine.write_state("c", "app.db", _sqlite(tmp_path / f"{page_size}.db", page_size, rows))
    await engine.close()
    await engine.storage.close()
    level0 = root / "c" / "app.db" / "ltx" / "0"
    assert sorted(p.name[:33] for p in level0.iterdir()) == [
        "0000000000000001-0000000000000001", "0000000000000001-0000000000000003", "0000000000000002-0000000000000002",
        "0000000000000004-0000000000000004", "0000000000000005-0000000000000005"]
    assert await cli("verify", str(root / "c" / "app.db")) == 0, capsys.readouterr().err
    assert "ok: 5 files, latest TXID 0000000000000005" in capsys.readouterr().out
    last = level0 / "0000000000000005-0000000000000005.ltx"
    header, pages, _ = decode(last.read_bytes(), Version.V3)
    last.write_bytes(encode(header.replace(ext_pre_apply_checksum=header.ext_pre_apply_checksum ^ 1), pages,
                            Version.V3))
    assert await cli("verify", str(root / "c" / "app.db")) == 1
    assert "L0: 0000000000000005 pre-apply checksum" in capsys.readouterr().err
    (level0 / "0000000000000004-0000000000000004.ltx").unlink()
    assert await cli("verify", str(root / "c" / "app.db")) == 1
    assert "L0: gap between 0000000000000003 and 0000000000000005" in capsys.readouterr().err


class _RetentionDuringVerify:
    """A store whose retention deletes `victim` (an L0 flush an L1 file covers) while `verify` reads the files."""

    def __init__(self, inner: Any, victim: str) -> None:
        self.inner, self.victim = inner, victim

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_bytes(self, key: str) -> bytes:
        data = await self.inner.get_bytes(key)
        await self.inner.delete([self.victim])
        return data


async def test_verify_of_a_live_backup_is_not_failed_by_retention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A file deleted by retention after the listing is no problem of the backup: verify checks what is stored."""
    root = tmp_path / "backups"
    storage = open_storage(f"file://{root}")
    engine = await Engine.open(storage, tmp_path / "state", Levels(l0_interval=0))
    history = History(tmp_path / "live.db")
    for i in range(4):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(T0 + i * 1000))
    await engine.compact_level("c", "app.db", 1)
    history.write()
    await engine.write_tx("c", "app.db", history.commit(T0 + 5000))
    victim = engine.index("c", "app.db").level(0)[2].key(storage.layout, "")
    await engine.close()
    await storage.close()
    history.close()
    real = backup_cmd.open_storage
    monkeypatch.setattr(backup_cmd, "open_storage", lambda url, **kw: _RetentionDuringVerify(real(url, **kw), victim))
    assert await cli("verify", str(root / "c" / "app.db")) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "ok: " in out and "; 1 deleted by retention or compaction while checking" in out


class TestS3Endpoint:
    @pytest.mark.parametrize("command", [["ls"], ["verify"], ["restore", "-o", "out.db"], ["query", "--", "SELECT 1"],
                                         ["replicate", "-o", "copy.db"]])
    @pytest.mark.parametrize("endpoint", ["minio:9000", "http://127.0.0.1:99999", "ftp://minio"])
    def test_a_malformed_endpoint_is_a_usage_error(self, command: list[str], endpoint: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
        """Named by argparse, exit 2, before any request: not botocore's ValueError traceback."""
        argv = [command[0], "--s3-endpoint", endpoint, *command[1:]]
        argv.insert(argv.index("--") if "--" in argv else len(argv), "s3://bucket/backups/default/app.db")
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert f"argument --s3-endpoint: {endpoint!r}: want http(s)://HOST[:PORT]" in capsys.readouterr().err
