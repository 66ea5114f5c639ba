"""bastion.bench.results: JSON round trip and the Markdown table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from bastion.bench.results import BenchResult, load_results, machine_info, render_markdown, save_results
from bastion.bench.stats import RunStats


@dataclass
class Rec:
    scheduled_at: float
    sent_at: float | None
    done_at: float | None
    status: int
    bytes: int = 10
    error: str | None = None


def _stats() -> RunStats:
    recs = [Rec(i / 100, i / 100, i / 100 + 0.002 * (i + 1), 200 if i % 10 else 503) for i in range(100)]
    return RunStats.from_records(recs, window_start=0.0, offered_rate=100.0)


def _result(**kw: object) -> BenchResult:
    base: dict[str, object] = {
        "scenario": "malware",
        "framework": "bastion",
        "mode": "open-loop",
        "payload_bytes": 1234,
        "load": {"rate": 100, "duration_s": 1.0, "warmup_s": 0.0, "arrival": "fixed"},
        "stats": _stats(),
        "cpu_s": 0.045,
        "peak_rss_mib": 88.4,
        "versions": {"bastion": "0.1.0", "python": "3.11.7"},
        "command": "bastion bench --scenario malware",
        "date": "2026-11-22T03:00:00+00:00",
    }
    base.update(kw)
    return BenchResult(**base)  # type: ignore[arg-type]


def test_json_round_trip() -> None:
    r = _result()
    back = BenchResult.from_json(r.to_json())
    assert back.to_dict() == r.to_dict()
    assert back.stats == r.stats
    assert back.cpu_us_per_request == pytest.approx(0.045 / 90 * 1e6)
    assert back.machine == r.machine and "logical_cpus" in back.machine


def test_json_round_trip_keeps_samples_when_asked(tmp_path: Path) -> None:
    r = _result()
    path = tmp_path / "bench.json"
    save_results(path, [r, _result(framework="other", mode="saturation", load={"connections": 16})], samples=True)
    loaded = load_results(path)
    assert [x.framework for x in loaded] == ["bastion", "other"]
    merged = loaded[0].stats.merge(loaded[1].stats)  # samples came back, so merge works
    assert merged.requests == 200


def test_bad_input_is_refused() -> None:
    d = _result().to_dict()
    with pytest.raises(ValueError, match="mode"):
        BenchResult.from_dict({**d, "mode": "sideways"})
    with pytest.raises(ValueError, match="schema"):
        BenchResult.from_dict({**d, "schema": 99})


def test_missing_cpu_and_empty_stats_render_as_na() -> None:
    r = _result(cpu_s=None, peak_rss_mib=None, stats=RunStats.from_records([]))
    assert r.cpu_us_per_request is None
    back = BenchResult.from_json(r.to_json())
    assert back.stats.latency_ms.count == 0
    md = render_markdown([back])
    assert md.count("n/a") == 7 + 2  # the latency columns, CPU and RSS


def test_markdown_table() -> None:
    md = render_markdown([_result(), _result(framework="a|b", mode="saturation", load={"connections": 64})])
    lines = md.strip().splitlines()
    assert lines[0].startswith("| scenario | framework | mode | load | payload B | min ms | p25 ms")
    assert lines[1].startswith("|---|---|---|---|---:|")
    assert len(lines) == 4
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    st = _stats()
    assert row[:5] == ["malware", "bastion", "open-loop", "100 req/s fixed", "1,234"]
    assert row[5] == f"{st.latency_ms.min:.2f}" and row[11] == f"{st.latency_ms.max:,.2f}"
    assert row[12] == f"{st.throughput:,.1f}"
    assert row[13] == "10.00"  # 10 of 100 were 503
    assert row[14] == "500" and row[15] == "88"
    assert "a\\|b" in lines[3] and "64 conn" in lines[3]


def test_machine_info() -> None:
    m = machine_info()
    assert m["logical_cpus"] and m["python"]
