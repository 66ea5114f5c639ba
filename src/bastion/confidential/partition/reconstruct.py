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

and gets the reconstructions of the evaluation inputs with their scores
(``run_reconstruction``). The parts, by what each decides:

* ``recon_inputs.py``: what inputs are accepted (shapes, value ranges, size bounds);
* ``recon_scores.py``: how a reconstruction is scored (SSIM/PSNR for images, feature
  recovery for tables) and the no-information baseline (``score_reconstruction``,
  ``baseline_scores``, ``primary_metric``);
* ``recon_models.py``: the two attackers, ``decoder`` and ``cgan``, their networks and
  training, and the budgets (``BudgetSpec``, ``BUDGETS``) that size it;
* ``recon_plot.py``: ``plot_examples``, a picture of reconstructions next to the originals;
* here: ``run_reconstruction`` (argument checks, the aux train/validation split, the
  attacker's training and the scoring) and its ``ReconstructionResult``.

Every public name of those modules is importable from here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bastion.confidential.partition.recon_inputs import (
    MAX_FEATURE_DIM,
    MAX_INPUT_DIM,
    MAX_ROWS,
    Kind,
    _check_pairs,
)
from bastion.confidential.partition.recon_models import (
    BUDGETS,
    BudgetSpec,
    _add_noise_input,
    _Codec,
    _fit_decoder,
    _fit_gan,
    _predict,
    _torch_session,
)
from bastion.confidential.partition.recon_plot import plot_examples
from bastion.confidential.partition.recon_scores import (
    _selection_value,
    _ssim_batch,
    _ssim_window,
    baseline_scores,
    primary_metric,
    score_reconstruction,
)

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
BudgetName = Literal["quick", "standard", "large"]
Progress = Callable[[int, int], None]

VAL_FRACTION = 0.15  # share of the auxiliary pairs held out for validation (early stopping, checkpoint choice)


@dataclass
class ReconstructionResult:
    """One attacker's outcome at one split.

    ``scores`` are on the evaluation pairs (see ``recon_scores`` for what each is);
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
