"""`run --data-dir` naming a directory that does not exist: said at start and in /healthz, not silently idle."""

from __future__ import annotations

import aiohttp
import structlog

from tests.daemon.conftest import Env


async def test_a_missing_data_dir_is_warned_about_and_shown_in_healthz(env: Env) -> None:
    missing = env.tmp / "nonexistent"
    with structlog.testing.capture_logs() as logs:
        sidecar = await env.start(data_dir=missing)
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["data_dir"] == str(missing) and "does not exist" in warning["event"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sidecar.url}/healthz") as resp:
            health = await resp.json()
        assert health["data_dir"] == str(missing)
        assert health["warnings"] == [warning["event"]]
        (missing / "dbs").mkdir(parents=True)  # LiteFS starts after all: the warning goes
        async with http.get(f"{sidecar.url}/healthz") as resp:
            assert (await resp.json())["warnings"] == []
