"""The tradeoff sweep's detector point: the same attacks against a server that runs the
zoo-probing detector (``probe_monitor`` in the server's settings, ``guard/probes.py``).

Three fresh tenants, so that no earlier point's history counts:

* a **benign** tenant replays the sweep's goodput workload (reachable targets): its
  goodput is the point's, and it must not be flagged;
* the **fingerprinted** attacker runs the fingerprint and then the extraction at the
  trigger it found, exactly as at the other points. When the detector acts (``block``),
  the server's 403 ends its queries wherever they are; it then trains on every answer it
  did get, fingerprint probes included (what a cut-off attacker still holds);
* the **naive** attacker (no targets, so nothing for the detector to see) extracts with
  the same budget: the attacker's best response to the detector, reported beside it.

Part of the tradeoff sweep (``bastion lab tradeoff`` calls it on a server of its own) and
talks to the server only through the public protocol and the admin API, like the rest of
the lab.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bastion.client import AdminClient
from bastion.lab.benign import Progress, goodput_of
from bastion.lab.extract import evaluate, run_extraction, train_surrogate, training_targets
from bastion.lab.fingerprint import fingerprint
from bastion.lab.oracle import BudgetExhausted, Oracle, OracleError

if TYPE_CHECKING:  # the sweep imports nothing of this module; the type only documents the argument
    from bastion.lab.sweep import SweepConfig

PROBE_TENANTS = ("probe-benign", "probe-attacker", "probe-naive")


def probe_settings(action: str, max_refused: int) -> dict[str, Any]:
    """The server settings block (``--config`` YAML) the detector point runs with."""
    return {"probe_monitor": {"max_refused": max_refused, "action": action}}


def _answered(oracle: Oracle) -> tuple[np.ndarray, np.ndarray] | None:
    """Every distinct row the oracle got an answer for, with its (first) answer."""
    if not oracle.answers:
        return None
    x = np.concatenate([a for a, _ in oracle.answers])
    p = np.concatenate([b for _, b in oracle.answers])
    flat = x.reshape(len(x), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    first.sort()
    return x[first], p[first]


def _collect(oracle: Oracle, rows: np.ndarray, budget: int, batch_size: int,
             targets: Mapping[str, float] | None) -> str | None:  # fmt: skip
    """Ask ``budget`` rows at ``targets``; a refusal (403 block, 429 quota) ends it. Returns why it stopped."""
    for start in range(0, budget, batch_size):
        try:
            oracle.ask(rows[start : min(start + batch_size, budget)], dict(targets) if targets else None)
        except BudgetExhausted as err:
            return str(err)
        except OracleError as err:
            if err.status in (401, 403, 429):
                return str(err)
            raise
    return None


def detector_point(
    url: str,
    zoo: str,
    admin: AdminClient,
    config: SweepConfig,
    *,
    action: str,
    max_refused: int,
    rows: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    victim_probs: np.ndarray,
    workload: Sequence[Mapping[str, float]],
    victim: str,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The detector point's document (the sweep's point shape, plus ``detector``)."""
    started = time.perf_counter()
    keys = {t: admin.create_key(t, models=[zoo], description=f"tradeoff sweep: {t} (probe detector point)").token
            for t in PROBE_TENANTS}
    for key in keys.values():
        admin.wait_for_key(key, zoo)
    doc: dict[str, Any] = {"defense": "none", "strength": math.nan, "defense_class": "baseline", "spec": None,
                           "hardening": "none", "hardening_spec": None,
                           "escalation": {"kind": "probe-monitor", "action": action, "max_refused": max_refused}}
    doc["goodput"] = goodput_of(url, zoo, keys["probe-benign"], admin, workload, eval_x, config.seed, progress)

    with Oracle(url, zoo, api_key=keys["probe-attacker"], budget=config.fingerprint_budget + config.budget,
                keep_answers=True) as oracle:
        stopped: str | None = None
        trigger = None
        try:
            fp = fingerprint(oracle, rows, repeats=config.repeats)
            trigger = fp.victim_trigger
            doc["fingerprint"] = {"queries": fp.queries, "requests": fp.requests, "rejected": fp.rejected,
                                  "variants_found": len(fp.variants), "complete": fp.complete,
                                  "victim_trigger": trigger, "victim_consistency": math.nan}
        except OracleError as err:
            if err.status not in (401, 403, 429):
                raise
            stopped = str(err)
            doc["fingerprint"] = {"queries": oracle.queries, "requests": oracle.requests,
                                  "rejected": oracle.rejected, "variants_found": None, "complete": False,
                                  "victim_trigger": None, "victim_consistency": math.nan, "stopped": stopped}
        fingerprint_requests = oracle.requests
        if stopped is None:
            stopped = _collect(oracle, rows, config.budget, config.batch_size, trigger)
        held = _answered(oracle)
        extraction_requests = oracle.requests - fingerprint_requests
    doc["detector"] = {"flagged": stopped is not None, "stopped": stopped,
                       "attacker_requests_before_refusal": oracle.requests,
                       "fingerprint_requests": fingerprint_requests, "extraction_requests": extraction_requests}
    by_target: dict[str, dict[str, Any]] = {}
    if held is not None:
        x, probs = held
        for target in config.targets:
            surrogate = train_surrogate(x, training_targets(probs, target), seed=config.seed, config=config.train)
            scores = evaluate(surrogate, eval_x, eval_y, victim_probs)
            by_target[target] = {"accuracy": scores["accuracy"], "fidelity": scores["fidelity"]}
    best = max(by_target.items(), key=lambda kv: (kv[1]["accuracy"], kv[1]["fidelity"]), default=None)
    doc["extraction"] = {
        "attacker": "fingerprinted", "queried": zoo, "targets": trigger, "queries": oracle.queries,
        "requests": oracle.requests, "rows_answered": 0 if held is None else len(held[0]),
        "accuracy": (by_target.get(config.targets[0]) or {}).get("accuracy", math.nan),
        "fidelity": (by_target.get(config.targets[0]) or {}).get("fidelity", math.nan),
        "by_target": by_target, "best": {"target": best[0], **best[1]} if best else None, "stopped": stopped,
        "note": "trained on every distinct row answered before the refusal, fingerprint probes included",
    }
    # the naive attacker's better surrogate, as for the fingerprinted one: soft labels, or the
    # argmax's one-hot when hardening has perturbed the scores
    naive: dict[str, dict[str, Any]] = {}
    for target in config.targets:
        r = run_extraction(url, zoo, keys["probe-naive"], rows, attacker="naive", budget=config.budget,
                           batch_size=config.batch_size, victim_model=victim, eval_x=eval_x, eval_y=eval_y,
                           victim_probs=victim_probs, seed=config.seed, train=config.train, progress=progress,
                           target=target)
        naive[target] = {"queries": r.queries, "accuracy": r.accuracy, "fidelity": r.fidelity}
    best_naive = max(naive.items(), key=lambda kv: (kv[1]["accuracy"], kv[1]["fidelity"]))
    doc["naive_under_detector"] = {**best_naive[1], "target": best_naive[0], "by_target": naive}
    doc["seconds"] = round(time.perf_counter() - started, 3)
    return doc
