"""The server's Prometheus metrics, each server with its own registry (tests run many servers at once).

Counters the request handlers bump live here; everything about the engine and its store is read from the engine's
status copies at each scrape (`EngineCollector`), so a metric can never drift from what the engine holds.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from sidecar.engine import Engine
from sidecar.storage.base import BUCKETS


class Metrics:
    """Request-side counters and histograms; `render` adds the engine's."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.uploads = Counter("lfsc_uploads", "Accepted LTX uploads", ["cluster"], registry=r)
        self.upload_bytes = Counter("lfsc_upload_bytes", "Bytes of accepted LTX uploads", ["cluster"], registry=r)
        self.rejections = Counter("lfsc_rejections", "Refused requests by error code", ["code"], registry=r)
        self.storage_errors = Counter("lfsc_storage_errors", "Object-store failures answered to a client", registry=r)
        self.forwarded = Counter("lfsc_forwarded", "Requests forwarded to the process that writes their cluster",
                                 registry=r)
        self.handed = Counter("lfsc_connections_handed", "Connections handed whole to the process on this machine "
                              "that writes their cluster", registry=r)
        self.request_seconds = Histogram("lfsc_request_seconds", "Request duration", ["route"], registry=r)
        self.build_seconds = Histogram("lfsc_build_seconds", "Engine flushes (level 0) and compactions, by level",
                                       ["level"], registry=r, buckets=(.005, .01, .05, .1, .5, 1, 5, 10, 60, 300))
        self._engine: EngineCollector | None = None
        # Each request's children, looked up once per label value: `labels()` takes a lock and builds a tuple.
        self._accepted: dict[str, tuple[Counter, Counter]] = {}
        self._routes: dict[str, Histogram] = {}

    def accepted(self, cluster: str, nbytes: int) -> None:
        """One upload of `nbytes` accepted for `cluster`."""
        children = self._accepted.get(cluster)
        if children is None:
            children = self._accepted[cluster] = (self.uploads.labels(cluster), self.upload_bytes.labels(cluster))
        children[0].inc()
        children[1].inc(nbytes)

    def observe_request(self, route: str, seconds: float) -> None:
        child = self._routes.get(route)
        if child is None:
            child = self._routes[route] = self.request_seconds.labels(route)
        child.observe(seconds)

    def observe_build(self, level: int, seconds: float) -> None:
        self.build_seconds.labels(str(level)).observe(seconds)

    def watch(self, engine: Engine) -> None:
        """Export the engine's state at every scrape."""
        if self._engine is None:
            self._engine = EngineCollector(engine)
            self.registry.register(self._engine)

    def render(self, engine: Engine) -> bytes:
        self.watch(engine)
        return generate_latest(self.registry)


class EngineCollector:
    """The engine's gauges and counters, read from its status copies when scraped."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list[Metric]:
        return []  # no fixed description: the families depend on the databases known at scrape time

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        now = engine.clock()
        statuses = engine.statuses()
        lag_txids = GaugeMetricFamily("lfsc_hwm_lag_txids", "Accepted TXID minus HWM", labels=["cluster", "db"])
        lag_seconds = GaugeMetricFamily("lfsc_hwm_lag_seconds", "Age of the oldest acknowledged upload not yet in "
                                        "the store (0 when the HWM is the position)", labels=["cluster", "db"])
        failures = GaugeMetricFamily("lfsc_job_failures", "Failures of a database's job since start (flush, L1, "
                                     "L2, snapshot, retention, set_aside, lease, checksums)",
                                     labels=["cluster", "db", "job"])
        set_aside = GaugeMetricFamily("lfsc_set_aside_files", "Copies of a database's stored files set aside in the "
                                      "store (of another history), kept until older than the snapshot retention",
                                      labels=["cluster", "db"])
        worst, failing = 0.0, 0
        for st in statuses:
            lag_txids.add_metric([st.cluster, st.name], st.pos.txid - st.hwm)
            lag = max(0.0, now - st.oldest_pending) if st.oldest_pending else 0.0
            worst = max(worst, lag)
            lag_seconds.add_metric([st.cluster, st.name], lag)
            set_aside.add_metric([st.cluster, st.name], st.set_aside)
            for job, (total, in_a_row, _) in st.jobs.items():
                failures.add_metric([st.cluster, st.name, job], total)
                failing += bool(in_a_row)
        yield lag_txids
        yield lag_seconds
        yield GaugeMetricFamily("lfsc_hwm_lag_seconds_max", "The largest HWM lag of any database", value=worst)
        yield failures
        yield set_aside
        yield GaugeMetricFamily("lfsc_jobs_failing", "Database jobs failing right now", value=failing)
        yield GaugeMetricFamily("lfsc_pending_uploads", "Accepted uploads not yet in the store",
                                value=sum(st.pending_files for st in statuses))
        yield GaugeMetricFamily("lfsc_pending_bytes", "Bytes of accepted uploads not yet in the store",
                                value=sum(st.pending_bytes for st in statuses))
        yield GaugeMetricFamily("lfsc_upload_log_commits", "Group commits of the upload log (fdatasync calls)",
                                value=engine.log_commits)
        yield GaugeMetricFamily("lfsc_upload_log_segments", "Upload log segments on disk (grows while the store is "
                                "unreachable)", value=engine.log_segments)
        yield GaugeMetricFamily("lfsc_upload_log_bytes", "Bytes of the upload log on disk", value=engine.log_bytes)
        yield GaugeMetricFamily("lfsc_disk_full", "1 while the state directory's disk refuses upload log writes",
                                value=1 if engine.disk_full else 0)
        yield GaugeMetricFamily("lfsc_flush_concurrency", "Flushes the engine lets run at once (adapts to the store)",
                                value=engine.limit.value)
        yield CounterMetricFamily("lfsc_flushes", "L0 files written", value=engine.flushes)
        yield CounterMetricFamily("lfsc_upload_log_quarantined", "Upload log records refused at replay",
                                  value=engine.quarantined)
        yield CounterMetricFamily("lfsc_stray_files_deleted", "Files a previous owner wrote after its lease had run "
                                  "out, found and deleted by this engine's sweeps", value=engine.strays_deleted)
        stats = engine.store_stats()
        requests = CounterMetricFamily("lfsc_store_requests", "Object-store requests by operation", labels=["op"])
        errors = CounterMetricFamily("lfsc_store_request_errors", "Object-store requests that failed, by operation",
                                     labels=["op"])
        seconds = HistogramMetricFamily("lfsc_store_request_seconds", "Object-store request duration",
                                        labels=["op"])
        for op in sorted(stats.count):
            requests.add_metric([op], stats.count[op])
            errors.add_metric([op], stats.errors.get(op, 0))
            bounds = [("+Inf" if b == float("inf") else repr(b), c) for b, c in zip(BUCKETS, stats.buckets[op],
                                                                                    strict=True)]
            seconds.add_metric([op], bounds, stats.seconds[op])
        yield requests
        yield errors
        yield seconds


__all__ = ["EngineCollector", "Metrics"]
