from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bastion.core.errors import InvalidInput
from bastion.zoo.profiles import VariantProfile, ZooProfile
from bastion.zoo.spec import ZooSpec, ZooSpecError, check_profile, load_zoo_spec, parse_zoo_spec

GOOD: dict[str, Any] = {
    "task": "image-classification",
    "variants": ["image_logreg", "image_cnn", "image_mobilenet"],
    "evaluation": "eval.npz",
    "metric": "accuracy",
}


def parse(**changes: Any) -> ZooSpec:
    data = {**GOOD, **changes}
    return parse_zoo_spec("image", {k: v for k, v in data.items() if v is not ...}, source="image/zoo.yaml")


def test_defaults() -> None:
    spec = parse()
    assert spec == ZooSpec(
        name="image",
        task="image-classification",
        variants=("image_logreg", "image_cnn", "image_mobilenet"),
        evaluation="eval.npz",
        metric="accuracy",
        latency_percentile="p95",
        policy="uniform-feasible",
        on_infeasible="reject",
        expose_variant=False,
    )


def test_all_fields(tmp_path: Path) -> None:
    zoo = tmp_path / "crypto"
    zoo.mkdir()
    (zoo / "zoo.yaml").write_text(
        "task: forecasting\nvariants: [lin, gbm]\nevaluation: eval.npz\nmetric: directional_accuracy\n"
        "latency_percentile: p99\npolicy: fastest-feasible\non_infeasible: closest\nexpose_variant: true\n"
    )
    spec = load_zoo_spec(zoo)
    assert (spec.name, spec.metric, spec.latency_percentile) == ("crypto", "directional_accuracy", "p99")
    assert (spec.policy, spec.on_infeasible, spec.expose_variant) == ("fastest-feasible", "closest", True)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"polcy": "x"}, "image/zoo.yaml: polcy: unknown key; did you mean 'policy'"),
        ({"task": ...}, "image/zoo.yaml: task: required"),
        ({"task": ""}, "task: expected a non-empty string"),
        ({"variants": "a,b"}, "variants: expected a list"),
        ({"variants": ["a"]}, "variants: a zoo needs at least 2 variants, got 1"),
        ({"variants": ["a", "b", "a"]}, r"variants\[2\]: duplicate variant 'a'"),
        ({"variants": ["a", "../etc"]}, r"variants\[1\]: expected a model name"),
        ({"variants": ["a", 3]}, r"variants\[1\]: expected a model name"),
        ({"variants": ["a", "image"]}, r"variants\[1\]: a zoo cannot list itself"),
        ({"evaluation": "../secret.npz"}, "evaluation: expected an .npz file name"),
        ({"evaluation": "eval.csv"}, "evaluation: expected an .npz file name"),
        ({"metric": "f1"}, "metric: expected one of accuracy, directional_accuracy, r2, got 'f1'"),
        ({"latency_percentile": "p90"}, "latency_percentile: expected one of p50, p95, p99"),
        ({"policy": "fastest"}, "policy: expected one of uniform-feasible, fastest-feasible"),
        ({"on_infeasible": "drop"}, "on_infeasible: expected one of reject, closest"),
        ({"expose_variant": "yes"}, "expose_variant: expected true or false"),
    ],
)
def test_errors_name_file_and_field(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ZooSpecError, match=match) as exc:
        parse(**changes)
    assert isinstance(exc.value, InvalidInput)


def test_not_a_mapping_and_empty() -> None:
    with pytest.raises(ZooSpecError, match="empty file"):
        parse_zoo_spec("z", None, source="z/zoo.yaml")
    with pytest.raises(ZooSpecError, match="expected a mapping"):
        parse_zoo_spec("z", ["a"], source="z/zoo.yaml")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ZooSpecError, match=r"z/zoo\.yaml: missing"):
        load_zoo_spec(tmp_path / "z")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "zoo.yaml").write_text("task: [unclosed\n")
    with pytest.raises(ZooSpecError, match=r"z/zoo.yaml: not valid YAML \(line"):
        load_zoo_spec(tmp_path / "z")


def _profile(zoo: str = "image", metric: str = "accuracy", variants: tuple[str, ...] = GOOD["variants"]) -> ZooProfile:
    lat = {"batch1": {"p50": 1.0, "p95": 2.0, "p99": 3.0}}
    vs = tuple(VariantProfile(v, 1, 0.9, lat) for v in variants)
    return ZooProfile(zoo, metric, "2025-01-01T00:00:00Z", "m", "c", vs)


def test_check_profile() -> None:
    spec = parse()
    check_profile(spec, _profile())
    with pytest.raises(ZooSpecError, match="zoo: profile is of zoo 'other'"):
        check_profile(spec, _profile(zoo="other"))
    with pytest.raises(ZooSpecError, match="metric: profile measured 'r2'"):
        check_profile(spec, _profile(metric="r2"))
    with pytest.raises(ZooSpecError, match=r"not measured: image_mobilenet; not in zoo\.yaml: old"):
        check_profile(spec, _profile(variants=("image_logreg", "image_cnn", "old")))
