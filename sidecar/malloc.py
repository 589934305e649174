"""Fewer glibc malloc arenas: `main` sets the cap for every command; it matters for `run` and `serve`.

glibc gives each thread that allocates under contention an arena of its own (up to 8 per core) and keeps what
is freed there for that arena's next use. The sidecar's worker threads (building uploads, writing the store)
each held a few such MiB: two arenas, as `MALLOC_ARENA_MAX=2` would set, cut its RSS by 3 MiB at 1,000 tx/s
with no change in CPU (`bench/sidecar_bench.py`). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # glibc's <malloc.h>


def limit_arenas(n: int = 2) -> bool:
    """Let glibc malloc use at most `n` arenas from now on; False where there is no glibc `mallopt`."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, n))


__all__ = ["limit_arenas"]
