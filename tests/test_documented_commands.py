"""Every `litefs-sidecar …` line in README.md and in every `--help` example runs as written.

Each line is parsed by the real CLI. The quick ones (restore, ls, verify, ltx, admin) are then run through
`sidecar.cli.main` against real things standing where the line says: a backup server on 127.0.0.1 holding
`default`, `prod` and `staging` backups of `app.db` (TXID 00000000000004d2 committed at 2026-11-24T08:00:00Z, two
more after), its store under the paths the lines name, moto's S3 for `s3://` URLs, LTX files and SQLite databases
in the working directory. Paths outside it (/var/lib/…, /backups) are mapped to those stand-ins; nothing else
in a line changes. `run`, `serve`, `demo` and `--follow` run until stopped, so they are parsed only (their deploy-file
twins are also loaded, in tests/deploy/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import io
import shutil
import sqlite3
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from sidecar.cli import build_parser, main
from sidecar.engine import Engine, Levels
from sidecar.ltx import Pos, Version
from sidecar.ltx.sqlite import encode_db
from sidecar.server import ServerConfig, serve
from sidecar.server.auth import Scope
from sidecar.storage import open_storage
from sidecar.storage.base import parse_rfc3339
from tests.conftest import GO_V2, LITEFS, LITESTREAM, make_db
from tests.deploy.deployfiles import REPO, commands_in_shell, shell_blocks
from tests.engine.history import History
from tests.s3server import MotoServer

ADMIN = "tok-admin-documented-0123456789"
SNAPSHOT_TXID = 0x4D2
SNAPSHOT_AT = parse_rfc3339("2026-11-24T08:00:00Z")
YEAR = 365 * 86400.0
PARSE_ONLY = {"run", "serve", "demo"}
CLUSTERS = ("default", "prod", "staging")
DOCUMENTED_TABLES = ("orders", "users", "t")
READER = "tok-reader-documented-0123456789"  # LITEFS_SIDECAR_TOKEN=… in the lines: a read-only token of default


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def help_lines() -> list[str]:
    """The example command lines of every help text, without the explanation written after two spaces."""
    lines = set()
    for parser in parsers(build_parser()):
        for line in (parser.epilog or "").splitlines():
            text = line.strip()
            if text.startswith("litefs-sidecar ") or (text.startswith("LITEFS_") and " litefs-sidecar " in text):
                lines.add(text.split("  ")[0])
    return sorted(lines)


README_COMMANDS = commands_in_shell(shell_blocks((REPO / "README.md").read_text()))
HELP_COMMANDS = [argv for line in help_lines() for argv in commands_in_shell(line)]


def name(argv: list[str]) -> str:
    return " ".join(argv)[:70]


@pytest.mark.parametrize("argv", README_COMMANDS + HELP_COMMANDS, ids=name)
def test_every_documented_line_parses(argv: list[str]) -> None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`litefs-sidecar {' '.join(argv)}`: {err.getvalue().strip()}") from exc
    assert callable(getattr(args, "func", None))


def test_the_lines_are_found() -> None:
    """The README's blocks and the help texts hold what this file is about (a guard against a parsing slip)."""
    readme = {tuple(a[:2]) if a[0] in ("admin", "ltx") else (a[0],) for a in README_COMMANDS}
    assert {("demo",), ("run",), ("serve",), ("restore",), ("ls",), ("verify",), ("admin", "--server"),
            ("admin", "restore"), ("ltx", "verify"), ("ltx", "compact")} <= readme
    assert len(HELP_COMMANDS) > 40


# --- running them ---


@dataclass
class Stage:
    """Where the documented lines' paths and servers are, in this test."""

    tmp: Path
    url: str  # the backup server
    store: Path  # its file:// store
    litefs: Path  # stands in for /var/lib/litefs
    upload: Path  # stands in for /backups/app-2026-11-24.db

    def rewrite(self, argv: list[str]) -> list[str]:
        """The line's words with documented places swapped for this test's, and globs expanded as a shell would."""
        places = [("https://backups.internal:20203", self.url), ("http://backup-host:20203", self.url),
                  ("/var/lib/litefs-sidecar/backups", str(self.store)),
                  ("/backups/app-2026-11-24.db", str(self.upload)),
                  ("file:///backups", f"file://{self.store}"), ("/var/lib/litefs/", f"{self.litefs}/")]
        out = []
        for word in argv:
            for documented, here in places:
                word = word.replace(documented, here)
            out += sorted(glob.glob(word)) if "*" in word and " " not in word else [word]  # not SQL's count(*)
        return out

    def workdir(self, i: int, argv: list[str]) -> Path:
        """A fresh working directory: app.db, ltx/ (LiteFS's files), replica/ (Litestream's), backups/ (the store),
        and the LTX files the dump examples name."""
        cwd = self.tmp / f"cwd-{i}"
        cwd.mkdir()
        if "--db" not in argv or "apply" not in argv:  # `ltx apply --db X` creates its database
            uploadable(cwd / "app.db", rows=300)
        shutil.copytree(LITEFS / "per-tx" / "fx-wal.db", cwd / "ltx")
        shutil.copytree(LITESTREAM / "replica", cwd / "replica")
        for name in ("0000000000000002-0000000000000002.ltx", "00000000000004d2-00000000000004d2.ltx"):
            shutil.copy(GO_V2 / "medium-4096.ltx", cwd / name)
        (cwd / "backups").symlink_to(self.store)
        return cwd


def add_documented_tables(con: sqlite3.Connection) -> None:
    """The app's own tables, which the query examples name."""
    for table in DOCUMENTED_TABLES:
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, v TEXT)")
        con.execute(f"INSERT INTO {table} (v) VALUES ('a'), ('b')")


def uploadable(path: Path, rows: int = 50) -> Path:
    """An app's database, as the upload lines send (it replaces default/app.db for the lines after them)."""
    make_db(path, rows=rows)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as con:
        add_documented_tables(con)
    return path


async def backed_up(engine: Engine, cluster: str, path: Path) -> None:
    """app.db in `cluster`: a snapshot at TXID 00000000000004d2 (2026-11-24T08:00Z), then two more, an hour apart."""
    history = History(path, seed=len(cluster))
    try:
        add_documented_tables(history.con)
        history.write(n=20)
        history.commit(SNAPSHOT_AT)  # only to learn the pages and the checksum the snapshot has
        out = io.BytesIO()
        with open(path, "rb") as db:
            encode_db(db, out, version=Version.V2, txid=SNAPSHOT_TXID, timestamp=SNAPSHOT_AT)
        await engine.write_tx(cluster, "app.db", out.getvalue())
        history.pos = Pos(SNAPSHOT_TXID, history.pos.post_apply_checksum)
        for hour in (2, 3):
            history.write()
            await engine.write_tx(cluster, "app.db", history.commit(SNAPSHOT_AT + hour * 3_600_000))
    finally:
        history.close()


def create_bucket(moto: MotoServer, bucket: str) -> None:
    try:
        moto.create_bucket(bucket)
    except urllib.error.HTTPError as err:
        if err.code != 409:  # already there: another test of this session made it
            raise


@pytest.fixture
async def stage(tmp_path: Path, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stage]:
    levels = Levels(l0_interval=0, l0_retention=YEAR, l1_retention=YEAR, l2_retention=YEAR, snapshot_retention=YEAR)
    engine = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state", levels)
    for cluster in CLUSTERS:
        await backed_up(engine, cluster, tmp_path / f"{cluster}.db")
    # The s3:// lines' bucket names, with the same default/app.db under the prefixes they use.
    for bucket, prefix in (("bucket", "backups"), ("my-bucket", "litefs")):
        create_bucket(moto_server, bucket)
        s3 = await Engine.open(open_storage(f"s3://{bucket}/{prefix}", endpoint_url=moto_server.url),
                               tmp_path / f"state-{bucket}", levels)
        if not s3.databases("default"):
            await backed_up(s3, "default", tmp_path / f"{bucket}.db")
        await s3.close()
        await s3.storage.close()
    stop = asyncio.Event()
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    config = ServerConfig(admin_token=ADMIN, tokens={READER: Scope("default", readonly=True)})
    task = asyncio.create_task(serve(engine, config, "127.0.0.1", 0, stop=stop, started=started.set_result))
    url = await asyncio.wait_for(started, 10)
    monkeypatch.setenv("LITEFS_SIDECAR_SERVER_ADMIN_TOKEN", ADMIN)
    monkeypatch.setenv("LITEFS_SIDECAR_SERVER_ADDR", url.removeprefix("http://"))  # admin's default server
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.url)  # as a user of another S3 store would
    monkeypatch.setenv("LITEFS_SIDECAR_TOKEN", READER)
    litefs = tmp_path / "litefs"
    shutil.copytree(LITEFS / "per-tx" / "fx-wal.db", litefs / "dbs" / "app.db" / "ltx")
    try:
        yield Stage(tmp_path, url, tmp_path / "store", litefs, uploadable(tmp_path / "app-2026-11-24.db"))
    finally:
        stop.set()
        await task


@pytest.mark.parametrize("source", ["README.md", "--help"])
async def test_every_documented_line_runs(source: str, stage: Stage, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 0 for each line, run in order against the one server (later lines see what earlier ones did)."""
    lines = README_COMMANDS if source == "README.md" else HELP_COMMANDS
    ran = 0
    with structlog.testing.capture_logs():  # the in-process server's log lines stay out of the commands' output
        for i, argv in enumerate(lines):
            if argv[0] in PARSE_ONLY or "--follow" in argv:  # these run until stopped
                continue
            monkeypatch.chdir(stage.workdir(i, argv))
            code = await asyncio.to_thread(main, stage.rewrite(argv))
            out, err = capsys.readouterr()
            assert code == 0, f"`litefs-sidecar {' '.join(argv)}` exited {code}:\n{err}{out}"
            assert "Traceback" not in err
            ran += 1
    assert ran >= (10 if source == "README.md" else 30)
