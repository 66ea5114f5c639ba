"""Fingerprint a model zoo from outside: how many variants answer, and which targets
trigger each of them consistently.

The attacker sees one name (the zoo) and sends targets ``{"accuracy": a, "latency_ms": l}``;
the server keeps the Pareto front of its variants (sorted by latency, so also by
quality: v0 fastest and least accurate ... v(n-1) slowest and most accurate) and picks
among the *feasible* ones, those with ``quality >= a`` and ``latency <= l``. Whatever
the policy (uniform, fastest, most accurate), a target whose feasible set is a single
variant is answered by that variant every time. The feasible set for ``(a, l)`` is
``{i : q_i >= a and l_i <= l}``, a contiguous run of the front, and it is exactly
``{i}`` on the rectangle ``q_(i-1) < a <= q_i``, ``l_i <= l < l_(i+1)``. The
algorithm walks that staircase with bisections, using only whether the server serves
(200) or refuses (422: no variant meets the targets, ``on_infeasible: reject``).

1. **Probes.** ``candidates`` pool rows are sent twice with no targets (the zoo picks
   any variant). The ``probes`` rows kept are those where the answers disagree most
   (different top-1, then the largest L1 distance), then where the answer is least sure
   (smallest top-1 margin): where variants are likely to differ, so that their answers
   tell them apart even if the server rounded its outputs.
2. **Signatures.** Every later query sends the probe rows as one request; a request is
   served by one variant and a variant is deterministic, so the answer (probabilities
   rounded to ``decimals``) is that variant's *response signature*. Answers within
   ``tolerance`` (max abs difference) of a known signature join its cluster (batching
   may move the last float bits); a new cluster is a newly seen variant.
3. **Staircase.** Step ``i`` starts from an accuracy floor ``A`` that excludes the
   variants already mapped (none for step 0). If ``(A, no latency)`` is refused, no
   more accurate variant exists: done. Otherwise a latency bracket is found
   (exponential search) and bisected in log space to relative precision
   ``latency_rel_tol``: the smallest served latency ``L_i`` is just above ``l_i`` and
   the answer there comes from variant ``i`` alone. Then, at latency ``L_i``, the
   accuracy is bisected between ``A`` (served) and 1 to ``accuracy_tol``: the largest
   served accuracy is just below ``q_i`` and the smallest refused one, just above,
   becomes the next floor. Each step costs about ``log2(1/accuracy_tol)`` +
   ``log2(ln(bracket)/ln(1 + latency_rel_tol))`` requests, ~20 here, instead of a grid's
   hundreds. It also leaks each variant's profiled quality to within ``accuracy_tol``
   and its profiled latency to within ``latency_rel_tol``.
4. **Triggers and consistency.** Variant ``i``'s trigger is the middle of its rectangle:
   accuracy halfway between the floor and the largest served accuracy, latency the
   geometric middle of ``[L_i, largest refused latency of step i+1)`` (no latency
   target for the last variant, which is alone above its floor). Each trigger is
   replayed ``repeats`` times; its consistency is the fraction of answers in the
   variant's signature cluster (a refusal counts as a miss). Ties the server
   randomises, or queue waits that push a variant's effective latency over the
   target, show up here.
5. **Timing** is a secondary signal only: the median client-side round trip per
   signature is reported (a slower variant should answer more slowly), never used to
   decide anything.

**Fallback.** A zoo that never refuses (``on_infeasible: closest``) gives the walk
nothing to bisect. Then a coarse grid of targets (accuracy x log latency, plus "no
target" on each axis) is queried once per cell and the answers are clustered. For each
cluster, its most stable cells (the largest share of grid neighbours answered by the
same cluster: deterministic regions agree with their neighbours, randomised ones
rarely do) are replayed a few times and the first that never wavers becomes the
trigger; consistency is then measured as above. The fallback cannot order the variants by quality from refusals;
its victim is the variant answering ``accuracy = 1`` (the closest to a perfect score).

**Victim.** The default victim for extraction is the most accurate variant: the last
step of the staircase, i.e. the variant triggered by the highest feasible accuracy
target. The walk measures its quality bracket directly, so no labels are needed to
estimate which variant is best.

Counts are in rows sent (``queries``) and requests; a refused request costs its rows
too (a server's quota counts it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bastion.lab.oracle import BudgetExhausted, Oracle

__all__ = ["FingerprintResult", "Signatures", "VariantFinding", "choose_probes", "fingerprint"]

_LATENCY_FLOOR_MS = 1e-6  # below any real variant: a zoo still serving here ignores latency targets
_LATENCY_CEILING_MS = 1e6
_GRID_ACCURACY = (None, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)
_GRID_LATENCY = (None, *(10.0 ** (k / 2) for k in range(-8, 5)))  # 1e-4 .. 1e2 ms


class Signatures:
    """Clusters of answers to the probe rows: one cluster per variant seen."""

    def __init__(self, decimals: int = 6, tolerance: float = 1e-4) -> None:
        self.decimals = decimals
        self.tolerance = tolerance
        self.representatives: list[np.ndarray] = []
        self.counts: list[int] = []
        self.latencies: list[list[float]] = []

    def assign(self, probs: np.ndarray, latency_ms: float = math.nan) -> int:
        """The cluster of ``probs`` (a new one when it matches none)."""
        sig = np.round(probs, self.decimals)
        for i, rep in enumerate(self.representatives):
            if rep.shape == sig.shape and float(np.max(np.abs(rep - sig))) <= self.tolerance:
                self.counts[i] += 1
                self.latencies[i].append(latency_ms)
                return i
        self.representatives.append(sig)
        self.counts.append(1)
        self.latencies.append([latency_ms])
        return len(self.representatives) - 1

    def __len__(self) -> int:
        return len(self.representatives)

    def median_latency_ms(self, cluster: int) -> float:
        values = [v for v in self.latencies[cluster] if math.isfinite(v)]
        return statistics.median(values) if values else math.nan


def choose_probes(answers: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Indices of the ``k`` candidate rows where ``answers`` (each [rows, classes], from
    requests served by possibly different variants) disagree most, then are least sure."""
    stack = np.stack(answers)  # [answers, rows, classes]
    top1 = stack.argmax(axis=2)
    distinct = np.array([len(set(top1[:, r])) for r in range(stack.shape[1])])
    spread = np.abs(stack[:, None] - stack[None, :]).sum(axis=3).max(axis=(0, 1))
    mean = np.sort(stack.mean(axis=0), axis=1)
    margin = mean[:, -1] - (mean[:, -2] if mean.shape[1] > 1 else 0.0)
    # lexicographic: disagreement first, then spread, then uncertainty
    order = np.lexsort((margin, -spread, -distinct))
    return np.sort(order[:k])


@dataclass
class VariantFinding:
    rank: int  # position on the front, 0 = fastest / least accurate
    signature: int  # cluster id in the run's Signatures
    trigger: dict[str, float]
    consistency: float  # fraction of `repeats` answers at the trigger from this variant
    repeats: int
    quality_range: tuple[float, float] | None  # the server's profiled quality lies in [lo, hi)
    latency_range_ms: tuple[float, float] | None  # its profiled (effective) latency lies in (lo, hi]
    client_latency_ms: float  # median round trip of its answers (secondary signal)
    ambiguous: bool = False  # another signature answered inside this variant's rectangle


@dataclass
class FingerprintResult:
    zoo: str
    method: str  # "staircase" or "grid"
    variants: list[VariantFinding]
    signatures_seen: int
    victim: int | None  # index into `variants`
    probe_rows: list[int]
    queries: int
    requests: int
    rejected: int
    complete: bool  # False: the budget ran out before the walk ended
    notes: list[str] = field(default_factory=list)

    @property
    def victim_trigger(self) -> dict[str, float] | None:
        return None if self.victim is None else dict(self.variants[self.victim].trigger)

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["variants_found"] = len(self.variants)
        doc["victim_trigger"] = self.victim_trigger
        return doc


class _Walk:
    """Queries with the probe rows; keeps the signatures and the cost."""

    def __init__(self, oracle: Oracle, probes: np.ndarray, signatures: Signatures) -> None:
        self.oracle = oracle
        self.probes = probes
        self.signatures = signatures
        self.refusals = 0

    def ask(self, accuracy: float | None, latency_ms: float | None) -> int | None:
        """The signature cluster that answered, or None when the server refused the targets."""
        targets: dict[str, float] = {}
        if accuracy is not None:
            targets["accuracy"] = float(accuracy)
        if latency_ms is not None:
            targets["latency_ms"] = float(latency_ms)
        answer = self.oracle.ask(self.probes, targets)
        if answer.probs is None:
            self.refusals += 1
            return None
        return self.signatures.assign(answer.probs, answer.latency_ms)


@dataclass
class _Step:
    floor: float | None  # accuracy target that excludes the variants already mapped
    latency_lo: float  # refused at `floor`
    latency_hi: float  # served at `floor`, by variant `cluster` alone
    cluster: int
    accuracy_lo: float  # served at latency_hi
    accuracy_hi: float | None  # refused at latency_hi; None: served even at accuracy 1
    seen: set[int]  # clusters answering inside the accuracy bisection (should be {cluster})


def fingerprint(
    oracle: Oracle,
    rows: np.ndarray,
    *,
    probes: int = 4,
    candidates: int = 32,
    repeats: int = 10,
    accuracy_tol: float = 1e-4,
    latency_rel_tol: float = 0.01,
    max_variants: int = 16,
    decimals: int = 6,
    tolerance: float = 1e-4,
    method: str = "auto",
) -> FingerprintResult:
    """Fingerprint the zoo behind ``oracle`` with pool ``rows`` (in the attack's order).

    ``method``: ``staircase`` (refusal-driven bisection), ``grid`` (fallback), or
    ``auto`` (staircase unless the zoo never refuses). The oracle's budget bounds the
    cost; when it runs out the result holds what was mapped so far (``complete`` False).
    """
    if method not in ("auto", "staircase", "grid"):
        raise ValueError(f"method: expected auto, staircase or grid, got {method!r}")
    signatures = Signatures(decimals, tolerance)
    notes: list[str] = []
    start_queries = oracle.queries
    start_requests, start_rejected = oracle.requests, oracle.rejected
    steps: list[_Step] = []
    findings: list[VariantFinding] = []
    victim: int | None = None
    complete = False
    probe_idx = np.arange(min(probes, len(rows)))
    used = "staircase" if method != "grid" else "grid"
    try:
        cand = rows[:max(candidates, probes)]
        first = [oracle.ask(cand) for _ in range(2)]
        served = [a.probs for a in first if a.probs is not None]
        if not served:
            raise ValueError(f"zoo '{oracle.model}' refused requests without targets: {first[0].message}")
        probe_idx = choose_probes(served, probes)
        for a in first:
            if a.probs is not None:
                signatures.assign(a.probs[probe_idx])  # a batch's round trip is not comparable: no latency
        walk = _Walk(oracle, cand[probe_idx], signatures)
        if method == "auto" and walk.ask(None, _LATENCY_FLOOR_MS) is not None and walk.ask(1.0, None) is not None:
            used = "grid"
            notes.append("the zoo served targets nothing can meet (no 422): on_infeasible is not 'reject'; "
                         "used the grid fallback")
        if used == "staircase":
            _staircase(walk, accuracy_tol, latency_rel_tol, max_variants, steps, notes)
            findings = _findings_from_steps(steps)
            victim = len(findings) - 1 if findings else None
        else:
            findings, victim = _grid(walk)
        for f in findings:
            f.repeats = repeats
            f.consistency = _consistency(walk, f)
        complete = True
    except BudgetExhausted as err:
        notes.append(f"stopped early: {err}")
        if not findings and steps:
            findings = _findings_from_steps(steps)  # mapped, consistency not measured (NaN)
        # an unfinished walk has not reached the most accurate variant yet
        victim = victim if findings and victim is not None and victim < len(findings) and used == "grid" else None
    for f in findings:
        f.client_latency_ms = signatures.median_latency_ms(f.signature)
    extra = len(signatures) - len({f.signature for f in findings})
    if extra > 0:
        notes.append(f"{extra} signature cluster(s) seen but not isolated by a trigger")
    return FingerprintResult(
        zoo=oracle.model, method=used, variants=findings, signatures_seen=len(signatures), victim=victim,
        probe_rows=[int(i) for i in probe_idx], queries=oracle.queries - start_queries,
        requests=oracle.requests - start_requests, rejected=oracle.rejected - start_rejected,
        complete=complete, notes=notes,
    )


def _consistency(walk: _Walk, finding: VariantFinding) -> float:
    """The fraction of ``finding.repeats`` replays of the trigger that its variant answered."""
    hits = sum(
        walk.ask(finding.trigger.get("accuracy"), finding.trigger.get("latency_ms")) == finding.signature
        for _ in range(finding.repeats)
    )
    return hits / finding.repeats if finding.repeats else math.nan


def _staircase(walk: _Walk, accuracy_tol: float, latency_rel_tol: float, max_variants: int,
               steps: list[_Step], notes: list[str]) -> None:
    """Appends to ``steps`` as it goes, so a budget that runs out keeps what was mapped."""
    floor: float | None = None
    previous_hi: float | None = None
    while len(steps) < max_variants:
        if walk.ask(floor, None) is None:
            if floor is None:
                raise ValueError(f"zoo '{walk.oracle.model}' refused a request without targets")
            break  # nothing is more accurate than the variants already mapped
        bracket = _latency_bracket(walk, floor, previous_hi)
        if bracket is None:
            notes.append("latency targets are not binding (served below 1e-6 ms); stopped the walk")
            break
        lo, hi, cluster = bracket
        lo, hi, cluster = _bisect_latency(walk, floor, lo, hi, cluster, latency_rel_tol)
        a_lo, a_hi, seen = _bisect_accuracy(walk, hi, floor if floor is not None else 0.0, accuracy_tol)
        if len(seen - {cluster}) > 0:
            notes.append(f"step {len(steps)}: {len(seen)} signatures answered inside one rectangle; two variants "
                         f"may be closer in latency than {latency_rel_tol:.0%}")
        steps.append(_Step(floor, lo, hi, cluster, a_lo, a_hi, seen))
        if a_hi is None:
            break
        floor, previous_hi = a_hi, hi


def _latency_bracket(walk: _Walk, floor: float | None, start: float | None) -> tuple[float, float, int] | None:
    """(refused, served, cluster at served) latencies at accuracy ``floor``."""
    if start is None:
        at, factor = 1.0, 10.0  # no idea yet: decades
    else:
        at, factor = start, 2.0  # the next variant is usually within a few times the last
    cluster = walk.ask(floor, at)
    if cluster is not None:
        hi, hi_cluster = at, cluster
        while True:
            lo = hi / factor
            if lo < _LATENCY_FLOOR_MS:
                return None
            c = walk.ask(floor, lo)
            if c is None:
                return lo, hi, hi_cluster
            hi, hi_cluster = lo, c
    lo = at
    while True:
        hi = lo * factor
        if hi > _LATENCY_CEILING_MS:
            raise ValueError(f"zoo '{walk.oracle.model}' served accuracy {floor} without a latency target but "
                             f"refused every latency up to {_LATENCY_CEILING_MS:g} ms")
        c = walk.ask(floor, hi)
        if c is not None:
            return lo, hi, c
        lo = hi


def _bisect_latency(walk: _Walk, floor: float | None, lo: float, hi: float, cluster: int,
                    rel_tol: float) -> tuple[float, float, int]:
    while hi / lo > 1.0 + rel_tol:
        mid = math.sqrt(lo * hi)
        c = walk.ask(floor, mid)
        if c is None:
            lo = mid
        else:
            hi, cluster = mid, c
    return lo, hi, cluster


def _bisect_accuracy(walk: _Walk, latency: float, lo: float, tol: float) -> tuple[float, float | None, set[int]]:
    seen: set[int] = set()
    c = walk.ask(1.0, latency)
    if c is not None:
        return 1.0, None, {c}
    hi = 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        c = walk.ask(mid, latency)
        if c is None:
            hi = mid
        else:
            lo = mid
            seen.add(c)
    return lo, hi, seen


def _findings_from_steps(steps: list[_Step]) -> list[VariantFinding]:
    findings = []
    for i, step in enumerate(steps):
        floor = step.floor if step.floor is not None else 0.0
        trigger = {"accuracy": round((floor + step.accuracy_lo) / 2, 6)}
        if i + 1 < len(steps):
            upper = steps[i + 1].latency_lo  # refused one step up: below the next variant's latency
            trigger["latency_ms"] = float(f"{math.sqrt(step.latency_hi * upper):.6g}")
        findings.append(VariantFinding(
            rank=i, signature=step.cluster, trigger=trigger, consistency=math.nan, repeats=0,
            quality_range=(step.accuracy_lo, step.accuracy_hi if step.accuracy_hi is not None else 1.0),
            latency_range_ms=(step.latency_lo, step.latency_hi), client_latency_ms=math.nan,
            ambiguous=len(step.seen - {step.cluster}) > 0,
        ))
    return findings


def _grid(walk: _Walk, checks: int = 3, candidates: int = 3) -> tuple[list[VariantFinding], int | None]:
    cells: dict[tuple[int, int], int | None] = {}
    for i, a in enumerate(_GRID_ACCURACY):
        for j, lat in enumerate(_GRID_LATENCY):
            cells[i, j] = walk.ask(a, lat)
    top_cell = (len(_GRID_ACCURACY) - 1, 0)  # accuracy 1, no latency target: the closest to perfect
    top = cells.get(top_cell)

    def stability(ij: tuple[int, int], cluster: int) -> tuple[float, int]:
        # a cell inside a region the server answers deterministically has neighbours that agree;
        # one where several variants are feasible (randomised) rarely does
        i, j = ij
        near = [cells[n] for n in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)) if n in cells]
        same = sum(c == cluster for c in near)
        return same / len(near), same

    def targets(ij: tuple[int, int]) -> dict[str, float]:
        a, lat = _GRID_ACCURACY[ij[0]], _GRID_LATENCY[ij[1]]
        out: dict[str, float] = {}
        if a is not None:
            out["accuracy"] = float(a)
        if lat is not None:
            out["latency_ms"] = float(f"{lat:.6g}")
        return out

    findings: list[VariantFinding] = []
    for cluster in sorted({c for c in cells.values() if c is not None}):
        mine = sorted((ij for ij, c in cells.items() if c == cluster),
                      key=lambda ij, c=cluster: (ij != top_cell, tuple(-v for v in stability(ij, c))))
        # replay the most promising cells a few times; keep the first that never wavers
        best, best_hits = mine[0], -1
        for ij in mine[:candidates]:
            t = targets(ij)
            hits = sum(walk.ask(t.get("accuracy"), t.get("latency_ms")) == cluster for _ in range(checks))
            if hits > best_hits:
                best, best_hits = ij, hits
            if hits == checks:
                break
        findings.append(VariantFinding(
            rank=len(findings), signature=cluster, trigger=targets(best), consistency=math.nan, repeats=0,
            quality_range=None, latency_range_ms=None, client_latency_ms=math.nan,
        ))
    victim = next((k for k, f in enumerate(findings) if f.signature == top), None)
    return findings, victim
