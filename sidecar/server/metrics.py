"""The server's Prometheus metrics, each server with its own registry (tests run many servers at once)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sidecar.engine import Engine


class Metrics:
    """Counters the handlers bump, and gauges read from the engine's status copies at each scrape."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.uploads = Counter("lfsc_uploads", "Accepted LTX uploads", ["cluster"], registry=r)
        self.upload_bytes = Counter("lfsc_upload_bytes", "Bytes of accepted LTX uploads", ["cluster"], registry=r)
        self.rejections = Counter("lfsc_rejections", "Refused requests by error code", ["code"], registry=r)
        self.storage_errors = Counter("lfsc_storage_errors", "Object-store failures", registry=r)
        self.hwm_lag = Gauge("lfsc_hwm_lag_txids", "Accepted TXID minus HWM", ["cluster", "db"], registry=r)
        self.request_seconds = Histogram("lfsc_request_seconds", "Request duration", ["route"], registry=r)
        self.build_seconds = Histogram("lfsc_build_seconds", "Engine flushes (level 0) and compactions, by level",
                                       ["level"], registry=r, buckets=(.005, .01, .05, .1, .5, 1, 5, 10, 60, 300))
        self.log_commits = Gauge("lfsc_upload_log_commits", "Group commits of the upload log (fdatasync calls)",
                                 registry=r)
        self.log_segments = Gauge("lfsc_upload_log_segments", "Upload log segments on disk (grows while the "
                                  "store is unreachable)", registry=r)
        self.pending_uploads = Gauge("lfsc_pending_uploads", "Accepted uploads not yet in the store", registry=r)
        self.job_failures = Gauge("lfsc_job_failures", "Failures of a database's job since start (flush, L1, L2, "
                                  "snapshot, retention)", ["cluster", "db", "job"], registry=r)
        self.jobs_failing = Gauge("lfsc_jobs_failing", "Database jobs failing right now", registry=r)

    def observe_build(self, level: int, seconds: float) -> None:
        self.build_seconds.labels(str(level)).observe(seconds)

    def render(self, engine: Engine) -> bytes:
        """The exposition text, with the engine's gauges brought up to date."""
        statuses = engine.statuses()
        self.log_commits.set(engine.log_commits)
        self.log_segments.set(engine.log_segments)
        self.pending_uploads.set(sum(st.pending_files for st in statuses))
        failing = 0
        for st in statuses:
            self.hwm_lag.labels(st.cluster, st.name).set(st.pos.txid - st.hwm)
            for job, (total, now, _) in st.jobs.items():
                self.job_failures.labels(st.cluster, st.name, job).set(total)
                failing += bool(now)
        self.jobs_failing.set(failing)
        return generate_latest(self.registry)


__all__ = ["Metrics"]
