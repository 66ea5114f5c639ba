"""The benign tenant of the tradeoff sweep: its workload of reachable targets, and its
goodput, read from the server's own counters over the replay.

Goodput = met / all zoo requests the server counted (``bastion_zoo_requests_total``,
parsed by :func:`bastion.client.zoo_counters`, the same parser ``bastion zoo goodput``
uses); the sweep's tenants are the only callers of the zoo, so the delta is the replay's.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bastion.client import AdminClient
from bastion.lab.oracle import Oracle

__all__ = ["Progress", "counter_delta", "goodput_from_delta", "goodput_of", "latency_slo_range", "reachable_workload"]

# (phase, rows done, total or None): what the CLI's progress bars take
Progress = Callable[[str, int, int | None], None]


def counter_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, int]:
    """``after - before`` per label value (a value absent on one side counts 0); counters
    are whole numbers, so the difference is rounded to an int."""
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0)) for k in sorted(set(before) | set(after))}


def goodput_from_delta(delta: Mapping[str, int]) -> float:
    """met / all outcomes counted (NaN when nothing was counted)."""
    total = sum(delta.values())
    return delta.get("met", 0) / total if total else math.nan


# ---- the benign workload ---------------------------------------------------------------------------
def reachable_workload(front: Sequence[Mapping[str, Any]], n: int, seed: int,
                       latency_ms: tuple[float, float] | None = None) -> list[dict[str, float]]:
    """``n`` targets some variant of ``front`` meets: accuracy uniform over the front's
    quality range (widened below by half of it), latency log-uniform over ``latency_ms``
    (default: the fastest variant's profiled latency to twice the slowest's), like
    ``bastion zoo goodput``'s random workload; a draw no variant's profile meets is redrawn."""
    qs = [float(v["quality"]) for v in front]
    ls = [float(v["latency_ms"]) for v in front]
    q_lo, q_hi = min(qs), max(qs)
    a_lo = max(0.0, q_lo - 0.5 * ((q_hi - q_lo) or 0.05))
    lat_lo, lat_hi = latency_ms if latency_ms is not None else (min(ls), 2.0 * max(ls))
    if not 0 < lat_lo <= lat_hi:
        raise ValueError(f"latency range: expected 0 < LO <= HI, got {lat_lo}:{lat_hi}")
    l_lo, l_hi = math.log(lat_lo), math.log(lat_hi)
    rng = random.Random(seed)
    out: list[dict[str, float]] = []
    for _ in range(1000 * max(1, n)):
        if len(out) == n:
            break
        t = {"accuracy": round(rng.uniform(a_lo, q_hi), 4), "latency_ms": round(math.exp(rng.uniform(l_lo, l_hi)), 4)}
        if any(q >= t["accuracy"] and lat <= t["latency_ms"] for q, lat in zip(qs, ls, strict=True)):
            out.append(t)
    return out


def latency_slo_range(round_trips_ms: Sequence[float], front: Sequence[Mapping[str, Any]]) -> tuple[float, float]:
    """Latency targets a served request can meet: the server judges a request's latency
    target against its own time in the server (queueing, batching, the transport), which
    on a small zoo is far above the variants' profiled compute time. From the benign
    client's round trips with no targets (an upper bound of that time): [1.5 x p90,
    10 x that], and never below twice the slowest profiled variant."""
    rtt = sorted(float(x) for x in round_trips_ms if math.isfinite(x))
    if not rtt:
        raise ValueError("no round trip to calibrate latency targets on")
    p90 = rtt[min(len(rtt) - 1, int(0.9 * len(rtt)))]
    lo = max(1.5 * p90, 2.0 * max(float(v["latency_ms"]) for v in front))
    return round(lo, 4), round(10.0 * lo, 4)




def goodput_of(url: str, zoo: str, key: str, admin: AdminClient, workload: Sequence[Mapping[str, float]],
               x: np.ndarray, seed: int, progress: Progress | None) -> dict[str, Any]:
    """Replay ``workload`` (one row of ``x`` per target, drawn with ``seed``) with the benign
    tenant's ``key``; the server's outcome and selection counts over it, and its goodput."""
    before = admin.zoo_counters(zoo)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(x), len(workload))
    statuses: dict[str, int] = {}
    with Oracle(url, zoo, api_key=key) as oracle:
        for i, (targets, row) in enumerate(zip(workload, picks, strict=True)):
            answer = oracle.ask(x[row:row + 1], targets)
            statuses[str(answer.status)] = statuses.get(str(answer.status), 0) + 1
            if progress is not None:
                progress("goodput", i + 1, len(workload))
    # the counters are the server's: a worker may count the last requests a moment after
    # answering them, so poll until the replay is all counted (or a deadline passes)
    deadline = time.monotonic() + 5.0
    while True:
        after = admin.zoo_counters(zoo)
        delta = counter_delta(before.requests, after.requests)
        if sum(delta.values()) >= len(workload) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {"requests": len(workload), "server_outcomes": delta, "goodput": goodput_from_delta(delta),
            "client_statuses": statuses, "selections": counter_delta(before.selections, after.selections)}
