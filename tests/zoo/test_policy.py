from __future__ import annotations

import random
from collections import Counter

import pytest

from bastion.core.errors import InvalidInput, Unprocessable
from bastion.zoo.pareto import Point
from bastion.zoo.policy import Choice, Targets, make_policy, parse_targets

FRONT = [Point("small", 0.91, 0.4), Point("mid", 0.95, 2.0), Point("big", 0.97, 6.2)]


def choose(policy: str, targets: Targets, waits: dict[str, float] | None = None, on: str = "reject") -> Choice:
    return make_policy(policy, on, zoo="image").choose(FRONT, targets, waits or {}, random.Random(0))


def test_fastest_and_most_accurate_feasible() -> None:
    t = Targets(accuracy=0.93, latency_ms=10)
    assert choose("fastest-feasible", t) == Choice("mid", True, "fastest of 2 feasible")
    assert choose("most-accurate-feasible", t).variant == "big"
    assert choose("fastest-feasible", Targets()).variant == "small"
    assert choose("most-accurate-feasible", Targets()).variant == "big"


def test_latency_target_only() -> None:
    assert choose("most-accurate-feasible", Targets(latency_ms=2.0)).variant == "mid"


def test_load_awareness_pushes_fastest_out() -> None:
    t = Targets(latency_ms=3.0)
    assert choose("fastest-feasible", t).variant == "small"
    # small's queue adds 5 ms: 5.4 ms > 3 ms, so mid (idle, 2 ms) is the fastest feasible now.
    c = choose("fastest-feasible", t, waits={"small": 5.0})
    assert c.variant == "mid" and c.feasible
    for seed in range(50):
        c = make_policy("uniform-feasible", "reject").choose(FRONT, t, {"small": 5.0}, random.Random(seed))
        assert c.variant == "mid"


def test_fastest_ranks_by_effective_latency_without_targets() -> None:
    assert choose("fastest-feasible", Targets(), waits={"small": 10.0}).variant == "mid"


def test_infinite_wait_is_never_feasible_under_a_latency_target() -> None:
    c = choose("fastest-feasible", Targets(latency_ms=100), waits={"small": float("inf")})
    assert c.variant == "mid"


def test_bad_wait_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="waits_ms"):
        choose("fastest-feasible", Targets(), waits={"small": -1.0})


def test_uniform_spreads_over_all_feasible_and_never_picks_infeasible() -> None:
    front = [*FRONT, Point("huge", 0.99, 50.0)]
    policy = make_policy("uniform-feasible", "reject")
    rng = random.Random(1234)
    n = 3000
    counts = Counter(policy.choose(front, Targets(latency_ms=10), {}, rng).variant for _ in range(n))
    assert set(counts) == {"small", "mid", "big"}
    expected = n / 3
    chi2 = sum((counts[k] - expected) ** 2 / expected for k in ("small", "mid", "big"))
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_uniform_is_deterministic_given_the_rng_and_ignores_input_order() -> None:
    policy = make_policy("uniform-feasible", "reject")
    rng_a, rng_b = random.Random(7), random.Random(7)
    a = [policy.choose(FRONT, Targets(), {}, rng_a).variant for _ in range(20)]
    b = [policy.choose(list(reversed(FRONT)), Targets(), {}, rng_b).variant for _ in range(20)]
    assert a == b
    assert policy.choose(FRONT, Targets(), {}, random.Random(0)).reason == "uniform among 3 feasible"


def test_reject_names_unmet_targets_and_offers() -> None:
    with pytest.raises(Unprocessable) as exc:
        choose("uniform-feasible", Targets(accuracy=0.99, latency_ms=0.1))
    msg = str(exc.value)
    assert exc.value.http_status == 422
    assert "zoo 'image'" in msg
    assert "accuracy ≥ 0.99 and latency ≤ 0.1 ms" in msg
    assert "unmet: accuracy and latency" in msg
    assert "accuracy 0.91\u20130.97 and latency 0.4\u20136.2 ms" in msg


def test_reject_when_each_target_alone_is_reachable() -> None:
    with pytest.raises(Unprocessable, match="no variant meets both at once"):
        choose("fastest-feasible", Targets(accuracy=0.97, latency_ms=1.0))


def test_reject_mentions_current_queues() -> None:
    with pytest.raises(Unprocessable) as exc:
        choose("fastest-feasible", Targets(latency_ms=1.0), waits={"small": 3.0})
    msg = str(exc.value)
    assert "unmet: latency" in msg
    assert "latency 0.4\u20136.2 ms (2\u20136.2 ms with the current queues)" in msg


def test_closest_uses_normalised_shortfall() -> None:
    # accuracy range 0.06, latency range 5.8 ms. Target a=0.99, l=1:
    # small: (0.99-0.91)/0.06 + 0 = 1.333; mid: 0.667 + 1/5.8 = 0.839; big: 0.333 + 5.2/5.8 = 1.23
    c = choose("uniform-feasible", Targets(accuracy=0.99, latency_ms=1.0), on="closest")
    assert c.variant == "mid" and not c.feasible and c.reason.startswith("closest:")


def test_closest_ties_go_to_the_faster_variant() -> None:
    # Same quality, both short of the target by the same amount: equal distance.
    front = [Point("a", 0.9, 1.0), Point("b", 0.9, 3.0)]
    c = make_policy("most-accurate-feasible", "closest").choose(front, Targets(accuracy=0.95), {}, random.Random(0))
    assert c.variant == "a"


def test_closest_with_a_single_variant_and_infinite_waits() -> None:
    one = [Point("only", 0.8, 2.0)]
    c = make_policy("fastest-feasible", "closest").choose(one, Targets(latency_ms=1.0), {}, random.Random(0))
    assert c == Choice("only", False, c.reason)
    c = make_policy("fastest-feasible", "closest").choose(
        FRONT, Targets(latency_ms=1.0), dict.fromkeys(("small", "mid"), float("inf")), random.Random(0)
    )
    assert c.variant == "big"


def test_make_policy_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown zoo policy"):
        make_policy("random", "reject")
    with pytest.raises(ValueError, match="on_infeasible"):
        make_policy("uniform-feasible", "maybe")


def test_empty_front_is_a_bug() -> None:
    with pytest.raises(ValueError, match="empty"):
        make_policy("uniform-feasible", "reject").choose([], Targets(), {}, random.Random(0))


def test_parse_targets() -> None:
    assert parse_targets({}) == Targets()
    assert parse_targets(None) == Targets()
    assert parse_targets({"accuracy": 0.95, "latency_ms": 12, "other": "x"}) == Targets(0.95, 12.0)
    assert parse_targets({"accuracy": 1}) == Targets(accuracy=1.0)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"accuracy": True}, "parameters.accuracy: expected a number"),
        ({"accuracy": "0.9"}, "parameters.accuracy: expected a number"),
        ({"accuracy": 1.5}, r"parameters.accuracy: expected a number in \[0, 1\]"),
        ({"accuracy": -0.1}, r"parameters.accuracy: expected a number in \[0, 1\]"),
        ({"accuracy": float("nan")}, "parameters.accuracy: expected a finite number"),
        ({"latency_ms": 0}, "parameters.latency_ms: expected a number > 0"),
        ({"latency_ms": False}, "parameters.latency_ms: expected a number"),
        ({"latency_ms": float("inf")}, "parameters.latency_ms: expected a finite number"),
        ({"latency_ms": None}, "parameters.latency_ms: expected a number"),
    ],
)
def test_parse_targets_errors(params: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        parse_targets(params)
