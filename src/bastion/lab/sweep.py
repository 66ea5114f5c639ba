"""The tradeoff sweep on one live server: every point's goodput, fingerprint and extraction.

For each point the attacker and the benign tenant are moved into the point's defense
class over the admin API (:class:`bastion.client.AdminClient`); the benign tenant's
goodput comes from :mod:`bastion.lab.benign`, the attacker walks the zoo
(:func:`bastion.lab.fingerprint.fingerprint`) and extracts at the victim's trigger.
Everything a point needs that does not change between points (the server, the admin
client, the attacker's rows, the evaluation set and the victim's answers on it) is a
:class:`SweepRun`; what must outlive one server (the escalated tenants' names, since every
server of one run shares a key store) is an :class:`EscalatedTenants` the caller keeps.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bastion.client import AdminClient, ClientError
from bastion.lab.benign import Progress, counter_delta, goodput_of, latency_slo_range, reachable_workload
from bastion.lab.extract import (
    TARGETS,
    Collected,
    ExtractionResult,
    TrainConfig,
    evaluate,
    run_extraction,
    train_surrogate,
    training_targets,
    victim_answers,
)
from bastion.lab.fingerprint import FingerprintResult, fingerprint
from bastion.lab.oracle import BudgetExhausted, Oracle
from bastion.lab.sweep_plan import BASELINE, NO_HARDENING, HardeningSetting, SweepPoint

__all__ = [
    "EscalatedTenants",
    "Step",
    "SweepConfig",
    "SweepRun",
    "best_of_targets",
    "collect_until_refused",
    "run_sweep",
]

ATTACKER, BENIGN = "tradeoff-attacker", "tradeoff-benign"

Step = Callable[[str], None]  # one line of what the sweep does now, for the console


@dataclass
class SweepConfig:
    zoo: str
    budget: int = 512  # extraction rows per attack
    fingerprint_budget: int = 2000
    goodput_requests: int = 200
    batch_size: int = 32
    repeats: int = 10  # replays per trigger (consistency)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    settle_s: float = 1.5  # a class change reaches the workers within a second
    selections_at: float | None = None  # the strength whose selection frequencies are plotted
    latency_ms: tuple[float, float] | None = None  # benign latency targets; None: calibrated (latency_slo_range)
    targets: tuple[str, ...] = TARGETS  # surrogate training targets tried on the same answers (soft, hard)
    # escalation: the attacker of the escalated points is a fresh tenant with this quota (requests, in total),
    # set through the admin API before it starts; the server's 429 ends its queries
    escalate_quota: int | None = None

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["train"] = {"hidden": list(self.train.hidden), "steps": self.train.steps}
        doc["latency_ms"] = list(self.latency_ms) if self.latency_ms is not None else None
        doc["targets"] = list(self.targets)
        return doc


@dataclass
class EscalatedTenants:
    """Names of the escalated attackers, fresh on every use. Pass the same object to every
    :func:`run_sweep` of one experiment: its servers share one key store, and a tenant's
    spent total quota stays with its name, so a name must never be issued twice."""

    issued: int = 0

    def next_name(self) -> str:
        self.issued += 1
        return f"tradeoff-escalated-{self.issued}"


def _fingerprint_doc(fp: FingerprintResult) -> dict[str, Any]:
    cons = [v.consistency for v in fp.variants if math.isfinite(v.consistency)]
    victim_consistency = math.nan if fp.victim is None or not fp.variants else float(fp.variants[fp.victim].consistency)
    return {
        "queries": fp.queries, "requests": fp.requests, "rejected": fp.rejected, "method": fp.method,
        "variants_found": len(fp.variants), "signatures_seen": fp.signatures_seen, "complete": fp.complete,
        "victim_trigger": fp.victim_trigger, "victim_consistency": victim_consistency,
        "mean_consistency": float(np.mean(cons)) if cons else math.nan,
        "consistency": [v.consistency for v in fp.variants], "notes": list(fp.notes),
    }


def _attack_doc(r: ExtractionResult) -> dict[str, Any]:
    return {"attacker": r.attacker, "queried": r.queried, "targets": r.targets, "queries": r.queries,
            "requests": r.requests, "rejected": r.rejected, "rows_answered": r.rows_answered,
            "accuracy": r.accuracy, "fidelity": r.fidelity, "victim_accuracy": r.victim_accuracy,
            "eval_rows": r.eval_rows, "train_seconds": r.train.get("seconds")}


def best_of_targets(by_target: Mapping[str, Mapping[str, Any]]) -> tuple[str, Mapping[str, Any]] | None:
    """The attacker's best surrogate: max accuracy (then fidelity) over its training targets."""
    def key(item: tuple[str, Mapping[str, Any]]) -> tuple[float, float]:
        a, f = item[1].get("accuracy"), item[1].get("fidelity")
        return (a if a is not None and math.isfinite(a) else -1.0, f if f is not None and math.isfinite(f) else -1.0)

    items = sorted(by_target.items())
    return max(items, key=key) if items else None


def collect_until_refused(oracle: Oracle, rows: np.ndarray, budget: int, *, batch_size: int,
                          targets: Mapping[str, float]) -> tuple[Collected | None, str | None]:
    """:func:`bastion.lab.extract.collect`, except that a server refusal (a spent quota:
    429 with no Retry-After) ends the queries and keeps what was answered; returns the
    collected answers (None if nothing was) and the refusal's message."""
    xs, ps = [], []
    before = (oracle.queries, oracle.requests, oracle.rejected)
    stopped = None
    for start in range(0, budget, batch_size):
        chunk = rows[start:min(start + batch_size, budget)]
        try:
            answer = oracle.ask(chunk, dict(targets) if targets else None)
        except BudgetExhausted as err:
            stopped = str(err)
            break
        if answer.probs is not None:
            xs.append(chunk)
            ps.append(answer.probs)
    if not xs:
        return None, stopped or "no request was answered"
    return Collected(np.concatenate(xs), np.concatenate(ps), oracle.queries - before[0],
                     oracle.requests - before[1], oracle.rejected - before[2]), stopped


@dataclass
class SweepRun:
    """What every point of one sweep on one server shares."""

    url: str
    admin: AdminClient
    config: SweepConfig
    hardening: HardeningSetting
    rows: np.ndarray  # the attacker's query pool, in its order
    eval_x: np.ndarray
    eval_y: np.ndarray
    victim_probs: np.ndarray  # the victim variant's answers on eval_x (fidelity's reference)
    escalated: EscalatedTenants
    progress: Progress | None = None

    def _tick(self, phase: str) -> Callable[[int, int | None], None] | None:
        progress = self.progress
        return None if progress is None else (lambda done, total: progress(phase, done, total))

    def point_doc(self, point: SweepPoint) -> dict[str, Any]:
        """The head of a point's document (its keys come first in tradeoff.json)."""
        return {"defense": point.defense, "strength": point.strength, "defense_class": point.defense_class,
                "spec": point.spec, "hardening": self.hardening.name, "hardening_spec": self.hardening.block}

    def attack(self, doc: dict[str, Any], key: str, *, count_selections: bool) -> None:
        """Fingerprint the zoo with ``key``, then extract at the victim trigger it found; fills
        ``fingerprint`` and ``extraction`` (None, with ``notes``, when no trigger was found).
        ``count_selections``: also record the variants the server chose for the extraction
        (from its counters: only meaningful while no other tenant calls the zoo)."""
        zoo, config = self.config.zoo, self.config
        with Oracle(self.url, zoo, api_key=key, budget=config.fingerprint_budget,
                    progress=self._tick("fingerprint")) as oracle:
            fp = fingerprint(oracle, self.rows, repeats=config.repeats)
        doc["fingerprint"] = _fingerprint_doc(fp)
        if fp.victim_trigger is None:
            doc["extraction"] = None
            doc["notes"] = [f"no victim trigger found: {fp.notes}"]
            return
        before = self.admin.zoo_counters(zoo) if count_selections else None
        doc["extraction"] = self.extraction(key, fp.victim_trigger)
        if before is not None:
            after = self.admin.zoo_counters(zoo)
            doc["extraction"]["selections"] = counter_delta(before.selections, after.selections)

    def extraction(self, key: str, trigger: Mapping[str, float]) -> dict[str, Any]:
        """Query ``config.budget`` rows at ``trigger`` once, train one surrogate per training
        target on those answers; the attack document with ``by_target`` and ``best``."""
        zoo, config = self.config.zoo, self.config
        with Oracle(self.url, zoo, api_key=key, budget=config.budget, progress=self._tick("fingerprinted")) as oracle:
            got, stopped = collect_until_refused(oracle, self.rows, config.budget, batch_size=config.batch_size,
                                                 targets=trigger)
        if got is None:
            return {"attacker": "fingerprinted", "queried": zoo, "targets": dict(trigger), "queries": 0,
                    "rows_answered": 0, "accuracy": math.nan, "fidelity": math.nan, "stopped": stopped,
                    "by_target": {}, "best": None}
        by_target: dict[str, dict[str, Any]] = {}
        for target in config.targets:
            surrogate = train_surrogate(got.x, training_targets(got.probs, target), seed=config.seed,
                                        config=config.train)
            scores = evaluate(surrogate, self.eval_x, self.eval_y, self.victim_probs)
            by_target[target] = {"accuracy": scores["accuracy"], "fidelity": scores["fidelity"],
                                 "train_seconds": round(surrogate.seconds, 3)}
        best = best_of_targets(by_target)
        first = by_target[config.targets[0]]
        victim_accuracy = float((np.asarray(self.victim_probs).argmax(axis=1) == self.eval_y).mean())
        answered = got.probs
        distinct = float(np.mean([len(np.unique(np.round(r, 6))) for r in answered])) if len(answered) else math.nan
        return {"attacker": "fingerprinted", "queried": zoo, "targets": dict(trigger), "queries": got.queries,
                "requests": got.requests, "rejected": got.rejected, "rows_answered": len(got.x),
                "accuracy": first["accuracy"], "fidelity": first["fidelity"],
                "victim_accuracy": victim_accuracy, "eval_rows": len(self.eval_y),
                "train_seconds": first["train_seconds"], "by_target": by_target,
                "best": {"target": best[0], **best[1]} if best else None,
                "answer_distinct_values": distinct, "stopped": stopped}

    def escalated_point(self, plain: Mapping[str, Any], point: SweepPoint) -> dict[str, Any]:
        """The point again for an attacker the operator has escalated: a fresh tenant (no usage
        yet) in the point's class with a total quota of ``config.escalate_quota`` requests,
        both set over the admin API; the server's 429 is what ends its fingerprint or its
        extraction. Goodput is the benign tenant's of the same point (it is not escalated)."""
        zoo, config, admin = self.config.zoo, self.config, self.admin
        quota = int(config.escalate_quota or 0)
        tenant = self.escalated.next_name()
        key = admin.create_key(tenant, models=[zoo],
                               description=f"tradeoff sweep: escalated attacker (quota {quota}/total)").token
        admin.set_limits(tenant, quota=quota, quota_period="total")
        admin.set_defense_class(tenant, point.defense_class)
        admin.wait_for_key(key, zoo)
        time.sleep(config.settle_s)  # the class and limits reach the workers within a second; nothing shows when
        escalation = {"quota": quota, "quota_period": "total", "unit": "requests", "tenant": tenant}
        doc = {**self.point_doc(point), "escalation": escalation, "goodput": plain["goodput"]}
        self.attack(doc, key, count_selections=False)
        with contextlib.suppress(ClientError):
            admin.set_defense_class(tenant, BASELINE)
        return doc


def run_sweep(
    url: str,
    admin_key: str,
    config: SweepConfig,
    points: Sequence[SweepPoint],
    *,
    front: Sequence[Mapping[str, Any]],
    rows: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    progress: Progress | None = None,
    step: Step | None = None,
    hardening: HardeningSetting = NO_HARDENING,
    baseline_attacks: bool = True,
    escalate: Sequence[str] = (),
    escalated: EscalatedTenants | None = None,
) -> dict[str, Any]:
    """Every point on the live server at ``url`` (serving the variants with ``hardening``,
    recorded in each point's document; ``baseline_attacks``: also run the explicit and the
    naive attacker at the baseline point; ``escalate``: classes that get a second, escalated
    point: a fresh attacker tenant with ``config.escalate_quota`` requests in total, set
    through the admin API, fingerprints and extracts until the server refuses; its name
    comes from ``escalated``, shared by every sweep on the same key store); returns the
    result document (JSON-able, NaN for what could not be measured). ``front``: the Pareto
    variants (``variant``, ``quality``, ``latency_ms``) from the repository's profile; the
    victim is the most accurate one."""
    zoo = config.zoo
    victim = max(front, key=lambda v: (v["quality"], -v["latency_ms"]))["variant"]
    admin = AdminClient(url, admin_key)
    say = step or (lambda _msg: None)
    try:
        attacker_key = admin.create_key(ATTACKER, models=[zoo], description="tradeoff sweep: attacker (zoo only)").token
        benign_key = admin.create_key(BENIGN, models=[zoo], description="tradeoff sweep: benign goodput workload").token
        admin.wait_for_key(attacker_key, zoo)
        admin.wait_for_key(benign_key, zoo)
        latency_range = config.latency_ms
        calibration: list[float] = []
        if latency_range is None:
            with Oracle(url, zoo, api_key=benign_key) as oracle:
                calibration = [oracle.ask(eval_x[i:i + 1]).latency_ms for i in range(20)]
            latency_range = latency_slo_range(calibration, front)
            say(f"latency targets {latency_range[0]:g}..{latency_range[1]:g} ms (from the benign client's round "
                f"trips, p50 {float(np.median(calibration)):.3g} ms)")
        workload = reachable_workload(front, config.goodput_requests, config.seed, latency_range)
        say(f"victim answers ({victim}, {len(eval_x)} held-out rows, asked by name with the admin key)")
        victim_probs = victim_answers(url, victim, admin_key, eval_x, batch_size=config.batch_size)
        run = SweepRun(url, admin, config, hardening, rows, eval_x, eval_y, victim_probs,
                       escalated if escalated is not None else EscalatedTenants(), progress)
        results: list[dict[str, Any]] = []
        extra_attacks: dict[str, Any] = {}
        for k, point in enumerate(points):
            label = "baseline (none)" if point.defense == "none" else f"{point.defense} {point.strength:g}"
            label = f"hardening {hardening.name}, {label}"
            say(f"[{k + 1}/{len(points)}] {label}: class {point.defense_class}")
            started = time.perf_counter()
            for tenant in (ATTACKER, BENIGN):
                admin.set_defense_class(tenant, point.defense_class)
            time.sleep(config.settle_s)  # the class reaches the workers within a second; nothing shows when
            doc = run.point_doc(point)
            doc["goodput"] = goodput_of(url, zoo, benign_key, admin, workload, eval_x, config.seed, progress)
            run.attack(doc, attacker_key, count_selections=True)
            if point.defense == "none" and baseline_attacks:
                for name in ("explicit", "naive"):
                    say(f"baseline: {name} attacker")
                    # the explicit attacker asks the victim by name: an experimenter's (admin) key
                    key = admin_key if name == "explicit" else attacker_key
                    r = run_extraction(url, zoo, key, rows, attacker=name, budget=config.budget,
                                       batch_size=config.batch_size, victim_model=victim, eval_x=eval_x,
                                       eval_y=eval_y, victim_probs=victim_probs, seed=config.seed,
                                       train=config.train, progress=progress)
                    extra_attacks[name] = _attack_doc(r)
            doc["seconds"] = round(time.perf_counter() - started, 3)
            results.append(doc)
            if point.defense_class in escalate and config.escalate_quota is not None:
                say(f"[{k + 1}/{len(points)}] {label}: escalated attacker (quota {config.escalate_quota} requests "
                    "in total)")
                results.append(run.escalated_point(doc, point))
    finally:
        with contextlib.suppress(ClientError):
            for tenant in (ATTACKER, BENIGN):
                admin.set_defense_class(tenant, BASELINE)
        admin.close()
    return {"zoo": zoo, "victim": victim, "front": [dict(v) for v in front], "hardening": [hardening.name],
            "workload": {
        "requests": len(workload), "seed": config.seed, "latency_ms": list(latency_range),
        "calibration_round_trips_ms": [round(x, 4) for x in calibration],
        "targets": "reachable: accuracy uniform over the front's quality range (widened below by half of it), "
        "latency log-uniform over latency_ms"}, "baseline_attacks": extra_attacks, "points": results}
