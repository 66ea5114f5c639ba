"""The crypto-forecasting zoo: files, exports that match their models, a real trade-off,
determinism, and a generator that does what its docstring says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from bastion.cli.profile import profile_zoo
from bastion.repository.config import load_model_config
from bastion.runtimes import create_runtime
from bastion.scenarios import crypto
from bastion.zoo.pareto import pareto_front
from bastion.zoo.profiles import ZooProfile


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, crypto.Predict]]:
    repo = tmp_path_factory.mktemp("crypto_repo")
    names, models = crypto.build_with_models(repo, small=True, seed=0)
    assert names == [*crypto.VARIANTS, crypto.ZOO]
    return repo, models


@pytest.fixture(scope="module")
def profile(built: tuple[Path, dict[str, crypto.Predict]]) -> ZooProfile:
    # the default 200 latency samples: the cheapest variants sit within ~1.5x of each other near
    # ONNX Runtime's per-call floor, and 30 samples' median let them swap (a dominated variant); ~0.1 s more
    return profile_zoo(built[0], crypto.ZOO)


@pytest.mark.slow
def test_files_and_zoo_spec(built: tuple[Path, dict[str, crypto.Predict]]) -> None:
    repo, _ = built
    for variant in crypto.VARIANTS:
        assert (repo / variant / "config.yaml").is_file()
        assert (repo / variant / "1" / "model.onnx").is_file()
        config = load_model_config(repo / variant)
        assert [(t.name, t.datatype, t.shape) for t in config.inputs] == [("window", "FP32", (-1, 32, 5))]
        assert [(t.name, t.datatype, t.shape) for t in config.outputs] == [("forecast", "FP32", (-1, 1))]
    spec = yaml.safe_load((repo / "crypto" / "zoo.yaml").read_text())
    assert spec["metric"] == "directional_accuracy"
    assert spec["variants"] == list(crypto.VARIANTS)
    with np.load(repo / "crypto" / "eval.npz") as data:
        assert sorted(data.files) == ["window", "y"]
        assert data["window"].dtype == np.float32 and data["window"].shape[1:] == (32, 5)
        assert len(data["window"]) == len(data["y"])


@pytest.mark.slow
def test_served_models_answer_like_the_trained_ones(built: tuple[Path, dict[str, crypto.Predict]]) -> None:
    repo, models = built
    with np.load(repo / "crypto" / "eval.npz") as data:
        x = data["window"][:8]
    for variant in crypto.VARIANTS:
        runtime = create_runtime(load_model_config(repo / variant), repo / variant / "1")
        try:
            got = runtime.predict({"window": x})["forecast"]
        finally:
            runtime.close()
        np.testing.assert_allclose(got, models[variant](x), rtol=1e-4, atol=1e-6, err_msg=variant)


@pytest.mark.slow
def test_profile_is_a_real_trade_off(profile: ZooProfile) -> None:
    quality = {v.variant: v.quality for v in profile.variants}
    assert all(q > 0.5 for q in quality.values()), quality
    points = profile.points("p50")
    slowest = max(points, key=lambda p: p.latency_ms)
    assert slowest.quality == max(quality.values()), points
    assert len(pareto_front(points)) >= 3, points


def _files(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_same_seed_same_zoo(built: tuple[Path, dict[str, crypto.Predict]], tmp_path: Path) -> None:
    # the same seed gives the same bytes in every file (models, configs, eval.npz, zoo.yaml);
    # shown on TINY builds (fewer rows, epochs and trees: the same code), another seed differs
    first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "other"
    assert crypto.build(first, seed=0, sizes=crypto.TINY) == [*crypto.VARIANTS, crypto.ZOO]
    crypto.build(second, seed=0, sizes=crypto.TINY)
    files = _files(first)
    assert files == _files(second)
    # the same files as the small build (less the profile, which a build does not write)
    assert sorted(files) == sorted(f for f in _files(built[0]) if not f.endswith("profile.json"))
    crypto.build(other, seed=1, sizes=crypto.TINY)
    different = _files(other)
    assert sorted(different) == sorted(files)
    assert different["crypto/eval.npz"] != files["crypto/eval.npz"]
    assert all(different[f"{v}/1/model.onnx"] != files[f"{v}/1/model.onnx"] for v in crypto.VARIANTS)


def test_generator_correlations_and_regimes_are_as_documented() -> None:
    series = crypto.generate(60_000, seed=1)
    r, s = series.returns, series.regime
    assert np.array_equal(series.prices, 100.0 * np.exp(np.cumsum(r, axis=0)))
    # Stationary share of turbulent steps: p01 / (p01 + p10) = 0.02 / 0.07.
    assert abs(s.mean() - 2 / 7) < 0.05
    stays = np.diff(s) == 0
    assert abs(stays[s[:-1] == 0].mean() - crypto.TRANSITION[0, 0]) < 0.01
    assert abs(stays[s[:-1] == 1].mean() - crypto.TRANSITION[1, 1]) < 0.02
    others = r[:, 1:]  # coin 0 carries the predictable part on top of the shocks
    for regime, rho in enumerate(crypto.RHO):
        corr = np.corrcoef(others[s == regime].T)
        off = corr[~np.eye(len(corr), dtype=bool)]
        assert np.all(np.abs(off - rho) < 0.05), (regime, off)
    vol_ratio = others[s == 1].std(axis=0) / others[s == 0].std(axis=0)
    np.testing.assert_allclose(vol_ratio, crypto.TURBULENT_VOL_MULT, rtol=0.08)
    # Lead-lag: coin 1 leads coin 0 with momentum when calm and reversal when turbulent.
    lead = np.array([np.corrcoef(r[1:, 0][s[1:] == k], r[:-1, 1][s[1:] == k])[0, 1] for k in (0, 1)])
    assert lead[0] > 0.2 and lead[1] < -0.2, lead
    assert np.array_equal(crypto.generate(500, seed=3).returns, crypto.generate(500, seed=3).returns)
