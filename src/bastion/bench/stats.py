"""Statistics of one load run: latency percentiles, throughput, errors, schedule lag.

**Percentile definition.** Linear interpolation between the two closest ranks, which is
numpy's default (``np.percentile(..., method="linear")``, Hyndman & Fan type 7): for ``n``
sorted values ``x[0..n-1]`` the ``p``-th percentile sits at rank ``h = (n - 1) * p / 100``
and is ``x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)])``. So p0 is the
minimum, p100 the maximum, and p50 of an even count is the mean of the middle two. wrk's
HdrHistogram percentiles are not exactly this (they are bucketed), which is one reason a
result records which generator produced it.

**What counts.** Latency is over every request that got an HTTP response, whatever its
status (as wrk and hey do), measured by the open-loop generator from the request's
*scheduled* send time. Requests that never got a response (transport errors, timeouts)
and requests that were never sent (dropped: every connection busy) have no latency; they
count as errors, so a server that sheds load cannot look fast without its error rate
showing it. Throughput counts 2xx responses only.

Percentiles of two runs cannot be combined from their summaries, so :class:`RunStats`
keeps its raw samples (a few MB for a 60 s run at a few hundred req/s) and ``merge``
recomputes from them; stats read back from JSON without samples, or parsed from a tool
that only prints percentiles (wrk), cannot be merged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p25", 25.0),
    ("p50", 50.0),
    ("p75", 75.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
)
SUMMARY_KEYS: tuple[str, ...] = ("count", "min", *(k for k, _ in PERCENTILES), "max", "mean")


def percentile(values: Sequence[float] | np.ndarray, p: float) -> float:
    """The ``p``-th percentile (0..100) by linear interpolation (see the module docstring)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("percentile of no values")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile {p} outside 0..100")
    return float(np.percentile(arr, p, method="linear"))


@dataclass(frozen=True)
class Summary:
    """Distribution summary of one quantity (milliseconds for latency and lag).

    An empty summary has ``count == 0`` and NaN everywhere else, so it renders as "n/a"
    instead of a misleading zero.
    """

    count: int
    min: float
    p25: float
    p50: float
    p75: float
    p90: float
    p99: float
    p999: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: Iterable[float] | np.ndarray) -> Summary:
        arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
        if arr.size == 0:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan, nan, nan, nan)
        qs = np.percentile(arr, [p for _, p in PERCENTILES], method="linear")
        return cls(
            count=int(arr.size),
            min=float(arr.min()),
            p25=float(qs[0]),
            p50=float(qs[1]),
            p75=float(qs[2]),
            p90=float(qs[3]),
            p99=float(qs[4]),
            p999=float(qs[5]),
            max=float(arr.max()),
            mean=float(arr.mean()),
        )

    def get(self, key: str) -> float:
        """By the names in ``SUMMARY_KEYS`` ("p99.9" included)."""
        return float(self.p999 if key == "p99.9" else getattr(self, key))

    def to_dict(self) -> dict[str, float | int | None]:
        # NaN is not JSON; None is the honest "no value".
        out: dict[str, float | int | None] = {}
        for key in SUMMARY_KEYS:
            value = self.get(key) if key != "count" else self.count
            out[key] = None if isinstance(value, float) and math.isnan(value) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        def num(key: str) -> float:
            value = d.get(key)
            return math.nan if value is None else float(value)

        return cls(
            count=int(d.get("count") or 0),
            min=num("min"),
            p25=num("p25"),
            p50=num("p50"),
            p75=num("p75"),
            p90=num("p90"),
            p99=num("p99"),
            p999=num("p99.9"),
            max=num("max"),
            mean=num("mean"),
        )


class RecordLike(Protocol):
    """What ``RunStats.from_records`` reads of a request (``openloop.RequestRecord``).

    Times are seconds on one monotonic clock; ``sent_at`` is None for a dropped request,
    ``done_at`` None when no response came; ``status`` 0 when there was no HTTP status.
    """

    scheduled_at: float
    sent_at: float | None
    done_at: float | None
    status: int
    bytes: int
    error: str | None


@dataclass
class RunStats:
    """Everything one run measured, client side.

    ``duration_s`` is the measurement window used for throughput. For open-loop runs it
    runs from the window's first scheduled send to the last response of a measured
    request, so a server that falls behind and drains its backlog after the schedule ends
    gets a lower throughput, not the offered rate.
    """

    duration_s: float
    requests: int  # measured requests: scheduled in the window (open loop) or completed (closed loop)
    ok: int  # 2xx responses
    status_counts: dict[str, int] = field(default_factory=dict)  # "200": n, ...
    transport_errors: dict[str, int] = field(default_factory=dict)  # "timeout": n, "connection reset": n
    dropped: int = 0  # never sent: every connection busy and max_connections reached
    latency_ms: Summary = field(default_factory=lambda: Summary.of([]))
    lag_ms: Summary = field(default_factory=lambda: Summary.of([]))  # sent_at - scheduled_at
    send_rate: float | None = None  # achieved sends per second (open loop)
    offered_rate: float | None = None  # what the schedule asked for
    response_bytes: int = 0
    latency_samples: np.ndarray | None = field(default=None, repr=False, compare=False)
    lag_samples: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def responses(self) -> int:
        return sum(self.status_counts.values())

    @property
    def errors(self) -> int:
        """Non-2xx responses + transport errors + dropped requests."""
        return self.responses - self.ok + sum(self.transport_errors.values()) + self.dropped

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def throughput(self) -> float:
        """Successful (2xx) responses per second of the window."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    # ------------------------------------------------------------------ building

    @classmethod
    def from_records(
        cls, records: Sequence[RecordLike], *, window_start: float | None = None, offered_rate: float | None = None
    ) -> RunStats:
        """Stats of the given (already warm-up-filtered) records.

        ``window_start`` is when the measured window began on the records' clock (default:
        the first scheduled time); the window ends at the last response or failure.
        """
        if not records:
            return cls(duration_s=0.0, requests=0, ok=0, offered_rate=offered_rate)
        start = min(r.scheduled_at for r in records) if window_start is None else window_start
        status: dict[str, int] = {}
        errors: dict[str, int] = {}
        latencies: list[float] = []
        lags: list[float] = []
        sends: list[float] = []
        dropped = ok = nbytes = 0
        end = start
        for r in records:
            if r.sent_at is None:
                dropped += 1
                continue
            sends.append(r.sent_at)
            lags.append((r.sent_at - r.scheduled_at) * 1e3)
            if r.done_at is not None:
                end = max(end, r.done_at)
            if r.status > 0:
                status[str(r.status)] = status.get(str(r.status), 0) + 1
                ok += 200 <= r.status < 300
                nbytes += r.bytes
                assert r.done_at is not None
                latencies.append((r.done_at - r.scheduled_at) * 1e3)
            else:
                kind = r.error or "error"
                errors[kind] = errors.get(kind, 0) + 1
        send_rate = None
        if len(sends) >= 2:
            span = max(sends) - min(sends)
            # n sends span n - 1 intervals
            send_rate = (len(sends) - 1) / span if span > 0 else None
        lat = np.asarray(latencies, dtype=np.float64)
        lag = np.asarray(lags, dtype=np.float64)
        return cls(
            duration_s=max(0.0, end - start),
            requests=len(records),
            ok=int(ok),
            status_counts=dict(sorted(status.items())),
            transport_errors=dict(sorted(errors.items())),
            dropped=dropped,
            latency_ms=Summary.of(lat),
            lag_ms=Summary.of(lag),
            send_rate=send_rate,
            offered_rate=offered_rate,
            response_bytes=nbytes,
            latency_samples=lat,
            lag_samples=lag,
        )

    def merge(self, other: RunStats) -> RunStats:
        """Two runs pooled as one (e.g. repeats, or several generator processes at once).

        Counts add; percentiles are recomputed from the pooled samples; the window is the
        longer of the two (runs side by side; for runs back to back, sum the durations
        yourself). Rates are recomputed from the pooled counts.
        """
        if self.latency_samples is None or other.latency_samples is None:
            raise ValueError("cannot merge stats without raw samples: percentiles don't combine")
        lat = np.concatenate([self.latency_samples, other.latency_samples])
        lag = np.concatenate([_or_empty(self.lag_samples), _or_empty(other.lag_samples)])
        duration = max(self.duration_s, other.duration_s)
        return RunStats(
            duration_s=duration,
            requests=self.requests + other.requests,
            ok=self.ok + other.ok,
            status_counts=_add(self.status_counts, other.status_counts),
            transport_errors=_add(self.transport_errors, other.transport_errors),
            dropped=self.dropped + other.dropped,
            latency_ms=Summary.of(lat),
            lag_ms=Summary.of(lag),
            send_rate=_sum_opt(self.send_rate, other.send_rate),
            offered_rate=_sum_opt(self.offered_rate, other.offered_rate),
            response_bytes=self.response_bytes + other.response_bytes,
            latency_samples=lat,
            lag_samples=lag,
        )

    # ------------------------------------------------------------------ JSON

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "duration_s": self.duration_s,
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "throughput": self.throughput,
            "status_counts": self.status_counts,
            "transport_errors": self.transport_errors,
            "dropped": self.dropped,
            "latency_ms": self.latency_ms.to_dict(),
            "lag_ms": self.lag_ms.to_dict(),
            "send_rate": self.send_rate,
            "offered_rate": self.offered_rate,
            "response_bytes": self.response_bytes,
        }
        if samples and self.latency_samples is not None:
            d["latency_samples_ms"] = self.latency_samples.tolist()
            d["lag_samples_ms"] = _or_empty(self.lag_samples).tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunStats:
        # errors/error_rate/throughput are derived: written for readers, recomputed here.
        lat = d.get("latency_samples_ms")
        lag = d.get("lag_samples_ms")
        return cls(
            duration_s=float(d["duration_s"]),
            requests=int(d["requests"]),
            ok=int(d["ok"]),
            status_counts={str(k): int(v) for k, v in d.get("status_counts", {}).items()},
            transport_errors={str(k): int(v) for k, v in d.get("transport_errors", {}).items()},
            dropped=int(d.get("dropped", 0)),
            latency_ms=Summary.from_dict(d.get("latency_ms", {})),
            lag_ms=Summary.from_dict(d.get("lag_ms", {})),
            send_rate=d.get("send_rate"),
            offered_rate=d.get("offered_rate"),
            response_bytes=int(d.get("response_bytes", 0)),
            latency_samples=None if lat is None else np.asarray(lat, dtype=np.float64),
            lag_samples=None if lag is None else np.asarray(lag, dtype=np.float64),
        )

    def to_json(self, *, samples: bool = False) -> str:
        return orjson.dumps(self.to_dict(samples=samples), option=orjson.OPT_SORT_KEYS).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> RunStats:
        return cls.from_dict(orjson.loads(text))


def _or_empty(a: np.ndarray | None) -> np.ndarray:
    return np.zeros(0) if a is None else a


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def _sum_opt(a: float | None, b: float | None) -> float | None:
    if a is None and b is None:
        return None
    return (a or 0.0) + (b or 0.0)
