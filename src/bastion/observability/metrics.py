"""Prometheus metrics, per model and version.

With several worker processes, prometheus-client's multiprocess mode is used
(``PROMETHEUS_MULTIPROC_DIR`` must be set before prometheus_client is imported; the
server launcher does that), and ``/metrics`` on any worker reports the sum of all.
Label children are resolved once per model version, and observations are tallied in
plain numbers and flushed in bulk (see ``_Tally``): prometheus-client's per-call locking
would otherwise show on the hot path.
"""

from __future__ import annotations

import asyncio
import os
import sys
import weakref
from bisect import bisect_left
from typing import Any

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
        self._versions: weakref.WeakSet[VersionMetrics] = weakref.WeakSet()
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
        self.partition_latency = Histogram(
            "bastion_partition_part_seconds",
            "Time of each part of a partitioned model per batch: the head in the trusted worker (with the "
            "channel round trip), the tail in this process",
            ["model", "version", "part"],
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
        self.zoo_selections = Counter(
            "bastion_zoo_selections_total",
            "Variants chosen for zoo requests; feasible=false when no variant met the targets",
            ["zoo", "variant", "feasible"],
            registry=r,
        )
        self.zoo_requests = Counter(
            "bastion_zoo_requests_total",
            "Zoo requests by whether the serving variant met the targets: met, missed_accuracy, "
            "missed_latency, missed_both, or rejected (no variant feasible); goodput = met / all",
            ["zoo", "outcome"],
            registry=r,
        )
        # security events: rare by nature, so counted directly (no tally)
        self.auth_failures = Counter(
            "bastion_auth_failures_total",
            "Requests refused for missing or invalid credentials (401)",
            ["transport", "reason"],
            registry=r,
        )
        self.forbidden = Counter(
            "bastion_forbidden_total",
            "Requests refused because the key's scope or role does not allow them (403)",
            ["tenant"],
            registry=r,
        )
        self.limited = Counter(
            "bastion_rate_limited_total",
            "Requests refused with 429 by tenant; limit=rate (token bucket) or quota (budget exhausted)",
            ["tenant", "limit"],
            registry=r,
        )
        self.extraction_alerts = Counter(
            "bastion_extraction_alerts_total",
            "Tenants flagged by the extraction monitor (PRADA), by the action taken",
            ["tenant", "action"],
            registry=r,
        )
        # the HTTP front door (transport/http_server.py): answers decided on the headers
        # alone, and the bytes read and thrown away while closing after them
        self.http_early = Counter(
            "bastion_http_early_responses_total",
            "Requests answered on their headers without their body being kept (401, 403, 413, 429, ...)",
            ["status"],
            registry=r,
        )
        self.http_lingering = Counter(
            "bastion_http_lingering_closes_total",
            "Connections closed after an early answer by reading and discarding what the client still sent",
            registry=r,
        )
        self.http_discarded = Counter(
            "bastion_http_discarded_body_bytes_total",
            "Request body bytes read and discarded without being kept (refused requests, lingering closes)",
            registry=r,
        )
        self._http_stats: Any = None
        self._http_seen = (dict[int, int](), 0, 0)
        self.worker_up = Gauge(
            "bastion_trusted_worker_up",
            "1 when the attested channel to the trusted worker is up (confidential models can answer)",
            registry=r, multiprocess_mode="livemax",
        )
        self.worker_connects = Counter(
            "bastion_trusted_worker_connects_total",
            "Attested channels established with the trusted worker (more than one: it restarted)",
            registry=r,
        )
        self._worker: Any = None
        self._worker_seen = 0
        # models placed on a Ray cluster (runtimes/ray_runtime.py), read at each flush
        self.ray_replicas = Gauge(
            "bastion_ray_replicas",
            "Live Ray replicas of a placed model (all its loaded versions)",
            ["model"],
            registry=r, multiprocess_mode="livesum",
        )
        self.ray_retries = Counter(
            "bastion_ray_retries_total",
            "Batches of a placed model retried on another replica after a replica was lost",
            ["model"],
            registry=r,
        )
        self._ray_seen: dict[str, int] = {}
        # the store of the limits shared by the replicas (guard.redis_state.SharedState)
        self.shared_state_errors = Counter(
            "bastion_shared_state_errors_total",
            "Failed calls to the store of the rate limits and budgets shared by the replicas",
            ["backend", "op"],
            registry=r,
        )
        self.limiter_fallbacks = Counter(
            "bastion_limiter_fallback_total",
            "Limits decided by this process alone because the shared store was unreachable (fail open); "
            "limit=rate (requests) or quota (leases of queries)",
            ["limit"],
            registry=r,
        )
        self._shared: Any = None
        self._shared_seen: tuple[dict[str, int], dict[str, int]] = ({}, {})
        self.model_ready = Gauge(
            "bastion_model_ready",
            "1 when the model version is loaded and serving",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )

    def zoo_selection(self, zoo: str, variant: str, feasible: bool) -> None:
        # zoo and variant names come from the operator's repository, never from a request
        self.zoo_selections.labels(zoo, variant, "true" if feasible else "false").inc()

    def zoo_outcome(self, zoo: str, outcome: str) -> None:
        self.zoo_requests.labels(zoo, outcome).inc()

    def auth_failure(self, transport: str, reason: str) -> None:
        self.auth_failures.labels(transport, reason).inc()

    def forbidden_request(self, tenant: str) -> None:
        # tenant names come from the operator's key store, never from a request
        self.forbidden.labels(tenant).inc()

    def rate_limited(self, tenant: str, limit: str) -> None:
        self.limited.labels(tenant, limit).inc()

    def extraction_alert(self, tenant: str, action: str) -> None:
        self.extraction_alerts.labels(tenant, action).inc()

    def for_version(self, model: str, version: str) -> VersionMetrics:
        return VersionMetrics(self, model, version)

    def register_version(self, vm: VersionMetrics) -> None:
        self._versions.add(vm)

    def watch_http(self, stats: Any) -> None:
        """Report an ``HttpServer``'s ``stats`` (``transport.http_server.HttpStats``)."""
        self._http_stats = stats

    def watch_worker(self, client: Any) -> None:
        """Report a ``confidential.worker_client.WorkerClient``'s state."""
        self._worker = client

    def watch_shared_state(self, state: Any) -> None:
        """Report a ``guard.redis_state.SharedState``'s ``errors`` and ``fallbacks``."""
        self._shared = state

    def flush(self) -> None:
        """Move tallied observations into the Prometheus metrics (event-loop thread only)."""
        for vm in list(self._versions):
            vm.flush()
        worker = self._worker
        if worker is not None:
            self.worker_up.set(1 if worker.ready else 0)
            if worker.connects > self._worker_seen:
                self.worker_connects.inc(worker.connects - self._worker_seen)
                self._worker_seen = worker.connects
        self._flush_ray()
        stats = self._http_stats
        if stats is not None:
            seen_early, seen_linger, seen_discarded = self._http_seen
            for status, n in stats.early_responses.items():
                if n > seen_early.get(status, 0):
                    self.http_early.labels(str(status)).inc(n - seen_early.get(status, 0))
            if stats.lingering_closes > seen_linger:
                self.http_lingering.inc(stats.lingering_closes - seen_linger)
            if stats.discarded_bytes > seen_discarded:
                self.http_discarded.inc(stats.discarded_bytes - seen_discarded)
            self._http_seen = (dict(stats.early_responses), stats.lingering_closes, stats.discarded_bytes)
        shared = self._shared
        if shared is not None:
            seen_errors, seen_fallbacks = self._shared_seen
            errors, fallbacks = dict(shared.errors), dict(shared.fallbacks)
            for op, n in errors.items():
                if n > seen_errors.get(op, 0):
                    self.shared_state_errors.labels(shared.backend, op).inc(n - seen_errors.get(op, 0))
            for limit, n in fallbacks.items():
                if n > seen_fallbacks.get(limit, 0):
                    self.limiter_fallbacks.labels(limit).inc(n - seen_fallbacks.get(limit, 0))
            self._shared_seen = (errors, fallbacks)

    def _flush_ray(self) -> None:
        # only once a placed model loaded its runtime module: never imports it (nor ray)
        module = sys.modules.get("bastion.runtimes.ray_runtime")
        if module is None:
            return
        stats = module.replica_stats()
        for gone in set(self._ray_seen) - {model for model, _, _ in stats}:  # unloaded
            self.ray_replicas.labels(gone).set(0)
            self._ray_seen[gone] = 0
        for model, alive, retries in stats:
            self.ray_replicas.labels(model).set(alive)
            seen = self._ray_seen.get(model, 0)
            counter = self.ray_retries.labels(model)  # shown from 0 on, not from the first retry
            if retries > seen:
                counter.inc(retries - seen)
            self._ray_seen[model] = retries

    async def flush_periodically(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.flush()

    def render(self) -> bytes:
        self.flush()
        if multiprocess_enabled():
            registry = CollectorRegistry()
            prom_mp.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class _Tally:
    """A histogram's observations kept in plain Python numbers until the next flush.

    prometheus-client's ``observe`` takes a lock and walks the buckets on every call;
    on a path that costs tens of microseconds a request that shows. Here an observation
    is a bisect and two additions on the event-loop thread, and ``flush`` adds the totals
    to the real histogram (on every scrape, and once a second for multiprocess files).
    """

    __slots__ = ("_bounds", "_child", "counts", "total")

    def __init__(self, child: Any, bounds: tuple[float, ...]) -> None:
        self._child = child
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self._bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        # the child's per-bucket values are the same objects observe() would increment
        buckets = self._child._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
                counts[i] = 0
        self._child._sum.inc(self.total)
        self.total = 0.0


class VersionMetrics(BatchObserver):
    """The metrics of one model version: label children resolved once, observations
    tallied locally and flushed in bulk."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._labels = (model, version)
        self._outcome_children = {o: metrics.requests.labels(model, version, o) for o in OUTCOMES}
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.request_latency = _Tally(metrics.request_latency.labels(model, version), LATENCY_BUCKETS)
        self._queue = _Tally(metrics.queue_latency.labels(model, version), LATENCY_BUCKETS)
        self._compute = _Tally(metrics.compute_latency.labels(model, version), LATENCY_BUCKETS)
        self._metrics = metrics
        self._parts: dict[str, _Tally] = {}
        self._batch = _Tally(metrics.batch_size.labels(model, version), tuple(float(b) for b in BATCH_BUCKETS))
        self._depth = metrics.queue_depth.labels(model, version)
        self._ready = metrics.model_ready.labels(model, version)
        self._depth_now = 0
        self._depth_flushed = -1
        metrics.register_version(self)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def observe_part(self, part: str, seconds: float) -> None:
        """A partitioned model's part (``head`` / ``tail``): event-loop thread only."""
        tally = self._parts.get(part)
        if tally is None:
            child = self._metrics.partition_latency.labels(*self._labels, part)
            tally = self._parts[part] = _Tally(child, LATENCY_BUCKETS)
        tally.observe(seconds)

    def set_ready(self, ready: bool) -> None:
        self._ready.set(1 if ready else 0)

    def queue_depth(self, depth: int) -> None:
        self._depth_now = depth

    def batch_done(self, rows: int, requests: int, queue_s: list[float], compute_s: float) -> None:
        self._batch.observe(rows)
        self._compute.observe(compute_s)
        observe = self._queue.observe
        for q in queue_s:
            observe(q)

    def flush(self) -> None:
        for outcome, n in self.outcomes.items():
            if n:
                self._outcome_children[outcome].inc(n)
                self.outcomes[outcome] = 0
        for tally in (self.request_latency, self._queue, self._compute, self._batch, *self._parts.values()):
            tally.flush()
        if self._depth_now != self._depth_flushed:
            self._depth.set(self._depth_now)
            self._depth_flushed = self._depth_now
