"""The Dockerfiles (the project image and the LiteFS node image) and litefs-exec, the node's process supervisor,
run for real with stand-ins for the application and the sidecar."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.deployfiles import DEPLOY, REPO, copies, dockerfile, exec_form

LITEFS_EXEC = DEPLOY / "fly" / "litefs-exec"


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: anchored at the context root, `**/` any directories, `*` within one."""
    out = ""
    for token in re.split(r"(\*\*/|\*|\?)", pattern.strip("/")):
        out += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the repository) out of the build context."""
    patterns = [_pattern(p) for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]  # a directory's pattern covers its files
    return any(p.fullmatch(prefix) for p in patterns for prefix in prefixes)


class TestProjectImage:
    """The top-level Dockerfile: python:3.11-slim, `pip install .`, entrypoint litefs-sidecar."""

    def test_base_install_and_entrypoint(self) -> None:
        ins = dockerfile(REPO / "Dockerfile")
        assert [i.args for i in ins if i.keyword == "FROM"] == ["python:3.11-slim"]
        assert any(i.keyword == "RUN" and "pip install ." in i.args for i in ins)
        entrypoint = [exec_form(i) for i in ins if i.keyword == "ENTRYPOINT"]
        assert entrypoint[-1] == ["litefs-sidecar"]
        with open(REPO / "pyproject.toml", "rb") as f:
            scripts = tomllib.load(f)["project"]["scripts"]
        assert scripts["litefs-sidecar"] == "sidecar.__main__:main"

    @pytest.mark.parametrize("path", [REPO / "Dockerfile", DEPLOY / "fly" / "node.Dockerfile"],
                             ids=lambda p: str(p.relative_to(REPO)))
    def test_copied_files_exist_and_are_not_dockerignored(self, path: Path) -> None:
        for src, _ in copies(path):
            assert (REPO / src).exists(), f"{path.name}: COPY {src}: no such file"
            assert not ignored(src), f"{path.name}: COPY {src}: excluded by .dockerignore"

    def test_dockerignore_keeps_the_tests_out(self) -> None:
        assert ignored("tests/conftest.py") and ignored(".git/HEAD") and ignored("sidecar/__pycache__/x.pyc")
        assert not ignored("sidecar/cli.py") and not ignored("deploy/fly/litefs-exec")


Wait = Callable[[Callable[[], bool]], None]


@pytest.fixture
def wait_until() -> Wait:
    def wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.02)
    return wait


@pytest.fixture
def stubs(tmp_path: Path) -> dict[str, object]:
    """A fake `litefs-sidecar` first on PATH, and a fake application: both log starts and SIGTERMs to files."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    program = f"""#!{sys.executable}
import os, signal, sys, time
from pathlib import Path
log, name = Path({str(log)!r}), sys.argv[1] if sys.argv[1:2] == ["app"] else "sidecar"
def note(what):
    with open(log, "a") as f:
        f.write(f"{{name}} {{what}} {{os.getpid()}} {{' '.join(sys.argv[1:])}}\\n")
def term(*_):
    note("term")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
note("start")
crash = Path({str(tmp_path / 'crash')!r})
if name == "sidecar" and crash.exists():
    crash.unlink()
    note("crash")
    sys.exit(3)
exit_code = Path({str(tmp_path / 'app-exit')!r})
while True:
    if name == "app" and exit_code.exists():
        sys.exit(int(exit_code.read_text()))
    time.sleep(0.02)
"""
    for name in ("litefs-sidecar", "app"):
        (bin_dir / name).write_text(program)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LITEFS_EXEC_RESTART_DELAY": "0.1"}
    return {"env": env, "log": log, "dir": tmp_path}


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


class TestLitefsExec:
    """litefs-exec runs the application and `litefs-sidecar run` side by side under LiteFS's exec."""

    def start(self, stubs: dict[str, object]) -> subprocess.Popen[bytes]:
        env, tmp = stubs["env"], stubs["dir"]
        assert isinstance(env, dict) and isinstance(tmp, Path)
        with open(tmp / "stderr", "wb") as err:
            return subprocess.Popen([str(LITEFS_EXEC), "app", "app", "--addr", ":8081"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)

    def test_starts_the_sidecar_with_its_config(self, stubs: dict[str, object], wait_until: Wait) -> None:
        log = stubs["log"]
        assert isinstance(log, Path)
        proc = self.start(stubs)
        try:
            wait_until(lambda: len(lines(log)) == 2)
            starts = sorted(line.split(" ", 3)[::3] for line in lines(log))
            assert starts == [["app", "app --addr :8081"],
                              ["sidecar", "run --config /etc/litefs-sidecar/sidecar.toml"]]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)

    def test_a_signal_stops_both_and_exits_zero(self, stubs: dict[str, object], wait_until: Wait) -> None:
        log = stubs["log"]
        assert isinstance(log, Path)
        proc = self.start(stubs)
        wait_until(lambda: len(lines(log)) == 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert sorted(line.split()[0] for line in lines(log) if " term " in line) == ["app", "sidecar"]

    def test_the_apps_exit_stops_the_sidecar_and_is_passed_on(self, stubs: dict[str, object],
                                                               wait_until: Wait) -> None:
        log, tmp = stubs["log"], stubs["dir"]
        assert isinstance(log, Path) and isinstance(tmp, Path)
        proc = self.start(stubs)
        wait_until(lambda: len(lines(log)) == 2)
        (tmp / "app-exit").write_text("7")
        assert proc.wait(10) == 7
        assert [line.split()[:2] for line in lines(log) if " term " in line] == [["sidecar", "term"]]

    def test_a_failed_sidecar_is_restarted_and_the_app_keeps_running(self, stubs: dict[str, object],
                                                                      wait_until: Wait) -> None:
        log, tmp = stubs["log"], stubs["dir"]
        assert isinstance(log, Path) and isinstance(tmp, Path)
        (tmp / "crash").touch()
        proc = self.start(stubs)
        try:
            wait_until(lambda: sum(1 for line in lines(log) if line.startswith("sidecar start")) == 2)
            assert any(line.startswith("sidecar crash") for line in lines(log))
            assert proc.poll() is None
            assert sum(1 for line in lines(log) if line.startswith("app start")) == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        assert "litefs-sidecar exited with status 3; restarting it" in (tmp / "stderr").read_text()
