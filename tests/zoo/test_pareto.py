from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.zoo.pareto import Point, dominated_by, dominates, duplicate_of, pareto_front


def names(points: list[Point]) -> list[str]:
    return [p.name for p in points]


def test_single_point_is_the_front() -> None:
    assert names(pareto_front([Point("a", 0.9, 1.0)])) == ["a"]


def test_empty_input_gives_empty_front() -> None:
    assert pareto_front([]) == []


def test_all_on_the_front_sorted_by_latency() -> None:
    pts = [Point("big", 0.97, 6.2), Point("small", 0.91, 0.4), Point("mid", 0.95, 2.0)]
    assert names(pareto_front(pts)) == ["small", "mid", "big"]


def test_one_dominating_all() -> None:
    pts = [Point("a", 0.9, 5.0), Point("best", 0.99, 0.1), Point("b", 0.95, 3.0)]
    assert names(pareto_front(pts)) == ["best"]
    assert dominated_by(pts[0], pts) == ["b", "best"]
    assert dominated_by(pts[2], pts) == ["best"]


def test_equal_quality_faster_wins_and_equal_latency_more_accurate_wins() -> None:
    pts = [Point("slow", 0.9, 2.0), Point("fast", 0.9, 1.0), Point("worse", 0.8, 1.0)]
    assert names(pareto_front(pts)) == ["fast"]
    assert dominates(pts[1], pts[0]) and dominates(pts[1], pts[2])


def test_exact_tie_keeps_first_by_name() -> None:
    pts = [Point("zeta", 0.9, 1.0), Point("alpha", 0.9, 1.0), Point("x", 0.95, 3.0)]
    assert names(pareto_front(pts)) == ["alpha", "x"]
    # A tie is not dominance: the dropped twin has no strict dominator but has a duplicate.
    assert dominated_by(pts[0], pts) == []
    assert duplicate_of(pts[0], pareto_front(pts)) == "alpha"
    assert not dominates(pts[0], pts[1]) and not dominates(pts[1], pts[0])


def test_duplicate_names_and_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        pareto_front([Point("a", 0.9, 1.0), Point("a", 0.8, 2.0)])
    with pytest.raises(ValueError, match="quality"):
        Point("a", math.nan, 1.0)
    with pytest.raises(ValueError, match="latency"):
        Point("a", 0.5, -1.0)


# Small value grids make ties and equal coordinates frequent, the interesting cases.
_points = st.lists(
    st.tuples(st.sampled_from([0.5, 0.7, 0.8, 0.9, 0.95]), st.sampled_from([0.5, 1.0, 2.0, 4.0])),
    min_size=1,
    max_size=8,
).map(lambda xs: [Point(f"v{i}", q, lat) for i, (q, lat) in enumerate(xs)])


@settings(max_examples=200, deadline=None)
@given(_points)
def test_front_property(points: list[Point]) -> None:
    front = pareto_front(points)
    member = {p.name for p in front}
    assert front == sorted(front, key=lambda p: (p.latency_ms, p.name))
    for p in front:
        assert dominated_by(p, points) == []
    for p in points:
        if p.name not in member:
            # Either strictly dominated by a front member, or the exact twin of one.
            assert any(dominates(m, p) for m in front) or duplicate_of(p, front) is not None
    # No two front members share a (quality, latency) point.
    assert len({(p.quality, p.latency_ms) for p in front}) == len(front)
