"""Pictures of reconstructions: what an SSIM of 0.3 or 0.8 actually looks like."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bastion.confidential.partition.recon_inputs import _as_float_array, _check_inputs


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
