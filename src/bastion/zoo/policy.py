"""Selection policies: which variant of a zoo serves this request.

A policy sees the zoo's Pareto front, the client's targets, the current extra wait
of each variant's queue and a ``random.Random`` (the server seeds it from a secret;
later issues add differentially private policies behind the same one-method
Protocol).

Feasible, exactly: ``quality >= targets.accuracy`` (when given) and
``latency_ms + waits_ms[variant] <= targets.latency_ms`` (when given). A variant
missing from ``waits_ms`` has no queue (wait 0); an infinite wait means "cannot be
served in time" (e.g. the queue is full). The latency a policy reasons about is
this *effective* latency, so a busy fast variant loses to an idle slower one.

When nothing is feasible, ``on_infeasible`` decides:

- ``reject``: ``Unprocessable`` (422) naming the unmet target(s) and the ranges the
  zoo offers.
- ``closest``: the variant with the smallest normalised shortfall

      d = max(0, (a_req - q) / a_scale) + max(0, (l_eff - l_req) / l_scale)

  where ``a_scale`` is the front's quality range (max - min) and ``l_scale`` the
  range of the finite effective latencies; a zero range (one point, or all equal)
  falls back to 1.0 for quality and to ``l_req`` for latency, so a term is then a
  relative shortfall. An absent target contributes 0. Ties go to the faster
  variant (lower effective latency), then the more accurate, then the name.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bastion.core.errors import InvalidInput, Unprocessable
from bastion.zoo.pareto import Point

__all__ = [
    "ON_INFEASIBLE",
    "POLICY_NAMES",
    "Choice",
    "FeasibleSelection",
    "SelectionPolicy",
    "Targets",
    "effective_latency",
    "is_feasible",
    "make_policy",
    "parse_targets",
]

POLICY_NAMES = ("uniform-feasible", "fastest-feasible", "most-accurate-feasible")
ON_INFEASIBLE = ("reject", "closest")


@dataclass(frozen=True, slots=True)
class Targets:
    """What the client asks for; ``None`` means "no requirement"."""

    accuracy: float | None = None
    latency_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    variant: str
    feasible: bool
    reason: str


class SelectionPolicy(Protocol):
    def choose(
        self, front: list[Point], targets: Targets, waits_ms: dict[str, float], rng: random.Random
    ) -> Choice: ...


def _number(parameters: Mapping[str, Any], key: str) -> float | None:
    if key not in parameters:
        return None
    value = parameters[key]
    # bool is an int subclass; {"accuracy": true} is a client mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"parameters.{key}: expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidInput(f"parameters.{key}: expected a finite number, got {value!r}")
    return value


def parse_targets(parameters: Mapping[str, Any] | None) -> Targets:
    """Targets from request parameters ``accuracy`` (in [0, 1]) and ``latency_ms`` (> 0).

    Other parameters are ignored: they belong to the protocol or to the model.
    """
    if not parameters:
        return Targets()
    accuracy = _number(parameters, "accuracy")
    if accuracy is not None and not 0.0 <= accuracy <= 1.0:
        raise InvalidInput(f"parameters.accuracy: expected a number in [0, 1], got {accuracy!r}")
    latency = _number(parameters, "latency_ms")
    if latency is not None and latency <= 0.0:
        raise InvalidInput(f"parameters.latency_ms: expected a number > 0, got {latency!r}")
    return Targets(accuracy=accuracy, latency_ms=latency)


def effective_latency(point: Point, waits_ms: Mapping[str, float]) -> float:
    wait = float(waits_ms.get(point.name, 0.0))
    # A negative or NaN wait is a bug in the caller's estimator, not a client error.
    if math.isnan(wait) or wait < 0:
        raise ValueError(f"waits_ms[{point.name!r}]: expected a wait >= 0 ms, got {wait!r}")
    return point.latency_ms + wait


def is_feasible(point: Point, targets: Targets, waits_ms: Mapping[str, float]) -> bool:
    if targets.accuracy is not None and point.quality < targets.accuracy:
        return False
    return targets.latency_ms is None or effective_latency(point, waits_ms) <= targets.latency_ms


@dataclass(frozen=True, slots=True)
class _Candidate:
    point: Point
    latency: float  # effective: profile latency + current wait

    @property
    def name(self) -> str:
        return self.point.name

    @property
    def quality(self) -> float:
        return self.point.quality


# A picker chooses among a non-empty list of feasible candidates -> (choice, reason).
Picker = Callable[[Sequence[_Candidate], random.Random], tuple[_Candidate, str]]


def _pick_uniform(cands: Sequence[_Candidate], rng: random.Random) -> tuple[_Candidate, str]:
    # Sorted by name so the draw depends only on the set and the rng, not on input order.
    ordered = sorted(cands, key=lambda c: c.name)
    return ordered[rng.randrange(len(ordered))], f"uniform among {len(ordered)} feasible"


def _pick_fastest(cands: Sequence[_Candidate], rng: random.Random) -> tuple[_Candidate, str]:
    best = min(cands, key=lambda c: (c.latency, -c.quality, c.name))
    return best, f"fastest of {len(cands)} feasible"


def _pick_most_accurate(cands: Sequence[_Candidate], rng: random.Random) -> tuple[_Candidate, str]:
    best = min(cands, key=lambda c: (-c.quality, c.latency, c.name))
    return best, f"most accurate of {len(cands)} feasible"


_PICKERS: dict[str, Picker] = {
    "uniform-feasible": _pick_uniform,
    "fastest-feasible": _pick_fastest,
    "most-accurate-feasible": _pick_most_accurate,
}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _span(values: Sequence[float]) -> str:
    lo, hi = min(values), max(values)
    return _fmt(lo) if lo == hi else f"{_fmt(lo)}\u2013{_fmt(hi)}"  # en dash: "0.91-0.97" reads as a subtraction


@dataclass(frozen=True)
class FeasibleSelection:
    """Pick among the feasible front members with ``picker``; otherwise apply ``on_infeasible``."""

    picker: Picker
    on_infeasible: str = "reject"
    zoo: str = ""

    def choose(self, front: list[Point], targets: Targets, waits_ms: dict[str, float], rng: random.Random) -> Choice:
        if not front:
            raise ValueError("empty Pareto front: a zoo has at least one loaded variant")
        cands = [_Candidate(p, effective_latency(p, waits_ms)) for p in front]
        feasible = [c for c in cands if is_feasible(c.point, targets, waits_ms)]
        if feasible:
            chosen, reason = self.picker(feasible, rng)
            return Choice(chosen.name, True, reason)
        if self.on_infeasible == "closest":
            return _closest(cands, targets)
        raise Unprocessable(_reject_message(self.zoo, cands, targets))


def _closest(cands: Sequence[_Candidate], targets: Targets) -> Choice:
    qualities = [c.quality for c in cands]
    a_scale = (max(qualities) - min(qualities)) or 1.0
    finite = [c.latency for c in cands if math.isfinite(c.latency)]
    l_req = targets.latency_ms
    l_scale = (max(finite) - min(finite)) if finite else 0.0
    if l_scale <= 0:
        l_scale = l_req if l_req else 1.0

    def distance(c: _Candidate) -> float:
        d = 0.0
        if targets.accuracy is not None:
            d += max(0.0, (targets.accuracy - c.quality) / a_scale)
        if l_req is not None:
            d += max(0.0, (c.latency - l_req) / l_scale)
        return d

    best = min(cands, key=lambda c: (distance(c), c.latency, -c.quality, c.name))
    return Choice(
        best.name,
        False,
        f"closest: no variant feasible; distance {_fmt(distance(best))} "
        f"(quality {_fmt(best.quality)}, latency {_fmt(best.latency)} ms)",
    )


def _reject_message(zoo: str, cands: Sequence[_Candidate], targets: Targets) -> str:
    asked: list[str] = []
    if targets.accuracy is not None:
        asked.append(f"accuracy ≥ {_fmt(targets.accuracy)}")
    if targets.latency_ms is not None:
        asked.append(f"latency ≤ {_fmt(targets.latency_ms)} ms")
    # Say which target alone is out of reach; if each is reachable alone, it is the combination.
    unmet: list[str] = []
    if targets.accuracy is not None and all(c.quality < targets.accuracy for c in cands):
        unmet.append("accuracy")
    if targets.latency_ms is not None and all(c.latency > targets.latency_ms for c in cands):
        unmet.append("latency")
    why = f"unmet: {' and '.join(unmet)}" if unmet else "no variant meets both at once"
    profile_lat = [c.point.latency_ms for c in cands]
    effective = [c.latency for c in cands]
    offers = f"accuracy {_span([c.quality for c in cands])} and latency {_span(profile_lat)} ms"
    if effective != profile_lat:
        offers += f" ({_span(effective)} ms with the current queues)"
    name = f"zoo {zoo!r}" if zoo else "the zoo"
    return f"no variant of {name} meets {' and '.join(asked)} ({why}); the zoo offers {offers}"


def make_policy(name: str, on_infeasible: str, *, zoo: str = "") -> SelectionPolicy:
    """The policy ``name`` with the infeasible-case handling ``on_infeasible``.

    ``zoo`` only appears in the 422 message.
    """
    if name not in _PICKERS:
        raise ValueError(f"unknown zoo policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
    if on_infeasible not in ON_INFEASIBLE:
        raise ValueError(f"unknown on_infeasible {on_infeasible!r}; expected one of {', '.join(ON_INFEASIBLE)}")
    return FeasibleSelection(_PICKERS[name], on_infeasible, zoo)
