"""Measured profiles of a zoo's variants, stored beside ``zoo.yaml`` as ``profile.json``.

Profiles are measured, never typed in: ``quality`` comes from the variant's
predictions on the zoo's held-out set and ``latency_ms`` from timing real calls.
The file records when, on which machine and with which command it was produced, so
a number can always be traced back to a run.

``profile.json``::

    {"zoo": "image", "metric": "accuracy", "measured_at": "2025-01-01T12:00:00Z",
     "machine": "...", "command": "bastion zoo profile ...",
     "variants": [{"variant": "image_cnn", "version": 1, "quality": 0.95,
                   "latency_ms": {"batch1": {"p50": 1.0, "p95": 1.4, "p99": 2.0},
                                  "batch_max": {...}}}]}

Each latency regime holds exactly ``p50``, ``p95``, ``p99`` (non-decreasing);
``batch1`` is required because selection is per request.

Quality metrics (all "higher is better"):

- ``accuracy``: fraction of rows where the predicted label equals the true label.
  If ``y_pred`` has one more dimension than ``y_true`` it holds per-class scores
  and its argmax over the last axis is the predicted label.
- ``directional_accuracy`` (forecasting): the fraction of rows, among those whose
  true change is non-zero, where the predicted change has the same sign as the true
  change. Changes are ``y - reference`` when ``reference`` (the last observed
  value) is given, else ``y_true``/``y_pred`` are already changes (e.g. returns).
  A predicted change of exactly 0 has no direction and counts as wrong; rows whose
  true change is 0 are left out (no direction to get right).
- ``r2``: coefficient of determination ``1 - SS_res / SS_tot``; for 2-D targets
  the mean over columns. Undefined (ValueError) when the targets are constant.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from numpy.typing import ArrayLike

from bastion.core.errors import InvalidInput
from bastion.zoo.pareto import Point

__all__ = [
    "METRICS",
    "PERCENTILES",
    "PROFILE_FILE",
    "ProfileError",
    "VariantProfile",
    "ZooProfile",
    "load_profile",
    "machine_description",
    "measure_latencies",
    "measure_latency",
    "profile_to_dict",
    "quality",
    "save_profile",
    "utc_now_iso",
]

PROFILE_FILE = "profile.json"
METRICS = ("accuracy", "directional_accuracy", "r2")
PERCENTILES = ("p50", "p95", "p99")
_REQUIRED_REGIME = "batch1"


class ProfileError(InvalidInput):
    """profile.json is missing, not JSON, or has a wrong field."""


@dataclass(frozen=True)
class VariantProfile:
    variant: str
    version: int
    quality: float
    latency_ms: dict[str, dict[str, float]]


@dataclass(frozen=True)
class ZooProfile:
    zoo: str
    metric: str
    measured_at: str  # ISO 8601, UTC
    machine: str
    command: str
    variants: tuple[VariantProfile, ...]

    def points(self, percentile: str, regime: str = _REQUIRED_REGIME) -> list[Point]:
        """The variants as points of the trade-off plane, at the given latency percentile."""
        if percentile not in PERCENTILES:
            raise ValueError(f"percentile: expected one of {', '.join(PERCENTILES)}, got {percentile!r}")
        missing = [v.variant for v in self.variants if regime not in v.latency_ms]
        if missing:
            raise ValueError(f"latency regime {regime!r} not measured for: {', '.join(missing)}")
        return [Point(v.variant, v.quality, v.latency_ms[regime][percentile]) for v in self.variants]


# ---- measuring --------------------------------------------------------------


def measure_latency(call: Callable[[], object], *, warmup: int, iterations: int) -> dict[str, float]:
    """Time ``iterations`` calls of ``call`` after ``warmup`` untimed ones; p50/p95/p99 in ms.

    Warm-up calls absorb first-call costs (lazy init, caches) that a serving
    process pays once, not per request.
    """
    return measure_latencies({"call": call}, warmup=warmup, iterations=iterations)["call"]


def measure_latencies(
    calls: Mapping[str, Callable[[], object]], *, warmup: int, iterations: int
) -> dict[str, dict[str, float]]:
    """``measure_latency`` for several calls at once, interleaved: round ``i`` times one call
    of each. What else the machine does while they are measured then falls on all of them
    alike, so their order (which variant is faster: the Pareto front) does not depend on
    which one happened to be measured during a busy second."""
    if warmup < 0:
        raise ValueError(f"warmup: expected >= 0, got {warmup}")
    if iterations < 1:
        raise ValueError(f"iterations: expected >= 1, got {iterations}")
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples = {name: np.empty(iterations, dtype=np.float64) for name in calls}
    timed = [(samples[name], call) for name, call in calls.items()]
    for i in range(iterations):
        for out, call in timed:
            start = time.perf_counter()
            call()
            out[i] = (time.perf_counter() - start) * 1000.0
    result = {}
    for name, values in samples.items():
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        result[name] = {"p50": float(p50), "p95": float(p95), "p99": float(p99)}
    return result


def _pair(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.size == 0:
        raise ValueError("quality: empty evaluation set")
    return t, p


def _same_shape(t: np.ndarray, p: np.ndarray, metric: str) -> None:
    if t.shape != p.shape:
        raise ValueError(f"{metric}: y_true has shape {t.shape}, y_pred {p.shape}")


def quality(metric: str, y_true: ArrayLike, y_pred: ArrayLike, *, reference: ArrayLike | None = None) -> float:
    """The variant's quality on a held-out set; see the module docstring for exact definitions."""
    t, p = _pair(y_true, y_pred)
    if metric == "accuracy":
        if p.ndim == t.ndim + 1:
            p = np.argmax(p, axis=-1)
        _same_shape(t, p, metric)
        return float(np.mean(t == p))
    if metric == "directional_accuracy":
        t = t.astype(np.float64)
        p = p.astype(np.float64)
        _same_shape(t, p, metric)
        if reference is not None:
            ref = np.asarray(reference, dtype=np.float64)
            t, p = t - ref, p - ref
        moved = t != 0
        if not moved.any():
            raise ValueError("directional_accuracy: every true change is 0; no direction to predict")
        return float(np.mean(np.sign(p[moved]) == np.sign(t[moved])))
    if metric == "r2":
        t = t.astype(np.float64)
        p = p.astype(np.float64)
        _same_shape(t, p, metric)
        if t.ndim == 1:
            t, p = t[:, None], p[:, None]
        ss_res = np.sum((t - p) ** 2, axis=0)
        ss_tot = np.sum((t - t.mean(axis=0)) ** 2, axis=0)
        if np.any(ss_tot == 0):
            raise ValueError("r2: a target column is constant; the coefficient of determination is undefined")
        return float(np.mean(1.0 - ss_res / ss_tot))
    raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def machine_description() -> str:
    """E.g. ``"AMD EPYC 7B13, 16 cores, 62.8 GiB RAM, Linux x86_64"``; best effort, never raises."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine() or "unknown CPU"
    cores = os.cpu_count() or 0
    parts = [cpu, f"{cores} cores"]
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        parts.append(f"{mem / 2**30:.1f} GiB RAM")
    except (AttributeError, ValueError, OSError):
        pass
    parts.append(f"{platform.system()} {platform.machine()}".strip())
    return ", ".join(parts)


# ---- storing ----------------------------------------------------------------


def save_profile(path: Path, profile: ZooProfile) -> None:
    """Write ``profile`` as JSON (validated first, so a bad profile never reaches disk)."""
    data = profile_to_dict(profile)
    _parse(data, str(path))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # Write then rename: a server hot-reloading the zoo never reads half a file.
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_profile(path: Path) -> ZooProfile:
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{source}: missing; measure the zoo's variants to create it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{source}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    return _parse(data, source)


def profile_to_dict(profile: ZooProfile) -> dict[str, Any]:
    return {
        "zoo": profile.zoo,
        "metric": profile.metric,
        "measured_at": profile.measured_at,
        "machine": profile.machine,
        "command": profile.command,
        "variants": [
            {
                "variant": v.variant,
                "version": v.version,
                "quality": v.quality,
                "latency_ms": {r: dict(stats) for r, stats in v.latency_ms.items()},
            }
            for v in profile.variants
        ],
    }


_TOP_KEYS = ("zoo", "metric", "measured_at", "machine", "command", "variants")
_VARIANT_KEYS = ("variant", "version", "quality", "latency_ms")


class _Check:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> NoReturn:
        raise ProfileError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def mapping(self, path: str, value: Any, keys: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected an object, got {type(value).__name__}")
        for key in value:
            if key not in keys:
                self.fail(f"{path}.{key}" if path else key, f"unknown key; expected one of {', '.join(keys)}")
        for key in keys:
            if key not in value:
                self.fail(f"{path}.{key}" if path else key, "required")
        return value

    def string(self, path: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            self.fail(path, f"expected a non-empty string, got {value!r}")
        return value

    def number(self, path: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(path, f"expected a finite number, got {value!r}")
        return float(value)


def _parse(data: Any, source: str) -> ZooProfile:
    c = _Check(source)
    top = c.mapping("", data, _TOP_KEYS)
    metric = top["metric"]
    if metric not in METRICS:
        c.fail("metric", f"expected one of {', '.join(METRICS)}, got {metric!r}")
    measured_at = c.string("measured_at", top["measured_at"])
    try:
        when = datetime.fromisoformat(measured_at.replace("Z", "+00:00"))
    except ValueError:
        c.fail("measured_at", f"expected an ISO 8601 timestamp, got {measured_at!r}")
    if when.utcoffset() != timezone.utc.utcoffset(None):
        c.fail("measured_at", f"expected a UTC timestamp (ending in Z or +00:00), got {measured_at!r}")
    raw_variants = top["variants"]
    if not isinstance(raw_variants, list) or not raw_variants:
        c.fail("variants", "expected a non-empty list")
    variants: list[VariantProfile] = []
    for i, item in enumerate(raw_variants):
        at = f"variants[{i}]"
        v = c.mapping(at, item, _VARIANT_KEYS)
        name = c.string(f"{at}.variant", v["variant"])
        if any(x.variant == name for x in variants):
            c.fail(f"{at}.variant", f"duplicate variant {name!r}")
        version = v["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            c.fail(f"{at}.version", f"expected an integer >= 1, got {version!r}")
        q = c.number(f"{at}.quality", v["quality"])
        variants.append(VariantProfile(name, version, q, _latencies(c, f"{at}.latency_ms", v["latency_ms"])))
    return ZooProfile(
        zoo=c.string("zoo", top["zoo"]),
        metric=metric,
        measured_at=measured_at,
        machine=c.string("machine", top["machine"]),
        command=c.string("command", top["command"]),
        variants=tuple(variants),
    )


def _latencies(c: _Check, path: str, value: Any) -> dict[str, dict[str, float]]:
    if not isinstance(value, Mapping) or _REQUIRED_REGIME not in value:
        c.fail(path, f"expected an object with at least {_REQUIRED_REGIME!r}, got {value!r}")
    out: dict[str, dict[str, float]] = {}
    for regime, stats in value.items():
        at = f"{path}.{regime}"
        s = c.mapping(at, stats, PERCENTILES)
        nums = {k: c.number(f"{at}.{k}", s[k]) for k in PERCENTILES}
        if nums["p50"] < 0:
            c.fail(f"{at}.p50", f"expected >= 0 ms, got {nums['p50']!r}")
        if not nums["p50"] <= nums["p95"] <= nums["p99"]:
            c.fail(at, f"percentiles must not decrease (p50 <= p95 <= p99), got {nums}")
        out[str(regime)] = nums
    return out
