"""PRADA extraction monitor: benign digits traffic passes, JBDA-style synthesis is flagged."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest

from bastion.core.errors import InvalidInput
from bastion.guard.monitor import Alert, ExtractionMonitor, MonitorConfig, parse_monitor

WHERE = "serve: extraction_monitor"
# measured over 20 seeds (stream below, lam 0.2, 10 seeds): flagged after 130-150 queries
DETECTION_BOUND = 200


@dataclass
class Digits:
    pool: np.ndarray  # the 1,000 rows the oracle did not train on: what clients send
    pool_labels: np.ndarray
    oracle: object

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.oracle.predict(x.reshape(x.shape[0], -1))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def digits() -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    train, pool = order[:797], order[797:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = LogisticRegression(max_iter=2000).fit(x[train], y[train])
    assert (oracle.predict(x[pool]) == y[pool]).mean() > 0.9
    return Digits(x[pool], y[pool], oracle)


def benign_stream(d: Digits, seed: int) -> np.ndarray:
    return d.pool[np.random.default_rng(seed).permutation(len(d.pool))]


def jbda_stream(d: Digits, seed: int, n: int = 1000, lam: float = 0.2, seeds: int = 10) -> np.ndarray:
    """JBDA-style synthesis (Papernot et al.; PRADA's attackers): one natural seed per class,
    then ``parent + lam * sign(direction)`` steps from earlier queries, clipped to the pixel
    range. The direction is random here (the attacker's substitute gradient in JBDA)."""
    rng = np.random.default_rng(seed)
    queries = [d.pool[rng.choice(np.flatnonzero(d.pool_labels == c % 10))] for c in range(seeds)]
    while len(queries) < n:
        parent = queries[rng.integers(len(queries))]
        step = lam * np.sign(rng.standard_normal(parent.shape[0]))
        queries.append(np.clip(parent + step, 0.0, 1.0).astype(np.float32))
    return np.stack(queries)


def feed(monitor: ExtractionMonitor, tenant: str, d: Digits, stream: np.ndarray, batch: int = 1) -> Alert | None:
    first = None
    for start in range(0, len(stream), batch):
        rows = stream[start : start + batch]
        alert = monitor.observe(tenant, rows, d.predict(rows))
        first = first or alert
    return first


# --------------------------------------------------------------------------- configuration


def test_parse_monitor_defaults_and_errors_name_the_field() -> None:
    assert parse_monitor({}, WHERE) == MonitorConfig()
    cfg = parse_monitor({"min_samples": 50, "delta": 0.95, "action": "throttle", "window": 500}, WHERE)
    assert (cfg.min_samples, cfg.delta, cfg.action, cfg.window) == (50, 0.95, "throttle", 500)
    cases = [
        (None, "", "expected a mapping"),
        ({"detla": 0.9}, "detla", "did you mean 'delta'"),
        ({"delta": 1.5}, "delta", "between 0 and 1"),
        ({"delta": True}, "delta", "between 0 and 1"),
        ({"action": "ban"}, "action", "alert, throttle, block, escalate"),
        ({"min_samples": 2}, "min_samples", "at least 3"),
        ({"max_per_class": 0}, "max_per_class", "integer >= 1"),
        ({"test_every": 1.5}, "test_every", "integer >= 1"),
        ({"window": 6000}, "window", "at most 5000"),
        ({"window": 50}, "window", "min_samples (100)"),
    ]
    for block, field, words in cases:
        with pytest.raises(InvalidInput) as info:
            parse_monitor(block, WHERE)
        prefix = f"{WHERE}.{field}: " if field else f"{WHERE}: "
        assert str(info.value).startswith(prefix) and words in str(info.value), str(info.value)


# --------------------------------------------------------------------------- detection


def test_benign_digits_stream_raises_no_alert(digits: Digits) -> None:
    monitor = ExtractionMonitor(MonitorConfig())
    for seed in range(3):
        tenant = f"benign-{seed}"
        assert feed(monitor, tenant, digits, benign_stream(digits, seed), batch=8) is None
        status = monitor.status(tenant)
        assert status["queries_seen"] == 1000 and not status["flagged"]
        assert status["last_w"] is not None and status["last_w"] >= MonitorConfig().delta
        print(f"benign seed {seed}: W = {status['last_w']:.3f} over {status['distances']} distances")


def test_retried_queries_do_not_count(digits: Digits) -> None:
    stream = benign_stream(digits, 7)
    once, twice = ExtractionMonitor(MonitorConfig()), ExtractionMonitor(MonitorConfig())
    assert feed(once, "t", digits, stream) is None
    # each request sent twice (a client retrying): exact repeats add no zero distances
    assert feed(twice, "t", digits, np.repeat(stream, 2, axis=0)) is None
    assert twice.status("t")["distances"] == once.status("t")["distances"]
    assert twice.status("t")["queries_seen"] == 2000


def test_jbda_style_stream_is_flagged(digits: Digits) -> None:
    cfg = MonitorConfig(action="throttle")
    monitor = ExtractionMonitor(cfg)
    alert = feed(monitor, "mallory", digits, jbda_stream(digits, seed=0))
    assert alert is not None
    print(f"JBDA-style stream flagged after {alert.queries_seen} queries, W = {alert.statistic:.3f}")
    assert alert.tenant == "mallory" and alert.action == "throttle" and alert.threshold == cfg.delta
    assert alert.statistic < cfg.delta
    assert alert.queries_seen <= DETECTION_BOUND
    # flagged stays flagged, and the alert is not repeated
    assert monitor.flagged("mallory") and monitor.status("mallory")["flagged"]
    assert feed(monitor, "mallory", digits, benign_stream(digits, 0)[:100]) is None
    assert monitor.flagged("mallory")
    assert monitor.status("mallory")["queries_seen"] == 1100
    monitor.reset("mallory")
    assert not monitor.flagged("mallory") and monitor.status("mallory")["queries_seen"] == 0


@pytest.mark.parametrize("seed", range(1, 6))
def test_jbda_style_detection_bound_over_seeds(digits: Digits, seed: int) -> None:
    alert = feed(ExtractionMonitor(MonitorConfig()), "t", digits, jbda_stream(digits, seed))
    assert alert is not None and alert.queries_seen <= DETECTION_BOUND, alert


def test_tenants_are_judged_apart(digits: Digits) -> None:
    monitor = ExtractionMonitor(MonitorConfig())
    attack, benign = jbda_stream(digits, seed=3), benign_stream(digits, 3)
    alerts = []
    for i in range(0, 1000, 10):  # interleaved requests of two tenants
        alerts.append(monitor.observe("mallory", attack[i : i + 10], digits.predict(attack[i : i + 10])))
        alerts.append(monitor.observe("alice", benign[i : i + 10], digits.predict(benign[i : i + 10])))
    flagged = [a.tenant for a in alerts if a is not None]
    assert flagged == ["mallory"]
    assert not monitor.flagged("alice")


def test_batching_does_not_change_the_verdict(digits: Digits) -> None:
    for stream in (jbda_stream(digits, seed=4), benign_stream(digits, 4)):
        single, batched = ExtractionMonitor(MonitorConfig()), ExtractionMonitor(MonitorConfig())
        one = feed(single, "t", digits, stream, batch=1)
        many = feed(batched, "t", digits, stream, batch=64)
        assert (one is None) == (many is None)
        if one is not None and many is not None:
            # tested once per request: the verdict may come at most one request later
            assert one.queries_seen <= many.queries_seen < one.queries_seen + 64
        else:
            # the same distances whatever the batching, so the same statistic
            a, b = single._tenants["t"], batched._tenants["t"]
            np.testing.assert_array_equal(a.distances, b.distances)
            assert single.stored_vectors("t") == batched.stored_vectors("t")


def test_a_point_mass_of_distances_is_flagged() -> None:
    # every query one fixed step from the last: shapiro cannot score a constant, PRADA must flag it
    cfg = MonitorConfig(min_samples=20, window=100, min_class_samples=5)
    monitor = ExtractionMonitor(cfg)
    steps = np.arange(200, dtype=np.float32)[:, None] * np.full((1, 64), 0.125, dtype=np.float32)
    alert = monitor.observe("t", steps, np.zeros(200, dtype=np.int64))
    assert alert is not None and alert.statistic == 0.0


# --------------------------------------------------------------------------- bounds and inputs


def test_memory_caps_hold() -> None:
    cfg = MonitorConfig(max_per_class=25, window=200, min_samples=100, delta=0.01, max_classes=3)
    monitor = ExtractionMonitor(cfg)
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.uniform(0, 1, (64, 64)).astype(np.float32)
        monitor.observe("t", x, rng.integers(0, 5, 64))  # 5 labels, 3 classes allowed
        stored = monitor.stored_vectors("t")
        assert len(stored) <= 3 and max(stored.values()) <= 25
        assert monitor.status("t")["distances"] <= 200
    assert monitor.status("t")["queries_seen"] == 50 * 64
    assert monitor.status("t")["stored_vectors"] == 3 * 25  # FIFO full, never past the cap


def test_tenant_cap_evicts_but_remembers_flags() -> None:
    cfg = MonitorConfig(min_samples=20, window=100, min_class_samples=5, max_tenants=2)
    monitor = ExtractionMonitor(cfg)
    steps = np.arange(100, dtype=np.float32)[:, None] * np.full((1, 8), 0.125, dtype=np.float32)
    assert monitor.observe("a", steps, np.zeros(100, dtype=np.int64)) is not None
    noise = np.random.default_rng(0).uniform(0, 1, (5, 8))
    monitor.observe("b", noise, np.zeros(5, dtype=np.int64))
    monitor.observe("c", noise, np.zeros(5, dtype=np.int64))  # evicts "a", the least recently seen
    assert monitor.status("a")["queries_seen"] == 0
    assert monitor.flagged("a") and monitor.status("a")["flagged"]
    assert monitor.observe("a", steps, np.zeros(100, dtype=np.int64)) is None  # no second alert
    assert monitor.flagged("a")


def test_inputs_are_checked() -> None:
    monitor = ExtractionMonitor(MonitorConfig())
    with pytest.raises(ValueError, match="3 queries but 2 predicted labels"):
        monitor.observe("t", np.zeros((3, 4)), np.zeros(2))
    with pytest.raises(TypeError, match="numeric"):
        monitor.observe("t", np.array([[b"x"]], dtype=object), np.zeros(1))
    monitor.observe("t", np.zeros((1, 2, 2)), np.zeros(1))
    with pytest.raises(ValueError, match="one monitor per model"):
        monitor.observe("t", np.zeros((1, 5)), np.zeros(1))
    # non-finite rows are counted but not measured
    x = np.random.default_rng(0).uniform(0, 1, (4, 4))
    x[1, 0] = np.nan
    x[2, 3] = np.inf
    monitor.observe("u", x, np.zeros(4))
    status = monitor.status("u")
    assert status["queries_seen"] == 4 and status["distances"] == 1
    assert monitor.observe("u", np.zeros((0, 4)), np.zeros(0)) is None
