"""The risk advisor: every candidate split of a model, measured, and the one to use.

For each cut it measures what the research chooses a split by (docs/CONFIDENTIAL.md):

* *compute kept in the TEE*: the head's FLOP share and its measured share of the whole
  model's latency (ONNX Runtime, batch 64, median of repeats);
* *input reconstruction*: the decoder and the conditional GAN of ``reconstruct.py``, trained
  on attacker-side data (one half of ``--data``) and scored on the other half;
* *gradient shielding*: the white-box attacks of ``shielding.py`` against the head-hidden
  attacker (surrogate head, transfer to the real model).

The recommendation is the shallowest cut whose reconstruction and attack success are under
the operator's thresholds. Reconstruction is judged *relative to the no-information
baseline* (0 = no better than answering the mean input, 1 = perfect): absolute SSIM reads
high on small images (the mean digit alone scores ~0.58 on 8x8 digits), and on sparse
binary features plain accuracy is dominated by the zeros, so tabular data use balanced
accuracy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from bastion.confidential.partition.graph import Cut, candidate_cuts, resolve_cut, split_model

__all__ = ["Advice", "CutRisk", "advise", "recommend"]

Progress = Callable[[str, int, int], None]


@dataclass
class CutRisk:
    cut: dict[str, Any]
    flop_share: float
    latency_share: float
    reconstruction: dict[str, dict[str, float]] = field(default_factory=dict)  # attacker -> scores
    recon_relative: float = 0.0  # the best attacker's score relative to the baseline, 0..1
    attacks: dict[str, float] = field(default_factory=dict)  # attack -> head-hidden success rate
    attack_max: float = 0.0


@dataclass
class Advice:
    model: str
    kind: str
    budget: str
    seed: int
    thresholds: dict[str, float]
    white_box: dict[str, float]
    baseline: dict[str, float]
    cuts: list[CutRisk]
    recommended: int | None  # the cut index K, or None when no cut meets the thresholds
    seconds: float


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.asarray(sess.run([sess.get_outputs()[0].name], {name: x})[0])


def _latency(model: onnx.ModelProto, x: np.ndarray, repeats: int = 20) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _relative(kind: str, scores: dict[str, float], baseline: dict[str, float]) -> float:
    key = "ssim" if kind == "image" else ("balanced_accuracy" if "balanced_accuracy" in scores else "r2")
    have, base = scores.get(key, 0.0), baseline.get(key, 0.0)
    top = 1.0
    return float(max(0.0, min(1.0, (have - base) / (top - base)))) if top > base else 0.0


def advise(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, *, kind: str, cuts: Sequence[int] | None = None,
           budget: str = "quick", seed: int = 0, attacks: Sequence[str] | None = None, eps: float | None = None,
           max_recon: float = 0.5, max_attack: float = 0.5, progress: Progress | None = None,
           name: str = "model") -> tuple[Advice, dict[int, dict[str, np.ndarray]], np.ndarray]:
    """Measure every cut (or ``cuts``); returns the advice, the reconstructions of the held-out
    inputs per cut and attacker, and those held-out inputs."""
    from bastion.confidential.partition import reconstruct, shielding

    started = time.perf_counter()
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    half = len(x) // 2
    aux, ev = order[:half], order[half:]  # attacker-side and held-out: disjoint
    x_aux, x_eval, y_eval = x[aux], x[ev], y[ev]
    candidates = candidate_cuts(model)
    chosen: list[Cut] = [resolve_cut(model, k, candidates) for k in cuts] if cuts else candidates
    note = progress or (lambda _what, _done, _total: None)
    total = len(chosen) + 1
    note("white-box attacks", 0, total)
    white = shielding.run_white_box(model, x_eval, y_eval, kind=kind, attacks=attacks, eps=eps, budget=budget,
                                    seed=seed, x_aux=x_aux)
    batch = x_eval[: min(64, len(x_eval))]
    whole_s = _latency(model, batch)
    baseline = reconstruct.baseline_scores(x_aux, x_eval, kind=kind)
    risks: list[CutRisk] = []
    examples: dict[int, dict[str, np.ndarray]] = {}
    for i, cut in enumerate(chosen, start=1):
        note(f"cut K={cut.index}", i, total)
        head, _tail = split_model(model, cut)
        f_aux, f_eval = _run(head, x_aux), _run(head, x_eval)
        risk = CutRisk(cut=cut.to_dict(), flop_share=cut.flop_share,
                       latency_share=min(1.0, _latency(head, batch) / whole_s) if whole_s > 0 else 0.0)
        recons: dict[str, np.ndarray] = {}
        for attacker in ("decoder", "cgan"):
            result, recon = reconstruct.run_reconstruction(
                f_aux, x_aux, f_eval, x_eval, attacker=attacker, kind=kind, budget=budget, seed=seed  # type: ignore[arg-type]
            )
            risk.reconstruction[attacker] = dict(result.scores)
            recons[attacker] = recon
        risk.recon_relative = max(_relative(kind, s, baseline) for s in risk.reconstruction.values())
        hidden = shielding.run_shielding(model, cut, x_aux, x_eval, y_eval, kind=kind, attacks=attacks, eps=eps,
                                         budget=budget, seed=seed, white_box=white)
        risk.attacks = {r.attack: r.success_rate for r in hidden if r.setting == "head-hidden"}
        risk.attack_max = max(risk.attacks.values(), default=0.0)
        risks.append(risk)
        examples[cut.index] = recons
    note("done", total, total)
    advice = Advice(
        model=name, kind=kind, budget=budget, seed=seed,
        thresholds={"max_recon_relative": max_recon, "max_attack_success": max_attack},
        white_box={r.attack: r.success_rate for r in white},
        baseline={k: float(v) for k, v in baseline.items()},
        cuts=risks, recommended=recommend(risks, max_recon, max_attack),
        seconds=time.perf_counter() - started,
    )
    return advice, examples, x_eval


def recommend(risks: Sequence[CutRisk], max_recon: float, max_attack: float) -> int | None:
    """The shallowest cut (risks in graph order) under both thresholds, or None."""
    for r in risks:
        if r.recon_relative <= max_recon and r.attack_max <= max_attack:
            return int(r.cut["index"])
    return None
