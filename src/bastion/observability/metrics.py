"""Prometheus metrics, per model and version.

With several worker processes, prometheus-client's multiprocess mode is used
(``PROMETHEUS_MULTIPROC_DIR`` must be set before prometheus_client is imported; the
server launcher does that), and ``/metrics`` on any worker reports the sum of all.
Label children are resolved once per model version, not per request: ``labels()`` takes
a lock and a dict lookup that would otherwise show on the hot path.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_mp

from bastion.engine.batcher import BatchObserver

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

OUTCOMES = ("success", "client_error", "rejected", "server_error")


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """All server metrics in one registry (a fresh one per server, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "bastion_inference_requests_total",
            "Inference requests by model, version and outcome",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.request_latency = Histogram(
            "bastion_inference_request_duration_seconds",
            "Time from decoded request to response in the data plane",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_latency = Histogram(
            "bastion_inference_queue_duration_seconds",
            "Time a request waited in the model's batch queue",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_latency = Histogram(
            "bastion_inference_compute_duration_seconds",
            "Time of one runtime.predict call on a batch",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bastion_inference_batch_size",
            "Rows per runtime.predict call",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "bastion_inference_queue_depth",
            "Requests waiting in the model's batch queue",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_ready = Gauge(
            "bastion_model_ready",
            "1 when the model version is loaded and serving",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )

    def for_version(self, model: str, version: str) -> VersionMetrics:
        return VersionMetrics(self, model, version)

    def render(self) -> bytes:
        if multiprocess_enabled():
            registry = CollectorRegistry()
            prom_mp.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class VersionMetrics(BatchObserver):
    """The label children of one model version, resolved once."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._metrics = metrics
        self._labels = (model, version)
        self.outcome = {o: metrics.requests.labels(model, version, o) for o in OUTCOMES}
        self.request_latency = metrics.request_latency.labels(model, version)
        self._queue = metrics.queue_latency.labels(model, version)
        self._compute = metrics.compute_latency.labels(model, version)
        self._batch = metrics.batch_size.labels(model, version)
        self._depth = metrics.queue_depth.labels(model, version)
        self._ready = metrics.model_ready.labels(model, version)

    def set_ready(self, ready: bool) -> None:
        self._ready.set(1 if ready else 0)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def batch_done(self, rows: int, requests: int, queue_s: list[float], compute_s: float) -> None:
        self._batch.observe(rows)
        self._compute.observe(compute_s)
        observe = self._queue.observe
        for q in queue_s:
            observe(q)
