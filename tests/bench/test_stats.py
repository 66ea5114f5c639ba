"""bastion.bench.stats against hand-computed values and numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from bastion.bench.stats import RunStats, Summary, percentile


@dataclass
class Rec:
    scheduled_at: float
    sent_at: float | None
    done_at: float | None
    status: int
    bytes: int = 10
    error: str | None = None


def test_percentile_is_linear_interpolation_by_hand() -> None:
    xs = [15.0, 20.0, 35.0, 40.0, 50.0]
    # rank h = (n - 1) p / 100 = 4p/100
    assert percentile(xs, 0) == 15.0
    assert percentile(xs, 25) == 20.0  # h = 1
    assert percentile(xs, 50) == 35.0  # h = 2
    assert percentile(xs, 40) == pytest.approx(29.0)  # h = 1.6: 20 + 0.6 * 15
    assert percentile(xs, 90) == pytest.approx(46.0)  # h = 3.6: 40 + 0.6 * 10
    assert percentile(xs, 100) == 50.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5  # even count: mean of the middle two
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_by_hand_and_against_numpy() -> None:
    s = Summary.of(range(1, 11))  # 1..10, h = 9p/100
    assert (s.count, s.min, s.max, s.mean) == (10, 1.0, 10.0, 5.5)
    assert s.p25 == pytest.approx(3.25)  # h = 2.25
    assert s.p50 == pytest.approx(5.5)
    assert s.p75 == pytest.approx(7.75)
    assert s.p90 == pytest.approx(9.1)  # h = 8.1
    assert s.p99 == pytest.approx(9.91)
    assert s.p999 == pytest.approx(9.991)

    rng = np.random.default_rng(3)
    xs = rng.lognormal(0, 1, 10_001)
    s = Summary.of(xs)
    for key, p in [("p25", 25), ("p50", 50), ("p75", 75), ("p90", 90), ("p99", 99), ("p99.9", 99.9)]:
        assert s.get(key) == pytest.approx(float(np.percentile(xs, p)), rel=1e-12)
    assert s.min == xs.min() and s.max == xs.max() and s.mean == pytest.approx(xs.mean())


def test_empty_summary_is_nan_and_null_in_json() -> None:
    s = Summary.of([])
    assert s.count == 0 and math.isnan(s.p50)
    d = s.to_dict()
    assert d["p50"] is None and d["count"] == 0
    assert math.isnan(Summary.from_dict(d).p99)


def _records() -> list[Rec]:
    return [
        Rec(0.000, 0.001, 0.011, 200),  # latency 11 ms, lag 1 ms
        Rec(0.010, 0.010, 0.030, 200),  # 20 ms, 0
        Rec(0.020, 0.023, 0.050, 503),  # 30 ms, 3
        Rec(0.030, 0.030, 0.070, 0, 0, "timeout"),  # no latency
        Rec(0.040, None, None, 0, 0, "dropped"),
        Rec(0.050, 0.052, 0.100, 200),  # 50 ms, 2
    ]


def test_from_records_counts_latency_from_schedule_and_errors() -> None:
    st = RunStats.from_records(_records(), window_start=0.0, offered_rate=100.0)
    assert st.requests == 6
    assert st.ok == 3
    assert st.status_counts == {"200": 3, "503": 1}
    assert st.transport_errors == {"timeout": 1}
    assert st.dropped == 1
    assert st.errors == 3  # 503 + timeout + dropped
    assert st.error_rate == pytest.approx(0.5)
    assert st.duration_s == pytest.approx(0.100)  # window start to the last response
    assert st.throughput == pytest.approx(30.0)
    assert st.latency_ms.count == 4
    assert st.latency_ms.min == pytest.approx(11.0)
    assert st.latency_ms.max == pytest.approx(50.0)
    assert st.latency_ms.p50 == pytest.approx(25.0)
    assert st.lag_ms.count == 5
    assert st.lag_ms.max == pytest.approx(3.0)
    assert st.lag_ms.p50 == pytest.approx(1.0)
    # 5 sends between 0.001 and 0.052: 4 intervals
    assert st.send_rate == pytest.approx(4 / 0.051)
    assert st.response_bytes == 40


def test_from_no_records() -> None:
    st = RunStats.from_records([])
    assert st.requests == 0 and st.throughput == 0.0 and st.error_rate == 0.0


def test_json_round_trip_with_and_without_samples() -> None:
    st = RunStats.from_records(_records(), offered_rate=100.0)
    back = RunStats.from_json(st.to_json())
    assert back == st  # samples are compare=False
    assert back.latency_samples is None
    assert back.errors == st.errors and back.throughput == pytest.approx(st.throughput)
    with pytest.raises(ValueError, match="samples"):
        back.merge(st)
    full = RunStats.from_json(st.to_json(samples=True))
    assert full.latency_samples is not None
    np.testing.assert_allclose(full.latency_samples, st.latency_samples)


def test_merge_recomputes_percentiles_from_pooled_samples() -> None:
    a = RunStats.from_records(_records(), window_start=0.0, offered_rate=100.0)
    b = RunStats.from_records([Rec(0.0, 0.0, 0.2, 200), Rec(0.1, 0.1, 0.4, 500)], window_start=0.0, offered_rate=50.0)
    m = a.merge(b)
    assert m.requests == 8 and m.ok == 4 and m.dropped == 1
    assert m.status_counts == {"200": 4, "500": 1, "503": 1}
    assert m.errors == 4
    assert m.offered_rate == 150.0
    pooled = [11.0, 20.0, 30.0, 50.0, 200.0, 300.0]
    assert m.latency_ms.p50 == pytest.approx(float(np.percentile(pooled, 50)))
    assert m.latency_ms.p99 == pytest.approx(float(np.percentile(pooled, 99)))
    assert m.duration_s == pytest.approx(0.4)
