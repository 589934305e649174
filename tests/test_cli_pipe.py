"""A reader that goes away (`litefs-sidecar ls URL | head -1`): the command ends quietly, as Unix tools do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import GO_V2, LITESTREAM

REPLICA = f"file://{LITESTREAM / 'replica'}"
COMMANDS = {
    "ls": ["ls", REPLICA],
    "verify": ["verify", REPLICA],
    "ltx dump": ["ltx", "dump", str(GO_V2 / "medium-4096.ltx")],  # 25 KB of page lines: more than one buffer
    "ltx list": ["ltx", "list", *map(str, sorted(GO_V2.glob("*.ltx")))],
    "--help": ["--help"],
}


@pytest.fixture
def closed_pipe() -> Iterator[int]:
    """The write end of a pipe whose reader has already gone: every write to it fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    yield write
    os.close(write)


@pytest.mark.parametrize("argv", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_closed_pipe_ends_the_command_quietly(argv: list[str], closed_pipe: int) -> None:
    proc = subprocess.run([sys.executable, "-m", "sidecar", *argv], stdout=closed_pipe, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    assert proc.stderr == ""  # no traceback, no "Exception ignored", no "FILE: Broken pipe"
    # 128 + SIGPIPE, what a shell reports for a tool the pipe ended; argparse's help ignores the closed pipe: 0
    assert proc.returncode == (0 if argv == ["--help"] else 141)
