"""Selection defenses: randomise which variant of a zoo answers, against fingerprinting.

A zoo hides which variant serves a request only until an attacker fingerprints one:
targets chosen so that exactly one variant is feasible (say an accuracy between the
two best qualities) make a deterministic or feasible-only policy serve that variant
every time, and the attacker can then extract it (Pareto-secure serving, PSML). The
defenses here make the choice random *also across the feasibility boundary*, so no
choice of targets pins a variant down, at a bounded cost in goodput. Three kinds, each
a ``SelectionPolicy``:

- ``MetricNoise``: perturb the request's targets, then let the zoo's base policy pick.
- ``ExponentialMechanism`` and ``PermuteAndFlip``: ε-differentially private selection
  over the Pareto front, scored by the utility below.

Utility of variant ``v`` for targets ``(a_req, l_req)``::

    u(v) = 1                  if v meets every given target (``policy.is_feasible``)
    u(v) = 1 - min(1, d(v))   otherwise, with
    d(v) = max(0, (a_req - q_v) / a_scale) + max(0, (l_eff_v - l_req) / l_scale)

``d`` is exactly the normalised shortfall by which ``on_infeasible: closest`` ranks
variants (see ``policy``): ``q_v`` the profiled quality, ``l_eff_v`` the profiled
latency plus the variant's current queue wait, ``a_scale`` the front's quality range
and ``l_scale`` the range of its finite effective latencies (a zero range falls back
to 1.0 for quality and to ``l_req`` for latency); an absent target contributes 0 and
an infinite wait under a latency target gives u = 0. So u ∈ [0, 1], every feasible
variant scores 1 (no tie-break: among feasible variants the mechanisms are uniform,
like ``uniform-feasible``), and the closest infeasible variant scores highest among the
rest. Sensitivity Δu = 1: the only private input of one selection is that request's
own targets, and changing them can move any u(v) by at most the width of its range,
[0, 1].

Mechanisms, with candidates in name order so a draw depends only on the front and the
``rng`` (never on list order) and weights ``w(v) = exp(ε·(u(v) - u*) / (2Δu))``,
``u* = max u`` (subtracting u* keeps every exponent <= 0, so nothing overflows):

- exponential: P(v) = w(v) / Σ w (McSherry & Talwar 2007).
- permute-and-flip: visit the candidates in a uniformly random order and accept ``v``
  with probability w(v) (McKenna & Sheldon, NeurIPS 2020). A max-utility variant has
  w = 1, so one pass always ends; its expected utility is never below the exponential
  mechanism's at the same ε.

ε = ∞ (or a huge ε) picks uniformly among the max-utility variants; ε → 0 approaches
uniform over the front. Variants whose effective latency is infinite (a full queue)
are left out of the draw when any other is left, since serving them is a 503.

Metric noise: for each target the client gave, with ``n`` a Laplace(0, 1) or N(0, 1)
draw from ``rng``: ``a' = clip(a + n·scale_accuracy, 0, 1)`` and
``l' = max(0.001 ms, l · exp(n·scale_latency))`` (multiplicative, since latencies span
orders of magnitude). A target with scale 0 is left alone and draws nothing, so both
scales 0 is exactly the base policy, rng stream included.

Unreachable targets. When no variant meets the client's *own* targets, every defense
first asks the base policy with those targets: under ``on_infeasible: reject`` that is
the 422 naming them (never the noisy targets, whose values would reveal the noise), so
a rejecting zoo keeps its contract; under ``closest`` its answer is discarded and the
defense chooses, because closest on fixed targets is deterministic and is itself the
fingerprint (``accuracy: 1.0`` gets the most accurate variant every time). When the
client's targets are reachable but only the noise made the perturbed ones unreachable,
``MetricNoise`` falls back internally to the variant closest to the perturbed targets
instead of answering 422, so the zoo may keep ``on_infeasible: reject``.

``Choice.feasible`` always refers to the client's original targets, and
``Choice.reason`` names the defense. The only randomness is the ``rng`` argument (the
server seeds it from a secret so choices cannot be replayed).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from bastion.core.errors import Unprocessable
from bastion.zoo.pareto import Point
from bastion.zoo.policy import Choice, SelectionPolicy, Targets, effective_latency, is_feasible

__all__ = [
    "DEFENSE_KINDS",
    "NOISE_KINDS",
    "NO_DEFENSE",
    "SENSITIVITY",
    "DefenseSpec",
    "ExponentialMechanism",
    "MetricNoise",
    "PermuteAndFlip",
    "build_policy",
    "default_defenses",
    "exponential_probabilities",
    "permute_and_flip_probabilities",
    "shortfall",
    "utilities",
    "utility",
]

DEFENSE_KINDS = ("none", "metric-noise", "exponential", "permute-and-flip")
NOISE_KINDS = ("laplace", "gaussian")
SENSITIVITY = 1.0  # Δu: u ∈ [0, 1] (module docstring)
# keeps a perturbed latency target > 0, as parse_targets requires of a client's
_MIN_LATENCY_MS = 1e-3


# ---- configuration ------------------------------------------------------------------------------
def _check_epsilon(epsilon: float | None) -> float:
    # `not epsilon > 0` also refuses NaN; ∞ is allowed here (the degenerate max-utility case)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"epsilon: expected a number > 0, got {epsilon!r}")
    return float(epsilon)


def _check_scale(name: str, scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"{name}: expected a finite number >= 0, got {scale!r}")
    return float(scale)


@dataclass(frozen=True, slots=True)
class DefenseSpec:
    """One defense as configured in ``zoo.yaml``; fields a kind does not use keep their defaults."""

    kind: str = "none"
    epsilon: float | None = None  # exponential, permute-and-flip
    noise: str = "laplace"  # metric-noise
    scale_accuracy: float = 0.0  # metric-noise: Laplace scale b or Gaussian sd, in accuracy units
    scale_latency: float = 0.0  # metric-noise: same, on log(latency)

    def __post_init__(self) -> None:
        # spec.py reports YAML mistakes with file and field; this guards programmatic use
        if self.kind not in DEFENSE_KINDS:
            raise ValueError(f"defense kind: expected one of {', '.join(DEFENSE_KINDS)}, got {self.kind!r}")
        if self.kind in ("exponential", "permute-and-flip"):
            _check_epsilon(self.epsilon)
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"defense noise: expected one of {', '.join(NOISE_KINDS)}, got {self.noise!r}")
        _check_scale("scale_accuracy", self.scale_accuracy)
        _check_scale("scale_latency", self.scale_latency)


NO_DEFENSE = DefenseSpec()


def default_defenses() -> Mapping[str, DefenseSpec]:
    """What a zoo that configures no defense has: class ``default``, kind none (read-only)."""
    return MappingProxyType({"default": NO_DEFENSE})


def build_policy(base: SelectionPolicy, defense: DefenseSpec) -> SelectionPolicy:
    """The zoo's base policy wrapped in ``defense`` (kind none: ``base`` itself)."""
    if defense.kind == "none":
        return base
    if defense.kind == "metric-noise":
        return MetricNoise(base, defense.noise, defense.scale_accuracy, defense.scale_latency)
    assert defense.epsilon is not None  # DefenseSpec checked it
    if defense.kind == "exponential":
        return ExponentialMechanism(defense.epsilon, base)
    return PermuteAndFlip(defense.epsilon, base)


# ---- utility -------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _scales(front: Sequence[Point], targets: Targets, waits_ms: Mapping[str, float]) -> tuple[float, float]:
    # the same scales as policy._closest, so u ranks infeasible variants as `closest` does
    qualities = [p.quality for p in front]
    a_scale = (max(qualities) - min(qualities)) or 1.0
    finite = [lat for lat in (effective_latency(p, waits_ms) for p in front) if math.isfinite(lat)]
    l_scale = (max(finite) - min(finite)) if finite else 0.0
    if l_scale <= 0:
        l_scale = targets.latency_ms if targets.latency_ms else 1.0
    return a_scale, l_scale


def _shortfall(point: Point, targets: Targets, waits_ms: Mapping[str, float], scales: tuple[float, float]) -> float:
    a_scale, l_scale = scales
    d = 0.0
    if targets.accuracy is not None:
        d += max(0.0, (targets.accuracy - point.quality) / a_scale)
    if targets.latency_ms is not None:
        d += max(0.0, (effective_latency(point, waits_ms) - targets.latency_ms) / l_scale)
    return d


def _check_front(front: Sequence[Point]) -> None:
    if not front:
        raise ValueError("empty Pareto front: a zoo has at least one loaded variant")


def shortfall(point: Point, targets: Targets, waits_ms: Mapping[str, float], front: Sequence[Point]) -> float:
    """``d``: the normalised shortfall of ``point`` against ``targets`` (0 when feasible)."""
    _check_front(front)
    return _shortfall(point, targets, waits_ms, _scales(front, targets, waits_ms))


def _utility(point: Point, targets: Targets, waits_ms: Mapping[str, float], scales: tuple[float, float]) -> float:
    if is_feasible(point, targets, waits_ms):
        return 1.0
    return 1.0 - min(1.0, _shortfall(point, targets, waits_ms, scales))


def utility(point: Point, targets: Targets, waits_ms: Mapping[str, float], front: Sequence[Point]) -> float:
    """``u(point)`` in [0, 1] (module docstring); ``front`` sets the normalising scales."""
    _check_front(front)
    return _utility(point, targets, waits_ms, _scales(front, targets, waits_ms))


def utilities(front: Sequence[Point], targets: Targets, waits_ms: Mapping[str, float]) -> dict[str, float]:
    """``u`` of every front member, by name."""
    _check_front(front)
    scales = _scales(front, targets, waits_ms)
    return {p.name: _utility(p, targets, waits_ms, scales) for p in front}


# ---- mechanisms ----------------------------------------------------------------------------------
def _weights(utils: Sequence[float], epsilon: float) -> list[float]:
    """``exp(ε·(u - u*) / (2Δu))``; exactly 1 at u*, even for ε = ∞ (where ∞·0 would be NaN)."""
    top = max(utils)
    return [1.0 if u == top else math.exp(epsilon * (u - top) / (2.0 * SENSITIVITY)) for u in utils]


def exponential_probabilities(utils: Sequence[float], epsilon: float) -> list[float]:
    """P(choose i) under the exponential mechanism, for utilities ``utils``."""
    w = _weights(utils, _check_epsilon(epsilon))
    total = math.fsum(w)
    return [x / total for x in w]


def permute_and_flip_probabilities(utils: Sequence[float], epsilon: float) -> list[float]:
    """P(choose i) under permute-and-flip, in closed form.

    ``i`` sits at position k+1 of the random order with probability 1/n, behind a
    uniformly random k-subset S of the others, all of which were rejected:
    P(i) = p_i · (1/n) Σ_k e_k({1 - p_j : j ≠ i}) / C(n-1, k), with e_k the elementary
    symmetric polynomial. O(n³), fine for a front of a few variants.
    """
    p = _weights(utils, _check_epsilon(epsilon))
    n = len(p)
    out: list[float] = []
    for i in range(n):
        e = [1.0] + [0.0] * (n - 1)  # e_0..e_{n-1} of the others' rejection probabilities
        for j in range(n):
            if j != i:
                for k in range(n - 1, 0, -1):
                    e[k] += e[k - 1] * (1.0 - p[j])
        out.append(p[i] * math.fsum(e[k] / math.comb(n - 1, k) for k in range(n)) / n)
    return out


def _reject_like_base(
    base: SelectionPolicy | None,
    front: list[Point],
    targets: Targets,
    waits_ms: dict[str, float],
    rng: random.Random,
) -> None:
    """Under a rejecting base, targets no variant meets are a 422 naming the client's own targets."""
    if base is None or any(is_feasible(p, targets, waits_ms) for p in front):
        return
    base.choose(front, targets, waits_ms, rng)  # raises under reject; a closest answer is discarded


def _servable(front: Sequence[Point], waits_ms: Mapping[str, float]) -> list[Point]:
    # name order: the draw must depend only on the set and the rng
    ordered = sorted(front, key=lambda p: p.name)
    finite = [p for p in ordered if math.isfinite(effective_latency(p, waits_ms))]
    return finite or ordered


@dataclass(frozen=True)
class _Mechanism:
    epsilon: float
    base: SelectionPolicy | None = None  # only consulted for unreachable targets
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _check_epsilon(self.epsilon))

    def choose(self, front: list[Point], targets: Targets, waits_ms: dict[str, float], rng: random.Random) -> Choice:
        _check_front(front)
        _reject_like_base(self.base, front, targets, waits_ms, rng)
        cands = _servable(front, waits_ms)
        scales = _scales(front, targets, waits_ms)
        utils = [_utility(p, targets, waits_ms, scales) for p in cands]
        i = self._draw(utils, rng)
        chosen = cands[i]
        return Choice(
            chosen.name,
            is_feasible(chosen, targets, waits_ms),
            f"{self.name} ε={_fmt(self.epsilon)}; u={utils[i]:.2f}",
        )

    def _draw(self, utils: Sequence[float], rng: random.Random) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class ExponentialMechanism(_Mechanism):
    """P(v) ∝ exp(ε·u(v) / (2Δu)) over the front (module docstring)."""

    name: ClassVar[str] = "exponential"

    def _draw(self, utils: Sequence[float], rng: random.Random) -> int:
        w = _weights(utils, self.epsilon)
        r = rng.random() * math.fsum(w)
        acc = 0.0
        for i, x in enumerate(w):
            acc += x
            if r < acc:
                return i
        # rounding can leave r a hair above the running sum: the last non-zero weight
        return max(i for i, x in enumerate(w) if x > 0)


@dataclass(frozen=True)
class PermuteAndFlip(_Mechanism):
    """Random order, accept v with probability exp(ε·(u(v) - u*) / (2Δu)) (module docstring)."""

    name: ClassVar[str] = "permute-and-flip"

    def _draw(self, utils: Sequence[float], rng: random.Random) -> int:
        w = _weights(utils, self.epsilon)
        order = list(range(len(w)))
        rng.shuffle(order)
        for i in order:
            # w == 1.0 at u* and random() < 1.0, so the pass ends at the latest there
            if rng.random() < w[i]:
                return i
        raise AssertionError("permute-and-flip: a max-utility candidate is always accepted")


@dataclass(frozen=True)
class MetricNoise:
    """Perturb the client's targets, then let ``base`` choose (module docstring)."""

    base: SelectionPolicy
    noise: str = "laplace"
    scale_accuracy: float = 0.0
    scale_latency: float = 0.0

    def __post_init__(self) -> None:
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise: expected one of {', '.join(NOISE_KINDS)}, got {self.noise!r}")
        object.__setattr__(self, "scale_accuracy", _check_scale("scale_accuracy", self.scale_accuracy))
        object.__setattr__(self, "scale_latency", _check_scale("scale_latency", self.scale_latency))

    def _draw(self, rng: random.Random) -> float:
        if self.noise == "gaussian":
            return rng.gauss(0.0, 1.0)
        # the difference of two Exp(1) draws is Laplace(0, 1); expovariate never takes log(0)
        return rng.expovariate(1.0) - rng.expovariate(1.0)

    def perturb(self, targets: Targets, rng: random.Random) -> Targets:
        """The noisy targets; an absent target stays absent, a scale of 0 draws nothing."""
        accuracy, latency = targets.accuracy, targets.latency_ms
        if accuracy is not None and self.scale_accuracy > 0:
            accuracy = min(1.0, max(0.0, accuracy + self._draw(rng) * self.scale_accuracy))
        if latency is not None and self.scale_latency > 0:
            latency = max(_MIN_LATENCY_MS, latency * math.exp(self._draw(rng) * self.scale_latency))
        return Targets(accuracy=accuracy, latency_ms=latency)

    def describe(self) -> str:
        return (
            f"metric-noise {self.noise}(scale_accuracy={_fmt(self.scale_accuracy)}, "
            f"scale_latency={_fmt(self.scale_latency)})"
        )

    def choose(self, front: list[Point], targets: Targets, waits_ms: dict[str, float], rng: random.Random) -> Choice:
        _check_front(front)
        _reject_like_base(self.base, front, targets, waits_ms, rng)
        noisy = self.perturb(targets, rng)
        try:
            inner = self.base.choose(front, noisy, waits_ms, rng)
            variant, reason = inner.variant, inner.reason
        except Unprocessable:
            # the client's targets are reachable (checked above): the noise alone must not make a 422
            scales = _scales(front, noisy, waits_ms)

            def rank(p: Point) -> tuple[float, float, float, str]:
                lat = effective_latency(p, waits_ms)
                return (_shortfall(p, noisy, waits_ms, scales), lat, -p.quality, p.name)

            variant = min(front, key=rank).name
            reason = "closest to the perturbed targets"
        point = next(p for p in front if p.name == variant)
        return Choice(variant, is_feasible(point, targets, waits_ms), f"{self.describe()}; {reason}")
