"""Zoo-probing detector: flags a tenant that maps a zoo's Pareto front with its targets.

Why it works: fingerprinting a zoo (``bastion lab fingerprint``, and the attack of the
Pareto-secure serving research) needs to learn where the front's edges are, and the
cheapest signal a server gives is the refusal of targets no variant meets (422). The
staircase search bisects accuracy and latency targets on those refusals: in the lab it
sent 132 requests with 49 *distinct* refused targets to map a 4-variant image zoo. A
client with a fixed service level sends the same targets again and again: when they
cannot be met it gets the same 422 every time (one distinct refused target), and when
they can it gets none. So the detector counts, per tenant and zoo, the **distinct
refused targets** among the tenant's last ``window`` zoo requests, and flags the tenant
when they reach ``max_refused``.

A second, optional signal (``max_distinct``, off by default) counts distinct targets,
answered or refused, in the same window: a prober that avoids refusals (stepping its
targets only inside the feasible region and clustering the answers) still has to try
many targets. It is off by default because one tenant may front many end users with
their own targets (the lab's benign goodput workload sends 80 different ones); turn it
on where a tenant is one application.

What it does not catch: an attacker who skips fingerprinting (the *naive* attacker, which
extracts a mix of the variants; in the lab it does 1-3 points worse than the
fingerprinted one on the reference zoos) or who spreads its probing over several keys
(keys are issued by an operator, so that takes several identities). It is one signal
beside PRADA (``guard/monitor.py``), quotas and output hardening.

Targets are compared after rounding (accuracy to 1e-6, latency to 1e-3 ms), so float
noise in a client's encoding does not make one target look like many. Memory per
tenant and zoo is ``window`` small tuples; at most ``max_tenants`` (least recently seen
evicted, a flagged tenant's flag remembered). Event-loop only, like the other monitors.

Configured as::

    probe_monitor:
      window: 200        # the tenant's last zoo requests considered
      max_refused: 8     # distinct refused targets in the window that flag it
      max_distinct: 0    # distinct targets in the window that flag it (0 = off)
      action: alert      # alert | throttle | block | escalate (class "suspect")
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from bastion.guard.monitor import ACTIONS, parse_block

__all__ = ["ProbeAlert", "ProbeConfig", "ProbeMonitor", "parse_probe_monitor"]

Target = tuple[float | None, float | None]


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    window: int = 200
    max_refused: int = 8
    max_distinct: int = 0
    action: str = "alert"
    max_tenants: int = 10_000

    def __post_init__(self) -> None:
        for name in ("window", "max_refused", "max_tenants"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.max_distinct, int) or isinstance(self.max_distinct, bool) or self.max_distinct < 0:
            raise ValueError(f"max_distinct: expected an integer >= 0 (0 = off), got {self.max_distinct!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"action: expected one of {', '.join(ACTIONS)}, got {self.action!r}")


def parse_probe_monitor(mapping: Any, where: str) -> ProbeConfig:
    """Validate a parsed ``probe_monitor`` block strictly; messages name the field."""
    return parse_block(ProbeConfig, mapping, where)


@dataclass(frozen=True, slots=True)
class ProbeAlert:
    """A tenant newly flagged for probing a zoo (the data plane acts on ``action``)."""

    tenant: str
    queries_seen: int  # the tenant's zoo requests seen, the flagging one included
    refused: int  # distinct refused targets in the window
    distinct: int  # distinct targets in the window
    action: str
    signal: str  # "refused" | "distinct"

    @property
    def reason(self) -> str:
        return (f"zoo probing: {self.refused} distinct refused targets and {self.distinct} distinct targets "
                f"in the last requests, after {self.queries_seen} queries")  # fmt: skip


class _Window:
    __slots__ = ("all", "events", "flagged", "refused", "seen")

    def __init__(self, window: int) -> None:
        self.events: deque[tuple[Target, bool]] = deque(maxlen=window)
        self.all: Counter[Target] = Counter()  # target -> requests in the window
        self.refused: Counter[Target] = Counter()  # target -> refusals in the window
        self.seen = 0
        self.flagged = False


class ProbeMonitor:
    """Counts distinct (refused) targets per tenant and zoo; see the module docstring."""

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._evicted_flagged: set[str] = set()

    def observe(self, key: str, accuracy: float | None, latency_ms: float | None, refused: bool) -> ProbeAlert | None:
        """One zoo request of tenant ``key`` (``f"{tenant}/{zoo}"``) with its targets; a
        request without targets says nothing about probing and should not be passed."""
        state = self._windows.get(key)
        if state is None:
            state = _Window(self.config.window)
            state.flagged = key in self._evicted_flagged
            self._windows[key] = state
            if len(self._windows) > self.config.max_tenants:
                old_key, old = self._windows.popitem(last=False)
                if old.flagged:
                    self._evicted_flagged.add(old_key)
        else:
            self._windows.move_to_end(key)
        state.seen += 1
        if state.flagged:
            return None
        target: Target = (
            None if accuracy is None else round(float(accuracy), 6),
            None if latency_ms is None else round(float(latency_ms), 3),
        )
        if len(state.events) == state.events.maxlen:
            old_target, old_refused = state.events[0]
            _decrement(state.all, old_target)
            if old_refused:
                _decrement(state.refused, old_target)
        state.events.append((target, refused))
        state.all[target] += 1
        if refused:
            state.refused[target] += 1
        cfg = self.config
        signal = None
        if len(state.refused) >= cfg.max_refused:
            signal = "refused"
        elif cfg.max_distinct and len(state.all) >= cfg.max_distinct:
            signal = "distinct"
        if signal is None:
            return None
        state.flagged = True
        tenant = key.rsplit("/", 1)[0]
        return ProbeAlert(tenant, state.seen, len(state.refused), len(state.all), cfg.action, signal)

    def watch(self, key: str, accuracy: float | None, latency_ms: float | None, refused: bool) -> ProbeAlert | None:
        """One zoo request as the data plane sees it: a request without targets says nothing
        about probing and is not counted."""
        if accuracy is None and latency_ms is None:
            return None
        return self.observe(key, accuracy, latency_ms, refused)

    def flagged(self, key: str) -> bool:
        state = self._windows.get(key)
        return key in self._evicted_flagged if state is None else state.flagged

    def reset(self, key: str) -> None:
        self._windows.pop(key, None)
        self._evicted_flagged.discard(key)


def _decrement(counter: Counter[Target], target: Target) -> None:
    counter[target] -= 1
    if counter[target] <= 0:
        del counter[target]
