"""The input-reconstruction attackers of the partition risk advisor, on real digits images and a
synthetic binary table, with features whose information content is known by construction:
the input itself plus noise (reconstruction must work) and noise independent of the input
(reconstruction must not beat the trivial mean-input attacker). Quick budget only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("skimage")

from bastion.confidential.partition.reconstruct import (
    MAX_FEATURE_DIM,
    BudgetSpec,
    ReconstructionResult,
    _ssim_batch,
    baseline_scores,
    plot_examples,
    primary_metric,
    run_reconstruction,
    score_reconstruction,
)

TINY = BudgetSpec(decoder_steps=40, patience=20, gan_steps=20, hidden=32)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x = x[np.random.default_rng(0).permutation(len(x))]
    return x[:1200], x[1200:1500]  # aux (attacker), eval (held out, disjoint)


def _identity(x: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flat = x.reshape(len(x), -1)
    return (flat + 0.1 * rng.standard_normal(flat.shape)).astype(np.float32)


def _noise(x: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(x), 64)).astype(np.float32)


@pytest.fixture(scope="module")
def image_runs(digits: tuple[np.ndarray, np.ndarray]) -> dict[str, tuple[ReconstructionResult, np.ndarray]]:
    xa, xe = digits
    runs = {}
    for case, make in (("informative", _identity), ("none", _noise)):
        for attacker in ("decoder", "cgan"):
            runs[f"{case}-{attacker}"] = run_reconstruction(make(xa, 1), xa, make(xe, 2), xe, attacker=attacker,
                                                            kind="image", budget="quick", seed=0)
    return runs


def test_informative_features_reconstruct_digits(image_runs: dict, digits: tuple[np.ndarray, np.ndarray]) -> None:
    xa, xe = digits
    base = baseline_scores(xa, xe, kind="image")
    for attacker in ("decoder", "cgan"):
        result, recon = image_runs[f"informative-{attacker}"]
        assert recon.shape == xe.shape and recon.dtype == np.float32
        assert recon.min() >= 0.0 and recon.max() <= 1.0
        assert result.scores["ssim"] > 0.8, result.scores
        assert result.scores["psnr"] > base["psnr"] + 6.0, (result.scores, base)  # MSE at least 4x lower
        assert result.baseline == pytest.approx(base)
        assert (result.attacker, result.budget, result.n_aux, result.n_eval) == (attacker, "quick", 1200, 300)


def test_features_without_information_stay_at_the_trivial_baseline(image_runs: dict) -> None:
    for attacker in ("decoder", "cgan"):
        result, _ = image_runs[f"none-{attacker}"]
        assert abs(result.scores["ssim"] - result.baseline["ssim"]) < 0.03, (result.scores, result.baseline)
        assert abs(result.scores["psnr"] - result.baseline["psnr"]) < 0.5
        informative, _ = image_runs[f"informative-{attacker}"]
        assert informative.scores["ssim"] > result.scores["ssim"] + 0.25  # a clear margin, not noise


def test_cgan_starts_from_the_decoder_and_keeps_its_best_validation_checkpoint(image_runs: dict) -> None:
    dec, _ = image_runs["informative-decoder"]
    gan, _ = image_runs["informative-cgan"]
    assert gan.details["decoder_steps"] == dec.details["decoder_steps"]
    assert gan.details["val_score"] >= gan.details["val_score_start"]
    assert 0 <= gan.details["gan_selected_step"] <= gan.details["gan_steps"]
    assert gan.scores["ssim"] > dec.scores["ssim"] - 0.02  # eval may differ by chance, not by much


def test_cgan_without_adversarial_steps_is_exactly_the_decoder(digits: tuple[np.ndarray, np.ndarray]) -> None:
    # the generator's noise columns start at zero: G(f, z) == decoder(f), whatever z
    xa, xe = digits
    spec = BudgetSpec(decoder_steps=40, patience=20, gan_steps=0, hidden=32)
    fa, fe = _identity(xa, 1), _identity(xe, 2)
    _, dec = run_reconstruction(fa, xa, fe, xe, attacker="decoder", kind="image", budget=spec, seed=3)
    res, gan = run_reconstruction(fa, xa, fe, xe, attacker="cgan", kind="image", budget=spec, seed=3)
    np.testing.assert_array_equal(dec, gan)
    assert res.details["gan_selected_step"] == 0


def test_same_seed_same_reconstruction_and_progress_reaches_total(digits: tuple[np.ndarray, np.ndarray]) -> None:
    xa, xe = digits
    fa, fe = _identity(xa, 1), _identity(xe, 2)
    calls: list[tuple[int, int]] = []
    r1, a = run_reconstruction(fa, xa, fe, xe, attacker="cgan", kind="image", budget=TINY, seed=5,
                               progress=lambda s, t: calls.append((s, t)))
    _, b = run_reconstruction(fa, xa, fe, xe, attacker="cgan", kind="image", budget=TINY, seed=5)
    _, c = run_reconstruction(fa, xa, fe, xe, attacker="cgan", kind="image", budget=TINY, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    total = TINY.decoder_steps + TINY.gan_steps
    assert {t for _, t in calls} == {total}
    steps = [s for s, _ in calls]
    assert steps == sorted(steps) and steps[-1] == total
    assert r1.budget == "custom" and r1.train_seconds > 0


def _binary_table(n: int, d: int, seed: int) -> np.ndarray:
    """Rows drawn from 10 sparse prototypes (like app profiles): 0/1 features, about 15 % set."""
    rng = np.random.default_rng(seed)
    protos = rng.random((10, d)) < 0.12
    p = np.where(protos[rng.integers(0, 10, n)], 0.85, 0.03)
    return (rng.random((n, d)) < p).astype(np.float32)


def test_tabular_binary_feature_recovery() -> None:
    x = _binary_table(1400, 150, seed=0)
    xa, xe = x[:1100], x[1100:]
    rng = np.random.default_rng(1)
    informative = (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    none = rng.standard_normal((len(x), 32)).astype(np.float32)
    good, recon = run_reconstruction(informative[:1100], xa, informative[1100:], xe, attacker="decoder",
                                     kind="tabular", budget="quick", seed=0)
    bad, _ = run_reconstruction(none[:1100], xa, none[1100:], xe, attacker="decoder", kind="tabular",
                                budget="quick", seed=0)
    assert recon.shape == xe.shape
    base = good.baseline
    assert set(base) == {"accuracy", "balanced_accuracy", "f1_present"}
    assert base["balanced_accuracy"] == pytest.approx(0.5)  # all-zeros answer: no 1 is ever recovered
    # the identity-like features are not copied perfectly (quick budget, 935 training rows, 150 outputs): measured
    # accuracy 0.97, balanced 0.90; the no-information attacker is at the all-zeros answer (0.84, 0.5)
    assert good.scores["accuracy"] > 0.95 and good.scores["balanced_accuracy"] > 0.85, good.scores
    assert abs(bad.scores["accuracy"] - base["accuracy"]) < 0.01, (bad.scores, base)
    assert bad.scores["balanced_accuracy"] < 0.56
    assert good.scores["balanced_accuracy"] > bad.scores["balanced_accuracy"] + 0.3
    assert primary_metric("tabular", good.scores) == "accuracy"


def test_tabular_real_columns_use_r2() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((900, 12)) @ rng.standard_normal((12, 20))).astype(np.float32)
    f = (x @ rng.standard_normal((20, 16)) + 0.05 * rng.standard_normal((900, 16))).astype(np.float32)
    result, _ = run_reconstruction(f[:700], x[:700], f[700:], x[700:], attacker="decoder", kind="tabular",
                                   budget="quick", seed=0)
    assert set(result.scores) == {"r2", "within_tol"}
    assert result.scores["r2"] > 0.8, result.scores
    assert abs(result.baseline["r2"]) < 0.05
    assert primary_metric("tabular", result.scores) == "r2"


def test_scores_by_hand() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 8, 8)).astype(np.float32)
    perfect = score_reconstruction(x, x, kind="image", inputs_aux=x)
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["psnr"] == 100.0 and perfect["mse"] == 0.0
    noisy = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    s = score_reconstruction(x, noisy, kind="image", inputs_aux=x)
    assert 0 < s["ssim"] < 1 and 15 < s["psnr"] < 30
    assert _ssim_batch(x, noisy, None) == pytest.approx(s["ssim"], abs=1e-9)  # the c-GAN's fast validation SSIM
    assert _ssim_batch(x, noisy, 3) == pytest.approx(score_reconstruction(x, noisy, kind="image", inputs_aux=x,
                                                                          ssim_win=3)["ssim"], abs=1e-9)
    # binary: 2 rows x 4 features; truth has three 1s; the guess recovers two and adds one false 1
    truth = np.array([[1, 0, 0, 1], [0, 1, 0, 0]], np.float32)
    guess = np.array([[0.9, 0.6, 0.1, 0.2], [0.0, 0.7, 0.4, 0.0]], np.float32)
    t = score_reconstruction(truth, guess, kind="tabular", inputs_aux=truth)
    assert t["accuracy"] == pytest.approx(6 / 8)
    assert t["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert t["f1_present"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_refuses_absurd_shapes_and_values(digits: tuple[np.ndarray, np.ndarray]) -> None:
    xa, xe = digits
    fa, fe = _identity(xa, 1), _identity(xe, 2)
    kw = {"attacker": "decoder", "kind": "image", "budget": TINY}
    with pytest.raises(ValueError, match="above the bound"):
        big = np.zeros((40, MAX_FEATURE_DIM + 1), np.float32)
        run_reconstruction(big, xa[:40], big[:4], xe[:4], **kw)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run_reconstruction(fa, xa * 16, fe, xe * 16, **kw)
    with pytest.raises(ValueError, match="NHWC"):
        run_reconstruction(fa, xa.transpose(0, 2, 3, 1).repeat(2, 3), fe, xe.transpose(0, 2, 3, 1).repeat(2, 3), **kw)
    with pytest.raises(ValueError, match="rows"):
        run_reconstruction(fa[:-1], xa, fe, xe, **kw)
    with pytest.raises(ValueError, match="at least 32"):
        run_reconstruction(fa[:10], xa[:10], fe, xe, **kw)
    with pytest.raises(ValueError, match="NaN"):
        run_reconstruction(np.full_like(fa, np.nan), xa, fe, xe, **kw)
    with pytest.raises(ValueError, match="aux rows are"):
        run_reconstruction(fa, xa, fe[:, :10], xe, **kw)
    with pytest.raises(ValueError, match="budget"):
        run_reconstruction(fa, xa, fe, xe, attacker="decoder", kind="image", budget="huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attacker"):
        run_reconstruction(fa, xa, fe, xe, attacker="gan", kind="image", budget=TINY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        run_reconstruction(fa, xa, fe, xe, attacker="decoder", kind="tabular", budget=TINY)
    with pytest.raises(ValueError, match="ssim_win"):
        run_reconstruction(fa, xa, fe, xe, attacker="decoder", kind="image", budget=TINY, ssim_win=4)
    with pytest.raises(ValueError, match="hidden"):
        BudgetSpec(decoder_steps=10, patience=5, gan_steps=0, hidden=10**6)


def test_plot_examples_writes_a_png(tmp_path: Path, image_runs: dict, digits: tuple[np.ndarray, np.ndarray]) -> None:
    _, xe = digits
    recons = {name: rec for name, (_, rec) in image_runs.items() if name.startswith("informative")}
    out = plot_examples(xe, recons, tmp_path / "plots" / "examples.png", n=8, title="digits")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    with pytest.raises(ValueError, match="does not match"):
        plot_examples(xe, {"bad": np.zeros((8, 1, 4, 4), np.float32)}, tmp_path / "x.png")
