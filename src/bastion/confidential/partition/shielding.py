"""Gradient shielding (Pelta / GradSec) for the partition risk advisor (issue 16).

Why: a partitioned model keeps its first layers (the *head*) in the trusted worker. Its
weights never leave the enclave, so whoever holds the host (the *tail*'s weights, and
every request's intermediate features) cannot back-propagate through the whole model:
white-box adversarial examples need gradients with respect to the *input*, and the
chain rule stops at the cut. The question the advisor answers for each candidate cut
is: *how much harder do adversarial examples get?* It answers it empirically, as Pelta
does, by running the same attacks twice:

``white-box``
    ART attacks on the whole model (``PyTorchClassifier`` on the ONNX model converted
    with onnx2torch). The reference: what an attacker who has every weight achieves.
    It does not depend on the cut, so ``run_white_box`` computes it once per model and
    ``run_shielding`` reuses it.

``head-hidden``
    The attacker holds the tail (weights), auxiliary inputs of their own (disjoint from
    the evaluation inputs) and the features the real head gives for them (the host sees
    every request's features). It fits a *surrogate head* to map inputs to features
    (MSE) and attacks ``surrogate_head -> tail`` with the same ART attacks: the
    gradients pass through the surrogate where the real head's are hidden (BPDA's
    backward approximation). The adversarial examples are then scored on the *real*
    whole model: they work only as far as they transfer. The drop from white-box to
    head-hidden success is the protection the split buys.

    The surrogate (``surrogate.py``) has the head's architecture with its weights
    re-initialised and trained on the attacker's pairs; a head with no weights at all (a
    ``Cast``) is no secret: its surrogate is the head itself, and the result equals the
    white-box one. ``details`` reports how well it fits: the surrogate's training (learning
    rate chosen, hold-out loss, seconds), feature R² and label agreement of
    ``surrogate -> tail`` with the real model, on the evaluation inputs (never trained on:
    the attacker sees their features, not the inputs).

    Not modelled: an attacker who can also *query* the real head (a client of the
    service as well as the host) could run true BPDA, the real head forward and the
    surrogate backward; here the surrogate replaces the head in both passes.

Logits. The attacks run on the model's *logits*, read from the graph (the input of the
final ``Softmax``, or ``[0, z]`` for a sigmoid binary classifier; ``log(probabilities)``
only as a fallback); ``torch_convert.py`` converts the model and the cut's head and tail
with onnx2torch and checks the conversion against ONNX Runtime (within 1e-4 on the
probabilities). Scope: classifiers with one input tensor (every scenario model).

Attacks (``attacks``; all untargeted, labels = the true labels; the L-inf ones share
``eps``):

* ``pgd``: ``ProjectedGradientDescent``, L-inf, step ``eps / 4`` from the input (quick)
  or ``2.5 x eps / iterations`` from one random start (standard).
* ``mim``: ``MomentumIterativeMethod``, L-inf, decay 1.0, same steps as PGD.
* ``apgd``: ``AutoProjectedGradientDescent``, L-inf, cross-entropy of the logits (the
  estimator's loss), one random start (ART requires one), its own step-size schedule.
  ART's APGD only perturbs rows the attacked model still classifies correctly: a row the
  surrogate already gets wrong is left as it is (the attacker believes it done).
* ``cw``: ``CarliniL2Method``, confidence 0, learning rate 0.1, initial constant 1, a
  few binary-search steps of tens of iterations (ART's per-class gradient loop is
  replaced by one backward pass per call; see ``_classifier``). C&W
  minimises the L2 norm instead of staying in a ball: a row counts as a success when its
  label flips *and* ``||delta||_2 <= l2_eps``, by default ``eps x sqrt(input size)``:
  the L2 ball that contains the L-inf ball of radius ``eps``, so C&W gets at least the
  room the other attacks get. ``details`` also gives the unbounded flip rate and the
  median L2 norm of its flips.

Success rate: among evaluation rows the real model classifies correctly (at most the
budget's ``max_eval``, chosen by a seeded permutation, the same rows in both settings),
the fraction whose real-model label differs from the true one after the perturbation.

Images (``kind="image"``) are in [0, 1] and perturbations are clipped to it; with 8x8
digits, ``eps`` = 0.1 to 0.3 is a visible but digit-preserving change. The default,
0.15, is where white-box PGD flips most rows of the scenario CNNs without flipping all
of them: a saturated white-box rate (1.0 at 0.2) would hide part of any drop. Tabular
data (``kind="tabular"``) are attacked in a *continuous relaxation*: the same L-inf
ball, clipped to [min, max] of the auxiliary data (for the malware scenario's 0/1
features that is [0, 1]), default ``eps`` 0.02: every one of the 1,000 features may
move, so the ball is large, and at 0.1 every attack flips every row with or without
the head (nothing to compare). C&W is left out on tables by default: its tanh change
of variables cannot move a feature that sits on the clipping bound, which every 0/1
feature does, so it flips nothing there by construction. A value of 0.9 for
a permission an app requests is no app: the relaxed examples measure what the split
does to the attacker's *gradient access*, which is the question here, not whether a
realisable malware variant evades the detector (that needs a problem-space attack, such
as flipping features 0 -> 1 only). Rounding the relaxed examples back to 0/1 would undo
any perturbation below 0.5 and measure nothing.

Determinism: torch (seeded, ``threads`` intra-op threads, default 1) and numpy's
global RNG (ART's random starts draw from it) are seeded per attack and restored
afterwards; the same seed gives the same numbers on the same machine.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import onnx

from bastion.confidential.partition.graph import Cut, resolve_cut
from bastion.confidential.partition.surrogate import _fit_surrogate
from bastion.confidential.partition.torch_convert import CONVERSION_ATOL as CONVERSION_ATOL
from bastion.confidential.partition.torch_convert import (
    _check_conversion,
    _predict,
    _split_modules,
    convert,
    logits_model,
)

__all__ = [
    "ATTACKS",
    "BUDGETS",
    "AttackResult",
    "ShieldBudget",
    "convert",
    "default_attacks",
    "default_eps",
    "logits_model",
    "run_shielding",
    "run_white_box",
]

AttackName = Literal["pgd", "mim", "apgd", "cw"]
Kind = Literal["image", "tabular"]
Setting = Literal["white-box", "head-hidden"]
Progress = Callable[[int, int], None]

ATTACKS: tuple[str, ...] = ("pgd", "mim", "apgd", "cw")
_CHECK_ROWS = 32  # evaluation rows the torch conversion is checked on against ONNX Runtime


@dataclass(frozen=True)
class ShieldBudget:
    """How hard each attacker works. ``max_eval``: correctly-classified evaluation rows
    attacked; ``surrogate_steps``: Adam steps (batches of ``batch``) fitting the surrogate
    head; ``iters``: PGD and MIM iterations; ``apgd_iters``; ``random_init``: PGD random
    starts (0 = start at the input; APGD always takes one); ``cw_iters`` and
    ``cw_search_steps``: C&W's iterations per binary-search step of its constant."""

    max_eval: int
    surrogate_steps: int
    iters: int
    apgd_iters: int
    random_init: int
    cw_iters: int
    cw_search_steps: int
    cw_line_search: int = 5  # C&W's step halvings and doublings per iteration (ART's max_halving, max_doubling)
    batch: int = 64
    # Adam learning rates tried for the surrogate (best hold-out loss wins): a linear head
    # needs large steps, deeper heads diverge with them; 3e-2 with warm-up suited both on the digits
    surrogate_lrs: tuple[float, ...] = (3e-2,)


BUDGETS: dict[str, ShieldBudget] = {
    # a few seconds per cut on one core for the 8x8 digit CNNs: for tests and `advise --quick`
    "quick": ShieldBudget(max_eval=64, surrogate_steps=150, iters=10, apgd_iters=10, random_init=0,
                          cw_iters=10, cw_search_steps=2, cw_line_search=2),
    "standard": ShieldBudget(max_eval=256, surrogate_steps=800, iters=40, apgd_iters=50, random_init=1,
                             cw_iters=40, cw_search_steps=4, surrogate_lrs=(3e-2, 1e-2)),
}


@dataclass(frozen=True)
class AttackResult:
    """One attack in one setting. White-box results hold no cut (``cut_index`` and
    ``cut_tensor`` are None): they are the same for every cut of the model.

    ``eps`` is the L-inf radius for pgd/mim/apgd and the L2 bound ``l2_eps`` for cw
    (``norm`` says which); ``success_rate`` = flipped / ``n``, over the ``n`` attacked rows
    (correctly classified by the real model); ``clean_accuracy`` is the real model's
    accuracy on all the evaluation rows passed; ``seconds`` the attack's wall time (for
    head-hidden results, ``details["surrogate_seconds"]`` is the surrogate's training,
    shared by the attacks of one cut)."""

    cut_index: int | None
    cut_tensor: str | None
    attack: str
    setting: str
    eps: float
    norm: str
    success_rate: float
    n: int
    clean_accuracy: float
    seconds: float
    budget: str = "quick"
    seed: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_eps(kind: Kind) -> float:
    """The L-inf radius used when none is given: 0.15 on [0, 1] images, 0.02 on tables (see the module docstring)."""
    return 0.15 if kind == "image" else 0.02


def default_attacks(kind: Kind) -> tuple[str, ...]:
    """All four on images; no C&W on tables (its tanh change of variables cannot move a 0/1
    feature, which sits on the clipping bound: it flips nothing there, by construction)."""
    return ATTACKS if kind == "image" else ("pgd", "mim", "apgd")


# --------------------------------------------------------------------------- sessions and data


@contextmanager
def _seeded(seed: int, threads: int) -> Iterator[Any]:
    """Seeded torch (``threads`` intra-op threads) and numpy global RNG, both restored after."""
    import torch

    before = torch.get_num_threads()
    np_state = np.random.get_state()
    torch.set_num_threads(max(1, threads))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % (1 << 32))
            yield torch
    finally:
        np.random.set_state(np_state)
        torch.set_num_threads(before)


def _budget(budget: str | ShieldBudget) -> tuple[ShieldBudget, str]:
    if isinstance(budget, ShieldBudget):
        return budget, "custom"
    if budget in BUDGETS:
        return BUDGETS[budget], budget
    raise ValueError(f"budget must be one of {sorted(BUDGETS)} or a ShieldBudget, got {budget!r}")


def _check_args(attacks: Sequence[str] | None, kind: str, eps: float | None) -> tuple[tuple[str, ...], float]:
    if kind not in ("image", "tabular"):
        raise ValueError(f"kind must be 'image' or 'tabular', got {kind!r}")
    attacks = default_attacks(kind) if attacks is None else tuple(attacks)  # type: ignore[arg-type]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"attacks must be a non-empty subset of {ATTACKS}, got {tuple(attacks)}")
    eps = default_eps(kind) if eps is None else float(eps)  # type: ignore[arg-type]
    if not (0 < eps < math.inf):
        raise ValueError(f"eps must be > 0 and finite, got {eps}")
    return tuple(dict.fromkeys(attacks)), eps


def _as_x(name: str, a: Any) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"{name}: expected [N, ...] rows, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: has NaN or inf values")
    return x


def _clip_values(kind: str, x_aux: np.ndarray | None, x_eval: np.ndarray) -> tuple[float, float]:
    if kind == "image":
        return 0.0, 1.0
    ref = x_aux if x_aux is not None else x_eval
    return float(ref.min()), float(ref.max())


@dataclass
class _Target:
    """The real model and the rows to attack, shared by both settings."""

    full: Any
    x: np.ndarray  # correctly classified rows, [n, ...]
    y: np.ndarray  # their labels
    clean_accuracy: float
    nb_classes: int
    clip: tuple[float, float]
    conversion_diff: float
    kind: str


def _target(torch: Any, model: onnx.ModelProto, x_eval: np.ndarray, y_eval: np.ndarray, spec: ShieldBudget,
            seed: int, kind: str, x_aux: np.ndarray | None) -> _Target:
    full = logits_model(model)
    diff = _check_conversion(torch, model, full, x_eval[:_CHECK_ROWS])
    logits = _predict(torch, full, x_eval)
    pred = logits.argmax(axis=1)
    correct = np.flatnonzero(pred == y_eval)
    # a seeded choice (not the first rows): eval files are often sorted or stratified
    chosen = np.sort(np.random.default_rng(seed).permutation(correct)[:spec.max_eval])
    return _Target(full=full, x=x_eval[chosen], y=y_eval[chosen], clean_accuracy=float(np.mean(pred == y_eval)),
                   nb_classes=int(logits.shape[1]), clip=_clip_values(kind, x_aux, x_eval), conversion_diff=diff,
                   kind=kind)


# --------------------------------------------------------------------------- attacks


_CLASSIFIER: Any = None


def _classifier(torch: Any, module: Any, t: _Target) -> Any:
    global _CLASSIFIER
    if _CLASSIFIER is None:
        from art.estimators.classification import PyTorchClassifier

        class RowwiseClassGradient(PyTorchClassifier):
            """ART's classifier, with the per-row class gradient (``label`` one class per row,
            what C&W asks for twice an iteration) in one backward pass instead of one per
            distinct label (10 on digits): rows do not interact in an eval-mode model, so the
            gradient of the sum of the selected logits is each row's own gradient."""

            def class_gradient(self, x: np.ndarray, label: Any = None, training_mode: bool = False,
                               **kwargs: Any) -> np.ndarray:
                rows = np.asarray(label) if isinstance(label, (list, np.ndarray)) else None
                if (rows is None or rows.ndim != 1 or len(rows) != len(x) or training_mode
                        or self.preprocessing_operations or self._layer_idx_gradients >= 0):
                    return super().class_gradient(x, label=label, training_mode=training_mode, **kwargs)
                import torch

                self._model.train(mode=False)
                x_grad = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).requires_grad_(True)
                logits = self._model(x_grad)[-1]
                logits[torch.arange(len(rows)), torch.from_numpy(rows.astype(np.int64))].sum().backward()
                return x_grad.grad.numpy()[:, None].astype(np.float32)

        _CLASSIFIER = RowwiseClassGradient
    return _CLASSIFIER(model=module, loss=torch.nn.CrossEntropyLoss(), input_shape=t.x.shape[1:],
                       nb_classes=t.nb_classes, clip_values=t.clip, device_type="cpu",
                       preprocessing=None)  # ART's default (0, 1) standardisation is a no-op that costs time


def _make_attack(name: str, clf: Any, eps: float, spec: ShieldBudget) -> Any:
    from art.attacks.evasion import (
        AutoProjectedGradientDescent,
        CarliniL2Method,
        MomentumIterativeMethod,
        ProjectedGradientDescent,
    )

    batch = spec.max_eval  # one batch: the rows are few, and per-batch overhead dominates
    # quick: big steps so 10 iterations reach the ball's surface; standard: the usual 2.5 eps / iters
    step = eps / 4 if spec.random_init == 0 else 2.5 * eps / spec.iters
    if name == "pgd":
        return ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=step, max_iter=spec.iters,
                                        num_random_init=spec.random_init, batch_size=batch, verbose=False)
    if name == "mim":
        return MomentumIterativeMethod(clf, norm=np.inf, eps=eps, eps_step=step, decay=1.0, max_iter=spec.iters,
                                       batch_size=batch, verbose=False)
    if name == "apgd":
        return AutoProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=spec.apgd_iters,
                                            nb_random_init=1, batch_size=batch, loss_type=None, verbose=False)
    if name == "cw":
        # learning rate 0.1 (ART's default 0.01 barely moves in tens of iterations) and a start
        # constant of 1 so the first binary-search step already weighs misclassification
        return CarliniL2Method(clf, confidence=0.0, learning_rate=0.1, binary_search_steps=spec.cw_search_steps,
                               max_iter=spec.cw_iters, initial_const=1.0, max_halving=spec.cw_line_search,
                               max_doubling=spec.cw_line_search, batch_size=batch, verbose=False)
    raise ValueError(f"unknown attack {name!r}")


def _attack(torch: Any, name: str, attacked: Any, t: _Target, eps: float, l2_eps: float, spec: ShieldBudget,
            seed: int) -> tuple[float, float, dict[str, Any]]:
    """Run one attack on ``attacked`` (a logits module), score on the real model:
    (success rate, seconds, details)."""
    import logging

    if len(t.x) == 0:
        return 0.0, 0.0, {"note": "no correctly classified evaluation row to attack"}
    onehot = np.eye(t.nb_classes, dtype=np.float32)[t.y]
    art_log = logging.getLogger("art")
    level = art_log.level
    art_log.setLevel(logging.ERROR)  # ART logs every attack's construction and its success rate
    try:
        with _seeded(seed, torch.get_num_threads()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            x_adv = _make_attack(name, _classifier(torch, attacked, t), eps, spec).generate(t.x, y=onehot)
            seconds = time.perf_counter() - t0
    finally:
        art_log.setLevel(level)
    x_adv = np.asarray(x_adv, dtype=np.float32)
    flipped = _predict(torch, t.full, x_adv).argmax(axis=1) != t.y
    delta = (x_adv - t.x).reshape(len(t.x), -1)
    linf, l2 = np.abs(delta).max(axis=1), np.linalg.norm(delta, axis=1)
    details: dict[str, Any] = {"max_linf": float(linf.max()), "mean_l2": float(l2.mean())}
    if name == "cw":
        ok = flipped & (l2 <= l2_eps + 1e-6)
        details.update(flip_rate_unbounded=float(flipped.mean()),
                       median_l2_of_flips=float(np.median(l2[flipped])) if flipped.any() else None)
        if t.kind == "tabular":
            details["note"] = ("C&W works in tanh space: a feature on the clipping bound (a 0/1 column) barely moves, "
                               "so few or no flips here are no sign of robustness")
    else:
        # ART projects onto the ball; a row outside it (beyond float rounding) would be no result of this eps
        ok = flipped & (linf <= eps * (1 + 1e-4) + 1e-6)
    return float(ok.mean()), seconds, details


def _results(torch: Any, attacks: Sequence[str], attacked: Any, t: _Target, *, setting: str, cut: Cut | None,
             eps: float, l2_eps: float, spec: ShieldBudget, budget_name: str, seed: int,
             extra: dict[str, Any], tick: Callable[[], None]) -> list[AttackResult]:
    out = []
    for i, name in enumerate(attacks):
        rate, seconds, details = _attack(torch, name, attacked, t, eps, l2_eps, spec, seed + 1000 * (i + 1))
        out.append(AttackResult(
            cut_index=None if cut is None else cut.index, cut_tensor=None if cut is None else cut.tensor,
            attack=name, setting=setting, eps=l2_eps if name == "cw" else eps, norm="2" if name == "cw" else "inf",
            success_rate=rate, n=len(t.x), clean_accuracy=t.clean_accuracy, seconds=seconds, budget=budget_name,
            seed=seed, details={**extra, **details},
        ))
        tick()
    return out


def _l2_eps(l2_eps: float | None, eps: float, x: np.ndarray) -> float:
    return float(eps * math.sqrt(x[0].size)) if l2_eps is None else float(l2_eps)


def run_white_box(model: onnx.ModelProto, x_eval: Any, y_eval: Any, *, kind: Kind,
                  attacks: Sequence[AttackName] | None = None, eps: float | None = None, l2_eps: float | None = None,
                  budget: str | ShieldBudget = "quick", seed: int = 0, x_aux: Any = None, threads: int = 1,
                  progress: Progress | None = None) -> list[AttackResult]:
    """The attacks on the whole model (every weight known): one result per attack, with no cut.

    ``x_eval``/``y_eval``: evaluation inputs (float32, the model's input shape) and integer
    class indices (the position in the probabilities output). ``eps``: L-inf radius (default
    ``default_eps(kind)``); ``l2_eps``: C&W's L2 bound (default ``eps x sqrt(input size)``);
    ``x_aux``: only sets the clipping range of tabular data (the same as ``run_shielding``'s,
    so the white-box and head-hidden attackers search the same box). ``progress(done, total)``
    is called after each attack."""
    attacks, eps = _check_args(attacks, kind, eps)
    spec, budget_name = _budget(budget)
    xe, ye = _as_x("x_eval", x_eval), np.asarray(y_eval).astype(np.int64).reshape(-1)
    xa = None if x_aux is None else _as_x("x_aux", x_aux)
    if len(ye) != len(xe):
        raise ValueError(f"x_eval has {len(xe)} rows, y_eval {len(ye)}")
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(attacks))

    with _seeded(seed, threads) as torch:
        t = _target(torch, model, xe, ye, spec, seed, kind, xa)
        return _results(torch, attacks, t.full, t, setting="white-box", cut=None, eps=eps,
                        l2_eps=_l2_eps(l2_eps, eps, xe), spec=spec, budget_name=budget_name, seed=seed,
                        extra={"conversion_max_abs_diff": t.conversion_diff}, tick=tick)


def run_shielding(model: onnx.ModelProto, cut: str | int | Cut, x_aux: Any, x_eval: Any, y_eval: Any, *,
                  kind: Kind, attacks: Sequence[AttackName] | None = None, eps: float | None = None,
                  l2_eps: float | None = None, budget: str | ShieldBudget = "quick", seed: int = 0,
                  white_box: Sequence[AttackResult] | None = None, threads: int = 1,
                  progress: Progress | None = None) -> list[AttackResult]:
    """White-box and head-hidden attack success at one cut: the white-box results (``white_box``
    if given, as ``run_white_box`` returned them for this model, data, eps, budget and seed;
    computed otherwise), then one head-hidden result per attack.

    ``cut``: a cut point as ``graph.resolve_cut`` takes it (layer number K, tensor or node
    name). ``x_aux``: the attacker's inputs (disjoint from ``x_eval``); the real head's
    features for them are what it trains the surrogate on. ``progress(done, total)`` counts
    the surrogate's training as one step and each attack as one."""
    attacks, eps = _check_args(attacks, kind, eps)
    spec, budget_name = _budget(budget)
    xa, xe = _as_x("x_aux", x_aux), _as_x("x_eval", x_eval)
    ye = np.asarray(y_eval).astype(np.int64).reshape(-1)
    if len(ye) != len(xe):
        raise ValueError(f"x_eval has {len(xe)} rows, y_eval {len(ye)}")
    if xa.shape[1:] != xe.shape[1:]:
        raise ValueError(f"x_aux rows are {xa.shape[1:]}, x_eval rows {xe.shape[1:]}")
    chosen = resolve_cut(model, cut)
    total = len(attacks) * (1 if white_box is not None else 2) + 1
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    if white_box is None:
        white_box = run_white_box(model, xe, ye, kind=kind, attacks=attacks, eps=eps, l2_eps=l2_eps, budget=spec,
                                  seed=seed, x_aux=xa, threads=threads,
                                  progress=lambda _d, _t: tick())
        white_box = [replace(r, budget=budget_name) for r in white_box]
    else:
        have = {r.attack for r in white_box if r.setting == "white-box"}
        if not set(attacks) <= have:
            raise ValueError(f"white_box lacks results for {sorted(set(attacks) - have)}")
        white_box = [r for r in white_box if r.setting == "white-box" and r.attack in attacks]

    with _seeded(seed, threads) as torch:
        t = _target(torch, model, xe, ye, spec, seed, kind, xa)
        head, tail = _split_modules(torch, model, chosen)
        t0 = time.perf_counter()
        sur, info = _fit_surrogate(torch, head, xa, spec, seed)
        info["surrogate_seconds"] = time.perf_counter() - t0
        tick()
        attacked = torch.nn.Sequential(sur, tail).eval()
        # how good a copy the attacker got, on rows it never trained on
        f_real, f_sur = _predict(torch, head, xe), _predict(torch, sur, xe)
        var = float(np.var(f_real))
        info["surrogate_feature_r2"] = 1.0 - float(np.mean((f_sur - f_real) ** 2)) / var if var > 0 else None
        info["surrogate_label_agreement"] = float(np.mean(
            _predict(torch, attacked, xe).argmax(axis=1) == _predict(torch, t.full, xe).argmax(axis=1)))
        hidden = _results(torch, attacks, attacked, t, setting="head-hidden", cut=chosen, eps=eps,
                          l2_eps=_l2_eps(l2_eps, eps, xe), spec=spec, budget_name=budget_name, seed=seed,
                          extra=info, tick=tick)
    return [*white_box, *hidden]
