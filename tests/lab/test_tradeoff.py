"""``bastion lab tradeoff``: the pure parts, and one small sweep on a live server."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from bastion.lab import tradeoff as tr
from bastion.zoo.spec import load_zoo_spec, parse_zoo_spec

ZOO = {
    "task": "image-classification",
    "variants": ["image_logreg", "image_cnn_small", "image_cnn"],
    "evaluation": "eval.npz",
    "metric": "accuracy",
    "latency_percentile": "p50",
    "policy": "uniform-feasible",
    "on_infeasible": "reject",
    "defense": {"kind": "exponential", "epsilon": 1.0},  # replaced by the sweep's classes
}
FRONT = [
    {"variant": "fast", "quality": 0.90, "latency_ms": 0.01},
    {"variant": "mid", "quality": 0.95, "latency_ms": 0.05},
    {"variant": "best", "quality": 0.99, "latency_ms": 0.2},
]


def test_class_names_fit_the_defense_class_alphabet() -> None:
    assert tr.class_name("permute-and-flip", 0.5) == "pf-0p5"
    assert tr.class_name("exponential", 2.0) == "exp-2"
    assert tr.class_name("metric-noise", 0.02) == "noise-0p02"
    assert tr.class_name("metric-noise", 0.005) == "noise-0p005"
    for kind, strengths in tr.DEFAULT_STRENGTHS.items():
        assert len(strengths) >= 5
        for s in strengths:
            assert re.fullmatch(r"[a-z0-9_-]{1,32}", tr.class_name(kind, s))
    with pytest.raises(ValueError, match="defense"):
        tr.class_name("laplace", 1.0)
    with pytest.raises(ValueError, match="strength"):
        tr.class_name("exponential", 0.0)
    with pytest.raises(ValueError, match="strength"):
        tr.class_name("exponential", math.inf)


def test_plan_has_the_baseline_first_and_one_class_per_point() -> None:
    points = tr.plan_points({"permute-and-flip": [8, 0.5, 2], "metric-noise": [0.01]}, noise_latency_ratio=10)
    assert [p.defense_class for p in points] == ["default", "pf-0p5", "pf-2", "pf-8", "noise-0p01"]
    assert points[0].spec == {"kind": "none"} and points[0].strength is None
    assert points[1].spec == {"kind": "permute-and-flip", "epsilon": 0.5}
    assert points[-1].spec == {"kind": "metric-noise", "noise": "laplace", "scale_accuracy": 0.01,
                               "scale_latency": 0.1}


def test_zoo_yaml_rewrite_keeps_the_zoo_and_validates(tmp_path: Path) -> None:
    points = tr.plan_points(tr.QUICK_STRENGTHS)
    data = tr.rewrite_zoo_yaml(ZOO, points)
    assert "defense" not in data
    assert {k: v for k, v in data.items() if k != "defenses"} == {k: v for k, v in ZOO.items() if k != "defense"}
    spec = parse_zoo_spec("image", data, source="image/zoo.yaml")
    assert set(spec.defenses) == {p.defense_class for p in points}
    assert spec.defenses["default"].kind == "none"
    assert spec.defense_for("pf-0p5").kind == "permute-and-flip" and spec.defense_for("pf-0p5").epsilon == 0.5
    noise = spec.defense_for("noise-0p04")
    assert noise.kind == "metric-noise" and noise.scale_accuracy == 0.04 and noise.scale_latency == pytest.approx(0.4)
    assert spec.on_infeasible == "reject" and spec.policy == "uniform-feasible"  # the zoo's own
    # on disk: a copy of the repository, the original untouched
    repo = tmp_path / "repo"
    (repo / "image").mkdir(parents=True)
    (repo / "image" / "zoo.yaml").write_text(yaml.safe_dump({**ZOO, "on_infeasible": "closest"}))
    (repo / "image_logreg").mkdir()
    (repo / "image_logreg" / "config.yaml").write_text("x: 1\n")
    copy = tr.prepare_copy(repo, "image", tmp_path / "work", points)
    assert copy != repo and (copy / "image_logreg" / "config.yaml").read_text() == "x: 1\n"
    loaded = load_zoo_spec(copy / "image")
    assert loaded.on_infeasible == "closest" and len(loaded.defenses) == len(points)
    assert "defenses" not in yaml.safe_load((repo / "image" / "zoo.yaml").read_text())
    with pytest.raises(ValueError, match="no zoo"):
        tr.prepare_copy(repo, "malware", tmp_path / "work2", points)


METRICS = """\
# HELP bastion_zoo_requests_total Zoo requests
# TYPE bastion_zoo_requests_total counter
bastion_zoo_requests_total{outcome="met",zoo="image"} 12.0
bastion_zoo_requests_total{outcome="missed_accuracy",zoo="image"} 3.0
bastion_zoo_requests_total{outcome="rejected",zoo="image"} 1.0
bastion_zoo_requests_total{outcome="met",zoo="other"} 100.0
# HELP bastion_zoo_selections_total Variants chosen
# TYPE bastion_zoo_selections_total counter
bastion_zoo_selections_total{feasible="true",variant="best",zoo="image"} 10.0
bastion_zoo_selections_total{feasible="false",variant="best",zoo="image"} 2.0
bastion_zoo_selections_total{feasible="true",variant="fast",zoo="image"} 4.0
"""


def test_goodput_and_selections_come_from_counter_deltas() -> None:
    before = tr.zoo_counters(METRICS, "image")
    assert before["requests"]["met"] == 12 and before["requests"]["missed_both"] == 0
    assert before["selections"] == {"best": 12.0, "fast": 4.0}
    after_text = (METRICS.replace('"met",zoo="image"} 12.0', '"met",zoo="image"} 42.0')
                  .replace('"missed_accuracy",zoo="image"} 3.0', '"missed_accuracy",zoo="image"} 13.0')
                  .replace('variant="fast",zoo="image"} 4.0', 'variant="fast",zoo="image"} 44.0'))
    after = tr.zoo_counters(after_text, "image")
    delta = tr.counter_delta(before["requests"], after["requests"])
    assert delta == {"met": 30, "missed_accuracy": 10, "missed_both": 0, "missed_latency": 0, "rejected": 0}
    assert tr.goodput_from_delta(delta) == 0.75
    assert tr.counter_delta(before["selections"], after["selections"]) == {"best": 0, "fast": 40}
    assert math.isnan(tr.goodput_from_delta(dict.fromkeys(tr.OUTCOMES, 0)))


def test_benign_workload_is_seeded_and_reachable() -> None:
    work = tr.reachable_workload(FRONT, 200, seed=3, latency_ms=(1.0, 10.0))
    assert work == tr.reachable_workload(FRONT, 200, seed=3, latency_ms=(1.0, 10.0))
    assert work != tr.reachable_workload(FRONT, 200, seed=4, latency_ms=(1.0, 10.0))
    assert len(work) == 200
    for t in work:
        assert 0.85 <= t["accuracy"] <= 0.99 and 1.0 <= t["latency_ms"] <= 10.0
        assert any(v["quality"] >= t["accuracy"] and v["latency_ms"] <= t["latency_ms"] for v in FRONT)
    profiled = tr.reachable_workload(FRONT, 100, seed=0)  # the profile's own latency range
    assert all(any(v["quality"] >= t["accuracy"] and v["latency_ms"] <= t["latency_ms"] for v in FRONT)
               for t in profiled)
    lo, hi = tr.latency_slo_range([1.0] * 9 + [2.0], FRONT)
    assert (lo, hi) == (3.0, 30.0)
    assert tr.latency_slo_range([0.01], FRONT)[0] == pytest.approx(0.4)  # never below 2 x the slowest variant


def _point(defense: str, strength: float | None, goodput: float, consistency: float, acc: float, fid: float,
           selections: dict[str, int] | None = None) -> dict[str, Any]:
    cls = "default" if strength is None else tr.class_name(defense, strength)
    return {
        "defense": defense, "strength": strength, "defense_class": cls, "spec": {},
        "goodput": {"goodput": goodput, "requests": 10},
        "fingerprint": {"victim_consistency": consistency, "variants_found": 3, "queries": 500},
        "extraction": {"accuracy": acc, "fidelity": fid, "queries": 64,
                       "selections": selections or {"fast": 1, "mid": 1, "best": 8}},
    }


def _fake_doc() -> dict[str, Any]:
    result = {
        "zoo": "image", "victim": "best", "front": FRONT,
        "baseline_attacks": {"explicit": {"queries": 64, "accuracy": 0.9, "fidelity": 0.95},
                             "naive": {"queries": 64, "accuracy": 0.85, "fidelity": 0.9}},
        "points": [
            _point("none", None, 1.0, 1.0, 0.90, 0.95, {"best": 10}),
            _point("permute-and-flip", 0.5, 0.6, 0.3, 0.80, 0.82),
            _point("permute-and-flip", 8.0, 0.9, 0.7, 0.88, 0.93),
            _point("metric-noise", 0.02, 0.95, 0.9, math.nan, 0.94),
        ],
    }
    return {"kind": "tradeoff", "config": {"budget": 64, "fingerprint_budget": 2000, "goodput_requests": 10},
            "seed": 0, "machine": {"cpu": "test", "cores": 2}, "started_at": "2026-01-01T00:00:00Z",
            "seconds": 1.0, "command": "bastion lab tradeoff --quick", "result": result}


def test_summary_and_markdown_from_a_fake_result_set() -> None:
    doc = _fake_doc()
    rows = tr.summary_rows(doc["result"])
    pf = next(r for r in rows if r["defense_class"] == "pf-0p5")
    assert pf["accuracy_drop"] == pytest.approx(10.0) and pf["fidelity_drop"] == pytest.approx(13.0)
    assert rows[0]["accuracy_drop"] == 0.0
    noise = next(r for r in rows if r["defense"] == "metric-noise")
    assert noise["accuracy_drop"] is None  # not measured: no drop either
    md = tr.markdown_report(doc)
    assert "## permute-and-flip" in md and "## metric-noise" in md and "## Undefended baseline" in md
    assert "| 0.5 | 0.600 | 0.30 | 3 | 500 | 0.800 | +10.0 | 0.820 | +13.0 |" in md
    assert "| none | 1.000 | 1.00 | 3 | 500 | 0.900 | +0.0 | 0.950 | +0.0 |" in md
    assert "| 0.02 | 0.950 | 0.90 | 3 | 500 | - | - | 0.940 | +1.0 |" in md
    assert "| explicit | 64 | 0.900 | 0.950 |" in md and "| fingerprinted | 64 | 0.900 | 0.950 |" in md
    assert "bastion lab tradeoff --quick" in md


def test_plots_are_written(tmp_path: Path) -> None:
    from bastion.lab.plots import write_plots

    doc = _fake_doc()
    paths = write_plots(doc["result"], tr.summary_rows(doc["result"]), tmp_path, selections_at=2.0)
    assert {p.name for p in paths} == {"goodput_vs_accuracy.png", "goodput_vs_fidelity.png", "front_selections.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_strength_options() -> None:
    from bastion.cli.lab import _parse_strengths

    kinds = ["permute-and-flip", "metric-noise"]
    assert _parse_strengths((), kinds, quick=True) == {k: tr.QUICK_STRENGTHS[k] for k in kinds}
    got = _parse_strengths(("1,2", "metric-noise=0.01,0.03"), kinds, quick=False)
    assert got == {"permute-and-flip": (1.0, 2.0), "metric-noise": (0.01, 0.03)}
    import click

    with pytest.raises(click.BadParameter):
        _parse_strengths(("exponential=1",), kinds, quick=False)


@pytest.mark.slow
def test_quick_sweep_on_a_live_server(image_repo: Path, tmp_path: Path) -> None:
    """1 defense x 2 strengths, tiny budgets; the numbers come from the served copy."""
    from bastion.cli.lab import lab

    out = tmp_path / "out"
    run = CliRunner().invoke(lab, [
        "tradeoff", "--repo", str(image_repo), "--zoo", "image", "--quick", "--defenses", "permute-and-flip",
        "--strengths", "0.25,8", "--budget", "64", "--steps", "50", "--goodput-requests", "30", "--out", str(out),
    ], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    doc = json.loads((out / "tradeoff.json").read_text())
    assert doc["kind"] == "tradeoff" and doc["seed"] == 0 and doc["machine"]["cores"]
    assert doc["config"]["classes"] == {"default": {"kind": "none"},
                                        "pf-0p25": {"kind": "permute-and-flip", "epsilon": 0.25},
                                        "pf-8": {"kind": "permute-and-flip", "epsilon": 8.0}}
    points = {p["defense_class"]: p for p in doc["result"]["points"]}
    assert list(points) == ["default", "pf-0p25", "pf-8"]
    for p in points.values():
        g = p["goodput"]
        assert sum(g["server_outcomes"].values()) == g["requests"] == 30  # the server counted the replay
        assert 0.0 <= g["goodput"] <= 1.0
        assert p["fingerprint"]["queries"] > 0 and p["fingerprint"]["variants_found"] >= 2
        assert p["extraction"]["queries"] == 64 and 0.0 < p["extraction"]["accuracy"] <= 1.0
        assert sum(p["extraction"]["selections"].values()) == 2  # 64 rows in requests of 32
    base, strong = points["default"], points["pf-0p25"]
    assert base["goodput"]["goodput"] >= 0.9  # reachable targets, no defense
    assert base["fingerprint"]["victim_consistency"] == 1.0
    assert strong["fingerprint"]["victim_consistency"] < 0.8
    assert strong["goodput"]["goodput"] < base["goodput"]["goodput"]
    assert set(doc["result"]["baseline_attacks"]) == {"explicit", "naive"}
    # the repository's own zoo.yaml is untouched; the copy has the classes
    assert "defenses" not in yaml.safe_load((image_repo / "image" / "zoo.yaml").read_text())
    assert set(load_zoo_spec(out / "work" / "repo" / "image").defenses) == set(points)
    md = (out / "tradeoff.md").read_text()
    assert "## permute-and-flip" in md and "| 0.25 |" in md
    for name in ("goodput_vs_accuracy.png", "goodput_vs_fidelity.png", "front_selections.png"):
        assert (out / name).stat().st_size > 5000
