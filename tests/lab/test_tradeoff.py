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

from bastion.client import ZOO_OUTCOMES, zoo_counters
from bastion.lab import benign
from bastion.lab import sweep_plan as plan
from bastion.lab import tradeoff_report as report
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
    assert plan.class_name("permute-and-flip", 0.5) == "pf-0p5"
    assert plan.class_name("exponential", 2.0) == "exp-2"
    assert plan.class_name("metric-noise", 0.02) == "noise-0p02"
    assert plan.class_name("metric-noise", 0.005) == "noise-0p005"
    for kind, strengths in plan.DEFAULT_STRENGTHS.items():
        assert len(strengths) >= 5
        for s in strengths:
            assert re.fullmatch(r"[a-z0-9_-]{1,32}", plan.class_name(kind, s))
    with pytest.raises(ValueError, match="defense"):
        plan.class_name("laplace", 1.0)
    with pytest.raises(ValueError, match="strength"):
        plan.class_name("exponential", 0.0)
    with pytest.raises(ValueError, match="strength"):
        plan.class_name("exponential", math.inf)


def test_plan_has_the_baseline_first_and_one_class_per_point() -> None:
    points = plan.plan_points({"permute-and-flip": [8, 0.5, 2], "metric-noise": [0.01]}, noise_latency_ratio=10)
    assert [p.defense_class for p in points] == ["default", "pf-0p5", "pf-2", "pf-8", "noise-0p01"]
    assert points[0].spec == {"kind": "none"} and points[0].strength is None
    assert points[1].spec == {"kind": "permute-and-flip", "epsilon": 0.5}
    assert points[-1].spec == {"kind": "metric-noise", "noise": "laplace", "scale_accuracy": 0.01,
                               "scale_latency": 0.1}


def test_zoo_yaml_rewrite_keeps_the_zoo_and_validates(tmp_path: Path) -> None:
    points = plan.plan_points(plan.QUICK_STRENGTHS)
    data = plan.rewrite_zoo_yaml(ZOO, points)
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
    copy = plan.prepare_copy(repo, "image", tmp_path / "work", points)
    assert copy != repo and (copy / "image_logreg" / "config.yaml").read_text() == "x: 1\n"
    loaded = load_zoo_spec(copy / "image")
    assert loaded.on_infeasible == "closest" and len(loaded.defenses) == len(points)
    assert "defenses" not in yaml.safe_load((repo / "image" / "zoo.yaml").read_text())
    with pytest.raises(ValueError, match="no zoo"):
        plan.prepare_copy(repo, "malware", tmp_path / "work2", points)


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
    before = zoo_counters(METRICS, "image")
    assert before.requests["met"] == 12 and before.requests["missed_both"] == 0
    assert before.selections == {"best": 12.0, "fast": 4.0}
    after_text = (METRICS.replace('"met",zoo="image"} 12.0', '"met",zoo="image"} 42.0')
                  .replace('"missed_accuracy",zoo="image"} 3.0', '"missed_accuracy",zoo="image"} 13.0')
                  .replace('variant="fast",zoo="image"} 4.0', 'variant="fast",zoo="image"} 44.0'))
    after = zoo_counters(after_text, "image")
    delta = benign.counter_delta(before.requests, after.requests)
    assert delta == {"met": 30, "missed_accuracy": 10, "missed_both": 0, "missed_latency": 0, "rejected": 0}
    assert benign.goodput_from_delta(delta) == 0.75
    assert benign.counter_delta(before.selections, after.selections) == {"best": 0, "fast": 40}
    assert math.isnan(benign.goodput_from_delta(dict.fromkeys(ZOO_OUTCOMES, 0)))


def test_escalated_tenants_are_never_named_twice() -> None:
    """Every server of one run shares the key store, where a spent quota stays with the
    tenant's name: the names come from one object the caller passes to every sweep."""
    from bastion.lab.sweep import EscalatedTenants

    names = EscalatedTenants()
    assert [names.next_name() for _ in range(3)] == [f"tradeoff-escalated-{i}" for i in (1, 2, 3)]
    assert EscalatedTenants().next_name() == "tradeoff-escalated-1"  # nothing shared between runs


def test_the_lab_keeps_no_module_level_state() -> None:
    import ast

    import bastion.lab

    for path in Path(bastion.lab.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Global, ast.Nonlocal))], path.name


def test_the_experimenters_server_is_the_bench_launchers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.bench.launcher import child_env
    from bastion.lab.launch import serve_launch

    monkeypatch.setenv("PYTHONPATH", "/src/checkout")
    launch = serve_launch(tmp_path / "repo", "image", tmp_path / "keys.db", 8123, extra_args=["--config", "x.yaml"])
    assert launch.argv[1:5] == ["-m", "bastion.cli.main", "serve", str(tmp_path / "repo")]
    assert launch.argv[-2:] == ["--config", "x.yaml"]
    assert "--keys" in launch.argv and "--insecure-no-auth" not in launch.argv  # the sweep's tenants need keys
    assert launch.ready_url == "http://127.0.0.1:8123/v2/health/ready"
    assert launch.infer_url == "http://127.0.0.1:8123/v2/models/image/infer"
    assert launch.cwd == Path.cwd()  # the repository and key store paths may be relative to it
    env = child_env(launch.env)  # what the launcher starts the server with
    assert env["PYTHONPATH"] == "/src/checkout" and env["PYTHONUNBUFFERED"] == "1"


def test_benign_workload_is_seeded_and_reachable() -> None:
    work = benign.reachable_workload(FRONT, 200, seed=3, latency_ms=(1.0, 10.0))
    assert work == benign.reachable_workload(FRONT, 200, seed=3, latency_ms=(1.0, 10.0))
    assert work != benign.reachable_workload(FRONT, 200, seed=4, latency_ms=(1.0, 10.0))
    assert len(work) == 200
    for t in work:
        assert 0.85 <= t["accuracy"] <= 0.99 and 1.0 <= t["latency_ms"] <= 10.0
        assert any(v["quality"] >= t["accuracy"] and v["latency_ms"] <= t["latency_ms"] for v in FRONT)
    profiled = benign.reachable_workload(FRONT, 100, seed=0)  # the profile's own latency range
    assert all(any(v["quality"] >= t["accuracy"] and v["latency_ms"] <= t["latency_ms"] for v in FRONT)
               for t in profiled)
    lo, hi = benign.latency_slo_range([1.0] * 9 + [2.0], FRONT)
    assert (lo, hi) == (3.0, 30.0)
    assert benign.latency_slo_range([0.01], FRONT)[0] == pytest.approx(0.4)  # never below 2 x the slowest variant


def _point(defense: str, strength: float | None, goodput: float, consistency: float, acc: float, fid: float,
           selections: dict[str, int] | None = None) -> dict[str, Any]:
    cls = "default" if strength is None else plan.class_name(defense, strength)
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
    rows = report.summary_rows(doc["result"])
    pf = next(r for r in rows if r["defense_class"] == "pf-0p5")
    assert pf["accuracy_drop"] == pytest.approx(10.0) and pf["fidelity_drop"] == pytest.approx(13.0)
    assert rows[0]["accuracy_drop"] == 0.0
    noise = next(r for r in rows if r["defense"] == "metric-noise")
    assert noise["accuracy_drop"] is None  # not measured: no drop either
    md = report.markdown_report(doc)
    assert "## permute-and-flip" in md and "## metric-noise" in md and "## Undefended baseline" in md
    assert "| 0.5 | 0.600 | 0.30 | 3 | 500 | 0.800 | +10.0 | 0.820 | +13.0 |" in md
    assert "| none | 1.000 | 1.00 | 3 | 500 | 0.900 | +0.0 | 0.950 | +0.0 |" in md
    assert "| 0.02 | 0.950 | 0.90 | 3 | 500 | - | - | 0.940 | +1.0 |" in md
    assert "| explicit | 64 | 0.900 | 0.950 |" in md and "| fingerprinted | 64 | 0.900 | 0.950 |" in md
    assert "bastion lab tradeoff --quick" in md


def test_plots_are_written(tmp_path: Path) -> None:
    from bastion.lab.plots import write_plots

    doc = _fake_doc()
    paths = write_plots(doc["result"], report.summary_rows(doc["result"]), tmp_path, selections_at=2.0)
    assert {p.name for p in paths} == {"goodput_vs_accuracy.png", "goodput_vs_fidelity.png", "front_selections.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_strength_options() -> None:
    from bastion.cli.lab import _parse_strengths

    kinds = ["permute-and-flip", "metric-noise"]
    assert _parse_strengths((), kinds, quick=True) == {k: plan.QUICK_STRENGTHS[k] for k in kinds}
    got = _parse_strengths(("1,2", "metric-noise=0.01,0.03"), kinds, quick=False)
    assert got == {"permute-and-flip": (1.0, 2.0), "metric-noise": (0.01, 0.03)}
    import click

    with pytest.raises(click.BadParameter):
        _parse_strengths(("exponential=1",), kinds, quick=False)


MODEL_CONFIG = """\
runtime: onnx
max_batch_size: 64
inputs:
- name: image
  datatype: FP32
  shape: [-1, 1, 8, 8]
outputs:
- name: probabilities
  datatype: FP32
  shape: [-1, 10]
- name: label
  datatype: INT64
  shape: [-1]
hardening: {top_k: 3}
dynamic_batching: {max_queue_delay_us: 0, max_queue_size: 256}
parameters: {intra_op_threads: 1}
"""


def test_hardening_settings_parse() -> None:
    assert plan.parse_hardening_setting("none") == plan.NO_HARDENING
    assert plan.parse_hardening_setting("round=1") == plan.HardeningSetting("round-1", {"round": 1})
    assert plan.parse_hardening_setting("top_k=1") == plan.HardeningSetting("top1", {"top_k": 1})
    rs = plan.parse_hardening_setting("reverse_sigmoid=0.5:1")
    assert rs == plan.HardeningSetting("rs-0.5-1", {"reverse_sigmoid": {"beta": 0.5, "gamma": 1.0}})
    assert plan.parse_hardening_setting("rs=1:4").name == "rs-1-4"
    # the one-hot keeps the probabilities output the oracle reads
    assert plan.parse_hardening_setting("label_only").block == {"label_only": True, "label_output": None}
    assert len({plan.parse_hardening_setting(t).name for t in plan.DEFAULT_HARDENING}) >= 6
    for bad in ("round", "top_k=0", "reverse_sigmoid=1", "reverse_sigmoid=-1:1", "top_k=x", "laplace=1"):
        with pytest.raises(ValueError, match="hardening"):
            plan.parse_hardening_setting(bad)


@pytest.mark.parametrize("text", [*plan.DEFAULT_HARDENING, "round=0", "top_k=3"])
def test_config_yaml_rewrite_keeps_the_model_and_parses(text: str) -> None:
    from bastion.repository.config import parse_model_config_yaml

    setting = plan.parse_hardening_setting(text)
    data = yaml.safe_load(MODEL_CONFIG)
    out = plan.rewrite_model_config(data, setting.block)
    assert {k: v for k, v in out.items() if k != "hardening"} == {k: v for k, v in data.items() if k != "hardening"}
    assert list(out)[:4] == ["runtime", "max_batch_size", "inputs", "outputs"]  # order kept
    assert data["hardening"] == {"top_k": 3}  # the input is not modified
    assert out.get("hardening") == setting.block
    config = parse_model_config_yaml("image_cnn", yaml.safe_dump(out, sort_keys=False), source="config.yaml")
    spec = config.hardening
    if setting.block is None:
        assert spec is None or not spec.enabled
    else:
        assert spec is not None and spec.enabled
        if "reverse_sigmoid" in setting.block:
            assert spec.reverse_sigmoid is not None and spec.reverse_sigmoid.beta == setting.block[
                "reverse_sigmoid"]["beta"]
        if setting.block.get("label_only"):
            assert spec.label_only and spec.label_output is None
    assert config.max_batch_size == 64 and [o.name for o in config.outputs] == ["probabilities", "label"]
    with pytest.raises(ValueError, match="mapping"):
        plan.rewrite_model_config(["x"], None)  # type: ignore[arg-type]


def test_apply_hardening_writes_every_variant(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(MODEL_CONFIG)
    paths = plan.apply_hardening(tmp_path, ["a", "b"], plan.parse_hardening_setting("round=1"))
    assert len(paths) == 2
    for name in ("a", "b"):
        doc = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert doc["hardening"] == {"round": 1} and doc["runtime"] == "onnx"
    plan.apply_hardening(tmp_path, ["a"], plan.NO_HARDENING)
    assert "hardening" not in yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    with pytest.raises(ValueError, match=r"no config\.yaml"):
        plan.apply_hardening(tmp_path, ["missing"], plan.NO_HARDENING)


def test_hard_label_target_is_the_argmax_one_hot() -> None:
    import numpy as np

    from bastion.lab.extract import training_targets

    probs = np.array([[0.1, 0.7, 0.2], [0.4, 0.4, 0.2], [0.0, 0.0, 1.0]])
    assert training_targets(probs, "soft") is not None and np.array_equal(training_targets(probs, "soft"), probs)
    hard = training_targets(probs, "hard")
    assert np.array_equal(hard, [[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # a tie goes to the lower index
    assert hard.sum(axis=1).tolist() == [1.0, 1.0, 1.0]
    assert training_targets(np.empty((0, 3)), "hard").shape == (0, 3)
    with pytest.raises(ValueError, match="target"):
        training_targets(probs, "logits")
    # a perturbed answer that keeps the top-1 gives the same hard target
    perturbed = np.array([[0.3, 0.35, 0.35 - 1e-9], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    assert np.array_equal(training_targets(perturbed, "hard"), hard)


def _hardened(hardening: str, defense: str, strength: float | None, goodput: float, soft: tuple[float, float],
              hard: tuple[float, float], escalation: int | None = None) -> dict[str, Any]:
    p = _point(defense, strength, goodput, 1.0, *soft)
    p["hardening"] = hardening
    by = {"soft": {"accuracy": soft[0], "fidelity": soft[1]}, "hard": {"accuracy": hard[0], "fidelity": hard[1]}}
    target = max(by, key=lambda t: (by[t]["accuracy"], by[t]["fidelity"]))
    p["extraction"].update(by_target=by, best={"target": target, **by[target]}, rows_answered=64)
    if escalation is not None:
        p["escalation"] = {"quota": escalation, "quota_period": "total", "unit": "requests"}
    return p


def test_best_point_is_the_attackers_best_target_at_enough_goodput() -> None:
    doc = _fake_doc()
    doc["result"]["points"] = [
        _hardened("none", "none", None, 1.0, (0.90, 0.95), (0.88, 0.93)),
        # reverse sigmoid fools the soft attacker; the hard one recovers: the headline is the hard one
        _hardened("rs-1-1", "none", None, 1.0, (0.10, 0.10), (0.85, 0.90)),
        _hardened("rs-1-1", "metric-noise", 0.01, 0.85, (0.10, 0.10), (0.80, 0.84)),
        # protects most, but below the goodput floor
        _hardened("label-only", "permute-and-flip", 0.5, 0.6, (0.50, 0.5), (0.50, 0.5)),
        _hardened("label-only", "metric-noise", 0.01, 0.9, (0.60, 0.62), (0.60, 0.62), escalation=140),
    ]
    rows = report.summary_rows(doc["result"])
    rs = next(r for r in rows if r["hardening"] == "rs-1-1" and r["defense"] == "none")
    assert rs["best_target"] == "hard" and rs["accuracy"] == 0.85 and rs["soft_accuracy"] == 0.10
    assert rs["accuracy_drop"] == pytest.approx(5.0) and rs["fidelity_drop"] == pytest.approx(5.0)
    best = report.best_point(rows, 0.8)
    assert best is not None and best["hardening"] == "label-only" and best["escalation"] == "quota 140/total requests"
    assert best["accuracy_drop"] == pytest.approx(30.0) and best["fidelity_drop"] == pytest.approx(33.0)
    assert report.best_point(rows, 0.95)["hardening"] == "rs-1-1"  # type: ignore[index]
    assert report.best_point(rows, 1.01) is None
    md = report.markdown_report(doc)
    assert "## Output hardening x selection defense" in md
    assert ("| rs-1-1 | metric-noise 0.01 | 0.850 | 1.00 | 64 | 0.100 | 0.100 | 0.800 | 0.840 | hard | 0.800 | "
            "+10.0 | 0.840 | +11.0 |") in md
    assert "metric-noise 0.01 + escalated: quota 140/total requests" in md
    assert "target drop 19.6 / 9.6 pts (accuracy / fidelity): reached" in md
    # the per-defense tables hold the unhardened, unescalated points only
    assert "## permute-and-flip" not in md and "## metric-noise" not in md
    doc["result"]["points"].pop()
    md = report.markdown_report(doc)
    assert "target drop 19.6 / 9.6 pts (accuracy / fidelity): NOT reached" in md
    assert "target drop 9.8 / 4.8 pts (accuracy / fidelity): reached" in md  # rs-1-1 x noise 0.01: 10.0 / 11.0


@pytest.mark.slow
def test_quick_sweep_on_a_live_server(image_repo: Path, tmp_path: Path) -> None:
    """1 defense x 2 strengths, tiny budgets, and one hardening setting (label-only) on the
    baseline and pf-8; the numbers come from the served copy."""
    from bastion.cli.lab import lab

    out = tmp_path / "out"
    run = CliRunner().invoke(lab, [
        "tradeoff", "--repo", str(image_repo), "--zoo", "image", "--quick", "--defenses", "permute-and-flip",
        "--strengths", "0.25,8", "--budget", "64", "--steps", "50", "--goodput-requests", "30", "--out", str(out),
        "--hardening", "label_only", "--hardened-points", "pf-8",
    ], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    doc = json.loads((out / "tradeoff.json").read_text())
    assert doc["kind"] == "tradeoff" and doc["seed"] == 0 and doc["machine"]["cores"]
    assert doc["config"]["classes"] == {"default": {"kind": "none"},
                                        "pf-0p25": {"kind": "permute-and-flip", "epsilon": 0.25},
                                        "pf-8": {"kind": "permute-and-flip", "epsilon": 8.0}}
    assert [(p["hardening"], p["defense_class"]) for p in doc["result"]["points"]] == [
        ("none", "default"), ("none", "pf-0p25"), ("none", "pf-8"), ("label-only", "default"), ("label-only", "pf-8")]
    hardened = [p for p in doc["result"]["points"] if p["hardening"] == "label-only"]
    for p in hardened:  # hardening keeps the top-1: the one-hot answers, both targets trained on them
        assert p["extraction"]["answer_distinct_values"] <= 2.0
        by = p["extraction"]["by_target"]
        assert set(by) == {"soft", "hard"} and by["soft"]["accuracy"] == by["hard"]["accuracy"]
        assert sum(p["goodput"]["server_outcomes"].values()) == 30
    assert doc["config"]["hardening"] == {"none": None, "label-only": {"label_only": True, "label_output": None}}
    # the copy is left unhardened
    assert "hardening" not in yaml.safe_load((out / "work" / "repo" / "image_cnn" / "config.yaml").read_text())
    points = {p["defense_class"]: p for p in doc["result"]["points"] if p["hardening"] == "none"}
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
    assert "| label-only | permute-and-flip 8 |" in md and "## Best point with goodput >= 0.8" in md
    for name in ("goodput_vs_accuracy.png", "goodput_vs_fidelity.png", "front_selections.png"):
        assert (out / name).stat().st_size > 5000


@pytest.mark.slow
def test_detector_point_cuts_off_the_fingerprinting_attacker_only(image_repo: Path, tmp_path: Path) -> None:
    """--probe-monitor block: the fingerprint is refused after the threshold, the attacker
    keeps only the rows answered before; the naive attacker and the benign tenant are served."""
    from bastion.cli.lab import lab

    out = tmp_path / "out"
    run = CliRunner().invoke(lab, [
        "tradeoff", "--repo", str(image_repo), "--zoo", "image", "--quick", "--defenses", "exponential",
        "--strengths", "8", "--budget", "64", "--steps", "50", "--goodput-requests", "30", "--out", str(out),
        "--probe-monitor", "block", "--probe-max-refused", "6",
    ], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    doc = json.loads((out / "tradeoff.json").read_text())
    det = doc["result"]["points"][-1]
    assert det["escalation"] == {"kind": "probe-monitor", "action": "block", "max_refused": 6}
    assert doc["config"]["probe_monitor"] == {"action": "block", "max_refused": 6, "hardening": ["none"]}
    assert det["detector"]["flagged"] and "403" in det["detector"]["stopped"]
    assert det["fingerprint"]["rejected"] >= 6 and not det["fingerprint"]["complete"]
    assert det["detector"]["extraction_requests"] == 0  # refused before any extraction row
    base = doc["result"]["points"][0]
    assert det["extraction"]["rows_answered"] < base["extraction"]["rows_answered"]
    assert det["extraction"]["accuracy"] < base["extraction"]["accuracy"]
    assert det["goodput"]["goodput"] >= 0.9 and sum(det["goodput"]["server_outcomes"].values()) == 30
    naive = det["naive_under_detector"]
    assert naive["queries"] == 64 and set(naive["by_target"]) == {"soft", "hard"} and naive["accuracy"] > 0.5
    assert "## Zoo-probing detector" in (out / "tradeoff.md").read_text()
