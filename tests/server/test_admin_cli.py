"""`litefs-sidecar admin …` against a real server on 127.0.0.1, through `sidecar.cli.main` as a user runs it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from sidecar.cli import main
from sidecar.engine.index import reachable
from sidecar.ltx import Version, format_timestamp
from sidecar.ltx.decoder import decode
from tests.conftest import LITEFS, make_db
from tests.engine.history import History
from tests.faults import FaultProxy
from tests.server.client import BackupClient
from tests.server.conftest import ADMIN, TOKEN, Running, uploads

T0 = 1_790_000_000_000  # ms: the timestamps of the test's transactions


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's shell holds the admin token, as the server's environment does."""
    monkeypatch.setenv("LITEFS_SIDECAR_SERVER_ADMIN_TOKEN", ADMIN)


class Admin:
    """Runs `litefs-sidecar admin ARGS --server URL` in a thread (the server runs in this loop)."""

    def __init__(self, server: Running, capsys: pytest.CaptureFixture[str]) -> None:
        self.url, self.capsys = server.url, capsys

    async def __call__(self, *args: str, server: bool = True, before: bool = False) -> tuple[int, str, str]:
        """`before`: --server URL goes before the subcommand, not after it."""
        self.capsys.readouterr()
        flag = ["--server", self.url] if server or before else []
        argv = ["admin", *flag, *args] if before else ["admin", *args, *flag]
        code = await asyncio.to_thread(main, argv)
        out, err = self.capsys.readouterr()
        return code, out, err

    async def json(self, *args: str) -> Any:
        code, out, err = await self(*args, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def admin(server: Running, capsys: pytest.CaptureFixture[str]) -> Iterator[Admin]:
    with structlog.testing.capture_logs():  # the in-process server's log lines stay out of the command's stdout
        yield Admin(server, capsys)


async def backed_up(server: Running, http: aiohttp.ClientSession, tmp_path: Path, n: int = 3) -> History:
    """`app.db` with `n` transactions, one second apart from T0, uploaded as LiteFS would."""
    history = History(tmp_path / "live.db")
    client = BackupClient(http, server.url, TOKEN)
    for i in range(n):
        history.write(n=4)
        await client.write_tx("app.db", history.commit(T0 + i * 1000))
    return history


class TestList:
    async def test_table_and_json(self, server: Running, http: aiohttp.ClientSession, admin: Admin) -> None:
        """Every cluster's databases, with position, HWM, lag, size and restore points."""
        for path in uploads("fx-wal.db"):
            await BackupClient(http, server.url, TOKEN).write_tx("fx-wal.db", path.read_bytes())
        pos = server.engine.pos("default", "fx-wal.db")
        code, out, _ = await admin("list")
        header, row = out.splitlines()
        assert header.split() == ["CLUSTER", "DB", "TXID", "HWM", "LAG", "SIZE", "FILES", "POINTS", "OLDEST", "NEWEST"]
        assert code == 0 and row.split()[:5] == ["default", "fx-wal.db", f"{pos.txid:016x}", f"{pos.txid:016x}", "0"]
        data = await admin.json("list")
        [db] = data["clusters"][0]["databases"]
        assert db["txid"] == f"{pos.txid:016x}" and db["lag"] == 0 and db["restorePoints"] >= 5
        assert (await admin.json("list", "--cluster", "other")) == {"clusters": [{"name": "other", "databases": []}]}

    async def test_show_lists_restore_points(self, server: Running, http: aiohttp.ClientSession, admin: Admin,
                                             tmp_path: Path) -> None:
        """`show` prints one row per restore point."""
        (await backed_up(server, http, tmp_path)).close()
        code, out, _ = await admin("show", "--db", "app.db")
        assert code == 0 and out.startswith("default/app.db: TXID 0000000000000003")
        for i in range(3):
            assert f"L0     {i + 1:016x}  {format_timestamp(T0 + i * 1000)}" in out
        assert [p["txid"] for p in (await admin.json("show", "--db", "app.db"))["points"]] == [
            f"{i:016x}" for i in (1, 2, 3)]


    async def test_show_lists_every_level_and_what_it_covers(self, server: Running, http: aiohttp.ClientSession,
                                                           admin: Admin, tmp_path: Path) -> None:
        """Each level's restore points are listed under it (an L1, L2 or snapshot point is not hidden behind the L0
        point at the same TXID), with a table of each level's granularity and stretch of time."""
        (await backed_up(server, http, tmp_path)).close()
        engine = server.engine
        for level in (1, 2, 9):  # whatever the server's own ticker has not compacted yet: all reach TXID 3
            await engine.compact_level("default", "app.db", level)
        index = engine.index("default", "app.db")
        reach = reachable(index)
        ends = {lv: [e for e in index.level(lv) if e.max_txid in reach] for lv in (0, 1, 2, 9)}
        data = await admin.json("show", "--db", "app.db")
        assert sorted((p["level"], p["txid"]) for p in data["points"]) == sorted(
            (lv, f"{e.max_txid:016x}") for lv, files in ends.items() for e in files)
        assert {(p["level"], p["txid"]) for p in data["points"]} >= {(lv, f"{3:016x}") for lv in (0, 1, 2, 9)}
        assert data["levels"] == [
            {"level": lv, "points": len(files), "interval": {0: 0.0, 1: 300.0, 2: 3600.0, 9: 86400.0}[lv],
             "oldest": format_timestamp(files[0].timestamp), "newest": format_timestamp(files[-1].timestamp)}
            for lv, files in ends.items()]
        code, out, _ = await admin("show", "--db", "app.db")
        assert code == 0
        summary = out.split("restorable, per level:\n")[1].split("\n\n")[0].splitlines()
        every = {0: "upload", 1: "5m", 2: "1h", 9: "24h"}
        assert [line.split() for line in summary] == [["LEVEL", "EVERY", "POINTS", "OLDEST", "NEWEST"]] + [
            [f"L{lv}", every[lv], str(len(files)), format_timestamp(files[0].timestamp),
             format_timestamp(files[-1].timestamp)] for lv, files in ends.items()]
        assert f"L1     {3:016x}  {format_timestamp(T0 + 2000)}" in out


class TestRestore:
    async def test_restore_appends_a_head_and_can_be_undone(self, server: Running, http: aiohttp.ClientSession,
                                                            admin: Admin, tmp_path: Path) -> None:
        """Restoring TXID 2 writes TXID 4 with TXID 2's state; restoring TXID 3 then undoes it."""
        history = await backed_up(server, http, tmp_path)
        code, out, _ = await admin("restore", "--db", "app.db", "--txid", "2")
        assert code == 0
        assert out.strip() == (f"default/app.db: restored TXID 0000000000000002 ({format_timestamp(T0 + 1000)}) as "
                               "the new head, TXID 0000000000000004; earlier states stay restorable")
        assert server.engine.pos("default", "app.db").post_apply_checksum == history.checksums[2]
        when = format_timestamp(T0 + 2500)  # after TXID 3, before the restore: TXID 3's state
        data = await admin.json("restore", "--db", "app.db", "--timestamp", when)
        assert data["restored"]["txid"] == "0000000000000003" and data["txid"] == "0000000000000005"
        assert server.engine.pos("default", "app.db").post_apply_checksum == history.checksums[3]
        history.close()

    async def test_a_target_is_required(self, admin: Admin) -> None:
        """Neither --timestamp nor --txid, or a malformed one, is a usage error."""
        with pytest.raises(SystemExit) as info:
            await admin("restore", "--db", "app.db")
        assert info.value.code == 2
        with pytest.raises(SystemExit):
            await admin("restore", "--db", "app.db", "--timestamp", "yesterday")


class TestFiles:
    async def test_download_latest_and_at_a_txid(self, server: Running, http: aiohttp.ClientSession, admin: Admin,
                                                 tmp_path: Path) -> None:
        """A SQLite file equal to the database at that point; or an LTX v2 snapshot with --format ltx."""
        for path in uploads("fx-wal.db"):
            await BackupClient(http, server.url, TOKEN).write_tx("fx-wal.db", path.read_bytes())
        out = tmp_path / "dl.db"
        code, text, _ = await admin("download", "--db", "fx-wal.db", "-o", str(out))
        assert code == 0 and text.startswith(f"wrote {out}: SQLite database of default/fx-wal.db at TXID ")
        assert out.read_bytes() == (LITEFS / "db" / "fx-wal.db").read_bytes()
        history = await backed_up(server, http, tmp_path)
        data = await admin.json("download", "--db", "app.db", "--txid", "2", "-o", str(out))
        assert data == {"path": str(out), "bytes": out.stat().st_size, "txid": "0000000000000002"}
        check = tmp_path / "check.db"
        await server.engine.restore_to("default", "app.db", check, txid=2)
        assert out.read_bytes() == check.read_bytes()
        await admin("download", "--db", "app.db", "--format", "ltx", "-o", str(tmp_path / "snap.ltx"))
        header, _, trailer = decode((tmp_path / "snap.ltx").read_bytes(), Version.V2)
        assert header.is_snapshot and header.max_txid == 3 and trailer.post_apply_checksum == history.checksums[3]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".dl.db")) == []  # no temp files left
        history.close()

    async def test_download_into_a_missing_directory_is_refused(self, server: Running, http: aiohttp.ClientSession,
                                                                admin: Admin, tmp_path: Path) -> None:
        """The same words and status as `restore -o`; nothing is created."""
        (await backed_up(server, http, tmp_path)).close()
        out = tmp_path / "missing" / "dir" / "x.db"
        code, _, err = await admin("download", "--db", "app.db", "-o", str(out))
        assert code == 1 and err == f"litefs-sidecar: -o {out}: {out.parent} does not exist\n"
        assert not (tmp_path / "missing").exists()

    async def test_a_download_cut_short_is_an_error_and_writes_nothing(
            self, server: Running, http: aiohttp.ClientSession, admin: Admin, tmp_path: Path) -> None:
        """The connection drops mid-body (a proxy, a restart): the command fails and -o keeps what it held."""
        (await backed_up(server, http, tmp_path, n=5)).close()
        proxy = FaultProxy(server.url)
        proxy.faults.cut_gets, proxy.faults.cut_after = 1, 1000
        admin.url = await proxy.start()
        out = tmp_path / "dl.db"
        out.write_bytes(b"what was there")
        try:
            code, _, err = await admin("download", "--db", "app.db", "-o", str(out))
        finally:
            await proxy.stop()
        assert proxy.injected == 1
        assert code == 1 and "cut short" in err, (code, out.stat().st_size, err)
        assert out.read_bytes() == b"what was there"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dl.db")] == []

    async def test_upload_then_download_round_trips(self, server: Running, admin: Admin, tmp_path: Path) -> None:
        """An uploaded SQLite file becomes the head, byte for byte."""
        db = make_db(tmp_path / "new.db", rows=500)
        code, out, _ = await admin("upload", "--cluster", "staging", "--db", "new.db", str(db))
        assert code == 0 and "uploaded" in out and "TXID 0000000000000001" in out
        await admin("download", "--cluster", "staging", "--db", "new.db", "-o", str(tmp_path / "back.db"))
        assert (tmp_path / "back.db").read_bytes() == db.read_bytes()
        con = sqlite3.connect(tmp_path / "back.db")
        assert con.execute("SELECT count(*) FROM t").fetchone() == (500,)
        con.close()


    async def test_a_damaged_database_is_refused_at_upload(self, server: Running, admin: Admin,
                                                            tmp_path: Path) -> None:
        """A SQLite file cut short (half a copy) is refused, and nothing is stored: it would become the head."""
        data = make_db(tmp_path / "whole.db", rows=2000).read_bytes()
        page_size = int.from_bytes(data[16:18], "big")
        cut = tmp_path / "cut.db"
        cut.write_bytes(data[:page_size * (len(data) // page_size // 2)])
        code, _, err = await admin("upload", "--db", "new.db", str(cut))
        assert code == 1 and "422 ENOTSQLITE" in err and "new.db" in err, err
        assert server.engine.databases("default") == []


class TestCloneAndDelete:
    async def test_clone_a_database_and_a_whole_cluster(self, server: Running, http: aiohttp.ClientSession,
                                                        admin: Admin, tmp_path: Path) -> None:
        """One database under a new name, then every database of the cluster."""
        history = await backed_up(server, http, tmp_path)
        make_db(tmp_path / "b.db")
        await admin("upload", "--db", "b.db", str(tmp_path / "b.db"))
        code, out, _ = await admin("clone", "--db", "app.db", "--to-cluster", "staging", "--to-db", "copy.db")
        assert code == 0 and out.strip() == "cloned default/app.db to staging/copy.db at TXID 0000000000000001"
        assert server.engine.pos("staging", "copy.db").post_apply_checksum == history.checksums[3]
        results = await admin.json("clone", "--to-cluster", "qa")
        assert [r["name"] for r in results] == server.engine.databases("qa") == ["app.db", "b.db"]
        history.close()

    async def test_cloning_a_cluster_goes_on_past_a_database_that_fails(
            self, server: Running, http: aiohttp.ClientSession, admin: Admin, tmp_path: Path) -> None:
        """One database whose backup is damaged fails alone, named, and the others are still cloned (exit 1)."""
        for name in ("a.db", "b.db", "c.db"):
            make_db(tmp_path / name)
            await admin("upload", "--db", name, str(tmp_path / name))
        for f in (server.root / "store" / "default" / "a.db").rglob("*.ltx"):
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        code, out, err = await admin("clone", "--to-cluster", "qa")
        assert code == 1, (out, err)
        assert server.engine.databases("qa") == ["b.db", "c.db"]
        assert "cloned default/b.db to qa/b.db" in out and "cloned default/c.db to qa/c.db" in out
        assert "default/a.db" in err and len(err.splitlines()) == 1, err

    async def test_delete_needs_yes(self, server: Running, http: aiohttp.ClientSession, admin: Admin,
                                    tmp_path: Path) -> None:
        """Without --yes nothing is deleted (exit 2); with it, every stored file goes."""
        (await backed_up(server, http, tmp_path)).close()
        code, _, err = await admin("delete", "--db", "app.db")
        assert code == 2 and "without --yes" in err and server.engine.databases("default") == ["app.db"]
        code, out, _ = await admin("delete", "--db", "app.db", "--yes")
        assert code == 0 and out.startswith("deleted default/app.db: ")
        assert server.engine.databases("default") == []
        assert not list((server.root / "store" / "default").rglob("*.ltx"))


class TestErrors:
    async def test_server_refusals_are_one_line_and_exit_1(self, server: Running, http: aiohttp.ClientSession,
                                                           admin: Admin, tmp_path: Path) -> None:
        """The server's {code, error} becomes one line on stderr, without a traceback."""
        (await backed_up(server, http, tmp_path)).close()
        code, out, err = await admin("show", "--db", "nope.db")
        assert code == 1 and out == ""
        assert err == (f"litefs-sidecar: the server answered 404 ENODB: {server.url}/api/db: no database 'nope.db' in "
                       "cluster 'default'\n")
        code, _, err = await admin("restore", "--db", "app.db", "--txid", "99")
        answered = f"litefs-sidecar: the server answered 404 ENOTXID: {server.url}/api/restore: "
        assert code == 1 and err.startswith(answered)
        assert len(err.splitlines()) == 1
        code, _, err = await admin("show", "--db", "../x")
        assert code == 1 and "400 EBADDB" in err

    async def test_a_wrong_token_gets_a_hint(self, admin: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
        """401 names the variable to set."""
        monkeypatch.setenv("LITEFS_SIDECAR_SERVER_ADMIN_TOKEN", "not-the-admin-token")
        code, _, err = await admin("list")
        assert code == 1 and err.splitlines() == [
            f"litefs-sidecar: the server answered 401 EINVALIDAUTH: {admin.url}/api/databases: missing or invalid "
            "Authorization",
            "hint: set LITEFS_SIDECAR_SERVER_ADMIN_TOKEN to the server's admin token"]

    async def test_an_unreachable_server(self, server: Running, admin: Admin) -> None:
        """A server that is not there: one line and a hint."""
        await server.shutdown()
        code, _, err = await admin("list")
        assert code == 1 and err.splitlines() == [
            f"litefs-sidecar: cannot reach the backup server at {admin.url}: Connection refused",
            "hint: is `litefs-sidecar serve` running there? Give its address with --server URL"]

    async def test_default_server_is_the_configured_addr(self, server: Running, admin: Admin,
                                                         tmp_path: Path) -> None:
        """Without --server, the [server] addr of --config is used (as on the server's own host)."""
        config = tmp_path / "sidecar.toml"
        config.write_text(f'[server]\naddr = "{server.url.removeprefix("http://")}"\n')
        code, out, err = await admin("list", "--config", str(config), server=False)
        assert code == 0 and out.strip() == "no databases", err


class TestClientOptions:
    """--server, --config and --json go before or after the subcommand; --server takes what users type."""

    async def test_before_or_after_the_subcommand(self, server: Running, http: aiohttp.ClientSession, admin: Admin,
                                                  tmp_path: Path) -> None:
        (await backed_up(server, http, tmp_path)).close()
        for argv in (["--server", server.url, "list"], ["list", "--server", server.url],
                     ["--server", server.url, "--json", "show", "--db", "app.db"],
                     ["--json", "show", "--db", "app.db", "--server", server.url]):
            code, out, err = await admin(*argv, server=False)
            assert code == 0 and "app.db" in out, (argv, err)
        code, out, _ = await admin("--json", "list", server=False, before=True)
        assert code == 0 and json.loads(out)["clusters"][0]["databases"][0]["name"] == "app.db"

    async def test_a_bare_host_and_port_is_http(self, server: Running, admin: Admin) -> None:
        code, out, err = await admin("list", "--server", server.url.removeprefix("http://"), server=False)
        assert code == 0 and out.strip() == "no databases", err

    @pytest.mark.parametrize("url", ["ftp://127.0.0.1:9", "file:///tmp/x", "http://", "localhost:port"])
    async def test_anything_else_is_bad_usage_before_any_request(self, url: str, admin: Admin,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
        """Refused by argparse at once (exit 2), not after a minute of trying an FTP server."""
        with pytest.raises(SystemExit) as info:
            await admin("--server", url, "list", server=False)
        assert info.value.code == 2 and f"argument --server: {url!r}: " in capsys.readouterr().err
