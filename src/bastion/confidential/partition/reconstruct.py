"""Input-reconstruction attackers for the partition risk advisor (issue 16).

Why: a partitioned model runs its first layers (the *head*) in the trusted worker and
sends the head's output (the intermediate *features*) to the untrusted host, which runs
the rest. Whoever holds the host sees every request's features. The question the
advisor has to answer for each candidate split is: *how much of the client's input can
an attacker rebuild from those features?* It answers it empirically, as the research
does (Origami; the c-GAN attacker of the layer-partitioning literature): an attacker
who holds auxiliary pairs (features, input) from the same distribution, obtained by
running the head on data of their own, trains a model from features to input and is
scored on held-out pairs it never saw.

Everything here works on arrays, not on models: the caller runs the head (the graph
surgery lives in ``graph.py``) and passes

* ``features_aux`` [N_aux, ...], ``inputs_aux`` [N_aux, ...]: the attacker's side;
* ``features_eval`` [N_eval, ...], ``inputs_eval`` [N_eval, ...]: held-out pairs,
  disjoint from the auxiliary ones, on which the attack is scored.

Two attackers (torch, CPU, seeded; one intra-op thread by default so a seed gives the
same numbers every run):

``decoder``
    An MLP (two hidden layers with layer norm, plus a linear path from features to
    output) from the (flattened, standardised) features to the (flattened) input, trained
    with Adam on the reconstruction loss (MSE on [0, 1] images and on real columns on a
    standardised scale; BCE on binary columns), the learning rate cut at each plateau of
    the validation loss (a 15 % split of the auxiliary data) and training stopped at the
    fourth; the best checkpoint is kept. A plain MLP rather than transposed convolutions:
    the features of a cut may be convolutional maps, vectors or logits, and the inputs
    here are small (8x8 images, tables); the linear path is what makes a layer that still
    holds the input linearly (an early convolution) reconstructable within the quick
    budget.

``cgan``
    A conditional GAN in the pix2pix style: a generator G(features, z) -> input and a
    discriminator D(input, features) -> real/fake that judges (input, features) *pairs*,
    so it checks that a reconstruction is plausible *for these features*. G's loss is the
    adversarial loss plus ``recon_weight`` x the reconstruction loss. G has the decoder's
    architecture (plus the noise input) and starts from the decoder trained with the same
    seed and budget; the adversarial phase then runs for the budget's GAN steps, and the
    checkpoint kept is the one with the best validation score (SSIM for images,
    feature-recovery accuracy / R² for tabular) *including the starting point*. So on
    the attacker's own validation data the c-GAN is never worse than the decoder; when
    adversarial training does not help, it returns exactly the decoder's reconstructions
    (``details["gan_selected_step"] == 0``). Scores on the evaluation pairs are what they
    are, and may be a little lower than the decoder's by chance. Measured on the digits
    CNN (issue 16's image scenario), the adversarial phase added at most 0.015 SSIM to
    the decoder at the quick budget and about 0.001 at the standard one: on 8x8 inputs a
    well-trained regression already gets what the features hold; pix2pix's advantage
    (sharper, plausible detail) shows on larger images.

Reconstructions of the evaluation inputs use z = 0 (the mode of the noise prior), so
they are deterministic.

Scores (``score_reconstruction``), on the evaluation pairs:

* images (``kind="image"``, inputs [N, C, H, W] in [0, 1]): ``ssim`` = mean over images
  of scikit-image's ``structural_similarity`` (data_range 1.0, 7x7 uniform window or the
  largest odd window that fits, channels on axis 0; ``ssim_win`` changes it). On 8x8
  images only the 2x2 window positions away from the border count, so this is close to a
  global SSIM, and it is high even without information: the mean digit scores 0.58
  against held-out digits (0.38 with a 3x3 window). Read it against ``baseline_scores``;
  ``psnr`` = mean over images of ``peak_signal_noise_ratio`` (data_range 1.0, capped at
  100 dB for exact copies); ``mse`` = mean squared error over all pixels.
* tabular (``kind="tabular"``, inputs [N, D]): a column is *binary* when every auxiliary
  value in it is 0 or 1, else *real*. Binary columns: ``accuracy`` = fraction of
  (row, binary column) entries where the reconstruction thresholded at 0.5 equals the
  input thresholded at 0.5 (the "feature-recovery accuracy");
  ``balanced_accuracy`` = mean of the recovery rates of the 1s and of the 0s (pooled
  over all binary entries; sparse features make plain accuracy look high for an attacker
  who predicts all zeros, and this does not); ``f1_present`` = pooled F1 of the 1s.
  Real columns: ``r2`` = coefficient of determination per column (1 - SSE/SST around
  the evaluation mean), averaged over columns with non-zero evaluation variance;
  ``within_tol`` = fraction of (row, real column) entries within ``tol`` (0.1) auxiliary
  standard deviations of the truth. Mixed data get both sets.

``baseline_scores`` scores the trivial attacker that answers the mean auxiliary input
for every row: what "the features tell nothing" looks like on the same metrics.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "BUDGETS",
    "MAX_FEATURE_DIM",
    "MAX_INPUT_DIM",
    "MAX_ROWS",
    "BudgetSpec",
    "ReconstructionResult",
    "baseline_scores",
    "plot_examples",
    "primary_metric",
    "run_reconstruction",
    "score_reconstruction",
]

AttackerName = Literal["decoder", "cgan"]
Kind = Literal["image", "tabular"]
BudgetName = Literal["quick", "standard", "large"]
Progress = Callable[[int, int], None]

# Bounds: the advisor runs this once per candidate split on a CPU; anything beyond these is
# a mistake (a wrong axis, an unflattened batch), not a workload, and would take hours or
# exhaust memory before failing.
MAX_ROWS = 1_000_000  # rows of aux or eval
MAX_FEATURE_DIM = 1 << 16  # values per row of features (first layer: this x hidden weights)
MAX_INPUT_DIM = 1 << 15  # values per row of inputs (e.g. 3x96x96 = 27,648)
MAX_ARRAY_BYTES = 2 << 30  # float32 bytes of one features array (training holds about three copies)
MIN_AUX = 32  # the validation split needs rows, and so does training
VAL_FRACTION = 0.15
PSNR_CAP = 100.0  # dB, for exact copies (MSE = 0 would give inf)


@dataclass(frozen=True)
class BudgetSpec:
    """Training budget of the attackers, in optimiser steps (batches), not epochs: the run
    time then scales with the feature size, not with the amount of auxiliary data.

    ``decoder_steps`` is a maximum: after ``patience`` steps without a better validation loss
    the learning rate is cut (x0.3, from the best checkpoint), and the fourth such plateau
    stops training; ``gan_steps`` is the
    adversarial phase of the c-GAN after its decoder warm start; ``hidden`` is the width of the
    MLPs (the generator also has a linear path from features to input, so a hidden layer
    narrower than the input is not a bottleneck for what is linearly recoverable)."""

    decoder_steps: int
    patience: int
    gan_steps: int
    hidden: int
    batch: int = 64

    def __post_init__(self) -> None:
        for name, value, lo, hi in (("decoder_steps", self.decoder_steps, 1, 1_000_000),
                                    ("patience", self.patience, 1, 1_000_000),
                                    ("gan_steps", self.gan_steps, 0, 1_000_000),
                                    ("hidden", self.hidden, 8, 8192), ("batch", self.batch, 1, 8192)):
            if not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"BudgetSpec.{name} must be an integer in [{lo}, {hi}], got {value!r}")


BUDGETS: dict[str, BudgetSpec] = {
    "quick": BudgetSpec(decoder_steps=400, patience=60, gan_steps=200, hidden=128),
    "standard": BudgetSpec(decoder_steps=2000, patience=200, gan_steps=1500, hidden=256),
    "large": BudgetSpec(decoder_steps=8000, patience=500, gan_steps=6000, hidden=512),
}


@dataclass
class ReconstructionResult:
    """One attacker's outcome at one split.

    ``scores`` are on the evaluation pairs (see the module docstring for what each is);
    ``baseline`` are the same metrics for the trivial mean-input attacker;
    ``train_seconds`` is the wall time of training (the c-GAN's includes its decoder warm
    start); ``details`` holds steps run and the selected checkpoint."""

    attacker: str
    budget: str
    scores: dict[str, float]
    train_seconds: float
    n_aux: int
    n_eval: int
    baseline: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def _as_float_array(name: str, a: Any) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if arr.ndim < 2:
        raise ValueError(f"{name}: expected shape [N, ...] with at least 2 dimensions, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _check_inputs(name: str, inputs: np.ndarray, kind: str) -> None:
    row = int(np.prod(inputs.shape[1:]))
    if row > MAX_INPUT_DIM:
        raise ValueError(f"{name}: {row} values per row (shape {inputs.shape}) is above the bound of "
                         f"{MAX_INPUT_DIM}; reconstruction attackers here are sized for small inputs")
    if kind == "image":
        if inputs.ndim != 4:
            raise ValueError(f"{name}: images must be [N, C, H, W], got shape {inputs.shape}")
        c, h, w = inputs.shape[1:]
        if c > 4:
            raise ValueError(f"{name}: {c} channels; expected 1 to 4 (is the layout NHWC instead of NCHW?)")
        if min(h, w) < 3:
            raise ValueError(f"{name}: images of {h}x{w} are too small for SSIM (3x3 at least)")
        lo, hi = float(inputs.min()), float(inputs.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"{name}: image values must lie in [0, 1] (SSIM/PSNR use data_range 1.0), "
                             f"got [{lo:g}, {hi:g}]")
    elif kind == "tabular":
        if inputs.ndim != 2:
            raise ValueError(f"{name}: tabular inputs must be [N, D], got shape {inputs.shape}")
    else:
        raise ValueError(f"kind must be 'image' or 'tabular', got {kind!r}")


def _check_pairs(features_aux: Any, inputs_aux: Any, features_eval: Any, inputs_eval: Any,
                 kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    fa = _as_float_array("features_aux", features_aux)
    xa = _as_float_array("inputs_aux", inputs_aux)
    fe = _as_float_array("features_eval", features_eval)
    xe = _as_float_array("inputs_eval", inputs_eval)
    for name, f, x in (("aux", fa, xa), ("eval", fe, xe)):
        if len(f) != len(x):
            raise ValueError(f"{name}: features have {len(f)} rows but inputs have {len(x)}")
        if len(f) > MAX_ROWS:
            raise ValueError(f"{name}: {len(f)} rows is above the bound of {MAX_ROWS}")
        if f.nbytes > MAX_ARRAY_BYTES:
            raise ValueError(f"features_{name}: {f.nbytes / 2**30:.1f} GiB as float32 is above the bound of "
                             f"{MAX_ARRAY_BYTES / 2**30:.0f} GiB")
    if len(fa) < MIN_AUX:
        raise ValueError(f"aux: {len(fa)} rows; an attacker needs at least {MIN_AUX} (training + validation)")
    if len(fe) < 1:
        raise ValueError("eval: no rows")
    if fa.shape[1:] != fe.shape[1:]:
        raise ValueError(f"features: aux rows are {fa.shape[1:]} but eval rows are {fe.shape[1:]}")
    if xa.shape[1:] != xe.shape[1:]:
        raise ValueError(f"inputs: aux rows are {xa.shape[1:]} but eval rows are {xe.shape[1:]}")
    fdim = int(np.prod(fa.shape[1:]))
    if fdim > MAX_FEATURE_DIM:
        raise ValueError(f"features: {fdim} values per row (shape {fa.shape[1:]}) is above the bound of "
                         f"{MAX_FEATURE_DIM}; pool or cut elsewhere")
    _check_inputs("inputs_aux", xa, kind)
    _check_inputs("inputs_eval", xe, kind)
    return fa, xa, fe, xe


# --------------------------------------------------------------------------- scores


def _binary_columns(inputs_aux: np.ndarray) -> np.ndarray:
    flat = inputs_aux.reshape(len(inputs_aux), -1)
    return np.all((flat == 0) | (flat == 1), axis=0)


def _ssim_window(h: int, w: int, win: int | None) -> int:
    if win is None:
        side = min(7, h, w)
        return side if side % 2 == 1 else side - 1
    if win < 3 or win % 2 == 0 or win > min(h, w):
        raise ValueError(f"ssim_win must be odd, >= 3 and <= the image side ({min(h, w)}), got {win}")
    return win


def _image_scores(inputs: np.ndarray, recon: np.ndarray, ssim_win: int | None) -> dict[str, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    _, c, h, w = inputs.shape
    win = _ssim_window(h, w, ssim_win)
    x = inputs.astype(np.float64)
    r = np.clip(recon.astype(np.float64), 0.0, 1.0)
    ssims, psnrs = [], []
    for xi, ri in zip(x, r, strict=True):
        if c == 1:
            ssims.append(structural_similarity(xi[0], ri[0], data_range=1.0, win_size=win))
        else:
            ssims.append(structural_similarity(xi, ri, data_range=1.0, win_size=win, channel_axis=0))
        if np.array_equal(xi, ri):
            psnrs.append(PSNR_CAP)
        else:
            psnrs.append(min(PSNR_CAP, float(peak_signal_noise_ratio(xi, ri, data_range=1.0))))
    return {"ssim": float(np.mean(ssims)), "psnr": float(np.mean(psnrs)), "mse": float(np.mean((x - r) ** 2))}


def _ssim_batch(inputs: np.ndarray, recon: np.ndarray, ssim_win: int | None) -> float:
    """Mean SSIM over [N, C, H, W] images in one vectorised pass: the same formula as scikit-image's
    ``structural_similarity`` with its defaults (uniform window, sample covariance, K1 0.01, K2 0.03,
    border of half a window cropped, channels averaged), for the c-GAN's frequent validation
    checks; the reported scores use scikit-image itself."""
    from scipy.ndimage import uniform_filter

    _, _, h, w = inputs.shape
    win = _ssim_window(h, w, ssim_win)
    x = inputs.astype(np.float64)
    y = np.clip(recon.astype(np.float64), 0.0, 1.0)
    size = (1, 1, win, win)
    cov_norm = win * win / (win * win - 1.0)
    ux, uy = uniform_filter(x, size=size), uniform_filter(y, size=size)
    vx = cov_norm * (uniform_filter(x * x, size=size) - ux * ux)
    vy = cov_norm * (uniform_filter(y * y, size=size) - uy * uy)
    vxy = cov_norm * (uniform_filter(x * y, size=size) - ux * uy)
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return float(s[:, :, pad:h - pad, pad:w - pad].mean(axis=(2, 3)).mean())


def _tabular_scores(inputs: np.ndarray, recon: np.ndarray, binary: np.ndarray, aux_std: np.ndarray,
                    tol: float) -> dict[str, float]:
    out: dict[str, float] = {}
    if binary.any():
        truth = inputs[:, binary] >= 0.5
        guess = recon[:, binary] >= 0.5
        tp = float(np.sum(truth & guess))
        fp = float(np.sum(~truth & guess))
        fn = float(np.sum(truth & ~guess))
        tn = float(np.sum(~truth & ~guess))
        out["accuracy"] = (tp + tn) / truth.size
        rates = [r for r in (tp / (tp + fn) if tp + fn else None, tn / (tn + fp) if tn + fp else None)
                 if r is not None]
        out["balanced_accuracy"] = float(np.mean(rates))
        out["f1_present"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    real = ~binary
    if real.any():
        x = inputs[:, real].astype(np.float64)
        r = recon[:, real].astype(np.float64)
        sst = np.sum((x - x.mean(axis=0)) ** 2, axis=0)
        sse = np.sum((x - r) ** 2, axis=0)
        ok = sst > 0
        out["r2"] = float(np.mean(1.0 - sse[ok] / sst[ok])) if ok.any() else float("nan")
        out["within_tol"] = float(np.mean(np.abs(x - r) <= tol * aux_std[real].astype(np.float64)))
    return out


def score_reconstruction(inputs_eval: Any, recon: Any, *, kind: Kind, inputs_aux: Any, tol: float = 0.1,
                         ssim_win: int | None = None) -> dict[str, float]:
    """Score reconstructions ``recon`` of ``inputs_eval`` (same shape). ``inputs_aux`` says which
    tabular columns are binary and sets the tolerance scale of real ones (the attacker's
    knowledge, not the evaluation data's); see the module docstring for each metric."""
    xe = _as_float_array("inputs_eval", inputs_eval)
    re_ = _as_float_array("recon", recon)
    xa = _as_float_array("inputs_aux", inputs_aux)
    if xe.shape != re_.shape:
        raise ValueError(f"recon has shape {re_.shape}, inputs_eval {xe.shape}")
    _check_inputs("inputs_eval", xe, kind)
    if kind == "image":
        return _image_scores(xe, re_, ssim_win)
    binary = _binary_columns(xa)
    return _tabular_scores(xe, re_, binary, xa.std(axis=0), tol)


def baseline_scores(inputs_aux: Any, inputs_eval: Any, *, kind: Kind, tol: float = 0.1,
                    ssim_win: int | None = None) -> dict[str, float]:
    """Scores of the trivial attacker that answers the mean auxiliary input for every row
    (thresholded at 0.5 on binary columns, like any reconstruction): the level an attacker
    reaches when the features carry no information about the input."""
    xa = _as_float_array("inputs_aux", inputs_aux)
    xe = _as_float_array("inputs_eval", inputs_eval)
    if xa.shape[1:] != xe.shape[1:]:
        raise ValueError(f"inputs: aux rows are {xa.shape[1:]} but eval rows are {xe.shape[1:]}")
    recon = np.broadcast_to(xa.mean(axis=0, keepdims=True), xe.shape).copy()
    return score_reconstruction(xe, recon, kind=kind, inputs_aux=xa, tol=tol, ssim_win=ssim_win)


def primary_metric(kind: Kind, scores: Mapping[str, float]) -> str:
    """The headline metric of ``scores``, the one the c-GAN selects its checkpoint on:
    ``ssim`` for images, ``accuracy`` (binary columns) or else ``r2`` for tabular data."""
    if kind == "image":
        return "ssim"
    return "accuracy" if "accuracy" in scores else "r2"


def _selection_value(kind: Kind, scores: Mapping[str, float]) -> float:
    if kind == "image":
        return scores["ssim"]
    parts = [scores[k] for k in ("accuracy", "r2") if k in scores and math.isfinite(scores[k])]
    return float(np.mean(parts)) if parts else -math.inf


# --------------------------------------------------------------------------- models


@contextmanager
def _torch_session(seed: int, threads: int) -> Iterator[Any]:
    """Seeded, thread-limited torch, restoring the caller's RNG state and thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield torch
    finally:
        torch.set_num_threads(before)


class _Codec:
    """Maps arrays to the networks' scale and back: features standardised with the aux
    statistics; inputs flattened, binary/[0, 1] columns kept (sigmoid outputs), real
    columns standardised (linear outputs)."""

    def __init__(self, features_aux: np.ndarray, inputs_aux: np.ndarray, kind: str) -> None:
        f = features_aux.reshape(len(features_aux), -1)
        self.f_mean = f.mean(axis=0)
        self.f_std = np.where(f.std(axis=0) > 1e-6, f.std(axis=0), 1.0).astype(np.float32)
        x = inputs_aux.reshape(len(inputs_aux), -1)
        self.input_shape = inputs_aux.shape[1:]
        # sigmoid columns: every pixel of an image, binary columns of a table
        self.sig = np.ones(x.shape[1], bool) if kind == "image" else _binary_columns(inputs_aux)
        self.x_mean = np.where(self.sig, 0.0, x.mean(axis=0)).astype(np.float32)
        std = x.std(axis=0)
        self.x_std = np.where(self.sig | (std <= 1e-6), 1.0, std).astype(np.float32)

    def features(self, f: np.ndarray) -> np.ndarray:
        z = (f.reshape(len(f), -1) - self.f_mean) / self.f_std
        return np.clip(z, -20.0, 20.0).astype(np.float32)

    def inputs(self, x: np.ndarray) -> np.ndarray:
        return ((x.reshape(len(x), -1) - self.x_mean) / self.x_std).astype(np.float32)

    def decode(self, out: np.ndarray) -> np.ndarray:
        """Network outputs (on the network's scale, after the output activation) -> inputs."""
        x = out * self.x_std + self.x_mean
        return x.reshape((len(out), *self.input_shape)).astype(np.float32)


MAX_SKIP = 1 << 22  # weights of the generator's linear path features -> input (6144 x 64 = 393,216 for a conv cut)
DECODER_LR = 3e-3  # Adam (1e-2 diverged on 3,072-wide conv features)
# learning rate cut by LR_FACTOR at each validation plateau (``patience`` steps without a better loss, counted
# from the last improvement), training resuming from the best checkpoint; the LR_CUTS+1-th plateau stops it. A
# cosine schedule with early stopping did worse: with the budget's schedule still at a high rate, the largest
# budget stopped a conv cut early at 28.5 dB where the standard one, decaying sooner, reached 29.4 dB
LR_FACTOR = 0.3
LR_CUTS = 3
# the layers that read the features (first hidden layer, linear path) learn at DECODER_LR x sqrt(256 / width) when
# the features are wider than 256: at one rate for all, a 6,144-wide conv cut reached 18.6 dB PSNR in the quick
# budget against 28.0 dB with the scaling (image CNN, second convolution), while narrow cuts did not change
WIDE_FEATURES = 256


def _make_generator(torch: Any, f_dim: int, z_dim: int, out_dim: int, hidden: int, sig: np.ndarray) -> Any:
    nn = torch.nn

    class Generator(nn.Module):
        """MLP features (+ noise) -> input, plus a linear path features -> input; sigmoid on [0, 1]
        and binary columns, linear on real ones."""

        def __init__(self) -> None:
            super().__init__()
            self.z_dim = z_dim
            self.body = nn.Sequential(
                nn.Linear(f_dim + z_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(0.1),
                nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                nn.Linear(hidden, out_dim),
            )
            # a linear path from the features (not the noise) to the output: what is linearly
            # recoverable (an early conv layer, an identity-like feature) is learnt in a few hundred
            # steps instead of being squeezed through the MLP; skipped when it would be huge
            self.skip = nn.Linear(f_dim, out_dim) if f_dim * out_dim <= MAX_SKIP else None
            self.register_buffer("sig", torch.from_numpy(sig.copy()))

        def logits(self, f: Any, z: Any | None = None) -> Any:
            if self.z_dim:
                if z is None:
                    z = torch.zeros(len(f), self.z_dim)
                out = self.body(torch.cat([f, z], dim=1))
            else:
                out = self.body(f)
            return out if self.skip is None else out + self.skip(f)

        def activate(self, logits: Any) -> Any:
            return torch.where(self.sig, torch.sigmoid(logits), logits)

        def forward(self, f: Any, z: Any | None = None) -> Any:
            return self.activate(self.logits(f, z))

    return Generator()


def _make_discriminator(torch: Any, f_dim: int, x_dim: int, hidden: int) -> Any:
    nn = torch.nn
    h = max(64, hidden // 2)

    class Discriminator(nn.Module):
        """D(input, features) -> logit of "real pair": each branch projected, then an MLP on both."""

        def __init__(self) -> None:
            super().__init__()
            self.fx = nn.Linear(x_dim, h)
            self.ff = nn.Linear(f_dim, h)
            self.body = nn.Sequential(nn.LeakyReLU(0.2), nn.Dropout(0.3), nn.Linear(2 * h, h), nn.LeakyReLU(0.2),
                                      nn.Linear(h, 1))

        def forward(self, x: Any, f: Any) -> Any:
            return self.body(torch.cat([self.fx(x), self.ff(f)], dim=1)).squeeze(1)

    return Discriminator()


def _recon_loss(torch: Any, logits: Any, target: Any, sig: Any, kind: str) -> Any:
    """Per-value loss, averaged: MSE on image pixels (what PSNR measures) and on standardised real
    columns, BCE on binary columns."""
    f = torch.nn.functional
    if kind == "image":
        return f.mse_loss(torch.sigmoid(logits), target)
    per = torch.where(sig, f.binary_cross_entropy_with_logits(logits, target, reduction="none"),
                      (logits - target) ** 2)
    return per.mean()


def _batches(torch: Any, n: int, batch: int, gen: Any) -> Iterator[Any]:
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1 if n >= batch else 1, batch):
            yield perm[i:i + batch]


def _predict(torch: Any, g: Any, f: Any) -> np.ndarray:
    g.eval()
    with torch.no_grad():
        out = torch.cat([g(f[i:i + 4096]) for i in range(0, len(f), 4096)])
    g.train()
    return out.numpy()


def _fit_decoder(torch: Any, spec: BudgetSpec, f_tr: Any, x_tr: Any, f_va: Any, x_va: Any, kind: str,
                 sig: np.ndarray, gen: Any, tick: Callable[[int], None]) -> tuple[Any, dict[str, Any]]:
    """Train the decoder (a generator without noise input) on the reconstruction loss alone,
    early-stopped on the validation loss; returns the best checkpoint."""
    g = _make_generator(torch, f_tr.shape[1], 0, x_tr.shape[1], spec.hidden, sig)
    wide = [g.body[0].weight, *([g.skip.weight] if g.skip is not None else [])]
    rest = [p for p in g.parameters() if all(p is not w for w in wide)]
    scale = min(1.0, math.sqrt(WIDE_FEATURES / f_tr.shape[1]))
    opt = torch.optim.Adam([{"params": wide, "lr": DECODER_LR * scale}, {"params": rest}], lr=DECODER_LR,
                           weight_decay=1e-5)
    batch = min(spec.batch, len(f_tr))
    check_every = max(10, min(100, len(f_tr) // batch))
    best, best_state, best_step, step, cuts = math.inf, copy.deepcopy(g.state_dict()), 0, 0, 0
    batches = _batches(torch, len(f_tr), batch, gen)
    while step < spec.decoder_steps:
        idx = next(batches)
        loss = _recon_loss(torch, g.logits(f_tr[idx]), x_tr[idx], g.sig, kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        tick(step)
        if step % check_every == 0 or step == spec.decoder_steps:
            g.eval()
            with torch.no_grad():
                val = float(_recon_loss(torch, g.logits(f_va), x_va, g.sig, kind))
            g.train()
            if val < best * (1 - 1e-4):
                best, best_state, best_step = val, copy.deepcopy(g.state_dict()), step
            elif step - best_step >= spec.patience * (cuts + 1):
                # a plateau: go on from the best checkpoint at a lower rate; stop after LR_CUTS cuts
                if cuts == LR_CUTS:
                    break
                cuts += 1
                g.load_state_dict(best_state)
                for group in opt.param_groups:
                    group["lr"] *= LR_FACTOR
    g.load_state_dict(best_state)
    return g, {"decoder_steps": step, "decoder_val_loss": best, "decoder_lr_cuts": cuts}


def _add_noise_input(torch: Any, decoder: Any, z_dim: int) -> Any:
    """The c-GAN's generator, starting as the decoder: the decoder's weights, plus zero weights
    for the noise columns, so G(f, z) == decoder(f) for every z until adversarial training moves it."""
    first = decoder.body[0]
    f_dim, out_dim = first.in_features, decoder.body[-1].out_features
    g = _make_generator(torch, f_dim, z_dim, out_dim, first.out_features, decoder.sig.numpy())
    state = decoder.state_dict()
    w = state["body.0.weight"]
    state["body.0.weight"] = torch.cat([w, torch.zeros(w.shape[0], z_dim)], dim=1)
    g.load_state_dict(state)
    return g


def _fit_gan(torch: Any, spec: BudgetSpec, g: Any, f_tr: Any, x_tr: Any, f_va: Any, val_score: Callable[[Any], float],
             kind: str, recon_weight: float, gen: Any, tick: Callable[[int], None]) -> tuple[Any, dict[str, Any]]:
    """pix2pix-style adversarial fine-tuning of G (already the decoder) against D(input, features);
    keeps the checkpoint with the best validation score, the starting one included."""
    fnn = torch.nn.functional
    d = _make_discriminator(torch, f_tr.shape[1], x_tr.shape[1], spec.hidden)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    batch = min(spec.batch, len(f_tr))
    check_every = max(10, min(100, len(f_tr) // batch))
    best, best_state, best_step = val_score(g), copy.deepcopy(g.state_dict()), 0
    start = best
    batches = _batches(torch, len(f_tr), batch, gen)
    noise = 0.05  # instance noise on D's inputs: real binary/quantised values are otherwise trivially told apart
    for step in range(1, spec.gan_steps + 1):
        idx = next(batches)
        f, x = f_tr[idx], x_tr[idx]
        z = torch.randn(len(idx), g.z_dim, generator=gen)
        fake = g(f, z)
        # discriminator: real pairs -> 0.9 (one-sided label smoothing), generated pairs -> 0
        d_real = d(x + noise * torch.randn(x.shape, generator=gen), f)
        d_fake = d(fake.detach() + noise * torch.randn(x.shape, generator=gen), f)
        loss_d = (fnn.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, 0.9))
                  + fnn.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        # generator: fool D on (G(f, z), f) pairs + recon_weight x reconstruction
        logits = g.logits(f, z)
        d_gen = d(g.activate(logits) + noise * torch.randn(x.shape, generator=gen), f)
        loss_g = (fnn.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
                  + recon_weight * _recon_loss(torch, logits, x, g.sig, kind))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        tick(step)
        if step % check_every == 0 or step == spec.gan_steps:
            val = val_score(g)
            if val > best + 1e-6:
                best, best_state, best_step = val, copy.deepcopy(g.state_dict()), step
    g.load_state_dict(best_state)
    return g, {"gan_steps": spec.gan_steps, "gan_selected_step": best_step, "val_score_start": start,
               "val_score": best}


def run_reconstruction(features_aux: Any, inputs_aux: Any, features_eval: Any, inputs_eval: Any, *,
                       attacker: AttackerName, kind: Kind, budget: BudgetName | BudgetSpec = "quick",
                       seed: int = 0, progress: Progress | None = None, threads: int = 1,
                       recon_weight: float = 100.0, z_dim: int = 16,
                       ssim_win: int | None = None) -> tuple[ReconstructionResult, np.ndarray]:
    """Train ``attacker`` on the auxiliary pairs and reconstruct the evaluation inputs from their
    features.

    Returns the result (scores on the evaluation pairs, the trivial baseline's scores, training
    time) and the reconstructions, shaped like ``inputs_eval`` (float32; probabilities on
    binary columns, [0, 1] pixels for images). ``progress(step, total)`` is called after each
    optimiser step (``total`` = the budget's maximum; it jumps to ``total`` when early stopping
    ends a phase). ``threads`` is torch's intra-op thread count for the call (restored after);
    ``recon_weight`` weighs the c-GAN's reconstruction term against its adversarial term
    (pix2pix uses 100 with L1; here the term is the decoder's own loss); ``z_dim`` is the size of
    the generator's noise input; ``ssim_win`` overrides the SSIM window (default: 7, or the
    largest odd side that fits)."""
    if attacker not in ("decoder", "cgan"):
        raise ValueError(f"attacker must be 'decoder' or 'cgan', got {attacker!r}")
    if isinstance(budget, BudgetSpec):
        spec, budget_name = budget, "custom"
    elif budget in BUDGETS:
        spec, budget_name = BUDGETS[budget], str(budget)
    else:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)} or a BudgetSpec, got {budget!r}")
    if recon_weight < 0 or not math.isfinite(recon_weight):
        raise ValueError(f"recon_weight must be finite and >= 0, got {recon_weight}")
    if not 0 <= z_dim <= 1024:
        raise ValueError(f"z_dim must be in [0, 1024], got {z_dim}")
    if not 1 <= threads <= 256:
        raise ValueError(f"threads must be in [1, 256], got {threads}")
    fa, xa, fe, xe = _check_pairs(features_aux, inputs_aux, features_eval, inputs_eval, kind)
    if kind == "image":
        _ssim_window(xa.shape[2], xa.shape[3], ssim_win)  # refuse a bad window before training, not after
    codec = _Codec(fa, xa, kind)
    total = spec.decoder_steps + (spec.gan_steps if attacker == "cgan" else 0)

    def tick_at(offset: int) -> Callable[[int], None]:
        return (lambda s: progress(offset + s, total)) if progress is not None else (lambda s: None)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(fa))
    n_val = max(8, round(VAL_FRACTION * len(fa)))
    va, tr = order[:n_val], order[n_val:]
    with _torch_session(seed, threads) as torch:
        t0 = time.perf_counter()  # after torch's import, which is not training
        gen = torch.Generator().manual_seed(seed)
        f_all, x_all = torch.from_numpy(codec.features(fa)), torch.from_numpy(codec.inputs(xa))
        f_tr, x_tr, f_va, x_va = f_all[tr], x_all[tr], f_all[va], x_all[va]
        g, details = _fit_decoder(torch, spec, f_tr, x_tr, f_va, x_va, kind, codec.sig, gen, tick_at(0))
        if progress is not None:
            progress(spec.decoder_steps, total)
        if attacker == "cgan":
            x_va_np = xa[va]

            def val_score(model: Any) -> float:
                recon = codec.decode(_predict(torch, model, f_va))
                if kind == "image":
                    return _ssim_batch(x_va_np, recon, ssim_win)
                return _selection_value(kind, score_reconstruction(x_va_np, recon, kind=kind, inputs_aux=xa))

            g = _add_noise_input(torch, g, z_dim)
            g, more = _fit_gan(torch, spec, g, f_tr, x_tr, f_va, val_score, kind, recon_weight, gen,
                               tick_at(spec.decoder_steps))
            details.update(more)
            if progress is not None:
                progress(total, total)
        seconds = time.perf_counter() - t0
        recon = codec.decode(_predict(torch, g, torch.from_numpy(codec.features(fe))))
    if kind == "image":
        recon = np.clip(recon, 0.0, 1.0)
    result = ReconstructionResult(
        attacker=attacker, budget=budget_name,
        scores=score_reconstruction(xe, recon, kind=kind, inputs_aux=xa, ssim_win=ssim_win),
        train_seconds=seconds, n_aux=len(fa), n_eval=len(fe),
        baseline=baseline_scores(xa, xe, kind=kind, ssim_win=ssim_win), seed=seed, details=details,
    )
    return result, recon


# --------------------------------------------------------------------------- pictures


def plot_examples(inputs_eval: Any, recon_by_attacker: Mapping[str, Any], path: str | Path, n: int = 8,
                  *, title: str = "") -> Path:
    """Write a PNG grid: the first ``n`` evaluation images on the top row, each attacker's
    reconstructions of them on the rows below (one row per attacker, labelled), so a reader
    sees what an SSIM of 0.3 or 0.8 actually looks like. Images only ([N, C, H, W] in [0, 1])."""
    x = _as_float_array("inputs_eval", inputs_eval)
    _check_inputs("inputs_eval", x, "image")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n = min(n, len(x))
    rows: list[tuple[str, np.ndarray]] = [("original", x[:n])]
    for name, rec in recon_by_attacker.items():
        r = _as_float_array(f"recon[{name}]", rec)
        if r.shape[1:] != x.shape[1:] or len(r) < n:
            raise ValueError(f"recon[{name}]: shape {r.shape} does not match inputs {x.shape} (first {n} rows)")
        rows.append((str(name), np.clip(r[:n], 0.0, 1.0)))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.1 * n + 1.2, 1.15 * len(rows) + (0.4 if title else 0.1)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for i, (name, imgs) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            img = imgs[j]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(np.transpose(img[:3], (1, 2, 0)), vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(out, format="png")
    return out
