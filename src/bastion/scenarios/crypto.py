"""Crypto-price forecasting zoo: next-step return of one coin from a window of five coins.

Task
----
Input ``window``: FP32 ``[-1, T, C]`` with ``T = 32`` steps and ``C = 5`` coins, the
most recent log returns of every coin (row ``T - 1`` is the latest step). Output
``forecast``: FP32 ``[-1, 1]``, the predicted log return of coin 0 (the *target
coin*) at the next step. The evaluation target ``y`` is the true next log return.

The zoo's quality ("accuracy") is ``directional_accuracy`` as defined in
:mod:`bastion.zoo.profiles`: among evaluation rows whose true return is non-zero, the
fraction where ``sign(forecast) == sign(y)``; a forecast of exactly 0 counts as wrong.
Both ``y`` and ``forecast`` are returns (changes), so no ``reference`` is needed.

Generator (all of it; nothing is downloaded)
---------------------------------------------
One long path of ``n`` steps, from ``numpy.random.default_rng(seed)``:

1. **Regimes.** A two-state Markov chain ``s_t`` in {0 = calm, 1 = turbulent} with
   ``P(calm -> turbulent) = 0.02`` and ``P(turbulent -> calm) = 0.05`` (stationary share
   of turbulent steps 2/7 ~ 0.29; mean stays 50 and 20 steps), starting calm.
2. **Correlated GBM shocks.** Per step, ``eps_t = sigma_s * (L_s @ z_t)`` with
   ``z_t ~ N(0, I_5)`` and ``L_s`` the Cholesky factor of the regime's correlation
   matrix: equicorrelation ``rho = 0.3`` when calm, ``rho = 0.7`` when turbulent
   (crypto correlations jump in sell-offs). Per-coin volatilities ``SIGMA_CALM`` and
   ``TURBULENT_VOL_MULT`` times those when turbulent; drifts ``MU`` per regime. Log
   returns are ``r_t = mu_s - sigma_s**2 / 2 + eps_t`` (geometric Brownian motion).
3. **Predictable part of the target coin.** Coin 0 additionally gets
   ``g_t = sigma_{0,s_t} * (A * m_t + B[s_t] * u_t + K * tanh(v_t * w_t))`` where
   ``m_t`` is coin 4's mean return over the previous 8 steps in units of its standard
   error (momentum, linear), ``u_t = r_{1,t-1} / sigma_{1,s_t}`` (coin 1 leads coin 0:
   momentum ``B = +0.6`` when calm, reversal ``B = -0.6`` when turbulent, so its
   sign depends on a regime that must be inferred from the window's volatility and
   correlation), and ``v_t, w_t`` are coins 2 and 3's previous standardized returns
   (a non-linear cross-coin effect: the target follows when they agree). ``A = 0.3``,
   ``K = 0.45``.
4. Prices are ``100 * exp(cumsum(r))`` (:func:`generate` returns them for inspection;
   the models only see returns).

Rows: the window ends at step ``t - 1`` and ``y = r_{0,t}``. Training rows come from
the first part of the path; evaluation rows from a later window that starts ``T``
steps after the last training target, so no step is in both.

Variants (cheapest first; all take the same ``window``, all output ``forecast``)
-------------------------------------------------------------------------------
- ``crypto_ridge``: ridge regression on the flattened window (scikit-learn,
  skl2onnx). Sees the linear momentum only; lead-lag averages out across regimes.
- ``crypto_gbm``: histogram gradient boosting (600 trees, depth <= 5) on the flattened
  window (scikit-learn, skl2onnx). Trees pick up the coin-2/coin-3 interaction and
  part of the regime. skl2onnx 1.20 needs a small scoped fix to convert it with
  onnx >= 1.19 (see ``_hgb_export_fix``).
  The 3-D input is handled by an ONNX ``Reshape`` node prepended to the skl2onnx graph
  (trees cannot sit behind a torch front), the same for the ridge.
- ``crypto_gru``: a one-layer GRU (hidden 16) reading the window step by step.
- ``crypto_lstm``: a two-layer LSTM (hidden 48), the most expensive and most accurate.

Measured (full build, seed 0, ``profile_zoo``, batch-1 p50 through onnxruntime with
one thread on a shared 2-core machine): ridge 0.596 / 4.5 us, gbm 0.669 / 9.1 us,
gru 0.689 / 17.2 us, lstm 0.696 / 47.0 us; all four on the Pareto front. The small
build (fewer rows and epochs, same architectures) keeps the same order. ``sizes=TINY``
(a few thousand rows, one epoch, 50 trees) builds in seconds for tests of what does
not depend on the sizes (files, determinism); its variants are no meaningful ladder.

The recurrent models scale inputs and outputs inside the graph by fixed constants so
clients send raw log returns.

Caveats
-------
Synthetic data with a known structure: the numbers say how capacity pays on *this*
generator, not on real markets, where next-step direction is barely predictable. The
interaction and regime-dependent lead-lag were put in on purpose so a bigger model
genuinely helps (with a purely linear signal a ridge would be as good as the LSTM).
The GRU-LSTM quality gap is the smallest (under one point); on a different seed
it may shrink to noise, which would drop the GRU or LSTM off the front. Latencies
of a few microseconds are dominated by onnxruntime's per-call overhead, so the
ridge-gbm ratio depends on the machine more than the others.
Directional accuracy ignores magnitude: a model can score well and still lose money.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bastion.runtimes.export import sklearn_to_onnx, write_bytes_atomic, write_model_config
from bastion.scenarios.zoo_files import write_zoo

__all__ = [
    "COINS",
    "FULL",
    "MU",
    "RHO",
    "SIGMA_CALM",
    "SMALL",
    "STEPS",
    "TINY",
    "TRANSITION",
    "TURBULENT_VOL_MULT",
    "VARIANTS",
    "ZOO",
    "Series",
    "Sizes",
    "build",
    "generate",
    "make_rows",
]

ZOO = "crypto"
VARIANTS = ("crypto_ridge", "crypto_gbm", "crypto_gru", "crypto_lstm")
STEPS = 32  # T
COINS = 5  # C
TARGET = 0
MAX_BATCH = 64

# Regime 0 = calm, 1 = turbulent. Row = from, column = to.
TRANSITION = np.array([[0.98, 0.02], [0.05, 0.95]])
RHO = (0.3, 0.7)
SIGMA_CALM = np.array([0.010, 0.012, 0.011, 0.013, 0.009])
TURBULENT_VOL_MULT = 1.6
MU = (np.full(COINS, 2e-4), np.full(COINS, -4e-4))
MOMENTUM_LAGS = 8
A_MOMENTUM = 0.3
B_LEADLAG = (0.8, -0.8)
K_INTERACT = 0.35


@dataclass(frozen=True)
class Series:
    """A generated path: ``returns`` [n, C] log returns, ``prices`` [n, C], ``regime`` [n]."""

    returns: np.ndarray
    prices: np.ndarray
    regime: np.ndarray


def _equicorrelation(rho: float) -> np.ndarray:
    return np.full((COINS, COINS), rho) + (1.0 - rho) * np.eye(COINS)


def generate(n: int, seed: int) -> Series:
    """The documented generator (module docstring), ``n`` steps, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    regime = np.empty(n, dtype=np.int64)
    s = 0
    u = rng.random(n)
    for t in range(n):
        regime[t] = s
        s = int(u[t] < TRANSITION[s, 1]) if s == 0 else int(u[t] >= TRANSITION[s, 0])
    sigma = np.stack([SIGMA_CALM, SIGMA_CALM * TURBULENT_VOL_MULT])  # [2, C]
    chol = np.stack([np.linalg.cholesky(_equicorrelation(r)) for r in RHO])
    mu = np.stack(MU)
    z = rng.standard_normal((n, COINS))
    sig_t = sigma[regime]  # [n, C]
    eps = sig_t * np.einsum("nij,nj->ni", chol[regime], z)
    r = mu[regime] - sig_t**2 / 2 + eps
    # The predictable part depends on past returns only, so it is added step by step
    # (coin 0's own past feeds nothing back here, but keeping the loop causal makes
    # that obviously true).
    b = np.asarray(B_LEADLAG)[regime]
    for t in range(MOMENTUM_LAGS, n):
        st = sig_t[t]
        m = r[t - MOMENTUM_LAGS : t, 4].mean() / (st[4] / np.sqrt(MOMENTUM_LAGS))
        lead = r[t - 1, 1] / st[1]
        inter = np.tanh((r[t - 1, 2] / st[2]) * (r[t - 1, 3] / st[3]))
        r[t, TARGET] += st[TARGET] * (A_MOMENTUM * m + b[t] * lead + K_INTERACT * inter)
    prices = 100.0 * np.exp(np.cumsum(r, axis=0))
    return Series(returns=r, prices=prices, regime=regime)


def make_rows(returns: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``returns[t-T:t]`` and targets ``returns[t, TARGET]`` for ``t`` in [start, stop)."""
    idx = np.arange(start, stop)
    offsets = np.arange(-STEPS, 0)
    x = returns[idx[:, None] + offsets[None, :]].astype(np.float32)  # [rows, T, C]
    y = returns[idx, TARGET].astype(np.float32)
    return x, y


# ---- training and export ------------------------------------------------------

Progress = Callable[[str], None]
Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Sizes:
    """How much a build trains on (architectures and hyper-parameters are the same in every size)."""

    train_rows: int
    eval_rows: int
    gru_epochs: int
    lstm_epochs: int
    gbm_trees: int = 600


# The small build trades training rows and epochs for a build well under a minute on
# one core; the ordering of the variants' qualities holds in both (tested for small).
FULL = Sizes(train_rows=40_000, eval_rows=8_000, gru_epochs=8, lstm_epochs=8)
SMALL = Sizes(train_rows=16_000, eval_rows=4_000, gru_epochs=6, lstm_epochs=4)
# seconds, for tests of what the sizes do not change (files, determinism); not a useful zoo
TINY = Sizes(train_rows=2_000, eval_rows=500, gru_epochs=1, lstm_epochs=1, gbm_trees=50)

_GRU_HIDDEN = 16
_LSTM_HIDDEN, _LSTM_LAYERS = 48, 2
_GBM = {"max_depth": 5, "learning_rate": 0.02, "early_stopping": False}  # max_iter: Sizes.gbm_trees
_BATCH = 256
_LR = 3e-3


def _tensor(name: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": shape}


def _config() -> dict[str, Any]:
    return {
        "runtime": "onnx",
        "max_batch_size": MAX_BATCH,
        "inputs": [_tensor("window", [-1, STEPS, COINS])],
        "outputs": [_tensor("forecast", [-1, 1])],
    }


def _flat_window_front(model_bytes: bytes) -> bytes:
    """Give a skl2onnx graph over ``[N, T*C]`` the zoo's ``window [N, T, C]`` input and
    ``forecast [N, 1]`` output, so every variant shares one signature."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    (flat_in,) = graph.input
    old_out = graph.output[0].name
    shape = helper.make_tensor("window_flat_shape", TensorProto.INT64, [2], [-1, STEPS * COINS])
    graph.initializer.append(shape)
    reshape = helper.make_node("Reshape", ["window", "window_flat_shape"], [flat_in.name], name="flatten_window")
    graph.node.insert(0, reshape)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", STEPS, COINS]))
    for node in graph.node:
        node.output[:] = ["forecast" if o == old_out else o for o in node.output]
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("forecast", TensorProto.FLOAT, ["N", 1]))
    onnx.checker.check_model(model)
    return model.SerializeToString()


@contextlib.contextmanager
def _hgb_export_fix() -> Iterator[None]:
    """skl2onnx 1.20 passes a Python ``False`` as ``nodes_missing_value_tracks_true`` for
    the leaves of a HistGradientBoosting tree, which onnx >= 1.19 refuses in an ints
    attribute ("Expected an int, got a boolean"). Coerce it to 0/1 for the duration of
    one conversion; the exported graph is what skl2onnx meant to write."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    def add_node(*args: Any, **kwargs: Any) -> Any:
        if "nodes_missing_value_tracks_true" in kwargs:
            kwargs["nodes_missing_value_tracks_true"] = int(kwargs["nodes_missing_value_tracks_true"])
        return original(*args, **kwargs)

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def _sklearn_variant(model: Any) -> tuple[bytes, Predict]:
    with _hgb_export_fix():
        onnx_bytes = _flat_window_front(sklearn_to_onnx(model, STEPS * COINS, name="window_flat"))

    def predict(x: np.ndarray) -> np.ndarray:
        return model.predict(x.reshape(len(x), -1)).astype(np.float32).reshape(-1, 1)

    return onnx_bytes, predict


def _torch_variant(cell: str, hidden: int, layers: int, epochs: int, x: np.ndarray, y: np.ndarray,
                   seed: int) -> tuple[bytes, Predict]:
    import io

    import torch

    # Returns are ~1e-2; recurrent nets train far better on unit-scale inputs. The
    # scales are baked into the graph so clients still send and get raw log returns.
    x_scale = float(x.std())
    y_scale = float(y.std())

    class Forecaster(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = getattr(torch.nn, cell)(COINS, hidden, layers, batch_first=True)
            self.head = torch.nn.Linear(hidden, 1)

        def forward(self, window: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(window / x_scale)
            return self.head(out[:, -1]) * y_scale

    torch.manual_seed(seed)
    net = Forecaster()
    opt = torch.optim.Adam(net.parameters(), lr=_LR)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y).reshape(-1, 1)
    order = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=order)
        for i in range(0, len(xt), _BATCH):
            idx = perm[i : i + _BATCH]
            opt.zero_grad()
            # Loss on the scaled target: same optimum, better-conditioned gradients.
            loss = torch.nn.functional.mse_loss(net(xt[idx]) / y_scale, yt[idx] / y_scale)
            loss.backward()
            opt.step()
    net.eval()
    buf = io.BytesIO()
    # The exporter warns that RNNs exported without h0/c0 inputs may misbehave at other
    # batch sizes; the graph starts from zeros for any batch, and _check_export runs it
    # at batch 16 against the trained model, so the warning is noise here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        # The tracer flags nn.RNN's hidden-size check, a shape constant for a fixed model.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            net,
            (torch.zeros(1, STEPS, COINS),),
            buf,
            input_names=["window"],
            output_names=["forecast"],
            dynamic_axes={"window": {0: "N"}, "forecast": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(batch)).numpy()

    return buf.getvalue(), predict


def _check_export(onnx_bytes: bytes, predict: Predict, x: np.ndarray, variant: str) -> None:
    """The exported graph must answer what the in-process model answers."""
    from bastion.runtimes.onnx_runtime import ort  # telemetry off, as in the server

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    got = sess.run(["forecast"], {"window": x})[0]
    want = predict(x)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-6):
        raise RuntimeError(f"{variant}: ONNX export disagrees with the trained model: {got[:3]} vs {want[:3]}")


def build_with_models(
    out: Path, *, small: bool = False, seed: int = 0, progress: Progress | None = None, sizes: Sizes | None = None
) -> tuple[list[str], dict[str, Predict]]:
    """:func:`build`, also returning each variant's in-process model (for checking exports)."""
    import torch
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import Ridge

    say = progress or (lambda _msg: None)
    sizes = sizes or (SMALL if small else FULL)
    out = Path(out)
    start = time.perf_counter()

    # Training targets are t in [T, T + train_rows); evaluation windows start T steps
    # after the last training target, so no return is seen by both.
    first_eval = STEPS + sizes.train_rows + STEPS
    series = generate(first_eval + sizes.eval_rows, seed)
    x_tr, y_tr = make_rows(series.returns, STEPS, STEPS + sizes.train_rows)
    x_ev, y_ev = make_rows(series.returns, first_eval, first_eval + sizes.eval_rows)
    flat_tr = x_tr.reshape(len(x_tr), -1)

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    # One thread and deterministic kernels: same seed, same weights, same qualities.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        exported: dict[str, tuple[bytes, Predict]] = {}
        say("crypto_ridge: fitting")
        exported["crypto_ridge"] = _sklearn_variant(Ridge(alpha=1.0).fit(flat_tr, y_tr))
        say("crypto_gbm: fitting")
        gbm = HistGradientBoostingRegressor(**_GBM, max_iter=sizes.gbm_trees, random_state=seed).fit(flat_tr, y_tr)
        exported["crypto_gbm"] = _sklearn_variant(gbm)
        say("crypto_gru: training")
        exported["crypto_gru"] = _torch_variant("GRU", _GRU_HIDDEN, 1, sizes.gru_epochs, x_tr, y_tr, seed)
        say("crypto_lstm: training")
        exported["crypto_lstm"] = _torch_variant(
            "LSTM", _LSTM_HIDDEN, _LSTM_LAYERS, sizes.lstm_epochs, x_tr, y_tr, seed
        )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)

    for variant, (onnx_bytes, predict) in exported.items():
        _check_export(onnx_bytes, predict, x_ev[:16], variant)
        write_bytes_atomic(out / variant / "1" / "model.onnx", onnx_bytes)
        write_model_config(out / variant, _config())

    write_zoo(out, ZOO, task="crypto-return-forecasting", variants=VARIANTS, metric="directional_accuracy",
              evaluation={"window": x_ev, "y": y_ev})
    say(f"crypto: built {len(VARIANTS)} variants in {time.perf_counter() - start:.1f} s")
    return [*VARIANTS, ZOO], {v: p for v, (_, p) in exported.items()}


def build(
    out: Path, *, small: bool = False, seed: int = 0, progress: Progress | None = None, sizes: Sizes | None = None
) -> list[str]:
    """Write the scenario's variant models and its zoo into the model repository ``out``;
    return the names written (the variants, then the zoo). ``sizes`` overrides what
    ``small`` picks (``SMALL`` or ``FULL``)."""
    names, _ = build_with_models(out, small=small, seed=seed, progress=progress, sizes=sizes)
    return names
