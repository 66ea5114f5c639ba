"""Protection against goodput: sweep a zoo's selection defenses and measure both sides.

For each point (a defense kind at one strength, or the undefended baseline) the sweep
moves an attacker tenant and a benign tenant into that point's defense class, then:

* **goodput**: the benign tenant replays a fixed, seeded workload of *reachable* targets
  (some variant of the front meets each one); goodput = met / all from the delta of the
  server's ``bastion_zoo_requests_total`` counters over the replay;
* **fingerprint**: the attacker walks the zoo (:func:`bastion.lab.fingerprint.fingerprint`):
  rows spent, variants found, consistency of the victim's trigger;
* **extract**: the attacker queries ``budget`` rows at that trigger and trains a surrogate
  (:func:`bastion.lab.extract.run_extraction`); accuracy on the zoo's held-out rows and
  fidelity to the victim variant (whose answers the experimenter asks by name).

Output hardening (``hardening:`` in a model's ``config.yaml``, see
:mod:`bastion.guard.hardening`) is per model, not per tenant, so it cannot be switched
by a tenant's class: the caller writes one hardening setting into every variant's
``config.yaml`` of the copy (:func:`apply_hardening`), starts a server, sweeps the
selection points on it, and does that again per setting. The fingerprinted attacker's
answers are used twice: a surrogate trained on the returned scores (``soft``) and one
on the one-hot of their argmax (``hard``, the adaptive attacker that ignores perturbed
scores); a point's headline is the better of the two (max accuracy).

The baseline also runs the explicit and the naive attacker. Every attack and the goodput
workload go through the public REST protocol with an API key; the experiment's own
set-up (a copy of the repository with one defense class per point in ``zoo.yaml``, a
``bastion serve`` on loopback, the admin key) is the operator's side, and its
bootstrap admin key is made by the caller (``bastion lab tradeoff``), since this
package imports no server internals. Tenants' keys are created and moved between
classes through the admin API, the victim is read from the zoo's profile (the
experimenter knows its own repository).

Pure helpers (class names, the ``zoo.yaml`` rewrite, counter deltas, the markdown
report) are separate from the live parts so they can be tested without a server.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from bastion.lab.extract import (
    TARGETS,
    TrainConfig,
    evaluate,
    run_extraction,
    train_surrogate,
    training_targets,
    victim_answers,
)
from bastion.lab.fingerprint import fingerprint
from bastion.lab.oracle import Oracle

__all__ = [
    "BASELINE",
    "DEFAULT_HARDENING",
    "DEFAULT_STRENGTHS",
    "KIND_PREFIX",
    "NO_HARDENING",
    "QUICK_STRENGTHS",
    "HardeningSetting",
    "SweepConfig",
    "SweepPoint",
    "apply_hardening",
    "best_point",
    "class_name",
    "counter_delta",
    "defense_block",
    "goodput_from_delta",
    "latency_slo_range",
    "markdown_report",
    "parse_hardening_setting",
    "plan_points",
    "reachable_workload",
    "rewrite_model_config",
    "rewrite_zoo_yaml",
    "run_sweep",
    "serve",
    "zoo_counters",
]

KIND_PREFIX = {"permute-and-flip": "pf", "exponential": "exp", "metric-noise": "noise"}
# ε for the DP mechanisms; scale_accuracy for metric noise (scale_latency = ratio x that)
DEFAULT_STRENGTHS: dict[str, tuple[float, ...]] = {
    "permute-and-flip": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    "exponential": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    "metric-noise": (0.005, 0.01, 0.02, 0.04, 0.08),
}
QUICK_STRENGTHS: dict[str, tuple[float, ...]] = {
    "permute-and-flip": (0.5, 2.0, 8.0),
    "exponential": (0.5, 2.0, 8.0),
    "metric-noise": (0.01, 0.04, 0.08),
}
NOISE_LATENCY_RATIO = 10.0  # scale_latency (on log latency) per unit of scale_accuracy
BASELINE = "default"  # the undefended class: defenses.default is {kind: none}
OUTCOMES = ("met", "missed_accuracy", "missed_latency", "missed_both", "rejected")


# ---- the plan ------------------------------------------------------------------------------------
def _strength_text(strength: float) -> str:
    text = f"{strength:g}".replace(".", "p").replace("+", "")
    return text


def class_name(kind: str, strength: float) -> str:
    """The tenant defense class of one point: ``pf-0p5``, ``exp-2``, ``noise-0p02``."""
    if kind not in KIND_PREFIX:
        raise ValueError(f"defense: expected one of {', '.join(KIND_PREFIX)}, got {kind!r}")
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength > 0):
        raise ValueError(f"strength: expected a finite number > 0, got {strength!r}")
    name = f"{KIND_PREFIX[kind]}-{_strength_text(float(strength))}"
    if len(name) > 32:
        raise ValueError(f"class name {name!r} is longer than 32 characters")
    return name


def defense_block(kind: str, strength: float, noise_latency_ratio: float = NOISE_LATENCY_RATIO) -> dict[str, Any]:
    """The ``zoo.yaml`` defense of one point."""
    if kind == "metric-noise":
        return {"kind": kind, "noise": "laplace", "scale_accuracy": float(strength),
                "scale_latency": round(float(strength) * noise_latency_ratio, 6)}
    if kind in ("exponential", "permute-and-flip"):
        return {"kind": kind, "epsilon": float(strength)}
    raise ValueError(f"defense: expected one of {', '.join(KIND_PREFIX)}, got {kind!r}")


@dataclass(frozen=True)
class SweepPoint:
    defense: str  # "none" for the baseline, else a defense kind
    strength: float | None
    defense_class: str
    spec: dict[str, Any]


def plan_points(strengths: Mapping[str, Sequence[float]],
                noise_latency_ratio: float = NOISE_LATENCY_RATIO) -> list[SweepPoint]:
    """The baseline first, then every (defense, strength) in the order given (strengths sorted)."""
    points = [SweepPoint("none", None, BASELINE, {"kind": "none"})]
    seen = {BASELINE}
    for kind, values in strengths.items():
        for s in sorted(set(float(v) for v in values)):
            name = class_name(kind, s)
            if name in seen:
                raise ValueError(f"two points share the class name {name!r}")
            seen.add(name)
            points.append(SweepPoint(kind, s, name, defense_block(kind, s, noise_latency_ratio)))
    return points


def rewrite_zoo_yaml(data: Mapping[str, Any], points: Sequence[SweepPoint]) -> dict[str, Any]:
    """The zoo's own settings with a ``defenses`` block of one class per point (and
    ``default: {kind: none}``); an existing ``defense``/``defenses`` is replaced."""
    if not isinstance(data, Mapping):
        raise ValueError(f"zoo.yaml: expected a mapping, got {type(data).__name__}")
    out = {k: v for k, v in data.items() if k not in ("defense", "defenses")}
    block: dict[str, Any] = {BASELINE: {"kind": "none"}}
    for p in points:
        if p.defense_class != BASELINE:
            block[p.defense_class] = dict(p.spec)
    out["defenses"] = block
    return out


def prepare_copy(repo: Path, zoo: str, work: Path, points: Sequence[SweepPoint]) -> Path:
    """Copy ``repo`` to ``work/repo`` and write the points' classes into its ``<zoo>/zoo.yaml``."""
    src = Path(repo)
    if not (src / zoo / "zoo.yaml").is_file():
        raise ValueError(f"{src}: no zoo '{zoo}' ({zoo}/zoo.yaml)")
    dest = Path(work) / "repo"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, symlinks=True)
    path = dest / zoo / "zoo.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    path.write_text(yaml.safe_dump(rewrite_zoo_yaml(data, points), sort_keys=False), encoding="utf-8")
    return dest


# ---- output hardening ------------------------------------------------------------------------------
@dataclass(frozen=True)
class HardeningSetting:
    """One ``hardening:`` block written into every variant's ``config.yaml`` (``block``
    None: the variants' own configuration, no hardening), and its short name."""

    name: str
    block: dict[str, Any] | None


NO_HARDENING = HardeningSetting("none", None)
# what ``--hardening`` sweeps when asked for the default set
DEFAULT_HARDENING = ("none", "round=1", "reverse_sigmoid=0.5:0.5", "reverse_sigmoid=1:1", "reverse_sigmoid=1:4",
                     "top_k=1", "label_only")


def _positive(text: str, what: str, integer: bool = False) -> Any:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ValueError(f"hardening {what}: expected a{'n integer' if integer else ' number'}, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and what != "round"):
        raise ValueError(f"hardening {what}: expected a finite number > 0, got {text!r}")
    return value


def parse_hardening_setting(text: str) -> HardeningSetting:
    """``none``, ``round=D``, ``top_k=K``, ``reverse_sigmoid=BETA:GAMMA`` (or ``rs=``), ``label_only``.

    ``label_only`` sets ``label_output: null``: the probabilities output then answers the
    one-hot of its argmax (same name and shape), which the lab's oracle reads; with the
    label output kept the probabilities would be dropped from the answer altogether."""
    raw = text.strip()
    key, sep, value = raw.partition("=")
    key = key.strip().lower().replace("-", "_")
    if key == "none" and not sep:
        return NO_HARDENING
    if key == "label_only" and (not sep or value.strip().lower() in ("true", "1", "yes")):
        return HardeningSetting("label-only", {"label_only": True, "label_output": None})
    if key == "round" and sep:
        d = _positive(value, "round", integer=True)
        return HardeningSetting(f"round-{d}", {"round": d})
    if key == "top_k" and sep:
        k = _positive(value, "top_k", integer=True)
        return HardeningSetting(f"top{k}", {"top_k": k})
    if key in ("reverse_sigmoid", "rs") and sep:
        parts = value.split(":")
        if len(parts) != 2:
            raise ValueError(f"hardening reverse_sigmoid: expected BETA:GAMMA, got {value!r}")
        beta, gamma = (_positive(v, "reverse_sigmoid") for v in parts)
        return HardeningSetting(f"rs-{beta:g}-{gamma:g}", {"reverse_sigmoid": {"beta": beta, "gamma": gamma}})
    raise ValueError(f"hardening: expected none, round=D, top_k=K, reverse_sigmoid=BETA:GAMMA or label_only, "
                     f"got {text!r}")


def rewrite_model_config(data: Mapping[str, Any], block: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model's ``config.yaml`` with its ``hardening`` replaced by ``block`` (None: removed);
    every other key as it was, in its order."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config.yaml: expected a mapping, got {type(data).__name__}")
    out = {k: v for k, v in data.items() if k != "hardening"}
    if block is not None:
        out["hardening"] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in block.items()}
    return out


def apply_hardening(repo: Path, variants: Sequence[str], setting: HardeningSetting) -> list[Path]:
    """Write ``setting`` into every variant's ``config.yaml`` under ``repo`` (the work copy);
    returns the files written."""
    written = []
    for name in variants:
        path = Path(repo) / name / "config.yaml"
        if not path.is_file():
            raise ValueError(f"{path}: no config.yaml for variant {name!r}")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        path.write_text(yaml.safe_dump(rewrite_model_config(data, setting.block), sort_keys=False), encoding="utf-8")
        written.append(path)
    return written


# ---- counters ------------------------------------------------------------------------------------
def zoo_counters(metrics_text: str, zoo: str) -> dict[str, dict[str, float]]:
    """``{"requests": {outcome: n}, "selections": {variant: n}}`` of ``zoo`` from a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    requests = dict.fromkeys(OUTCOMES, 0.0)
    selections: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name not in ("bastion_zoo_requests", "bastion_zoo_selections"):
            continue
        for s in family.samples:
            if not s.name.endswith("_total") or s.labels.get("zoo") != zoo:
                continue
            if family.name == "bastion_zoo_requests":
                requests[s.labels["outcome"]] = requests.get(s.labels["outcome"], 0.0) + s.value
            else:
                v = s.labels.get("variant", "")
                selections[v] = selections.get(v, 0.0) + s.value
    return {"requests": requests, "selections": selections}


def counter_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, int]:
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


# ---- the server ------------------------------------------------------------------------------------
def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(repo: Path, keys_db: Path, *, log: Path, ready_timeout_s: float = 120.0,
          extra_args: Sequence[str] = ()) -> Iterator[str]:
    """``bastion serve repo`` on loopback with the key store; yields its URL, stops it on exit
    (errors and Ctrl-C included)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "bastion.cli.main", "serve", str(repo), "--host", "127.0.0.1",
           "--http-port", str(port), "--grpc-port", "-1", "--keys", str(keys_db), "--poll-interval", "0",
           "--log-format", "text", *extra_args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"bastion serve exited with {proc.returncode}; see {log}")
                try:
                    if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bastion serve not ready after {ready_timeout_s:g} s; see {log}")
                time.sleep(0.1)
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Admin:
    """The operator's admin calls over REST: keys, tenant classes, /metrics."""

    def __init__(self, url: str, key: str, zoo: str) -> None:
        self.zoo = zoo
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=30.0)

    def close(self) -> None:
        self.http.close()

    def create_key(self, tenant: str, models: Sequence[str] | None, description: str) -> str:
        doc: dict[str, Any] = {"tenant": tenant, "role": "infer", "description": description}
        if models is not None:
            doc["models"] = list(models)
        r = self.http.post("/v2/admin/keys", json=doc)
        r.raise_for_status()
        return str(r.json()["key"])

    def set_limits(self, tenant: str, limits: Mapping[str, Any]) -> None:
        """``PUT /v2/admin/tenants/{tenant}/limits``: what the server enforces from then on."""
        r = self.http.put(f"/v2/admin/tenants/{tenant}/limits", json=dict(limits))
        r.raise_for_status()

    def set_class(self, tenant: str, defense_class: str) -> None:
        r = self.http.put(f"/v2/admin/tenants/{tenant}/class", json={"defense_class": defense_class})
        r.raise_for_status()
        got = r.json().get("defense_class")
        if got != defense_class:
            raise RuntimeError(f"tenant {tenant}: class {got!r} after setting {defense_class!r}")

    def counters(self) -> dict[str, dict[str, float]]:
        r = self.http.get("/metrics")
        r.raise_for_status()
        return zoo_counters(r.text, self.zoo)

    def wait_for_key(self, key: str, model: str, timeout_s: float = 10.0) -> None:
        """A new key reaches the workers within a second: wait until it is accepted."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = httpx.get(f"{self.url}/v2/models/{model}", headers={"authorization": f"Bearer {key}"},
                          timeout=5.0)
            if r.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"a new key is still refused after {timeout_s:g} s ({r.status_code})")
            time.sleep(0.2)


# ---- the sweep ---------------------------------------------------------------------------------------
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


Progress = Callable[[str, int, int | None], None]
Step = Callable[[str], None]


def goodput_of(url: str, zoo: str, key: str, admin: Admin, workload: Sequence[Mapping[str, float]],
             x: np.ndarray, seed: int, progress: Progress | None) -> dict[str, Any]:
    before = admin.counters()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(x), len(workload))
    statuses: dict[str, int] = {}
    with Oracle(url, zoo, api_key=key) as oracle:
        for i, (targets, row) in enumerate(zip(workload, picks, strict=True)):
            answer = oracle.ask(x[row:row + 1], targets)
            statuses[str(answer.status)] = statuses.get(str(answer.status), 0) + 1
            if progress is not None:
                progress("goodput", i + 1, len(workload))
    # the counters are the server's; poll briefly until the replay is all counted
    deadline = time.monotonic() + 5.0
    while True:
        after = admin.counters()
        delta = counter_delta(before["requests"], after["requests"])
        if sum(delta.values()) >= len(workload) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {"requests": len(workload), "server_outcomes": delta, "goodput": goodput_from_delta(delta),
            "client_statuses": statuses,
            "selections": counter_delta(before["selections"], after["selections"])}


_ESCALATED = 0


def _escalated_point(url: str, zoo: str, admin: Admin, plain: Mapping[str, Any], point: SweepPoint,
                     hardening: HardeningSetting, config: SweepConfig, rows: np.ndarray, eval_x: np.ndarray,
                     eval_y: np.ndarray, victim_probs: np.ndarray, progress: Progress | None) -> dict[str, Any]:
    """The point again for an attacker the operator has escalated: a fresh tenant (no usage
    yet) in the point's class with a total quota of ``config.escalate_quota`` requests,
    both set over the admin API; the server's 429 is what ends its fingerprint or its
    extraction. Goodput is the benign tenant's of the same point (it is not escalated)."""
    global _ESCALATED
    _ESCALATED += 1
    quota = int(config.escalate_quota or 0)
    tenant = f"tradeoff-escalated-{_ESCALATED}"
    key = admin.create_key(tenant, [zoo], f"tradeoff sweep: escalated attacker (quota {quota}/total)")
    admin.set_limits(tenant, {"quota": quota, "quota_period": "total"})
    admin.set_class(tenant, point.defense_class)
    admin.wait_for_key(key, zoo)
    time.sleep(config.settle_s)
    escalation = {"quota": quota, "quota_period": "total", "unit": "requests", "tenant": tenant}
    doc: dict[str, Any] = {"defense": point.defense, "strength": point.strength,
                           "defense_class": point.defense_class, "spec": point.spec, "hardening": hardening.name,
                           "hardening_spec": hardening.block, "escalation": escalation,
                           "goodput": plain["goodput"]}
    fp_progress = None if progress is None else (lambda d, t: progress("fingerprint", d, t))
    with Oracle(url, zoo, api_key=key, budget=config.fingerprint_budget, progress=fp_progress) as oracle:
        fp = fingerprint(oracle, rows, repeats=config.repeats)
    doc["fingerprint"] = _fingerprint_doc(fp)
    if fp.victim_trigger is None:
        doc["extraction"] = None
        doc["notes"] = [f"no victim trigger found: {fp.notes}"]
    else:
        doc["extraction"] = fingerprinted_extraction(url, zoo, key, rows, fp.victim_trigger, config=config,
                                                     eval_x=eval_x, eval_y=eval_y, victim_probs=victim_probs,
                                                     progress=progress)
    with contextlib.suppress(httpx.HTTPError):
        admin.set_class(tenant, BASELINE)
    return doc


def _victim_consistency(fp: Any) -> float:
    if fp.victim is None or not fp.variants:
        return math.nan
    return float(fp.variants[fp.victim].consistency)


def _fingerprint_doc(fp: Any) -> dict[str, Any]:
    cons = [v.consistency for v in fp.variants if math.isfinite(v.consistency)]
    return {
        "queries": fp.queries, "requests": fp.requests, "rejected": fp.rejected, "method": fp.method,
        "variants_found": len(fp.variants), "signatures_seen": fp.signatures_seen, "complete": fp.complete,
        "victim_trigger": fp.victim_trigger, "victim_consistency": _victim_consistency(fp),
        "mean_consistency": float(np.mean(cons)) if cons else math.nan,
        "consistency": [v.consistency for v in fp.variants], "notes": list(fp.notes),
    }


def _attack_doc(r: Any) -> dict[str, Any]:
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


def fingerprinted_extraction(url: str, zoo: str, key: str, rows: np.ndarray, trigger: Mapping[str, float], *,
                             config: SweepConfig, eval_x: np.ndarray, eval_y: np.ndarray, victim_probs: np.ndarray,
                             progress: Progress | None = None) -> dict[str, Any]:
    """Query ``config.budget`` rows at ``trigger`` once, train one surrogate per training
    target on those answers; the attack document with ``by_target`` and ``best``."""
    tick = None if progress is None else (lambda d, t: progress("fingerprinted", d, t))
    with Oracle(url, zoo, api_key=key, budget=config.budget, progress=tick) as oracle:
        got, stopped = collect_until_refused(oracle, rows, config.budget, batch_size=config.batch_size,
                                             targets=trigger)
    if got is None:
        return {"attacker": "fingerprinted", "queried": zoo, "targets": dict(trigger), "queries": 0,
                "rows_answered": 0, "accuracy": math.nan, "fidelity": math.nan, "stopped": stopped,
                "by_target": {}, "best": None}
    by_target: dict[str, dict[str, Any]] = {}
    for target in config.targets:
        surrogate = train_surrogate(got.x, training_targets(got.probs, target), seed=config.seed, config=config.train)
        scores = evaluate(surrogate, eval_x, eval_y, victim_probs)
        by_target[target] = {"accuracy": scores["accuracy"], "fidelity": scores["fidelity"],
                             "train_seconds": round(surrogate.seconds, 3)}
    best = best_of_targets(by_target)
    first = by_target[config.targets[0]]
    victim_accuracy = float((np.asarray(victim_probs).argmax(axis=1) == eval_y).mean())
    answered = got.probs
    distinct = float(np.mean([len(np.unique(np.round(r, 6))) for r in answered])) if len(answered) else math.nan
    return {"attacker": "fingerprinted", "queried": zoo, "targets": dict(trigger), "queries": got.queries,
            "requests": got.requests, "rejected": got.rejected, "rows_answered": len(got.x),
            "accuracy": first["accuracy"], "fidelity": first["fidelity"],
            "victim_accuracy": victim_accuracy, "eval_rows": len(eval_y),
            "train_seconds": first["train_seconds"], "by_target": by_target,
            "best": {"target": best[0], **best[1]} if best else None,
            "answer_distinct_values": distinct, "stopped": stopped}


def collect_until_refused(oracle: Oracle, rows: np.ndarray, budget: int, *, batch_size: int,
                          targets: Mapping[str, float]) -> tuple[Any, str | None]:
    """:func:`bastion.lab.extract.collect`, except that a server refusal (a spent quota:
    429 with no Retry-After) ends the queries and keeps what was answered; returns the
    collected answers (None if nothing was) and the refusal's message."""
    from bastion.lab.extract import Collected
    from bastion.lab.oracle import BudgetExhausted

    xs, ps = [], []
    before = (oracle.queries, oracle.requests, oracle.rejected)
    stopped = None
    for start in range(0, budget, batch_size):
        chunk = rows[start:min(start + batch_size, budget)]
        try:
            answer = oracle.ask(chunk, trigger_or_none(targets))
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


def trigger_or_none(targets: Mapping[str, float] | None) -> Mapping[str, float] | None:
    return dict(targets) if targets else None


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
) -> dict[str, Any]:
    """Every point on the live server at ``url`` (serving the variants with ``hardening``,
    recorded in each point's document; ``baseline_attacks``: also run the explicit and the
    naive attacker at the baseline point; ``escalate``: classes that get a second, escalated
    point: a fresh attacker tenant with ``config.escalate_quota`` requests in total, set
    through the admin API, fingerprints and extracts until the server refuses); returns the result document (JSON-able,
    NaN for what could not be measured). ``front``: the Pareto variants (``variant``,
    ``quality``, ``latency_ms``) from the repository's profile; the victim is the most
    accurate one."""
    zoo = config.zoo
    victim = max(front, key=lambda v: (v["quality"], -v["latency_ms"]))["variant"]
    admin = Admin(url, admin_key, zoo)
    say = step or (lambda _msg: None)
    try:
        attacker_key = admin.create_key("tradeoff-attacker", [zoo], "tradeoff sweep: attacker (zoo only)")
        benign_key = admin.create_key("tradeoff-benign", [zoo], "tradeoff sweep: benign goodput workload")
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
        results: list[dict[str, Any]] = []
        extra_attacks: dict[str, Any] = {}
        for k, point in enumerate(points):
            label = "baseline (none)" if point.defense == "none" else f"{point.defense} {point.strength:g}"
            label = f"hardening {hardening.name}, {label}"
            say(f"[{k + 1}/{len(points)}] {label}: class {point.defense_class}")
            started = time.perf_counter()
            for tenant in ("tradeoff-attacker", "tradeoff-benign"):
                admin.set_class(tenant, point.defense_class)
            time.sleep(config.settle_s)
            doc: dict[str, Any] = {"defense": point.defense, "strength": point.strength,
                                   "defense_class": point.defense_class, "spec": point.spec,
                                   "hardening": hardening.name, "hardening_spec": hardening.block}
            doc["goodput"] = goodput_of(url, zoo, benign_key, admin, workload, eval_x, config.seed, progress)
            fp_progress = None if progress is None else (lambda d, t: progress("fingerprint", d, t))
            with Oracle(url, zoo, api_key=attacker_key, budget=config.fingerprint_budget,
                        progress=fp_progress) as oracle:
                fp = fingerprint(oracle, rows, repeats=config.repeats)
            doc["fingerprint"] = _fingerprint_doc(fp)
            trigger = fp.victim_trigger
            if trigger is None:
                doc["extraction"] = None
                doc["notes"] = [f"no victim trigger found: {fp.notes}"]
            else:
                before = admin.counters()
                doc["extraction"] = fingerprinted_extraction(
                    url, zoo, attacker_key, rows, trigger, config=config, eval_x=eval_x, eval_y=eval_y,
                    victim_probs=victim_probs, progress=progress)
                after = admin.counters()
                doc["extraction"]["selections"] = counter_delta(before["selections"], after["selections"])
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
                results.append(_escalated_point(url, zoo, admin, doc, point, hardening, config, rows, eval_x,
                                                eval_y, victim_probs, progress))
    finally:
        with contextlib.suppress(httpx.HTTPError):
            for tenant in ("tradeoff-attacker", "tradeoff-benign"):
                admin.set_class(tenant, BASELINE)
        admin.close()
    return {"zoo": zoo, "victim": victim, "front": [dict(v) for v in front], "hardening": [hardening.name],
            "workload": {
        "requests": len(workload), "seed": config.seed, "latency_ms": list(latency_range),
        "calibration_round_trips_ms": [round(x, 4) for x in calibration],
        "targets": "reachable: accuracy uniform over the front's quality range (widened below by half of it), "
        "latency log-uniform over latency_ms"}, "baseline_attacks": extra_attacks, "points": results}


# ---- the report ------------------------------------------------------------------------------------------
def _num(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _drop(base: Any, value: Any) -> Any:
    if base is None or value is None:
        return None
    if not (math.isfinite(base) and math.isfinite(value)):
        return None
    return round((base - value) * 100.0, 2)


def baseline_point(result: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The undefended point: no selection defense and no output hardening."""
    return next((p for p in result["points"] if p["defense"] == "none" and p.get("hardening", "none") == "none"
                 and not p.get("escalation")), None)


def _headline(ext: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """A point's (accuracy, fidelity, target): the best training target when several were tried."""
    best = ext.get("best")
    if best:
        return best.get("accuracy"), best.get("fidelity"), best.get("target")
    return ext.get("accuracy"), ext.get("fidelity"), None


def escalation_label(esc: Mapping[str, Any] | None) -> str | None:
    if not esc:
        return None
    if esc.get("kind") == "probe-monitor":
        return f"probe detector ({esc['action']} after {esc['max_refused']} refused targets)"
    return f"quota {esc['quota']}/{esc['quota_period']} requests"


def summary_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per point, drops in points (percentage points) vs the undefended
    fingerprinted attack (positive: the defense protects). ``accuracy``/``fidelity`` are the
    attacker's best training target (max accuracy of soft/hard) where both were tried."""
    base = baseline_point(result)
    b_acc, b_fid, _ = _headline((base or {}).get("extraction") or {})
    rows = []
    for p in result["points"]:
        ext = p.get("extraction") or {}
        fp = p.get("fingerprint") or {}
        acc, fid, target = _headline(ext)
        by = ext.get("by_target") or {}
        esc = p.get("escalation")
        rows.append({
            "hardening": p.get("hardening", "none"),
            "escalation": escalation_label(esc),
            "extraction_rows": ext.get("rows_answered"),
            "defense": p["defense"], "strength": p["strength"], "defense_class": p["defense_class"],
            "goodput": p["goodput"]["goodput"], "consistency": fp.get("victim_consistency"),
            "variants_found": fp.get("variants_found"), "fingerprint_queries": fp.get("queries"),
            "accuracy": acc, "fidelity": fid, "best_target": target,
            "soft_accuracy": (by.get("soft") or {}).get("accuracy"),
            "soft_fidelity": (by.get("soft") or {}).get("fidelity"),
            "hard_accuracy": (by.get("hard") or {}).get("accuracy"),
            "hard_fidelity": (by.get("hard") or {}).get("fidelity"),
            "accuracy_drop": _drop(b_acc, acc),
            "fidelity_drop": _drop(b_fid, fid),
        })
    return rows


TARGET_DROPS = ((19.6, 9.6), (9.8, 4.8))  # (accuracy, fidelity) drops in points the issue asks about


def best_point(rows: Sequence[Mapping[str, Any]], min_goodput: float = 0.8) -> Mapping[str, Any] | None:
    """The defended point (not the undefended baseline) with goodput >= ``min_goodput`` and
    the largest accuracy drop of the attacker's best target (ties: the larger fidelity
    drop, then the higher goodput); None when no such point was measured."""
    def finite(x: Any) -> bool:
        return x is not None and isinstance(x, (int, float)) and math.isfinite(x)

    ok = [r for r in rows
          if not (r["defense"] == "none" and r.get("hardening", "none") == "none" and not r.get("escalation"))
          and finite(r["goodput"]) and r["goodput"] >= min_goodput
          and finite(r["accuracy_drop"]) and finite(r["fidelity_drop"])]
    return max(ok, key=lambda r: (r["accuracy_drop"], r["fidelity_drop"], r["goodput"])) if ok else None


def _selection_label(r: Mapping[str, Any]) -> str:
    label = "none" if r["defense"] == "none" else f"{r['defense']} {r['strength']:g}"
    return f"{label} + escalated: {r['escalation']}" if r.get("escalation") else label


def _hardening_section(rows: Sequence[Mapping[str, Any]], result: Mapping[str, Any]) -> list[str]:
    specs = {p.get("hardening", "none"): p.get("hardening_spec") for p in result["points"]}
    lines = ["## Output hardening x selection defense", "",
             "One server per hardening setting (written into every variant's `config.yaml` of the copy), the "
             "selection points swept on it. The fingerprinted attacker's answers train two surrogates: `soft` "
             "(the returned scores) and `hard` (one-hot of their argmax: the adaptive attacker). `best` is the "
             "attacker's better one (max accuracy); drops are of `best` vs the undefended best, in points. "
             "`rows`: extraction rows the attacker got answered. An *escalated* point is the same point for a "
             "fresh attacker tenant whose quota (requests in total, fingerprint included) the operator set through "
             "`PUT /v2/admin/tenants/{t}/limits`; the server's 429 ended its queries (its goodput is the benign "
             "tenant's of the same point). Consistency under hardening is what the attacker can observe: "
             "variants whose hardened answers look alike count as one.", "",
             "| hardening | selection | goodput | consistency | rows | soft acc | soft fid | hard acc | hard fid | "
             "best | best acc | Δacc (pts) | best fid | Δfid (pts) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        n = "-" if r["extraction_rows"] is None else r["extraction_rows"]
        lines.append(f"| {r['hardening']} | {_selection_label(r)} | {_num(r['goodput'])} | "
                     f"{_num(r['consistency'], '.2f')} | {n} | "
                     f"{_num(r['soft_accuracy'])} | {_num(r['soft_fidelity'])} | "
                     f"{_num(r['hard_accuracy'])} | {_num(r['hard_fidelity'])} | {r['best_target'] or '-'} | "
                     f"{_num(r['accuracy'])} | {_num(r['accuracy_drop'], '+.1f')} | {_num(r['fidelity'])} | "
                     f"{_num(r['fidelity_drop'], '+.1f')} |")
    lines += ["", "Hardening settings: " + "; ".join(
        f"`{name}` = `{yaml.safe_dump(spec, default_flow_style=True).strip() if spec else 'none'}`"
        for name, spec in specs.items()), ""]
    return lines


def _best_point_lines(rows: Sequence[Mapping[str, Any]], min_goodput: float = 0.8) -> list[str]:
    best = best_point(rows, min_goodput)
    lines = [f"## Best point with goodput >= {min_goodput:g}", ""]
    if best is None:
        return [*lines, f"No defended point with goodput >= {min_goodput:g} and a measured extraction.", ""]
    lines.append(f"Hardening `{best['hardening']}` x selection `{_selection_label(best)}`: goodput "
                 f"{_num(best['goodput'])}, fingerprinted attacker's best ({best['best_target'] or 'soft'}) accuracy "
                 f"{_num(best['accuracy'])} ({_num(best['accuracy_drop'], '+.1f')} pts), fidelity "
                 f"{_num(best['fidelity'])} ({_num(best['fidelity_drop'], '+.1f')} pts).")
    for acc, fid in TARGET_DROPS:
        met = best["accuracy_drop"] >= acc and best["fidelity_drop"] >= fid
        verdict = "reached" if met else "NOT reached"
        lines.append(f"- target drop {acc:g} / {fid:g} pts (accuracy / fidelity): {verdict}")
    return [*lines, ""]


def _detector_lines(result: Mapping[str, Any]) -> list[str]:
    points = [p for p in result["points"] if (p.get("escalation") or {}).get("kind") == "probe-monitor"]
    if not points:
        return []
    base = baseline_point(result)
    b_acc, b_fid, _ = _headline((base or {}).get("extraction") or {})
    lines = ["## Zoo-probing detector", "",
             "A server with `probe_monitor` (guard/probes.py); fresh tenants. The fingerprinted attacker trains on "
             "every row answered before the server refused it (fingerprint probes included); the naive attacker "
             "(no targets: nothing for the detector to see) is its best response. Drops vs the undefended "
             "fingerprinted attack.", "",
             "| action | hardening | goodput | attacker requests before refusal | rows it holds | "
             "fingerprinted acc / fid | Δ (pts) | naive acc / fid | Δ (pts) |",
             "|---|---|---:|---:|---:|---|---|---|---|"]
    for p in points:
        det, ext, naive = p.get("detector") or {}, p.get("extraction") or {}, p.get("naive_under_detector") or {}
        acc, fid, _ = _headline(ext)
        lines.append(
            f"| {p['escalation']['action']} (after {p['escalation']['max_refused']} refused targets) | "
            f"{p.get('hardening', 'none')} | {_num(p['goodput']['goodput'])} | "
            f"{det.get('attacker_requests_before_refusal', '-') if det.get('flagged') else 'not refused'} | "
            f"{ext.get('rows_answered', '-')} | {_num(acc)} / {_num(fid)} | "
            f"{_num(_drop(b_acc, acc), '+.1f')} / {_num(_drop(b_fid, fid), '+.1f')} | "
            f"{_num(naive.get('accuracy'))} / {_num(naive.get('fidelity'))} | "
            f"{_num(_drop(b_acc, naive.get('accuracy')), '+.1f')} / "
            f"{_num(_drop(b_fid, naive.get('fidelity')), '+.1f')} |")
    return [*lines, ""]


def markdown_report(doc: Mapping[str, Any]) -> str:
    """``tradeoff.md``: the configuration, the baseline attackers, one table per defense."""
    result = doc["result"]
    cfg = doc["config"]
    lines = [f"# Protection vs goodput: zoo `{result['zoo']}`", ""]
    lines.append(f"Command: `{doc.get('command', '')}`  ")
    lines.append(f"Date: {doc.get('started_at', '')}, {doc.get('seconds', '-')} s; seed {doc.get('seed')}; "
                 f"machine: {doc.get('machine', {}).get('cpu', '?')} ({doc.get('machine', {}).get('cores', '?')} "
                 f"cores)  ")
    lines.append(f"Victim: `{result['victim']}`; extraction budget {cfg.get('budget')} rows, fingerprint budget "
                 f"{cfg.get('fingerprint_budget')} rows, goodput workload {cfg.get('goodput_requests')} reachable "
                 f"targets, surrogate {cfg.get('train')}.")
    lines += ["", "Goodput: met / all from the server's `bastion_zoo_requests_total` deltas over the benign "
              "replay. Consistency: fraction of replays of the fingerprinted victim trigger answered by the same "
              "variant. Accuracy / fidelity: the fingerprinted attacker's surrogate on the zoo's held-out rows "
              "(fidelity = agreement with the victim's top-1). Drops in points vs the undefended fingerprinted "
              "attack (positive = the defense protects).", ""]
    base = baseline_point(result)
    if base is not None:
        lines += ["## Undefended baseline", "", "| attacker | queries | accuracy | fidelity |", "|---|---:|---:|---:|"]
        attacks = dict(result.get("baseline_attacks", {}))
        if base.get("extraction"):
            attacks = {"fingerprinted": base["extraction"], **attacks}
        for name in ("explicit", "naive", "fingerprinted"):
            a = attacks.get(name)
            if a:
                lines.append(f"| {name} | {a['queries']} | {_num(a['accuracy'])} | {_num(a['fidelity'])} |")
        fp = base.get("fingerprint") or {}
        lines += ["", f"Baseline goodput {_num(base['goodput']['goodput'])}; fingerprint: "
                  f"{fp.get('variants_found', '-')} variant(s) found in {fp.get('queries', '-')} rows, victim "
                  f"trigger consistency {_num(fp.get('victim_consistency'), '.2f')}.", ""]
    all_rows = summary_rows(result)
    rows = [r for r in all_rows if r["hardening"] == "none" and not r["escalation"]]
    base_row = next((r for r in rows if r["defense"] == "none"), None)
    for kind in dict.fromkeys(r["defense"] for r in rows if r["defense"] != "none"):
        unit = "scale_accuracy" if kind == "metric-noise" else "ε"
        lines += [f"## {kind}", "",
                  f"| {unit} | goodput | consistency | variants found | fp rows | accuracy | Δacc (pts) | fidelity "
                  "| Δfid (pts) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        kind_rows = [r for r in rows if r["defense"] == kind]
        if base_row is not None:
            kind_rows = [{**base_row, "strength": None}, *kind_rows]
        for r in kind_rows:
            s = "none" if r["strength"] is None else f"{r['strength']:g}"
            lines.append(f"| {s} | {_num(r['goodput'])} | {_num(r['consistency'], '.2f')} | "
                         f"{r['variants_found'] if r['variants_found'] is not None else '-'} | "
                         f"{r['fingerprint_queries'] if r['fingerprint_queries'] is not None else '-'} | "
                         f"{_num(r['accuracy'])} | {_num(r['accuracy_drop'], '+.1f')} | {_num(r['fidelity'])} | "
                         f"{_num(r['fidelity_drop'], '+.1f')} |")
        lines.append("")
    if any(r["hardening"] != "none" for r in all_rows) or any(
            "best" in (p.get("extraction") or {}) for p in result["points"]):
        lines += _hardening_section(all_rows, result)
    lines += _detector_lines(result)
    lines += _best_point_lines(all_rows)
    plots = doc.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
