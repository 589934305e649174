"""Every metric README.md and docs/runbook.md name is one a scrape of `/metrics` has, by that name (PromQL finds
nothing under a name that is not exposed)."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
from prometheus_client import generate_latest

from sidecar.daemon.metrics import Metrics as SidecarMetrics
from tests.server.conftest import SNAPSHOT, Running, post

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "docs" / "runbook.md"]


def samples(text: str) -> set[str]:
    """The sample names of an exposition (a histogram's `_bucket`, `_sum` and `_count` each)."""
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


async def test_every_documented_metric_is_exposed_by_that_name(server: Running, http: aiohttp.ClientSession) -> None:
    await post(http, server.url, "app.db", SNAPSHOT)
    await post(http, server.url, "app.db", SNAPSHOT, "nope-nope-nope-nope")  # a rejection
    await server.engine.tick()
    async with http.get(f"{server.url}/metrics") as resp:
        exposed = samples(await resp.text())
    sidecar = SidecarMetrics()
    sidecar.lag.labels("app.db").set(0)
    sidecar.diverged.labels("app.db").set(0)
    exposed |= samples(generate_latest(sidecar.registry).decode())
    named = {(doc.name, name) for doc in DOCS for name in re.findall(r"`((?:lfsc|litefs_sidecar)_\w+)`",
                                                                     doc.read_text())}
    assert named
    missing = sorted((doc, name) for doc, name in named if name not in exposed and f"{name}_bucket" not in exposed)
    assert not missing, f"named in the docs but not exposed: {missing}"
