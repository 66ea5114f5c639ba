from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bastion.core.errors import Unprocessable
from bastion.zoo.defenses import (
    NO_DEFENSE,
    DefenseSpec,
    ExponentialMechanism,
    MetricNoise,
    PermuteAndFlip,
    build_policy,
    exponential_probabilities,
    permute_and_flip_probabilities,
    shortfall,
    utilities,
    utility,
)
from bastion.zoo.pareto import Point
from bastion.zoo.policy import Choice, SelectionPolicy, Targets, is_feasible, make_policy
from bastion.zoo.spec import ZooSpec, ZooSpecError, load_zoo_spec, parse_zoo_spec

FRONT = [Point("small", 0.91, 0.4), Point("mid", 0.95, 2.0), Point("big", 0.97, 6.2)]
NAMES = ["big", "mid", "small"]  # the mechanisms' canonical (name) order
# PSML-style fingerprint: an accuracy only the most accurate variant meets
FINGERPRINT = Targets(accuracy=0.96)
CHI2_DF2_P001 = 13.8


def base(policy: str = "uniform-feasible", on: str = "reject") -> SelectionPolicy:
    return make_policy(policy, on, zoo="image")


def counts(policy: SelectionPolicy, targets: Targets, n: int, seed: int = 0, **kw: Any) -> Counter[str]:
    rng = random.Random(seed)
    front = kw.get("front", FRONT)
    waits = kw.get("waits", {})
    return Counter(policy.choose(front, targets, waits, rng).variant for _ in range(n))


def chi2(observed: Counter[str], probs: dict[str, float], n: int) -> float:
    return sum((observed[k] - n * p) ** 2 / (n * p) for k, p in probs.items())


def brute_force_pf(utils: list[float], eps: float) -> list[float]:
    """Permute-and-flip by enumeration of every order, for checking the closed form."""
    top = max(utils)
    p = [math.exp(eps * (u - top) / 2) for u in utils]
    n = len(utils)
    out = [0.0] * n
    for order in itertools.permutations(range(n)):
        reach = 1.0
        for i in order:
            out[i] += reach * p[i]
            reach *= 1 - p[i]
    return [x / math.factorial(n) for x in out]


# ---- utility ------------------------------------------------------------------------------------
def test_utility_formula_on_the_fingerprint_query() -> None:
    # quality range 0.06: mid falls short by 0.01 -> d = 1/6; small by 0.05 -> d = 5/6
    u = utilities(FRONT, FINGERPRINT, {})
    assert u["big"] == 1.0
    assert u["mid"] == pytest.approx(1 - 0.01 / 0.06)
    assert u["small"] == pytest.approx(1 - 0.05 / 0.06)
    assert utility(FRONT[1], FINGERPRINT, {}, FRONT) == u["mid"]
    assert shortfall(FRONT[1], FINGERPRINT, {}, FRONT) == pytest.approx(0.01 / 0.06)


def test_utility_latency_term_absent_targets_and_clipping() -> None:
    # latency range 5.8 ms; big exceeds 3 ms by 3.2 ms; both terms add up
    t = Targets(accuracy=0.96, latency_ms=3.0)
    u = utilities(FRONT, t, {})
    assert u["big"] == pytest.approx(1 - 3.2 / 5.8)
    assert u["mid"] == pytest.approx(1 - 0.01 / 0.06)
    assert u["small"] == pytest.approx(1 - 0.05 / 0.06)
    assert utilities(FRONT, Targets(), {}) == {"small": 1.0, "mid": 1.0, "big": 1.0}
    # a shortfall beyond the whole range clips at 0, and a full queue is worth nothing
    assert utilities(FRONT, Targets(accuracy=1.0, latency_ms=0.1), {})["small"] == 0.0
    assert utilities(FRONT, Targets(latency_ms=100), {"small": math.inf})["small"] == 0.0


def test_utility_is_in_unit_interval_and_one_exactly_when_feasible() -> None:
    rng = random.Random(3)
    for _ in range(500):
        t = Targets(
            accuracy=rng.choice([None, rng.uniform(0.85, 1.0)]),
            latency_ms=rng.choice([None, rng.uniform(0.05, 10.0)]),
        )
        waits = {"mid": rng.choice([0.0, 1.5])}
        for p in FRONT:
            u = utility(p, t, waits, FRONT)
            assert 0.0 <= u <= 1.0
            assert (u == 1.0) == is_feasible(p, t, waits)


def test_best_infeasible_utility_is_what_closest_picks() -> None:
    # the utility reuses closest's normalised shortfall; guard against the two drifting apart
    closest = base(on="closest")
    rng = random.Random(11)
    checked = 0
    for _ in range(400):
        t = Targets(accuracy=rng.uniform(0.9, 1.0), latency_ms=rng.uniform(0.1, 8.0))
        if any(is_feasible(p, t, {}) for p in FRONT):
            continue
        u = utilities(FRONT, t, {})
        d = {p.name: shortfall(p, t, {}, FRONT) for p in FRONT}
        choice = closest.choose(FRONT, t, {}, rng)
        assert d[choice.variant] == min(d.values())
        assert u[choice.variant] == max(u.values())
        checked += 1
    assert checked > 100


# ---- exponential mechanism and permute-and-flip -------------------------------------------------
def test_exponential_probabilities_follow_the_formula() -> None:
    u = [1.0, 5 / 6, 1 / 6]
    for eps in (0.5, 2.0, 10.0):
        w = [math.exp(eps * x / 2) for x in u]
        assert exponential_probabilities(u, eps) == pytest.approx([x / sum(w) for x in w])


@pytest.mark.parametrize("eps", [1.0, 4.0])
def test_exponential_mechanism_draws_match_its_probabilities(eps: float) -> None:
    u = utilities(FRONT, FINGERPRINT, {})
    probs = dict(zip(NAMES, exponential_probabilities([u[k] for k in NAMES], eps), strict=True))
    n = 6000
    observed = counts(ExponentialMechanism(eps), FINGERPRINT, n, seed=5)
    assert chi2(observed, probs, n) < CHI2_DF2_P001


def test_permute_and_flip_closed_form_matches_enumeration() -> None:
    for utils in ([1.0, 0.5], [1.0, 5 / 6, 1 / 6], [0.2, 0.9, 0.9, 0.0], [1.0, 1.0, 0.3]):
        for eps in (0.1, 1.0, 3.0, 20.0):
            exact = permute_and_flip_probabilities(utils, eps)
            assert exact == pytest.approx(brute_force_pf(utils, eps), abs=1e-12)
            assert math.fsum(exact) == pytest.approx(1.0)


def test_permute_and_flip_two_point_closed_form() -> None:
    # two candidates, p = exp(-ε·gap/2) for the worse: it wins only when visited first and accepted
    eps, gap = 2.0, 0.5
    p = math.exp(-eps * gap / 2)
    assert permute_and_flip_probabilities([1.0, 1.0 - gap], eps) == pytest.approx([1 - p / 2, p / 2])


@pytest.mark.parametrize("eps", [1.0, 4.0])
def test_permute_and_flip_draws_match_the_closed_form(eps: float) -> None:
    u = utilities(FRONT, FINGERPRINT, {})
    probs = dict(zip(NAMES, permute_and_flip_probabilities([u[k] for k in NAMES], eps), strict=True))
    n = 6000
    observed = counts(PermuteAndFlip(eps), FINGERPRINT, n, seed=6)
    assert chi2(observed, probs, n) < CHI2_DF2_P001


def test_permute_and_flip_never_has_lower_expected_utility_than_exponential() -> None:
    rng = random.Random(2)
    cases = [[1.0, 5 / 6, 1 / 6], [1.0, 0.0], [0.5, 0.5, 0.5], [1.0, 1.0, 0.9, 0.1]]
    cases += [[rng.random() for _ in range(rng.randint(2, 6))] for _ in range(40)]
    for utils in cases:
        for eps in (0.01, 0.5, 2.0, 8.0, 50.0):
            pf = math.fsum(p * u for p, u in zip(permute_and_flip_probabilities(utils, eps), utils, strict=True))
            em = math.fsum(p * u for p, u in zip(exponential_probabilities(utils, eps), utils, strict=True))
            assert pf >= em - 1e-12


@pytest.mark.parametrize("mechanism", [ExponentialMechanism, PermuteAndFlip])
def test_large_epsilon_picks_only_max_utility_variants(mechanism: type) -> None:
    for eps in (1e6, math.inf):
        assert counts(mechanism(eps), FINGERPRINT, 300) == Counter({"big": 300})
        # both mid and big meet 0.93: uniform among them, never small
        observed = counts(mechanism(eps), Targets(accuracy=0.93), 3000)
        assert set(observed) == {"mid", "big"}
        assert chi2(observed, {"mid": 0.5, "big": 0.5}, 3000) < 10.8  # df 1, p = 0.001


@pytest.mark.parametrize("mechanism", [ExponentialMechanism, PermuteAndFlip])
def test_small_epsilon_approaches_uniform(mechanism: type) -> None:
    utils = [1.0, 5 / 6, 1 / 6]
    exact = (exponential_probabilities if mechanism is ExponentialMechanism else permute_and_flip_probabilities)(
        utils, 1e-6
    )
    assert exact == pytest.approx([1 / 3] * 3, abs=1e-6)
    n = 6000
    observed = counts(mechanism(1e-6), FINGERPRINT, n, seed=8)
    assert chi2(observed, dict.fromkeys(NAMES, 1 / 3), n) < CHI2_DF2_P001


@pytest.mark.parametrize("mechanism", [ExponentialMechanism, PermuteAndFlip])
def test_mechanisms_are_numerically_stable_for_huge_epsilon(mechanism: type) -> None:
    c = mechanism(1e300).choose(FRONT, FINGERPRINT, {}, random.Random(0))
    assert c.variant == "big"
    assert exponential_probabilities([1.0, 0.0], 1e300) == [1.0, 0.0]


@pytest.mark.parametrize("mechanism", [ExponentialMechanism, PermuteAndFlip])
def test_a_full_queue_is_left_out_of_the_draw(mechanism: type) -> None:
    observed = counts(mechanism(0.01), Targets(latency_ms=10.0), 500, waits={"mid": math.inf})
    assert set(observed) == {"small", "big"}


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, True])
def test_epsilon_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="epsilon"):
        ExponentialMechanism(bad)
    with pytest.raises(ValueError, match="epsilon"):
        PermuteAndFlip(bad)


# ---- metric noise -------------------------------------------------------------------------------
def test_metric_noise_with_scale_zero_is_exactly_the_base_policy() -> None:
    rng = random.Random(4)
    rejected = 0
    for on in ("reject", "closest"):
        plain, wrapped = base(on=on), MetricNoise(base(on=on), "laplace", 0.0, 0.0)
        rng_a, rng_b = random.Random(9), random.Random(9)
        for _ in range(300):
            t = Targets(accuracy=rng.uniform(0.85, 0.99), latency_ms=rng.uniform(0.2, 10.0))
            try:
                a = plain.choose(FRONT, t, {}, rng_a)
            except Unprocessable as exc:
                with pytest.raises(Unprocessable) as again:
                    wrapped.choose(FRONT, t, {}, rng_b)
                assert str(again.value) == str(exc)
                rejected += 1
                continue
            b = wrapped.choose(FRONT, t, {}, rng_b)
            assert (a.variant, a.feasible) == (b.variant, b.feasible)
            assert b.reason.startswith("metric-noise laplace(") and b.reason.endswith(a.reason)
        assert rng_a.random() == rng_b.random()  # no hidden draws either
    assert rejected > 10


@pytest.mark.parametrize("noise", ["laplace", "gaussian"])
def test_metric_noise_changes_choices_near_a_boundary(noise: str) -> None:
    # accuracy 0.95 is exactly mid's quality: fastest-feasible always gives mid; noise pushes
    # the target above it (-> big) about half the time
    t = Targets(accuracy=0.95)
    assert counts(base("fastest-feasible"), t, 200) == Counter({"mid": 200})
    observed = counts(MetricNoise(base("fastest-feasible"), noise, 0.01, 0.0), t, 2000)
    assert observed["mid"] > 600 and observed["big"] > 600


def test_latency_noise_is_multiplicative() -> None:
    noise = MetricNoise(base(), "gaussian", 0.0, 0.5)
    rng = random.Random(1)
    logs = [math.log(noise.perturb(Targets(latency_ms=4.0), rng).latency_ms or math.nan) for _ in range(4000)]
    mean = math.fsum(logs) / len(logs)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in logs) / len(logs))
    assert mean == pytest.approx(math.log(4.0), abs=0.03)
    assert sd == pytest.approx(0.5, abs=0.03)


def test_laplace_noise_has_the_laplace_spread() -> None:
    noise = MetricNoise(base(), "laplace", 0.1, 0.0)
    rng = random.Random(2)
    xs = [(noise.perturb(Targets(accuracy=0.5), rng).accuracy or 0.0) - 0.5 for _ in range(6000)]
    # Laplace(0, b): mean 0, mean absolute deviation b
    assert math.fsum(xs) / len(xs) == pytest.approx(0.0, abs=0.005)
    assert math.fsum(abs(x) for x in xs) / len(xs) == pytest.approx(0.1, abs=0.005)


def test_perturbed_targets_stay_valid_and_absent_targets_stay_absent() -> None:
    noise = MetricNoise(base(), "laplace", 5.0, 50.0)
    rng = random.Random(3)
    for _ in range(500):
        t = noise.perturb(Targets(accuracy=0.9, latency_ms=1.0), rng)
        assert t.accuracy is not None and 0.0 <= t.accuracy <= 1.0
        assert t.latency_ms is not None and t.latency_ms > 0
    assert noise.perturb(Targets(), rng) == Targets()


def test_noise_never_turns_a_servable_request_into_a_422() -> None:
    # base rejects; heavy noise often makes the perturbed targets unreachable
    policy = MetricNoise(base(), "laplace", 0.2, 2.0)
    rng = random.Random(0)
    t = Targets(accuracy=0.93, latency_ms=7.0)
    reasons = Counter(policy.choose(FRONT, t, {}, rng).reason.split("; ")[1] for _ in range(2000))
    assert reasons["closest to the perturbed targets"] > 500


# ---- all defenses -------------------------------------------------------------------------------
DEFENSES = {
    "metric-noise": DefenseSpec("metric-noise", noise="laplace", scale_accuracy=0.02, scale_latency=0.3),
    "exponential": DefenseSpec("exponential", epsilon=2.0),
    "permute-and-flip": DefenseSpec("permute-and-flip", epsilon=2.0),
}


def test_build_policy() -> None:
    plain = base()
    assert build_policy(plain, NO_DEFENSE) is plain
    assert isinstance(build_policy(plain, DEFENSES["metric-noise"]), MetricNoise)
    assert isinstance(build_policy(plain, DEFENSES["exponential"]), ExponentialMechanism)
    assert isinstance(build_policy(plain, DEFENSES["permute-and-flip"]), PermuteAndFlip)


@pytest.mark.parametrize("kind", list(DEFENSES))
def test_fingerprinting_query_no_longer_pins_the_most_accurate_variant(kind: str) -> None:
    n = 3000
    assert counts(base(), FINGERPRINT, n) == Counter({"big": n})  # undefended: always big
    observed = counts(build_policy(base(), DEFENSES[kind]), FINGERPRINT, n)
    assert 0 < observed["big"] < 0.95 * n
    # still the most likely answer: the defense costs goodput, it does not discard the targets
    assert observed["big"] == max(observed.values())


@pytest.mark.parametrize("kind", list(DEFENSES))
def test_closest_fingerprint_accuracy_one_is_randomised_too(kind: str) -> None:
    # under on_infeasible: closest, asking for accuracy 1.0 pins the most accurate variant
    closest = base(on="closest")
    t = Targets(accuracy=1.0)
    assert counts(closest, t, 300) == Counter({"big": 300})
    # the noise must reach below big's quality 0.97 from 1.0 now, hence a larger scale
    spec = DefenseSpec("metric-noise", scale_accuracy=0.05) if kind == "metric-noise" else DEFENSES[kind]
    observed = counts(build_policy(closest, spec), t, 3000)
    assert 0 < observed["big"] < 0.95 * 3000


@pytest.mark.parametrize("kind", list(DEFENSES))
def test_feasible_refers_to_the_original_targets(kind: str) -> None:
    policy = build_policy(base(on="closest"), DEFENSES[kind])
    rng = random.Random(12)
    seen = set()
    for _ in range(1500):
        t = Targets(accuracy=rng.uniform(0.9, 0.97), latency_ms=rng.uniform(0.5, 8.0))
        c = policy.choose(FRONT, t, {}, rng)
        point = next(p for p in FRONT if p.name == c.variant)
        assert c.feasible == is_feasible(point, t, {})
        seen.add(c.feasible)
    assert seen == {True, False}


@pytest.mark.parametrize("kind", list(DEFENSES))
def test_unreachable_targets_under_reject_are_a_422_naming_the_clients_targets(kind: str) -> None:
    policy = build_policy(base(), DEFENSES[kind])
    for seed in range(20):
        with pytest.raises(Unprocessable, match=r"meets accuracy ≥ 0\.99 and latency ≤ 0\.1 ms \("):
            policy.choose(FRONT, Targets(accuracy=0.99, latency_ms=0.1), {}, random.Random(seed))


@pytest.mark.parametrize("kind", list(DEFENSES))
def test_reason_names_the_defense(kind: str) -> None:
    c = build_policy(base(), DEFENSES[kind]).choose(FRONT, FINGERPRINT, {}, random.Random(0))
    assert c.reason.startswith(kind)
    if kind != "metric-noise":
        assert "ε=2; u=" in c.reason


@pytest.mark.parametrize("kind", list(DEFENSES))
def test_reproducible_with_a_seed_and_independent_of_input_order(kind: str) -> None:
    policy = build_policy(base(on="closest"), DEFENSES[kind])
    targets = [Targets(accuracy=0.94 + 0.001 * i, latency_ms=3.0 + 0.2 * i) for i in range(40)]

    def run(seed: int, front: list[Point]) -> list[Choice]:
        rng = random.Random(seed)
        return [policy.choose(front, t, {}, rng) for t in targets]

    assert run(1, FRONT) == run(1, FRONT) == run(1, list(reversed(FRONT)))
    assert [c.variant for c in run(1, FRONT)] != [c.variant for c in run(2, FRONT)]


@pytest.mark.parametrize("kind", list(DEFENSES))
def test_no_randomness_but_the_rng_argument(kind: str) -> None:
    policy = build_policy(base(), DEFENSES[kind])
    random.seed(0)
    before = random.getstate()
    for seed in range(50):
        policy.choose(FRONT, FINGERPRINT, {}, random.Random(seed))
    assert random.getstate() == before


def test_goodput_stays_high_at_moderate_strength() -> None:
    # targets spread over what the zoo can meet; goodput = served variant meets the targets
    rng = random.Random(21)
    targets = [Targets(accuracy=rng.uniform(0.85, 0.97), latency_ms=rng.uniform(6.5, 20.0)) for _ in range(2000)]
    for spec in (
        DefenseSpec("metric-noise", scale_accuracy=0.01, scale_latency=0.2),
        DefenseSpec("exponential", epsilon=8.0),
        DefenseSpec("permute-and-flip", epsilon=8.0),
    ):
        policy = build_policy(base(), spec)
        draw = random.Random(5)
        good = sum(policy.choose(FRONT, t, {}, draw).feasible for t in targets)
        assert good / len(targets) > 0.8, spec


def test_empty_front_is_a_caller_bug() -> None:
    for spec in DEFENSES.values():
        with pytest.raises(ValueError, match="empty Pareto front"):
            build_policy(base(), spec).choose([], Targets(), {}, random.Random(0))


def test_defense_spec_guards_programmatic_use() -> None:
    with pytest.raises(ValueError, match="kind"):
        DefenseSpec("laplace")
    with pytest.raises(ValueError, match="epsilon"):
        DefenseSpec("exponential")
    with pytest.raises(ValueError, match="noise"):
        DefenseSpec("metric-noise", noise="uniform")
    with pytest.raises(ValueError, match="scale_latency"):
        DefenseSpec("metric-noise", scale_latency=-1.0)
    with pytest.raises(ValueError, match="noise"):
        MetricNoise(base(), "cauchy")


# ---- zoo.yaml -----------------------------------------------------------------------------------
GOOD: dict[str, Any] = {"task": "t", "variants": ["a", "b"], "evaluation": "eval.npz", "metric": "accuracy"}


def parse(**extra: Any) -> ZooSpec:
    return parse_zoo_spec("image", {**GOOD, **extra}, source="image/zoo.yaml")


def test_no_defense_by_default() -> None:
    spec = parse()
    assert dict(spec.defenses) == {"default": NO_DEFENSE}
    assert spec.defense_for("suspect") == NO_DEFENSE
    hash(spec)  # still hashable


def test_one_defense_for_every_tenant() -> None:
    spec = parse(defense={"kind": "permute-and-flip", "epsilon": 2})
    assert dict(spec.defenses) == {"default": DefenseSpec("permute-and-flip", epsilon=2.0)}
    assert spec.defense_for("trusted") == spec.defense_for("default")


def test_defenses_per_class(tmp_path: Path) -> None:
    zoo = tmp_path / "image"
    zoo.mkdir()
    (zoo / "zoo.yaml").write_text(
        "task: t\nvariants: [a, b]\nevaluation: eval.npz\nmetric: accuracy\n"
        "defenses:\n"
        "  default: {kind: metric-noise, noise: gaussian, scale_accuracy: 0.01, scale_latency: 0.2}\n"
        "  trusted: {kind: none}\n"
        "  suspect: {kind: exponential, epsilon: 0.5}\n"
        "  lab_2: {kind: metric-noise, scale_latency: 1}\n"
    )
    spec = load_zoo_spec(zoo)
    assert list(spec.defenses) == ["default", "lab_2", "suspect", "trusted"]
    assert spec.defenses["default"] == DefenseSpec(
        "metric-noise", noise="gaussian", scale_accuracy=0.01, scale_latency=0.2
    )
    assert spec.defenses["lab_2"] == DefenseSpec("metric-noise", noise="laplace", scale_latency=1.0)
    assert spec.defense_for("trusted") == NO_DEFENSE
    assert spec.defense_for("suspect") == DefenseSpec("exponential", epsilon=0.5)
    assert spec.defense_for("other") == spec.defenses["default"]
    with pytest.raises(TypeError):
        spec.defenses["x"] = NO_DEFENSE  # type: ignore[index]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"defence": {"kind": "none"}}, "image/zoo.yaml: defence: unknown key; did you mean 'defense'"),
        ({"defense": "exponential"}, "image/zoo.yaml: defense: expected a mapping with a kind"),
        ({"defense": {}}, "image/zoo.yaml: defense.kind: required"),
        ({"defense": {"kind": "dp"}}, "image/zoo.yaml: defense.kind: expected one of none, metric-noise, exp"),
        ({"defense": {"kind": "exponential"}}, "image/zoo.yaml: defense.epsilon: required for kind 'exponential'"),
        ({"defense": {"kind": "exponential", "epsilon": 0}}, r"defense\.epsilon: expected a finite number > 0"),
        ({"defense": {"kind": "exponential", "epsilon": -1}}, r"defense\.epsilon: expected a finite number > 0"),
        ({"defense": {"kind": "exponential", "epsilon": math.inf}}, r"defense\.epsilon: expected a finite"),
        ({"defense": {"kind": "exponential", "epsilon": True}}, r"defense\.epsilon: expected a finite"),
        ({"defense": {"kind": "exponential", "epsilon": "1"}}, r"defense\.epsilon: expected a finite"),
        (
            {"defense": {"kind": "permute-and-flip", "epsilom": 1}},
            r"image/zoo\.yaml: defense\.epsilom: unknown key; did you mean 'epsilon'",
        ),
        (
            {"defense": {"kind": "exponential", "epsilon": 1, "noise": "laplace"}},
            r"defense\.noise: not used by kind 'exponential' \(its fields: kind, epsilon\)",
        ),
        (
            {"defense": {"kind": "metric-noise", "epsilon": 1, "scale_accuracy": 0.1}},
            r"defense\.epsilon: not used by kind 'metric-noise'",
        ),
        ({"defense": {"kind": "none", "epsilon": 1}}, r"defense\.epsilon: not used by kind 'none'"),
        ({"defense": {"kind": "metric-noise"}}, "image/zoo.yaml: defense: metric-noise with scale_accuracy and"),
        (
            {"defense": {"kind": "metric-noise", "noise": "cauchy", "scale_accuracy": 0.1}},
            r"defense\.noise: expected one of laplace, gaussian, got 'cauchy'",
        ),
        (
            {"defense": {"kind": "metric-noise", "scale_latency": -0.1}},
            r"defense\.scale_latency: expected a finite number >= 0",
        ),
        (
            {"defense": {"kind": "none"}, "defenses": {"default": {"kind": "none"}}},
            "image/zoo.yaml: defenses: give either defense",
        ),
        ({"defenses": [{"kind": "none"}]}, "image/zoo.yaml: defenses: expected a mapping of defense class"),
        ({"defenses": {}}, "image/zoo.yaml: defenses: expected a mapping of defense class"),
        ({"defenses": {"suspect": {"kind": "none"}}}, "image/zoo.yaml: defenses: needs a 'default' class"),
        (
            {"defenses": {"default": {"kind": "none"}, "Suspect": {"kind": "none"}}},
            r"image/zoo\.yaml: defenses\.Suspect: expected a defense class name",
        ),
        (
            {"defenses": {"default": {"kind": "none"}, "bad\n": {"kind": "none"}}},
            "expected a defense class name",
        ),
        ({"defenses": {"default": {"kind": "none"}, 7: {"kind": "none"}}}, r"defenses\.7: expected a defense class"),
        (
            {"defenses": {"default": {"kind": "none"}, "suspect": {"kind": "exponential", "epsilon": 0}}},
            r"image/zoo\.yaml: defenses\.suspect\.epsilon: expected a finite number > 0",
        ),
    ],
)
def test_defense_errors_name_file_and_field(extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ZooSpecError, match=match):
        parse(**extra)
