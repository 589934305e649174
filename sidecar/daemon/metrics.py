"""The sidecar's `/metrics` (Prometheus) and `/healthz` on a local port."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.uploads = Counter("litefs_sidecar_uploads", "Uploads accepted upstream", ["db", "kind"], registry=r)
        self.bytes = Counter("litefs_sidecar_upload_bytes", "Bytes of accepted uploads", ["db"], registry=r)
        self.errors = Counter("litefs_sidecar_errors", "Failures by kind", ["kind"], registry=r)
        self.pruned = Counter("litefs_sidecar_pruned_files", "Local LTX files deleted under the HWM", ["db"],
                              registry=r)
        self.lag = Gauge("litefs_sidecar_lag_seconds", "How long the oldest transaction upstream lacks has waited, "
                         "or, when the last tick shipped everything, how long the oldest one it shipped had; 0 idle",
                         ["db"], registry=r)
        self.pending_files = Gauge("litefs_sidecar_pending_files", "Local LTX files upstream lacks", ["db"],
                                   registry=r)
        self.pending_bytes = Gauge("litefs_sidecar_pending_bytes", "Bytes of local LTX files upstream lacks", ["db"],
                                   registry=r)
        self.hwm = Gauge("litefs_sidecar_hwm_txid", "High-water mark upstream reported (upstream TXID)", ["db"],
                         registry=r)
        self.last_ship = Gauge("litefs_sidecar_last_ship_timestamp_seconds", "When the last upload was accepted",
                               ["db"], registry=r)
        self.diverged = Gauge("litefs_sidecar_db_error", "1 while a database cannot be shipped or pruned, or a "
                              "job of its in-process engine (flush, compaction, retention) is failing", ["db"],
                              registry=r)
        self.primary = Gauge("litefs_sidecar_primary", "1 on the primary, 0 on a replica", registry=r)

    def forget(self, db: str) -> None:
        """Remove every series labelled `db` (a database that no longer exists): none stays at its last value."""
        for metric in (self.bytes, self.pruned, self.lag, self.pending_files, self.pending_bytes, self.hwm,
                       self.last_ship, self.diverged):
            metric.remove(db)
        kinds = {s.labels["kind"] for family in self.uploads.collect() for s in family.samples if s.labels["db"] == db}
        for kind in kinds:
            self.uploads.remove(db, kind)


async def start_metrics(metrics: Metrics, health: Callable[[], dict[str, Any]], addr: str
                        ) -> tuple[web.AppRunner, str]:
    """Serve `/metrics` and `/healthz` (the JSON `health()` returns) on `addr` (host:port; port 0 picks one);
    returns (runner, url)."""
    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(health())

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = addr.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port))  # "[::]:9091" listens on every IPv6 address
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    return runner, f"http://{bound[0]}:{bound[1]}"


__all__ = ["Metrics", "start_metrics"]
