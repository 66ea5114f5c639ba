"""``zoo.yaml`` of a zoo directory -> ``ZooSpec``, strictly.

A zoo directory sits in the model repository beside the models; it has a
``zoo.yaml`` instead of a ``config.yaml``. The zoo's name is the directory name.
Unknown keys are errors (a typo must not silently fall back to a default), and
every message names the file and the field, e.g.
``image/zoo.yaml: policy: expected one of uniform-feasible, ..., got 'fastest'``.

Required: ``task``, ``variants`` (>= 2 distinct model names of the same
repository), ``evaluation`` (an ``.npz`` file beside zoo.yaml), ``metric``.
Defaults: ``latency_percentile: p95``, ``policy: uniform-feasible``,
``on_infeasible: reject``, ``expose_variant: false``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from bastion.core.errors import InvalidInput
from bastion.zoo.policy import ON_INFEASIBLE, POLICY_NAMES
from bastion.zoo.profiles import METRICS, PERCENTILES, ZooProfile

__all__ = ["ZOO_FILE", "ZooSpec", "ZooSpecError", "check_profile", "load_zoo_spec", "parse_zoo_spec"]

ZOO_FILE = "zoo.yaml"

_KEYS = (
    "task",
    "variants",
    "evaluation",
    "metric",
    "latency_percentile",
    "policy",
    "on_infeasible",
    "expose_variant",
)
_REQUIRED = ("task", "variants", "evaluation", "metric")
# Model names become URL path segments; keep them to a safe alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ZooSpecError(InvalidInput):
    """zoo.yaml is missing, not YAML, or has a wrong or unknown field."""


@dataclass(frozen=True, slots=True)
class ZooSpec:
    name: str
    task: str
    variants: tuple[str, ...]
    evaluation: str  # file name relative to the zoo directory
    metric: str
    latency_percentile: str = "p95"
    policy: str = "uniform-feasible"
    on_infeasible: str = "reject"
    expose_variant: bool = False


def load_zoo_spec(zoo_dir: Path) -> ZooSpec:
    """Read and parse ``zoo_dir/zoo.yaml``; the zoo name is the directory name."""
    zoo_dir = Path(zoo_dir)
    name = zoo_dir.name
    source = f"{name}/{ZOO_FILE}"
    try:
        text = (zoo_dir / ZOO_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ZooSpecError(f"{source}: missing; a zoo directory needs a {ZOO_FILE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ZooSpecError(f"{source}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ZooSpecError(f"{source}: not valid YAML{where}: {problem}") from None
    return parse_zoo_spec(name, data, source=source)


def _fail(source: str, path: str, message: str) -> NoReturn:
    raise ZooSpecError(f"{source}: {path}: {message}" if path else f"{source}: {message}")


def _choice(source: str, key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        _fail(source, key, f"expected one of {', '.join(allowed)}, got {value!r}")
    return value


def parse_zoo_spec(name: str, data: Any, *, source: str) -> ZooSpec:
    """Validate the parsed YAML ``data`` of zoo ``name``; errors name ``source`` and the field."""
    if data is None:
        _fail(source, "", f"empty file; required: {', '.join(_REQUIRED)}")
    if not isinstance(data, Mapping):
        _fail(source, "", f"expected a mapping of {', '.join(_KEYS)}, got {type(data).__name__}")
    for key in data:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            _fail(source, str(key), f"unknown key; {hint}expected one of {', '.join(_KEYS)}")
    for key in _REQUIRED:
        if key not in data:
            _fail(source, key, "required")

    task = data["task"]
    if not isinstance(task, str) or not task.strip():
        _fail(source, "task", f"expected a non-empty string, got {task!r}")

    variants = data["variants"]
    if not isinstance(variants, list):
        _fail(source, "variants", f"expected a list of model names, got {type(variants).__name__}")
    for i, v in enumerate(variants):
        if not isinstance(v, str) or not _NAME.match(v):
            _fail(source, f"variants[{i}]", f"expected a model name (letters, digits, _ . -), got {v!r}")
        if v == name:
            _fail(source, f"variants[{i}]", f"a zoo cannot list itself ({name!r}) as a variant")
        if v in variants[:i]:
            _fail(source, f"variants[{i}]", f"duplicate variant {v!r}")
    if len(variants) < 2:
        _fail(source, "variants", f"a zoo needs at least 2 variants, got {len(variants)}")

    evaluation = data["evaluation"]
    # Beside zoo.yaml only: a path that climbs out of the zoo directory could read any file.
    if (
        not isinstance(evaluation, str)
        or not evaluation.endswith(".npz")
        or "/" in evaluation
        or "\\" in evaluation
        or evaluation.startswith(".")
    ):
        _fail(source, "evaluation", f"expected an .npz file name beside {ZOO_FILE}, no directories; got {evaluation!r}")

    expose = data.get("expose_variant", False)
    if not isinstance(expose, bool):
        _fail(source, "expose_variant", f"expected true or false, got {expose!r}")

    return ZooSpec(
        name=name,
        task=task,
        variants=tuple(variants),
        evaluation=evaluation,
        metric=_choice(source, "metric", data["metric"], METRICS),
        latency_percentile=_choice(source, "latency_percentile", data.get("latency_percentile", "p95"), PERCENTILES),
        policy=_choice(source, "policy", data.get("policy", "uniform-feasible"), POLICY_NAMES),
        on_infeasible=_choice(source, "on_infeasible", data.get("on_infeasible", "reject"), ON_INFEASIBLE),
        expose_variant=expose,
    )


def check_profile(spec: ZooSpec, profile: ZooProfile, *, source: str = "profile.json") -> None:
    """Refuse a stale profile: it must be of this zoo, with its metric, for exactly its variants."""
    if profile.zoo != spec.name:
        _fail(source, "zoo", f"profile is of zoo {profile.zoo!r}, not {spec.name!r}")
    if profile.metric != spec.metric:
        _fail(source, "metric", f"profile measured {profile.metric!r} but zoo.yaml says {spec.metric!r}; re-measure")
    measured = {v.variant for v in profile.variants}
    missing = sorted(set(spec.variants) - measured)
    extra = sorted(measured - set(spec.variants))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"not measured: {', '.join(missing)}")
        if extra:
            parts.append(f"not in zoo.yaml: {', '.join(extra)}")
        _fail(source, "variants", f"{'; '.join(parts)}; re-measure")
