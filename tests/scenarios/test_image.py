"""The image scenario: scikit-learn digits, logistic regression to CNNs and a MobileNetV2-style net."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from bastion.repository.config import load_model_config
from bastion.runtimes import create_runtime
from bastion.scenarios import image
from bastion.zoo.pareto import pareto_front
from bastion.zoo.profiles import ZooProfile, load_profile
from bastion.zoo.spec import load_zoo_spec

if TYPE_CHECKING:
    from tests.conftest import BuiltScenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(image_scenario: BuiltScenario) -> Path:
    """The session's small build (tests/conftest.py), read-only."""
    return image_scenario.repo


@pytest.fixture(scope="module")
def profile(repo: Path) -> ZooProfile:
    """What the build measured (``bastion scenario build`` profiles the zoo it built)."""
    return load_profile(repo / image.ZOO / "profile.json")


def test_files_and_zoo_spec(repo: Path) -> None:
    for variant in image.VARIANTS:
        assert (repo / variant / "config.yaml").is_file()
        assert (repo / variant / "1" / "model.onnx").is_file()
    spec = load_zoo_spec(repo / image.ZOO)
    assert spec.variants == image.VARIANTS
    assert (spec.metric, spec.latency_percentile, spec.policy, spec.on_infeasible) == (
        "accuracy",
        "p50",
        "uniform-feasible",
        "reject",
    )
    with np.load(repo / image.ZOO / "eval.npz") as data:
        assert sorted(data.files) == ["image", "y"]
        x, y = data["image"], data["y"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and x.min() >= 0.0 and x.max() <= 1.0
    # a stratified 25 % of 1,797 images, every digit present
    assert len(x) == len(y) == 450 and set(y.tolist()) == set(range(10))


def test_variants_share_one_signature_and_match_the_trained_models(repo: Path) -> None:
    signatures = set()
    with np.load(repo / image.ZOO / "eval.npz") as data:
        rows = data["image"][:16]
    for variant in image.VARIANTS:
        config = load_model_config(repo / variant)
        runtime = create_runtime(config, repo / variant / "1")
        try:
            signatures.add(tuple((t.name, t.datatype, tuple(t.shape)) for t in runtime.inputs))
            assert [t.name for t in runtime.outputs][:1] == ["probabilities"]
            # reference.npz holds the in-process (torch / scikit-learn) answers on eval rows
            with np.load(repo / variant / "reference.npz") as ref:
                np.testing.assert_array_equal(ref["image"], rows)
                expected = ref["probabilities"]
            out = runtime.predict({"image": rows})
        finally:
            runtime.close()
        np.testing.assert_allclose(out["probabilities"], expected, atol=1e-4, err_msg=variant)
        np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(out["label"], out["probabilities"].argmax(axis=1))
    assert signatures == {(("image", "FP32", (-1, 1, 8, 8)),)}


def test_profile_quality_and_pareto_front(profile: ZooProfile) -> None:
    quality = {v.variant: v.quality for v in profile.variants}
    assert all(q > 0.9 for q in quality.values()), quality
    # the most expensive variant is the most accurate
    assert quality[image.VARIANTS[-1]] == max(quality.values()), quality
    front = pareto_front(profile.points("p50"))
    assert len(front) >= 3, (quality, front)


def _files(repo: Path) -> dict[str, str]:
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(repo.rglob("*")) if p.is_file()}


def test_build_is_deterministic(repo: Path, tmp_path: Path) -> None:
    # the same seed gives the same bytes in every file: the models, their reference answers,
    # configs, eval.npz and zoo.yaml. Shown on two TINY builds (one epoch per CNN: the
    # training code is the same whatever the epochs), and the small build shares their layout.
    first, second = tmp_path / "first", tmp_path / "second"
    assert image.build(first, seed=0, sizes=image.TINY) == [*image.VARIANTS, image.ZOO]
    image.build(second, seed=0, sizes=image.TINY)
    files = _files(first)
    assert files == _files(second)
    assert sorted(files) == sorted(f for f in _files(repo) if f != f"{image.ZOO}/profile.json")
    # the held-out split does not depend on the epochs: TINY's eval set is the small build's
    assert files[f"{image.ZOO}/eval.npz"] == _files(repo)[f"{image.ZOO}/eval.npz"]
