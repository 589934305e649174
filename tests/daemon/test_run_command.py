"""`litefs-sidecar run` as a process, when it cannot start: one line naming the problem, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.emulator import LoadWriter
from sidecar.ltx import parse_filename
from tests.daemon.conftest import Env, eventually


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


def test_a_metrics_host_that_does_not_resolve_says_so(tmp_path: Path) -> None:
    """The resolver's words (Name or service not known, or a temporary failure), not "unknown error -2"."""
    proc = run("--data-dir", str(tmp_path / "data"), "--state-dir", str(tmp_path / "state"),
               "--upstream", "http://127.0.0.1:9", "--metrics-addr", "no-such-host.invalid:9091")
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.splitlines()[-2]
    assert line.startswith("litefs-sidecar: cannot serve metrics on no-such-host.invalid:9091 (--metrics-addr): ")
    assert "unknown error" not in line


@pytest.mark.parametrize(("env", "problem"), [
    ({"NOTIFY_SOCKET": "relative/sock"}, "NOTIFY_SOCKET='relative/sock': want an absolute path or @abstract-name"),
    ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "soon"}, "WATCHDOG_USEC='soon': want a positive number of microseconds"),
])
def test_malformed_systemd_variables_are_named_before_anything_starts(env: dict[str, str], problem: str,
                                                                       tmp_path: Path) -> None:
    """As `serve` reports them: exit 2, listed with the other configuration problems, the state dir untouched."""
    proc = subprocess.run([sys.executable, "-m", "sidecar", "run", "--state-dir", str(tmp_path / "state"),
                           "--data-dir", str(tmp_path / "data"), "--upstream", f"file://{tmp_path}/backups",
                           "--metrics-addr", "", "--batch-interval", "soon"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "litefs-sidecar: invalid configuration:",
        '  sidecar.batch_interval = "soon" (from flag --batch-interval): not a duration (examples: 500ms, 1s, 10m)',
        f"  {problem}"]
    assert not (tmp_path / "state").exists() and not (tmp_path / "backups").exists()


def test_a_state_dir_it_cannot_create_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run("--data-dir", str(tmp_path / "data"), "--state-dir", str(blocker / "state"),
               "--upstream", f"file://{tmp_path / 'backups'}", "--metrics-addr", "")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith(f"litefs-sidecar: {blocker / 'state'}")
    assert proc.stderr.splitlines()[-1].endswith(": not a directory")
    assert "Traceback" not in proc.stderr


async def test_run_on_a_file_upstream_makes_a_restore_point_every_second(env: Env, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`run --upstream file://…` with its defaults ships once a second and flushes one L0 file a second (not every
    10 s, as on S3); each L0 file ends at an upload's end, and that TXID restores to the node's checksum."""
    backups = tmp_path / "backups"
    log = tmp_path / "sidecar.log"
    argv = [sys.executable, "-m", "sidecar", "run", "--data-dir", str(env.node.data_dir), "--mount-dir",
            str(env.node.mount_dir), "--litefs-url", env.litefs_url, "--upstream", f"file://{backups}",
            "--state-dir", str(tmp_path / "state"), "--metrics-addr", "", "--log-format", "json"]
    l0 = backups / "default" / "app.db" / "ltx" / "0"

    def flushed() -> list[int]:
        return sorted(t[1] for p in l0.glob("*.ltx") if (t := parse_filename(p.name)) is not None)

    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out)
        try:
            async with LoadWriter(env.node, "app.db", rate=20, seed=3) as load:
                def uploads() -> list[int]:
                    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
                    return [int(e["txid"].split("-")[1], 16) for e in events if e["event"] == "batch_shipped"]
                await eventually(lambda: len(flushed()) >= 4, within=20)  # at 10 s a file: after 30 s
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    ends = flushed()
    assert set(ends) <= set(uploads())
    history = load.history
    url = f"file://{backups}/default/app.db"
    for txid in ends:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["restore", "--txid", f"{txid:016x}", "-o", str(tmp_path / "r.db"), url])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert out.startswith(f"restored TXID {txid:016x} ") and f"checksum {history[txid][1]:016x}" in out
