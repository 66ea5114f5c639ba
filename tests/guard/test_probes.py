"""The zoo-probing detector: distinct refused targets flag a prober; a fixed service level,
refused or not, never does."""

from __future__ import annotations

import pytest

from bastion.core.errors import InvalidInput
from bastion.guard.probes import ProbeConfig, ProbeMonitor, parse_probe_monitor


def test_bisection_over_refused_targets_is_flagged_at_the_threshold() -> None:
    mon = ProbeMonitor(ProbeConfig(window=100, max_refused=5, action="block"))
    lo, hi = 0.9, 1.0
    alerts = []
    for i in range(20):  # a bisection on accuracy: every step above the front is refused
        mid = (lo + hi) / 2
        refused = mid > 0.97
        alert = mon.observe("eve/image", mid, 5.0, refused)
        if alert:
            alerts.append((i, alert))
        lo, hi = (lo, mid) if refused else (mid, hi)
    assert len(alerts) == 1
    _, alert = alerts[0]
    assert alert.tenant == "eve" and alert.action == "block" and alert.signal == "refused"
    assert alert.refused == 5
    assert "5 distinct refused targets" in alert.reason
    assert mon.flagged("eve/image")
    assert mon.observe("eve/image", 0.999, 1.0, True) is None  # flagged once only


def test_a_fixed_infeasible_service_level_is_not_probing() -> None:
    mon = ProbeMonitor(ProbeConfig(window=50, max_refused=3))
    for _ in range(500):
        # float noise in the client's encoding is not a new target
        assert mon.observe("app/image", 0.9990000001, 0.5, True) is None
    assert not mon.flagged("app/image")


def test_answered_targets_count_only_with_max_distinct() -> None:
    plain = ProbeMonitor(ProbeConfig(max_refused=3))
    strict = ProbeMonitor(ProbeConfig(max_refused=3, max_distinct=10))
    flagged_at = None
    for i in range(40):
        assert plain.observe("t/z", 0.5 + i / 100, 10.0, False) is None
        if strict.observe("t/z", 0.5 + i / 100, 10.0, False) and flagged_at is None:
            flagged_at = i
    assert flagged_at == 9


def test_refusals_slide_out_of_the_window() -> None:
    mon = ProbeMonitor(ProbeConfig(window=10, max_refused=3))
    for k in range(30):
        # two distinct refusals, then 8 answered requests: never 3 refusals within 10 requests
        assert mon.observe("t/z", 0.99 + (k % 5) / 1000, 1.0, k % 10 < 2) is None


def test_tenants_and_zoos_are_separate_and_eviction_keeps_the_flag() -> None:
    mon = ProbeMonitor(ProbeConfig(max_refused=2, max_tenants=2))
    mon.observe("a/z", 0.9, None, True)
    assert mon.observe("a/y", 0.91, None, True) is None  # another zoo
    assert mon.observe("a/z", 0.92, None, True) is not None
    mon.observe("b/z", 0.9, None, False)
    mon.observe("c/z", 0.9, None, False)  # evicts a/z (the oldest)
    assert mon.flagged("a/z")
    assert mon.observe("a/z", 0.5, None, True) is None


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"max_refused": 0}, "probe_monitor.max_refused: expected an integer >= 1"),
        ({"max_distinct": -1}, "probe_monitor.max_distinct"),
        ({"action": "ban"}, "probe_monitor.action: expected one of alert, throttle, block, escalate"),
        ({"windw": 5}, "did you mean 'window'"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_config_errors_name_the_field(block: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        parse_probe_monitor(block, "probe_monitor")
