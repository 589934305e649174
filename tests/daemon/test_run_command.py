"""`litefs-sidecar run` as a process, when it cannot start: one line naming the problem, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "run", *args], capture_output=True, text=True,
                          timeout=60)


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    """As `serve` with its port taken: exit 1, the address and the flag named; the upstream's HTTP session is
    closed (no 'Unclosed client session')."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = run("--data-dir", str(tmp_path / "data"), "--state-dir", str(tmp_path / "state"),
                   "--upstream", "http://127.0.0.1:9", "--metrics-addr", addr, "--log-format", "json")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-2:] == [
        f"litefs-sidecar: cannot serve metrics on {addr} (--metrics-addr): address already in use",
        'hint: --metrics-addr HOST:PORT picks another address; --metrics-addr "" turns metrics off']
    assert "Traceback" not in proc.stderr and "Unclosed" not in proc.stderr


def test_a_state_dir_it_cannot_create_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run("--data-dir", str(tmp_path / "data"), "--state-dir", str(blocker / "state"),
               "--upstream", f"file://{tmp_path / 'backups'}", "--metrics-addr", "")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith(f"litefs-sidecar: {blocker / 'state'}")
    assert proc.stderr.splitlines()[-1].endswith(": not a directory")
    assert "Traceback" not in proc.stderr
