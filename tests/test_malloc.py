"""The program's memory: the long-running commands cap glibc's malloc arenas (sidecar.malloc), and nothing only
a console would use is imported (sidecar.__main__)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

COUNT_ARENAS = """
import ctypes, ctypes.util, os, sys, tempfile, threading
from sidecar.malloc import limit_arenas
if sys.argv[1] == "limited":
    assert limit_arenas(2)
def churn():
    for _ in range(2000):
        blocks = [bytearray(4096) for _ in range(50)]
        del blocks
threads = [threading.Thread(target=churn) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = tempfile.mktemp()
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
print(open(path).read().count("<heap nr="))
os.unlink(path)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(M_ARENA_MAX) is glibc's")
def test_threads_share_at_most_two_arenas() -> None:
    """Eight threads allocating at once get arenas of their own, unless the cap is set (as `main` sets it)."""
    def arenas(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", COUNT_ARENAS, mode], check=True, capture_output=True, text=True)
        return int(out.stdout)
    assert arenas("limited") <= 2
    assert arenas("free") > 2


def test_the_program_leaves_out_what_structlog_would_import_for_consoles(tmp_path: Path) -> None:
    """structlog imports rich (7 MiB with pygments) whenever it is installed; the program marks it absent."""
    fake = tmp_path / "site" / "rich"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake.parent), *sys.path]), "PATH": os.environ["PATH"]}
    subprocess.run([sys.executable, "-c", "import structlog"], env=env, check=True)
    assert (tmp_path / "imported").exists()  # what structlog does on its own
    (tmp_path / "imported").unlink()
    proc = subprocess.run([sys.executable, "-m", "sidecar", "--version"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("litefs-sidecar"), proc.stderr
    assert not (tmp_path / "imported").exists()
