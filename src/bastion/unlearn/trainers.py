"""The model families SISA shards train: small numpy trainers whose whole state is arrays.

Families
--------
- ``logreg``: multinomial logistic regression (softmax over ``x @ W + b``), L2 penalty;
  the malware scenario's ``malware_logreg`` and the image scenario's ``image_logreg``
  family. Exported as a scikit-learn ``LogisticRegression``.
- ``mlp``: one hidden ReLU layer and a softmax output, L2 penalty; the malware
  scenario's ``malware_mlp`` family (1000 -> 32 -> 2), and an MLP on the image
  scenario's 64 flattened pixels. Exported as a scikit-learn ``MLPClassifier``.

Why not scikit-learn's own ``SGDClassifier`` / ``MLPClassifier.partial_fit``: SISA needs
to stop after a slice, save the state, and later resume from it in another process.
scikit-learn keeps part of that state in private attributes (Adam moments, the random
generator, loss objects) that only pickle saves, and its warm start refuses a slice that
lacks a class. Here the state is the weights, nothing else, saved as ``.npz``.

Training step (``train_step``), deterministic by construction: the step's rows arrive in
a canonical order (sorted by record id, see ``sisa``), a fresh Adam optimizer runs
``epochs`` passes of mini-batches over them, shuffled by a generator seeded with
``(seed, shard, step)`` only. Nothing depends on the wall clock, on the process, or on
which rows other shards hold, so the same inputs give the same weights bit for bit (in
float64; with the same BLAS and thread count: a BLAS that splits a reduction differently
may round differently).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["FAMILIES", "Hyper", "export_onnx", "init_state", "load_state", "predict_proba", "save_state",
           "train_step"]

FAMILIES = ("logreg", "mlp")
State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Hyper:
    """Training settings of one family; stored in the manifest so a retrain uses the same."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.01
    alpha: float = 1e-4  # L2 penalty per sample, as scikit-learn's MLP ``alpha`` / n
    hidden: int = 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hyper:
        known = {"epochs": int, "batch_size": int, "lr": float, "alpha": float, "hidden": int}
        if not isinstance(data, dict) or set(data) != set(known):
            raise ValueError(f"hyper-parameters must have exactly the keys {sorted(known)}")
        try:
            out = cls(**{k: t(data[k]) for k, t in known.items()})
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad hyper-parameters: {err}") from None
        out.check()
        return out

    def check(self) -> None:
        if not (1 <= self.epochs <= 1000 and 1 <= self.batch_size <= 65536 and 1 <= self.hidden <= 4096):
            raise ValueError(f"hyper-parameters out of range: {self}")
        if not (0 < self.lr <= 10 and 0 <= self.alpha <= 10):
            raise ValueError(f"hyper-parameters out of range: {self}")


DEFAULTS = {
    "logreg": Hyper(epochs=3, batch_size=32, lr=0.01, alpha=1e-3),
    "mlp": Hyper(epochs=3, batch_size=32, lr=0.003, alpha=1e-4, hidden=32),
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def init_state(family: str, n_features: int, n_classes: int, hyper: Hyper, seed: int, shard: int) -> State:
    """Initial weights: zeros for logreg, Glorot-uniform from ``(seed, shard)`` for the MLP."""
    _check_family(family)
    if family == "logreg":
        return {"W": np.zeros((n_features, n_classes)), "b": np.zeros(n_classes)}
    rng = np.random.default_rng([seed, shard, 0])
    b1 = np.sqrt(6.0 / (n_features + hyper.hidden))
    b2 = np.sqrt(6.0 / (hyper.hidden + n_classes))
    return {
        "W1": rng.uniform(-b1, b1, (n_features, hyper.hidden)),
        "b1": rng.uniform(-b1, b1, hyper.hidden),
        "W2": rng.uniform(-b2, b2, (hyper.hidden, n_classes)),
        "b2": rng.uniform(-b2, b2, n_classes),
    }


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_proba(family: str, state: State, x: np.ndarray) -> np.ndarray:
    """Class probabilities ``[n, classes]`` (float64) of the in-memory model."""
    _check_family(family)
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if family == "logreg":
        return _softmax(x @ state["W"] + state["b"])
    h = np.maximum(x @ state["W1"] + state["b1"], 0.0)
    return _softmax(h @ state["W2"] + state["b2"])


def _grads(family: str, s: State, x: np.ndarray, onehot: np.ndarray, alpha: float) -> State:
    n = len(x)
    if family == "logreg":
        d = (_softmax(x @ s["W"] + s["b"]) - onehot) / n
        return {"W": x.T @ d + alpha * s["W"], "b": d.sum(axis=0)}
    pre = x @ s["W1"] + s["b1"]
    h = np.maximum(pre, 0.0)
    dz = (_softmax(h @ s["W2"] + s["b2"]) - onehot) / n
    dh = (dz @ s["W2"].T) * (pre > 0)
    return {
        "W1": x.T @ dh + alpha * s["W1"], "b1": dh.sum(axis=0),
        "W2": h.T @ dz + alpha * s["W2"], "b2": dz.sum(axis=0),
    }


def train_step(family: str, state: State, x: np.ndarray, y: np.ndarray, n_classes: int, hyper: Hyper,
               rng: np.random.Generator) -> State:
    """Continue training ``state`` on ``x`` (rows in canonical order) and labels ``y`` (class indices)."""
    _check_family(family)
    s = {k: v.astype(np.float64, copy=True) for k, v in state.items()}
    if len(x) == 0:  # a step whose rows were all deleted leaves the state as it was
        return s
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    onehot = np.eye(n_classes)[np.asarray(y, dtype=np.int64)]
    # Adam, fresh per step: its moments are not part of the checkpoint (weights only).
    m = {k: np.zeros_like(v) for k, v in s.items()}
    v2 = {k: np.zeros_like(v) for k, v in s.items()}
    beta1, beta2, eps, t = 0.9, 0.999, 1e-8, 0
    for _ in range(hyper.epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), hyper.batch_size):
            idx = order[start:start + hyper.batch_size]
            g = _grads(family, s, x[idx], onehot[idx], hyper.alpha)
            t += 1
            for k in s:
                m[k] = beta1 * m[k] + (1 - beta1) * g[k]
                v2[k] = beta2 * v2[k] + (1 - beta2) * g[k] ** 2
                step = hyper.lr * np.sqrt(1 - beta2**t) / (1 - beta1**t)
                s[k] -= step * m[k] / (np.sqrt(v2[k]) + eps)
    return s


_STATE_KEYS = {"logreg": ("W", "b"), "mlp": ("W1", "b1", "W2", "b2")}


def save_state(state: State) -> bytes:
    """The state as ``.npz`` bytes (no pickle: plain float64 arrays, stable member order)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(state[k], dtype=np.float64) for k in sorted(state)})
    return buf.getvalue()


def load_state(family: str, data: bytes) -> State:
    """A state saved by ``save_state``; refuses pickled objects and unexpected members."""
    _check_family(family)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if set(npz.files) != set(_STATE_KEYS[family]):
            raise ValueError(f"checkpoint members {sorted(npz.files)} are not a {family} state")
        state = {k: npz[k] for k in npz.files}
    if any(a.dtype != np.float64 or not np.all(np.isfinite(a)) for a in state.values()):
        raise ValueError("checkpoint holds non-float64 or non-finite weights")
    return state


def to_sklearn(family: str, state: State, classes: np.ndarray) -> Any:
    """A fitted-looking scikit-learn estimator with these weights, for skl2onnx.

    Two classes are folded into scikit-learn's one-column binary form: softmax over
    (z0, z1) equals the logistic of z1 - z0, so the probabilities are unchanged.
    """
    _check_family(family)
    classes = np.asarray(classes)
    binary = len(classes) == 2
    if family == "logreg":
        from sklearn.linear_model import LogisticRegression

        w, b = state["W"], state["b"]
        model = LogisticRegression()
        model.coef_ = (w[:, 1] - w[:, 0])[None, :] if binary else w.T.copy()
        model.intercept_ = np.array([b[1] - b[0]]) if binary else b.copy()
    else:
        from sklearn.neural_network import MLPClassifier
        from sklearn.preprocessing import LabelBinarizer

        w2, b2 = state["W2"], state["b2"]
        model = MLPClassifier(hidden_layer_sizes=(state["W1"].shape[1],), activation="relu")
        model.coefs_ = [state["W1"].copy(), (w2[:, 1] - w2[:, 0])[:, None] if binary else w2.copy()]
        model.intercepts_ = [state["b1"].copy(), np.array([b2[1] - b2[0]]) if binary else b2.copy()]
        model.n_layers_ = 3
        model.n_outputs_ = 1 if binary else len(classes)
        model.out_activation_ = "logistic" if binary else "softmax"
        model._label_binarizer = LabelBinarizer().fit(classes)
    model.classes_ = classes
    model.n_features_in_ = (state["W"] if family == "logreg" else state["W1"]).shape[0]
    return model


def export_onnx(family: str, state: State, classes: np.ndarray) -> bytes:
    """ONNX bytes: input ``features`` FP32 [-1, d]; outputs ``label`` INT64 and ``probabilities`` FP32.

    Deterministic: the same weights give the same bytes (``sklearn_to_onnx`` fixes the
    graph name skl2onnx would otherwise draw at random)."""
    from bastion.runtimes.export import sklearn_to_onnx

    model = to_sklearn(family, state, classes)
    return sklearn_to_onnx(model, model.n_features_in_, name="features")
