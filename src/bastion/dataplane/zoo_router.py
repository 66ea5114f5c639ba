"""Zoo routing and selection: which variant of a zoo serves a request.

A request to a zoo names targets (``accuracy``, ``latency_ms`` parameters). The router
takes the Pareto front of the zoo's variants that are loaded now, adds each variant's
current queue wait to its profiled latency (load-aware feasibility), and lets the zoo's
policy for the caller's defense class choose, from a per-process secret rng so a client
cannot replay the draws. After the variant answered, ``finish`` judges goodput (the
variant's measured quality against the accuracy target, the request's own time in the
server against the latency target) and renames the answer to the zoo: no variant name or
version leaves the server unless the zoo sets ``expose_variant``.
"""

from __future__ import annotations

import random
import secrets
import time
from dataclasses import dataclass

from bastion.core.errors import InvalidInput, ModelNotReady, Unprocessable
from bastion.core.tensors import InferenceRequest, InferenceResponse
from bastion.dataplane.registry import Registry, Served
from bastion.guard.gate import Gate
from bastion.guard.principal import Principal
from bastion.observability.metrics import Metrics
from bastion.repository.zoos import LoadedZoo, ZooCatalog
from bastion.zoo.defenses import build_policy
from bastion.zoo.pareto import Point, pareto_front
from bastion.zoo.policy import SelectionPolicy, Targets, make_policy, parse_targets

_OUTCOME = {
    (False, False): "met",
    (True, False): "missed_accuracy",
    (False, True): "missed_latency",
    (True, True): "missed_both",
}


@dataclass(slots=True)
class _ZooState:
    """Per zoo definition: its policies and the Pareto fronts of the variant sets seen loaded."""

    loaded: LoadedZoo
    points: dict[str, Point]
    policies: dict[str, SelectionPolicy]  # by tenant defense class; always has "default"
    fronts: dict[frozenset[str], list[Point]]


@dataclass(slots=True)
class ZooChoice:
    """The variant chosen for one zoo request, and what ``finish`` needs to judge it."""

    zoo: LoadedZoo
    served: Served
    variant: str
    reason: str
    quality: float
    targets: Targets
    started: float


class ZooRouter:
    def __init__(self, zoos: ZooCatalog, registry: Registry, gate: Gate, metrics: Metrics) -> None:
        self._zoos = zoos
        self._registry = registry
        self._gate = gate
        self._metrics = metrics
        self._states: dict[str, _ZooState] = {}
        self._rng = random.Random(secrets.randbits(256))

    def zoo_named(self, name: str) -> LoadedZoo | None:
        """The zoo called ``name``; a loaded model of that name wins (one dict lookup on the
        model path)."""
        return None if name in self._registry.latest else self._zoos.get(name)

    def all(self) -> list[LoadedZoo]:
        return self._zoos.all()

    def front(self, zoo: LoadedZoo) -> tuple[_ZooState, list[Point]]:
        """The Pareto front over the variants loaded right now (an unloaded variant can leave
        a variant it dominated on the front); 503 when the zoo cannot serve."""
        if zoo.error:
            raise ModelNotReady(f"zoo '{zoo.name}' cannot serve: {zoo.error}", retry_after=5)
        state = self._state(zoo)
        latest = self._registry.latest
        loaded = frozenset(n for n in state.points if n in latest)
        if not loaded:
            raise ModelNotReady(f"no variant of zoo '{zoo.name}' is loaded", retry_after=1)
        front = state.fronts.get(loaded)
        if front is None:
            front = state.fronts[loaded] = pareto_front(state.points[n] for n in loaded)
        return state, front

    def first_variant(self, zoo: LoadedZoo) -> Served:
        """A loaded variant on the front: the zoo's signature is its variants' (they share one)."""
        _, front = self.front(zoo)
        return self._registry.latest[front[0].name]

    def select(self, zoo: LoadedZoo, request: InferenceRequest, who: Principal) -> ZooChoice:
        """Choose the variant for ``who``'s request (422 when the policy refuses the targets)."""
        if request.model_version:
            raise InvalidInput(f"'{zoo.name}' is a zoo and has no versions; call /v2/models/{zoo.name}/infer")
        started = time.perf_counter()
        state, front = self.front(zoo)
        targets = parse_targets(request.parameters)
        latest = self._registry.latest
        waits = {p.name: latest[p.name].batcher.estimated_wait_ms() for p in front}
        # the tenant's defense class picks the zoo's defense (zoo.yaml `defenses`)
        policy = state.policies.get(who.defense_class) or state.policies["default"]
        try:
            choice = policy.choose(front, targets, waits, self._rng)
        except Unprocessable:
            self._metrics.zoo_selection(zoo.name, "none", feasible=False)
            self._metrics.zoo_outcome(zoo.name, "rejected")
            self._gate.watch_targets(who, zoo.name, targets.accuracy, targets.latency_ms, refused=True)
            raise
        self._gate.watch_targets(who, zoo.name, targets.accuracy, targets.latency_ms, refused=False)
        self._metrics.zoo_selection(zoo.name, choice.variant, choice.feasible)
        # the variant serves the request as it is: it is validated and answered under the
        # zoo's name (so errors do not name the variant either), and the targets in its
        # parameters are the zoo's business only
        return ZooChoice(zoo, latest[choice.variant], choice.variant, choice.reason,
                         state.points[choice.variant].quality, targets, started)

    def finish(self, choice: ZooChoice, response: InferenceResponse) -> None:
        """Count goodput, then answer as the zoo."""
        targets = choice.targets
        elapsed_ms = (time.perf_counter() - choice.started) * 1000.0
        missed_accuracy = targets.accuracy is not None and choice.quality < targets.accuracy
        missed_latency = targets.latency_ms is not None and elapsed_ms > targets.latency_ms
        zoo = choice.zoo
        self._metrics.zoo_outcome(zoo.name, _OUTCOME[missed_accuracy, missed_latency])
        # the abstraction holds: the answer names the zoo, never the variant or its version
        response.model_name = zoo.name
        response.model_version = None
        if zoo.spec is not None and zoo.spec.expose_variant:
            response.parameters = {**response.parameters, "variant": choice.variant, "selection": choice.reason}

    def _state(self, zoo: LoadedZoo) -> _ZooState:
        state = self._states.get(zoo.name)
        if state is None or state.loaded is not zoo:
            spec, profile = zoo.spec, zoo.profile
            assert spec is not None and profile is not None  # callers check zoo.error first
            points = {p.name: p for p in profile.points(spec.latency_percentile) if p.name in spec.variants}
            base = make_policy(spec.policy, spec.on_infeasible, zoo=zoo.name)
            policies = {cls: build_policy(base, defense) for cls, defense in spec.defenses.items()}
            state = _ZooState(zoo, points, policies, {})
            self._states[zoo.name] = state
        return state
