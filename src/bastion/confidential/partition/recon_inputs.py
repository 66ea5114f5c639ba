"""What the reconstruction attackers accept: the arrays' shapes, value ranges and size bounds.

Used by every entry point of the reconstruction package (``run_reconstruction``,
``score_reconstruction``, ``baseline_scores``, ``plot_examples``) to refuse a wrong axis, an
NHWC batch, out-of-range pixels or an oversized array *before* any training or scoring starts,
with a message that names the offending argument.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Kind = Literal["image", "tabular"]

# Bounds: the advisor runs this once per candidate split on a CPU; anything beyond these is
# a mistake (a wrong axis, an unflattened batch), not a workload, and would take hours or
# exhaust memory before failing.
MAX_ROWS = 1_000_000  # rows of aux or eval
MAX_FEATURE_DIM = 1 << 16  # values per row of features (first layer: this x hidden weights)
MAX_INPUT_DIM = 1 << 15  # values per row of inputs (e.g. 3x96x96 = 27,648)
MAX_ARRAY_BYTES = 2 << 30  # float32 bytes of one features array (training holds about three copies)
MIN_AUX = 32  # the validation split needs rows, and so does training


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
