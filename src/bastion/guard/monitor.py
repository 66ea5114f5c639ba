"""Extraction monitor: PRADA (Juuti et al., "PRADA: Protecting against DNN Model Stealing
Attacks", EuroS&P 2019), per tenant.

Why it works: a benign client's queries are natural samples, and the distance from a
new sample to its nearest earlier sample of the same predicted class is, over many
queries, close to normally distributed. Extraction attacks that synthesise queries
(JBDA and its variants: a few seeds, then ``x + lambda * sign(gradient)`` steps around
them) produce distances that cluster at the step sizes they use, which is far from
normal. PRADA measures normality with the Shapiro-Wilk statistic ``W`` (1 = perfectly
normal) and flags a client when ``W < delta``.

What it does not catch (measured on scikit-learn digits with a logistic-regression
oracle, 1,000-query streams): queries drawn from a broad natural or random
distribution (uniform noise gives ``W`` of about 0.99, like benign traffic), and JBDA
whose substitute-gradient steps are clipped to the pixel range so often that the step
lengths spread out (``W`` 0.94-0.98, overlapping benign 0.95-0.98). PRADA is one signal
beside query budgets and output hardening, not a wall.

Per tenant and per predicted class ``c`` the monitor keeps a *growing set* ``G_c`` of
earlier queries and a threshold ``T_c`` (PRADA's Algorithm 1, as in the authors'
reference code):

1. the first query of class ``c`` starts ``G_c`` (its distance counts as 0 in
   ``D_Gc``, the distances of ``G_c``'s members; ``T_c = 0``); no distance is recorded;
2. otherwise ``d`` = the minimum L2 distance from the flattened query to ``G_c``;
   ``d`` is appended to ``D`` (the tenant's distance record);
3. if ``d > T_c`` the query joins ``G_c``, ``d`` joins ``D_Gc``, and
   ``T_c = max(T_c, mean(D_Gc) - std(D_Gc))``. So ``G_c`` collects the queries that
   are *new* (farther from the set than is typical for its members); near-duplicates
   are measured but not stored, which keeps ``G_c`` a cover of what the tenant
   explored. The threshold only rises (it never lets in what it refused before);
4. every ``test_every`` queries (at most once per ``observe`` call), with at least
   ``min_samples`` distances from classes that each have at least
   ``min_class_samples`` of them (a class with a handful of distances says little
   about its distribution), outliers beyond ``outlier_sigma`` standard deviations are
   dropped and ``W = shapiro(D).statistic`` is computed; ``W < delta`` flags the
   tenant. Distances that are all equal (a point mass, which ``shapiro`` cannot
   score) count as ``W = 0``.

``delta`` defaults to 0.9: PRADA tuned it per dataset between about 0.9 and 0.96, and
benign digits streams here never went below ``W = 0.945`` (30 shuffled streams of 1,000
queries), so 0.9 leaves a margin against false alarms on other data; raise it for
models whose benign traffic is measured to stay higher.

The monitor only reports: ``action`` (``alert``, ``throttle``, ``block``,
``escalate``) is carried in the ``Alert`` for the data plane to act on.

Choices beyond the paper, all to bound cost on the serving path:

- ``G_c`` holds at most ``max_per_class`` vectors (float32); past that, the oldest
  member is overwritten (FIFO). FIFO rather than a reservoir keeps the monitor
  deterministic (no random state to explain in an alert) and keeps ``G_c`` a cover of
  the tenant's recent region; the threshold ``T_c`` keeps its whole history.
- ``D`` is a sliding window of the last ``window`` distances (PRADA keeps all).
- An exact repeat of one of the tenant's last 1,024 distinct queries (a retried
  request), or of a stored member (``d == 0``), is counted but neither measured nor
  stored: retries would otherwise pile copies of one distance (or zeros) into ``D``
  and flag honest clients, and a repeat teaches an attacker nothing new. Repeats are
  recognised by a SipHash of the query's bytes (Python's ``hash``, keyed per process,
  so nobody can craft collisions to hide queries).
- Rows with NaN/Inf are skipped (they have no distance).
- At most ``max_classes`` classes per tenant (a model that answers free-form labels
  cannot grow memory without bound; queries of further classes are counted only), and
  at most ``max_tenants`` tenants (least recently seen evicted; a flagged tenant's flag
  is remembered after eviction). Memory is about
  ``tenants x classes x max_per_class x features x 4`` bytes at worst; size
  ``max_per_class`` for the model's input (1,000 x 64 features is 256 KiB per class).
- Once flagged, a tenant stays flagged (until ``reset``) and its queries are only
  counted: the decision is made, and measuring further would cost for nothing.

Cost per query: one float32 matrix-vector product against ``G_c`` (``<= max_per_class``
rows) plus bookkeeping (about 8 us at 64 features and 1,000 stored vectors, plus about
100 us per test at a full window of 1,000); the Shapiro-Wilk test over ``<= window`` distances runs once
per ``test_every`` queries, and at most once per call. The rows of one request are
processed one by one, in order, because each query's distance depends on the queries
before it; so the distances, growing sets and thresholds do not depend on how queries
are batched, and the verdict may come at most one request later with large batches.

One monitor serves one model (one input size): the vectors of different models are
not comparable. Key tenants per model if one monitor must see several
(``f"{tenant}/{model}"``). Not thread-safe: it is called from the event loop only, which
serialises every call (like the token buckets in ``guard/limits.py``). With
``--workers N`` each worker monitors the queries it serves, so a tenant spread over
several connections is judged on each worker's share: a synthetic stream stays
synthetic in every share, so it is still flagged, after about N times as many queries;
a monitor shared by workers would need a shared store for the growing sets.

Requires scipy (installed with scikit-learn, the ``sklearn`` extra); an
``ExtractionMonitor`` cannot be built without it, and importing this module does not
need it.

Configured as (the lead places the block)::

    extraction_monitor:
      min_samples: 100       # distances before the first test (PRADA: > 100)
      delta: 0.9             # flag when W < delta
      max_per_class: 1000    # stored vectors per tenant and class
      window: 1000           # distances tested (sliding)
      test_every: 10         # queries between tests
      action: alert          # alert | throttle | block | escalate
"""

from __future__ import annotations

import difflib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NoReturn, TypeVar

import numpy as np

from bastion.core.errors import InvalidInput

log = logging.getLogger("bastion.guard")

__all__ = ["ACTIONS", "Alert", "ExtractionMonitor", "MonitorConfig", "parse_block", "parse_monitor"]

ACTIONS = ("alert", "throttle", "block", "escalate")
_C = TypeVar("_C")
# scipy's Shapiro-Wilk p-values are exact up to 5000 samples and it warns beyond
_MAX_WINDOW = 5000
_RECENT = 1024  # distinct queries per tenant remembered to recognise retries
_INT_FIELDS = (
    "min_samples",
    "max_per_class",
    "window",
    "test_every",
    "min_class_samples",
    "max_classes",
    "max_tenants",
)


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """PRADA's knobs and the monitor's bounds; see the module docstring for each."""

    min_samples: int = 100
    delta: float = 0.9
    max_per_class: int = 1000
    window: int = 1000
    test_every: int = 10
    action: str = "alert"
    min_class_samples: int = 10
    outlier_sigma: float = 3.0
    max_classes: int = 1024
    max_tenants: int = 10_000

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.min_samples < 3:
            raise ValueError(f"min_samples: Shapiro-Wilk needs at least 3 samples, got {self.min_samples}")
        if self.window > _MAX_WINDOW:
            raise ValueError(f"window: at most {_MAX_WINDOW} (Shapiro-Wilk's range), got {self.window}")
        if self.window < self.min_samples:
            raise ValueError(f"window: must hold min_samples ({self.min_samples}) distances, got {self.window}")
        if not _is_number(self.delta) or not 0 < self.delta < 1:
            raise ValueError(f"delta: expected a number between 0 and 1 (exclusive), got {self.delta!r}")
        if not _is_number(self.outlier_sigma) or self.outlier_sigma <= 0:
            raise ValueError(f"outlier_sigma: expected a number > 0, got {self.outlier_sigma!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"action: expected one of {', '.join(ACTIONS)}, got {self.action!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_monitor(mapping: Any, where: str) -> MonitorConfig:
    """Validate a parsed YAML/JSON ``extraction_monitor`` block strictly; messages name the field."""
    return parse_block(MonitorConfig, mapping, where)


def parse_block(config: type[_C], mapping: Any, where: str) -> _C:
    """A settings dataclass from a parsed YAML/JSON block, strictly: unknown keys (with a
    did-you-mean), wrong types and ranges are ``InvalidInput`` naming ``where.field``. The
    dataclass's ``__post_init__`` raises ``ValueError("field: message")``."""
    keys = tuple(f.name for f in fields(config))  # type: ignore[arg-type]
    if not isinstance(mapping, Mapping):
        shown = f"{type(mapping).__name__} {mapping!r}" if mapping is not None else "nothing"
        _fail(where, "", f"expected a mapping of {', '.join(keys)}, got {shown}")
    for key in mapping:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            _fail(where, str(key), f"unknown key; {hint}expected one of {', '.join(keys)}")
    try:
        return config(**dict(mapping))
    except ValueError as exc:
        # __post_init__ messages start with the field name
        field, _, message = str(exc).partition(": ")
        _fail(where, field, message)


def _fail(where: str, key: str, message: str) -> NoReturn:
    raise InvalidInput(f"{where}.{key}: {message}" if key else f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class Alert:
    """A tenant newly flagged: what the data plane acts on (and audits)."""

    tenant: str
    queries_seen: int
    statistic: float  # Shapiro-Wilk W of the tenant's distances
    threshold: float  # the configured delta
    action: str


class _GrowingSet:
    """``G_c`` of one tenant and class: a FIFO ring of float32 vectors and PRADA's threshold."""

    __slots__ = (
        "cap",
        "count",
        "dist_n",
        "dist_sum",
        "dist_sumsq",
        "half_norms",
        "index",
        "slot",
        "threshold",
        "vectors",
    )

    def __init__(self, first: np.ndarray, cap: int, index: int) -> None:
        self.cap = cap
        self.index = index  # small int id of the class within its tenant, for the distance window
        size = min(cap, 16)  # grown on demand: most classes of most tenants stay small
        self.vectors = np.empty((size, first.shape[0]), dtype=np.float32)
        self.half_norms = np.empty(size, dtype=np.float32)
        self.count = 0
        self.slot = 0
        self.threshold = 0.0
        # D_Gc as running sums; the first member's distance counts as 0, as in PRADA
        self.dist_n = 1
        self.dist_sum = 0.0
        self.dist_sumsq = 0.0
        self._store(first)

    def min_distance(self, v: np.ndarray) -> float:
        n = self.count
        stored = self.vectors[:n]
        # argmin |g - v|^2 = argmin |g|^2/2 - g.v: one matrix-vector product picks the nearest;
        # that pair is then measured directly, free of the expansion's float32 cancellation
        i = int(np.argmin(self.half_norms[:n] - stored @ v))
        diff = stored[i] - v
        return math.sqrt(float(diff @ diff))

    def admit(self, v: np.ndarray, d: float) -> None:
        if d <= self.threshold:
            return
        self._store(v)
        self.dist_n += 1
        self.dist_sum += d
        self.dist_sumsq += d * d
        mean = self.dist_sum / self.dist_n
        std = math.sqrt(max(0.0, self.dist_sumsq / self.dist_n - mean * mean))
        self.threshold = max(self.threshold, mean - std)

    def _store(self, v: np.ndarray) -> None:
        if self.count < self.cap:
            if self.count == self.vectors.shape[0]:
                size = min(self.cap, 2 * self.count)
                self.vectors = np.resize(self.vectors, (size, self.vectors.shape[1]))
                self.half_norms = np.resize(self.half_norms, size)
            at = self.count
            self.count += 1
        else:
            at = self.slot
            self.slot = (self.slot + 1) % self.cap
        self.vectors[at] = v
        self.half_norms[at] = 0.5 * float(v @ v)


class _Tenant:
    __slots__ = (
        "classes",
        "dim",
        "distances",
        "filled",
        "flagged",
        "labels",
        "last_w",
        "pos",
        "recent",
        "seen",
        "since_test",
    )

    def __init__(self, window: int) -> None:
        self.classes: dict[Hashable, _GrowingSet] = {}
        self.dim: int | None = None
        self.distances = np.zeros(window, dtype=np.float64)
        self.labels = np.zeros(window, dtype=np.int32)  # the _GrowingSet.index of each distance
        self.pos = 0
        self.filled = 0
        self.seen = 0
        self.since_test = 0
        self.last_w: float | None = None
        self.flagged = False
        self.recent: dict[int, None] = {}  # hashes of the last distinct queries, oldest first


def _load_shapiro() -> Callable[[np.ndarray], Any]:
    try:
        from scipy.stats import shapiro
    except ImportError as exc:  # pragma: no cover - scipy comes with the sklearn extra
        raise RuntimeError(
            "the extraction monitor needs scipy (Shapiro-Wilk); install bastion-serve[sklearn] or scipy"
        ) from exc
    return shapiro


def query_and_label(
    inputs: Iterable[np.ndarray], outputs: Mapping[str, np.ndarray], label_output: str | None, probabilities_output: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """What the monitor reads from one answered request: the query rows (the first numeric
    input, flattened per row) and the predicted class of each (the label output, else the
    argmax of the probabilities). None when the model answers neither, or rows disagree."""
    data = next((a for a in inputs if a.dtype != object), None)
    if data is None:
        return None
    x = data.reshape(data.shape[0], -1) if data.ndim > 1 else data.reshape(1, -1)
    label = outputs.get(label_output) if label_output is not None else None
    if label is None:
        probs = outputs.get(probabilities_output)
        if probs is None:
            return None
        label = np.asarray(probs).argmax(axis=-1)
    label = np.asarray(label).reshape(-1)
    if label.shape[0] != x.shape[0]:
        return None
    return x, label


class ExtractionMonitor:
    """PRADA per tenant. Event-loop only (not thread-safe); see the module docstring."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._shapiro = _load_shapiro()
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()
        self._evicted_flagged: set[str] = set()

    def observe(self, tenant: str, x: np.ndarray, predicted: np.ndarray) -> Alert | None:
        """Record the queries ``x`` (``[rows, ...]``) and their predicted labels (``[rows]``).

        Returns an ``Alert`` the first time the tenant is flagged, else None.
        """
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"extraction monitor: queries must be numeric, got dtype {x.dtype}")
        rows = x.shape[0] if x.ndim else 1
        labels = np.asarray(predicted).reshape(-1)
        if labels.shape[0] != rows:
            raise ValueError(f"extraction monitor: {rows} queries but {labels.shape[0]} predicted labels")
        state = self._state(tenant)
        if state.flagged or rows == 0:
            state.seen += rows
            return None
        vectors = x.reshape(rows, -1).astype(np.float32, copy=False)
        if state.dim is None:
            state.dim = vectors.shape[1]
        elif vectors.shape[1] != state.dim:
            raise ValueError(
                f"extraction monitor: tenant {tenant!r} sent {vectors.shape[1]} features after {state.dim}; "
                "use one monitor per model (input signature)"
            )
        finite = np.isfinite(vectors).all(axis=1).tolist()
        for i, label in enumerate(labels.tolist()):
            if finite[i]:
                self._one(state, vectors[i], label)
        state.seen += rows
        state.since_test += rows
        # at most one test per request: the test costs more than a query (~100 us at 1,000
        # distances), and a 64-row request tested after each 10th row would pay it 6 times
        if state.since_test < self.config.test_every:
            return None
        state.since_test = 0
        return self._test(tenant, state)

    def watch(
        self,
        tenant: str,
        inputs: Iterable[np.ndarray],
        outputs: Mapping[str, np.ndarray],
        label_output: str | None,
        probabilities_output: str,
    ) -> Alert | None:
        """Feed one answered request (``query_and_label`` says what is read from it). A query
        the monitor cannot take (another input size than the tenant's earlier ones) is skipped."""
        seen = query_and_label(inputs, outputs, label_output, probabilities_output)
        if seen is None:
            return None
        try:
            return self.observe(tenant, *seen)
        except (TypeError, ValueError) as err:
            log.debug("extraction monitor skipped a query: %s", err)
            return None

    def status(self, tenant: str) -> dict[str, Any]:
        """What the monitor knows of ``tenant`` (for logs, metrics and the admin API)."""
        state = self._tenants.get(tenant)
        if state is None:
            return {
                "queries_seen": 0,
                "distances": 0,
                "stored_vectors": 0,
                "classes": 0,
                "last_w": None,
                "flagged": tenant in self._evicted_flagged,
            }
        return {
            "queries_seen": state.seen,
            "distances": state.filled,
            "stored_vectors": sum(g.count for g in state.classes.values()),
            "classes": len(state.classes),
            "last_w": state.last_w,
            "flagged": state.flagged,
        }

    def flagged(self, tenant: str) -> bool:
        state = self._tenants.get(tenant)
        return state.flagged if state is not None else tenant in self._evicted_flagged

    def reset(self, tenant: str) -> None:
        """Forget the tenant: its queries, distances and flag (after an operator's review)."""
        self._tenants.pop(tenant, None)
        self._evicted_flagged.discard(tenant)

    def stored_vectors(self, tenant: str) -> dict[Hashable, int]:
        """Stored vectors per class of ``tenant`` (each at most ``max_per_class``)."""
        state = self._tenants.get(tenant)
        return {} if state is None else {label: g.count for label, g in state.classes.items()}

    # ------------------------------------------------------------------ internals

    def _state(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is not None:
            self._tenants.move_to_end(tenant)
            return state
        state = _Tenant(self.config.window)
        if tenant in self._evicted_flagged:
            state.flagged = True
        self._tenants[tenant] = state
        if len(self._tenants) > self.config.max_tenants:
            old, evicted = self._tenants.popitem(last=False)
            if evicted.flagged:
                self._evicted_flagged.add(old)
        return state

    def _one(self, state: _Tenant, v: np.ndarray, label: Hashable) -> None:
        key = hash(v.tobytes())
        recent = state.recent
        if key in recent:
            return
        recent[key] = None
        if len(recent) > _RECENT:
            del recent[next(iter(recent))]
        group = state.classes.get(label)
        if group is None:
            if len(state.classes) < self.config.max_classes:
                state.classes[label] = _GrowingSet(v, self.config.max_per_class, len(state.classes))
            return
        d = group.min_distance(v)
        if d == 0.0:
            return
        state.distances[state.pos] = d
        state.labels[state.pos] = group.index
        state.pos = (state.pos + 1) % state.distances.shape[0]
        state.filled = min(state.filled + 1, state.distances.shape[0])
        group.admit(v, d)

    def _test(self, tenant: str, state: _Tenant) -> Alert | None:
        cfg = self.config
        if state.filled < cfg.min_samples:
            return None
        d = state.distances[: state.filled]
        labels = state.labels[: state.filled]
        counts = np.bincount(labels)
        d = d[counts[labels] >= cfg.min_class_samples]
        if d.shape[0] < cfg.min_samples:
            return None
        mean, std = d.mean(), d.std()
        if std > 0:
            d = d[np.abs(d - mean) < cfg.outlier_sigma * std]
            if d.shape[0] < cfg.min_samples:
                return None
        w = float(self._shapiro(d).statistic) if np.ptp(d) > 0 else 0.0
        state.last_w = w
        if w >= cfg.delta:
            return None
        state.flagged = True
        return Alert(tenant=tenant, queries_seen=state.seen, statistic=w, threshold=cfg.delta, action=cfg.action)
