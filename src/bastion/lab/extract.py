"""Extract a served model: train a surrogate on the server's answers, then measure it.

The attacker queries ``budget`` rows of its pool (in the lab's fixed order, in requests
of ``batch_size`` rows) and keeps the probabilities the server returns. Three attackers
differ only in where the queries go:

* ``explicit``: to the victim model by name. The upper bound: every answer is the
  victim's.
* ``naive``: to the zoo with no targets (or, ``naive_targets="random"``, with targets
  drawn at random, refusals included in the cost). Each request is answered by
  whichever variant the zoo picks, so the surrogate learns a mixture.
* ``fingerprinted``: to the zoo with the victim's trigger found by
  :func:`bastion.lab.fingerprint.fingerprint` (its queries are reported separately).

The surrogate is a small torch MLP on the flattened input, trained on the soft labels
(cross-entropy against the returned probabilities, which carries more of the victim's
decision surface than its top-1 alone) with Adam and a fixed number of steps: the
attacker has no labels, so there is no validation set to stop on. ``target="hard"`` trains
on the one-hot of each returned row's argmax instead (:func:`training_targets`): the
adaptive attacker against output hardening, which perturbs or strips the scores but
never the top-1 label. It is fast on one
CPU thread and deterministic for a seed. (scikit-learn's MLPClassifier cannot fit soft
labels; the Adversarial Robustness Toolbox adds nothing a 30-line loop does not here.)

Measured on the experimenter's labelled held-out rows (the scenario's ``eval.npz``):

* ``accuracy``: the surrogate's top-1 against the true labels;
* ``fidelity``: the surrogate's top-1 against the *victim's* top-1 on the same rows, the
  victim's answers coming from the server by querying the victim model by name with an
  experimenter key (not counted in the attacker's budget).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bastion.lab.oracle import Oracle, OracleError, Targets

__all__ = [
    "ATTACKERS",
    "TARGETS",
    "Collected",
    "ExtractionResult",
    "Surrogate",
    "TrainConfig",
    "collect",
    "evaluate",
    "random_targets",
    "run_extraction",
    "train_surrogate",
    "training_targets",
    "victim_answers",
]

ATTACKERS = ("explicit", "naive", "fingerprinted")
# the surrogate's training target: the returned probabilities, or the one-hot of their argmax
TARGETS = ("soft", "hard")


def training_targets(probs: np.ndarray, target: str = "soft") -> np.ndarray:
    """What the surrogate is fitted to: ``soft`` returns ``probs`` as they are; ``hard`` the
    one-hot of each row's argmax (ties to the lower class index, as ``argmax``), i.e. an
    attacker that ignores perturbed scores and keeps only the label hardening preserves."""
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
    probs = np.asarray(probs, dtype=np.float64)
    if target == "soft":
        return probs
    onehot = np.zeros_like(probs)
    if probs.size:
        onehot[np.arange(len(probs)), probs.argmax(axis=1)] = 1.0
    return onehot


@dataclass(frozen=True)
class TrainConfig:
    hidden: tuple[int, ...] = (128,)
    steps: int = 600  # Adam steps; no early stopping (the attacker has no labels)
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4


@dataclass
class Collected:
    """What the attacker holds after querying: its rows and the answers it got."""

    x: np.ndarray
    probs: np.ndarray
    queries: int
    requests: int
    rejected: int  # requests refused (422), whose rows are spent but unanswered


def random_targets(seed: int) -> Callable[[int], Targets]:
    """Targets a naive attacker might send without knowing the zoo: accuracy U(0, 1),
    latency log-uniform in [0.001, 100] ms; a fixed sequence per seed."""
    rng = np.random.default_rng(seed)

    def draw(_request: int) -> Targets:
        return {"accuracy": float(rng.uniform(0.0, 1.0)), "latency_ms": float(10.0 ** rng.uniform(-3.0, 2.0))}

    return draw


def collect(
    oracle: Oracle,
    rows: np.ndarray,
    budget: int,
    *,
    batch_size: int = 32,
    targets: Targets | Callable[[int], Targets] | None = None,
) -> Collected:
    """Send the first ``budget`` rows of ``rows`` in requests of ``batch_size``; keep the
    answered ones. ``targets``: fixed, or a function of the request index."""
    if budget > len(rows):
        raise ValueError(f"budget {budget} is larger than the query pool ({len(rows)} rows)")
    xs, ps = [], []
    before = (oracle.queries, oracle.requests, oracle.rejected)
    for k, start in enumerate(range(0, budget, batch_size)):
        chunk = rows[start:min(start + batch_size, budget)]
        answer = oracle.ask(chunk, targets(k) if callable(targets) else targets)
        if answer.probs is not None:
            xs.append(chunk)
            ps.append(answer.probs)
    if not xs:
        raise OracleError(f"{oracle.model}: no request of the budget was answered")
    return Collected(np.concatenate(xs), np.concatenate(ps), oracle.queries - before[0],
                     oracle.requests - before[1], oracle.rejected - before[2])


@contextmanager
def _one_thread() -> Iterator[None]:
    """One thread while training: deterministic, and polite on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Surrogate:
    net: Any  # torch.nn.Module
    mean: np.ndarray
    scale: float
    classes: int
    config: TrainConfig
    seconds: float

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        import torch

        flat = (x.reshape(len(x), -1).astype(np.float32) - self.mean) / self.scale
        with _one_thread(), torch.no_grad():
            self.net.eval()
            return torch.softmax(self.net(torch.from_numpy(flat)), dim=1).numpy().astype(np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_proba(x).argmax(axis=1)


def train_surrogate(x: np.ndarray, probs: np.ndarray, *, seed: int = 0,
                    config: TrainConfig | None = None) -> Surrogate:
    """An MLP fitted to the soft labels ``probs`` [rows, classes] of inputs ``x``."""
    import torch
    from torch import nn

    config = config or TrainConfig()
    started = time.perf_counter()
    flat = x.reshape(len(x), -1).astype(np.float32)
    mean = flat.mean(axis=0)
    # one scale for all features: per-feature scaling would blow rare binary features up
    scale = float(flat.std()) or 1.0
    inputs = torch.from_numpy((flat - mean) / scale)
    soft = torch.from_numpy(np.clip(probs, 0.0, 1.0).astype(np.float32))
    soft = soft / soft.sum(dim=1, keepdim=True).clamp_min(1e-12)
    classes = soft.shape[1]
    with _one_thread():
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = inputs.shape[1]
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        net = nn.Sequential(*layers)
        opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        n = len(inputs)
        net.train()
        step = 0
        while step < config.steps:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, config.batch_size):
                idx = order[start:start + config.batch_size]
                loss = -(soft[idx] * torch.log_softmax(net(inputs[idx]), dim=1)).sum(dim=1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step >= config.steps:
                    break
    return Surrogate(net, mean, scale, classes, config, time.perf_counter() - started)


def evaluate(surrogate: Surrogate, x: np.ndarray, y: np.ndarray, victim_probs: np.ndarray | None) -> dict[str, Any]:
    """Accuracy on labels ``y``; fidelity to the victim's top-1 when its answers are given."""
    pred = surrogate.predict(x)
    out: dict[str, Any] = {"eval_rows": len(y), "accuracy": float((pred == y).mean())}
    if victim_probs is not None:
        victim = victim_probs.argmax(axis=1)
        out["fidelity"] = float((pred == victim).mean())
        out["victim_accuracy"] = float((victim == y).mean())
    else:
        out["fidelity"] = math.nan
        out["victim_accuracy"] = math.nan
    return out


@dataclass
class ExtractionResult:
    attacker: str
    zoo: str
    queried: str  # the name the attacker's requests went to
    targets: Any  # the targets sent: a dict, "random", or None
    budget: int
    queries: int
    requests: int
    rejected: int
    rows_answered: int
    accuracy: float
    fidelity: float
    victim_accuracy: float
    eval_rows: int
    victim_model: str | None
    fingerprint: dict[str, Any] | None = None
    fingerprint_queries: int = 0
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def total_queries(self) -> int:
        return self.queries + self.fingerprint_queries

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        doc = asdict(self)
        doc["total_queries"] = self.total_queries
        return doc


Progress = Callable[[str, int, int | None], None]  # (phase, rows spent, row budget)


def victim_answers(url: str, victim_model: str, api_key: str | None, x: np.ndarray, *, batch_size: int = 32,
                   verify: str | bool = True) -> np.ndarray:
    """The victim's probabilities on ``x``, asked by name (the experimenter's reference)."""
    with Oracle(url, victim_model, api_key=api_key, verify=verify) as oracle:
        return oracle.predict(x, batch_size=batch_size)


def run_extraction(
    url: str,
    zoo: str,
    api_key: str | None,
    rows: np.ndarray,
    *,
    attacker: str,
    budget: int,
    batch_size: int = 32,
    victim_model: str | None = None,
    eval_x: np.ndarray | None = None,
    eval_y: np.ndarray | None = None,
    victim_probs: np.ndarray | None = None,
    trigger: Targets | None = None,
    fingerprint_budget: int = 2000,
    fingerprint_options: dict[str, Any] | None = None,
    naive_targets: str = "none",
    seed: int = 0,
    train: TrainConfig | None = None,
    progress: Progress | None = None,
    verify: str | bool = True,
    target: str = "soft",
) -> ExtractionResult:
    """One attacker end to end: (fingerprint,) query ``budget`` rows of ``rows``, train,
    and measure on ``eval_x``/``eval_y`` against ``victim_probs`` (the victim's answers on
    those rows, see :func:`victim_answers`). ``target``: train on the returned probabilities
    (``soft``) or on the one-hot of their argmax (``hard``, see :func:`training_targets`)."""
    from bastion.lab.fingerprint import fingerprint

    if attacker not in ATTACKERS:
        raise ValueError(f"attacker: expected one of {', '.join(ATTACKERS)}, got {attacker!r}")
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
    if naive_targets not in ("none", "random"):
        raise ValueError(f"naive_targets: expected none or random, got {naive_targets!r}")

    def tick(phase: str) -> Callable[[int, int | None], None] | None:
        return None if progress is None else (lambda done, total: progress(phase, done, total))

    fp_doc: dict[str, Any] | None = None
    fp_queries = 0
    targets: Targets | Callable[[int], Targets] | None = None
    described: Any = None
    queried = zoo
    if attacker == "explicit":
        if not victim_model:
            raise ValueError("the explicit attacker queries the victim by name: give victim_model")
        queried = victim_model
    elif attacker == "naive":
        if naive_targets == "random":
            targets, described = random_targets(seed), "random"
    elif trigger is not None:
        targets = described = dict(trigger)
    else:
        with Oracle(url, zoo, api_key=api_key, budget=fingerprint_budget, progress=tick("fingerprint"),
                    verify=verify) as fp_oracle:
            found = fingerprint(fp_oracle, rows, **(fingerprint_options or {}))
        fp_doc, fp_queries = found.as_dict(), found.queries
        if found.victim_trigger is None:
            raise OracleError(f"fingerprinting zoo '{zoo}' found no trigger for the victim: {found.notes}")
        targets = described = found.victim_trigger
    with Oracle(url, queried, api_key=api_key, budget=budget, progress=tick(attacker), verify=verify) as oracle:
        got = collect(oracle, rows, budget, batch_size=batch_size, targets=targets)
    surrogate = train_surrogate(got.x, training_targets(got.probs, target), seed=seed, config=train)
    if eval_x is not None and eval_y is not None:
        scores = evaluate(surrogate, eval_x, eval_y, victim_probs)
    else:
        scores = {"eval_rows": 0, "accuracy": math.nan, "fidelity": math.nan, "victim_accuracy": math.nan}
    config = surrogate.config
    return ExtractionResult(
        attacker=attacker, zoo=zoo, queried=queried, targets=described, budget=budget, queries=got.queries,
        requests=got.requests, rejected=got.rejected, rows_answered=len(got.x), accuracy=scores["accuracy"],
        fidelity=scores["fidelity"], victim_accuracy=scores["victim_accuracy"], eval_rows=scores["eval_rows"],
        victim_model=victim_model, fingerprint=fp_doc, fingerprint_queries=fp_queries,
        train={"model": f"MLP {list(config.hidden)}", "steps": config.steps, "batch_size": config.batch_size,
               "lr": config.lr, "weight_decay": config.weight_decay, "loss": f"{target}-label cross-entropy",
               "target": target, "seconds": round(surrogate.seconds, 3), "seed": seed},
    )
