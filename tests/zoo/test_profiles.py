from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bastion.core.errors import InvalidInput
from bastion.zoo.pareto import Point
from bastion.zoo.profiles import (
    ProfileError,
    VariantProfile,
    ZooProfile,
    load_profile,
    machine_description,
    measure_latencies,
    measure_latency,
    quality,
    save_profile,
    utc_now_iso,
)


def make_profile() -> ZooProfile:
    return ZooProfile(
        zoo="image",
        metric="accuracy",
        measured_at=utc_now_iso(),
        machine=machine_description(),
        command="bastion zoo profile repo/image",
        variants=(
            VariantProfile(
                "small",
                1,
                0.91,
                {"batch1": {"p50": 0.3, "p95": 0.4, "p99": 0.5}, "batch_max": {"p50": 2.0, "p95": 2.5, "p99": 3.0}},
            ),
            VariantProfile("big", 2, 0.97, {"batch1": {"p50": 5.0, "p95": 6.2, "p99": 7.0}}),
        ),
    )


def test_round_trip_and_points(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    profile = make_profile()
    save_profile(path, profile)
    loaded = load_profile(path)
    assert loaded == profile
    assert loaded.points("p95") == [Point("small", 0.91, 0.4), Point("big", 0.97, 6.2)]
    with pytest.raises(ValueError, match="'batch_max' not measured for: big"):
        loaded.points("p50", "batch_max")
    with pytest.raises(ValueError, match="percentile"):
        loaded.points("p90")
    assert not list(tmp_path.glob("*.tmp"))


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return path


def _good_json() -> dict[str, Any]:
    p = make_profile()
    return {
        "zoo": p.zoo,
        "metric": p.metric,
        "measured_at": "2025-01-01T12:00:00Z",
        "machine": "m",
        "command": "c",
        "variants": [
            {"variant": v.variant, "version": v.version, "quality": v.quality, "latency_ms": v.latency_ms}
            for v in p.variants
        ],
    }


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("machine"), "machine: required"),
        (lambda d: d.update(extra=1), "extra: unknown key"),
        (lambda d: d.update(metric="f1"), "metric: expected one of"),
        (lambda d: d.update(measured_at="yesterday"), "measured_at: expected an ISO 8601"),
        (lambda d: d.update(measured_at="2025-01-01T12:00:00+02:00"), "measured_at: expected a UTC"),
        (lambda d: d.update(variants=[]), "variants: expected a non-empty list"),
        (lambda d: d["variants"][1].update(variant="small"), r"variants\[1\].variant: duplicate variant 'small'"),
        (lambda d: d["variants"][0].update(version=True), r"variants\[0\].version: expected an integer >= 1"),
        (lambda d: d["variants"][0].update(version=0), r"variants\[0\].version: expected an integer >= 1"),
        (lambda d: d["variants"][0].update(quality="0.9"), r"variants\[0\].quality: expected a finite number"),
        (lambda d: d["variants"][0].update(latency_ms={}), r"variants\[0\].latency_ms: expected an object"),
        (
            lambda d: d["variants"][0]["latency_ms"]["batch1"].pop("p99"),
            r"variants\[0\].latency_ms.batch1.p99: required",
        ),
        (
            lambda d: d["variants"][0]["latency_ms"]["batch1"].update(p95=0.1),
            r"variants\[0\].latency_ms.batch1: percentiles must not decrease",
        ),
        (
            lambda d: d["variants"][0]["latency_ms"]["batch1"].update(p50=-1.0),
            r"variants\[0\].latency_ms.batch1.p50: expected >= 0",
        ),
    ],
)
def test_validation_errors(tmp_path: Path, mutate: Any, match: str) -> None:
    data = _good_json()
    mutate(data)
    with pytest.raises(ProfileError, match=match) as exc:
        load_profile(_write(tmp_path, data))
    assert isinstance(exc.value, InvalidInput)
    assert str(tmp_path / "profile.json") in str(exc.value)


def test_missing_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="missing"):
        load_profile(tmp_path / "profile.json")
    (tmp_path / "profile.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(tmp_path / "profile.json")


def test_save_refuses_an_invalid_profile(tmp_path: Path) -> None:
    bad = ZooProfile("z", "accuracy", "not a time", "m", "c", make_profile().variants)
    with pytest.raises(ProfileError, match="measured_at"):
        save_profile(tmp_path / "profile.json", bad)
    assert not (tmp_path / "profile.json").exists()


def test_measure_latency() -> None:
    calls = []
    stats = measure_latency(lambda: (calls.append(1), time.sleep(0.001)), warmup=2, iterations=5)
    assert len(calls) == 7
    assert set(stats) == {"p50", "p95", "p99"}
    assert 1.0 <= stats["p50"] <= stats["p95"] <= stats["p99"] < 1000
    with pytest.raises(ValueError, match="iterations"):
        measure_latency(lambda: None, warmup=0, iterations=0)


def test_accuracy() -> None:
    assert quality("accuracy", [0, 1, 2, 1], [0, 1, 1, 1]) == 0.75
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert quality("accuracy", [0, 1, 1], scores) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        quality("accuracy", [0, 1], [0, 1, 1])


def test_directional_accuracy() -> None:
    # Changes given directly; the row with true change 0 is left out, a 0 prediction is wrong.
    assert quality("directional_accuracy", [1.0, -2.0, 0.0, 3.0], [0.5, 1.0, 5.0, 0.0]) == pytest.approx(1 / 3)
    # Levels with the last observed value as reference: true moves up, down; predicted up, down.
    assert quality("directional_accuracy", [11.0, 9.0], [10.5, 9.9], reference=[10.0, 10.0]) == 1.0
    with pytest.raises(ValueError, match="every true change is 0"):
        quality("directional_accuracy", [0.0, 0.0], [1.0, 1.0])


def test_r2() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert quality("r2", y, y) == 1.0
    assert quality("r2", y, np.full(4, y.mean())) == 0.0
    assert quality("r2", y, [1.0, 2.0, 3.0, 5.0]) == pytest.approx(1 - 1 / 5)
    two = np.stack([y, 2 * y], axis=1)
    assert quality("r2", two, two) == 1.0
    with pytest.raises(ValueError, match="constant"):
        quality("r2", [1.0, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="metric"):
        quality("f1", [1], [1])
    with pytest.raises(ValueError, match="empty"):
        quality("accuracy", [], [])


def test_machine_description() -> None:
    text = machine_description()
    assert "cores" in text


def test_measure_latencies_interleaves_the_calls() -> None:
    order: list[str] = []
    stats = measure_latencies({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1,
                              iterations=3)
    # warm-up of each, then one timed call of each per round: a busy moment falls on both
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert set(stats) == {"a", "b"} and all(set(s) == {"p50", "p95", "p99"} for s in stats.values())
