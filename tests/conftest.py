"""Shared test helpers: fixture paths and small builders of real SQLite databases."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

FIXTURES = Path(__file__).parent / "fixtures"
GO_V2 = FIXTURES / "go-ltx-v2"
LITEFS = FIXTURES / "litefs-0.5.14"
LITESTREAM = FIXTURES / "litestream-0.5.17"


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def make_db(path: Path, rows: int = 200, page_size: int = 4096, seed: int = 0) -> Path:
    """A real SQLite database with a table of `rows` rows (rollback journal, so the file is complete)."""
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA page_size={page_size}")
    con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t (v) VALUES (?)", [(f"row-{seed}-{i}-" + "x" * (i % 50),) for i in range(rows)])
    con.commit()
    con.close()
    return path


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo what a test's setup() did (a command run in-process sets the level to warning, say): each test starts
    from structlog's and logging's defaults, whichever tests ran before it in its process."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level
             for name in ("botocore", "aiobotocore", "s3transfer", "urllib3", "watchfiles")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in noisy.items():
        logging.getLogger(name).setLevel(old)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


from tests.s3server import moto_server  # noqa: E402, F401  (a session fixture for every test package)
