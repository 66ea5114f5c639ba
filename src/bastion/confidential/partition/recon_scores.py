"""How a reconstruction is scored, and what "the features tell nothing" scores.

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

``primary_metric`` names the headline metric of a set of scores; the c-GAN selects its
checkpoint on it (``_selection_value``; ``_ssim_batch`` is the vectorised SSIM it uses
for its frequent validation checks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bastion.confidential.partition.recon_inputs import Kind, _as_float_array, _check_inputs

PSNR_CAP = 100.0  # dB, for exact copies (MSE = 0 would give inf)


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

