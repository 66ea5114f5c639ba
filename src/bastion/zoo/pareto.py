"""The Pareto front of a zoo's variants over (quality ↑, latency ↓).

Dominance, exactly: ``b`` dominates ``a`` when ``b.quality >= a.quality`` and
``b.latency_ms <= a.latency_ms`` and at least one of the two is strict. A variant
that nothing dominates is on the front.

Exact ties (same quality *and* same latency) dominate neither way. Keeping both
would put two interchangeable variants on the front, which skews a uniform policy
towards that point (it would be drawn twice as often), so the front keeps only the
one whose name sorts first and drops the others. ``dominated_by`` still reports
only strict dominators; a tied duplicate therefore has an empty list there while
being absent from the front (see ``duplicate_of``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Point", "dominated_by", "dominates", "duplicate_of", "pareto_front"]


@dataclass(frozen=True, slots=True)
class Point:
    """One variant in the trade-off plane: measured quality and latency (ms)."""

    name: str
    quality: float
    latency_ms: float

    def __post_init__(self) -> None:
        # NaN compares false both ways and would silently land on every front.
        if not math.isfinite(self.quality):
            raise ValueError(f"point {self.name!r}: quality must be finite, got {self.quality!r}")
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"point {self.name!r}: latency_ms must be finite and >= 0, got {self.latency_ms!r}")


def dominates(b: Point, a: Point) -> bool:
    """True when ``b`` is at least as accurate and at most as slow as ``a``, strictly better in one."""
    return (
        b.quality >= a.quality
        and b.latency_ms <= a.latency_ms
        and (b.quality > a.quality or b.latency_ms < a.latency_ms)
    )


def _unique(points: Iterable[Point]) -> list[Point]:
    pts = list(points)
    names = [p.name for p in pts]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate point names: {', '.join(dup)}")
    return pts


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The non-dominated points, sorted by latency ascending (ties by name).

    Of several points with identical (quality, latency) only the first by name is
    kept (see the module docstring). O(n log n): after sorting by latency ascending
    and quality descending, a point is on the front iff its quality beats every
    faster point's quality.
    """
    pts = _unique(points)
    order = sorted(pts, key=lambda p: (p.latency_ms, -p.quality, p.name))
    front: list[Point] = []
    best = -math.inf
    for p in order:
        if p.quality > best:
            front.append(p)
            best = p.quality
    return front


def dominated_by(point: Point, points: Iterable[Point]) -> list[str]:
    """Names of the points that strictly dominate ``point``, sorted by name."""
    return sorted(q.name for q in points if q.name != point.name and dominates(q, point))


def duplicate_of(point: Point, front: Iterable[Point]) -> str | None:
    """The front member with exactly ``point``'s quality and latency that replaced it, if any."""
    for q in front:
        if q.name != point.name and q.quality == point.quality and q.latency_ms == point.latency_ms:
            return q.name
    return None
