"""``zoo.yaml`` of a zoo directory -> ``ZooSpec``, strictly.

A zoo directory sits in the model repository beside the models; it has a
``zoo.yaml`` instead of a ``config.yaml``. The zoo's name is the directory name.
Unknown keys are errors (a typo must not silently fall back to a default), and
every message names the file and the field, e.g.
``image/zoo.yaml: policy: expected one of uniform-feasible, ..., got 'fastest'``.

Required: ``task``, ``variants`` (>= 2 distinct model names of the same
repository), ``evaluation`` (an ``.npz`` file beside zoo.yaml), ``metric``.
Defaults: ``latency_percentile: p95``, ``policy: uniform-feasible``,
``on_infeasible: reject``, ``expose_variant: false``, no defense.

Selection defenses (``defenses.py``), either one for every tenant::

    defense: {kind: permute-and-flip, epsilon: 2.0}

or one per tenant *defense class* (the class is a property of the tenant's key, so an
operator can move a tenant suspected of extraction to a stronger defense); ``default``
is required and serves every class the zoo does not name::

    defenses:
      default: {kind: metric-noise, noise: laplace, scale_accuracy: 0.01, scale_latency: 0.2}
      trusted: {kind: none}
      suspect: {kind: exponential, epsilon: 0.5}

Fields by kind: ``none``: none; ``exponential`` / ``permute-and-flip``: ``epsilon``
(required, finite, > 0); ``metric-noise``: ``noise`` (``laplace`` default, or
``gaussian``), ``scale_accuracy`` and ``scale_latency`` (>= 0, default 0, not both 0).
A field the kind does not use is an error, like an unknown key.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import yaml

from bastion.core.errors import InvalidInput
from bastion.zoo.defenses import DEFENSE_KINDS, NOISE_KINDS, DefenseSpec, default_defenses
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
    "defense",
    "defenses",
)
_REQUIRED = ("task", "variants", "evaluation", "metric")
# Model names become URL path segments; keep them to a safe alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# the tenant defense-class alphabet of guard/keystore.py (check_defense_class)
_DEFENSE_CLASS = re.compile(r"[a-z0-9_-]{1,32}")
_DEFENSE_FIELDS: dict[str, tuple[str, ...]] = {
    "none": ("kind",),
    "metric-noise": ("kind", "noise", "scale_accuracy", "scale_latency"),
    "exponential": ("kind", "epsilon"),
    "permute-and-flip": ("kind", "epsilon"),
}
_ALL_DEFENSE_FIELDS = ("kind", "epsilon", "noise", "scale_accuracy", "scale_latency")


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
    # defense class -> defense; always has "default". Read-only; left out of the hash
    # (a mapping has none) so a spec stays hashable.
    defenses: Mapping[str, DefenseSpec] = field(default_factory=default_defenses, hash=False)

    def defense_for(self, defense_class: str) -> DefenseSpec:
        """The defense for tenants of ``defense_class``; a class the zoo does not name gets ``default``."""
        return self.defenses.get(defense_class, self.defenses["default"])


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


def _unknown_key(source: str, path: str, key: Any, allowed: tuple[str, ...]) -> NoReturn:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    _fail(source, f"{path}.{key}" if path else str(key), f"unknown key; {hint}expected one of {', '.join(allowed)}")


def _number(source: str, path: str, value: Any, *, positive: bool) -> float:
    # bool is an int subclass: `epsilon: true` is a mistake, not 1.0
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        _fail(source, path, f"expected a finite number {'>' if positive else '>='} 0, got {value!r}")
    return float(value)


def _defense(source: str, path: str, data: Any) -> DefenseSpec:
    if not isinstance(data, Mapping):
        _fail(source, path, f"expected a mapping with a kind ({', '.join(DEFENSE_KINDS)}), got {data!r}")
    for key in data:
        if key not in _ALL_DEFENSE_FIELDS:
            _unknown_key(source, path, key, _ALL_DEFENSE_FIELDS)
    if "kind" not in data:
        _fail(source, f"{path}.kind", f"required; one of {', '.join(DEFENSE_KINDS)}")
    kind = _choice(source, f"{path}.kind", data["kind"], DEFENSE_KINDS)
    used = _DEFENSE_FIELDS[kind]
    for key in data:
        if key not in used:
            _fail(source, f"{path}.{key}", f"not used by kind {kind!r} (its fields: {', '.join(used)})")
    if kind in ("exponential", "permute-and-flip"):
        if "epsilon" not in data:
            _fail(source, f"{path}.epsilon", f"required for kind {kind!r}")
        return DefenseSpec(kind, epsilon=_number(source, f"{path}.epsilon", data["epsilon"], positive=True))
    if kind == "metric-noise":
        noise = _choice(source, f"{path}.noise", data.get("noise", "laplace"), NOISE_KINDS)
        sa = _number(source, f"{path}.scale_accuracy", data.get("scale_accuracy", 0.0), positive=False)
        sl = _number(source, f"{path}.scale_latency", data.get("scale_latency", 0.0), positive=False)
        if sa == 0 and sl == 0:
            _fail(
                source,
                path,
                "metric-noise with scale_accuracy and scale_latency both 0 changes nothing; "
                "give one > 0, or use kind: none",
            )
        return DefenseSpec(kind, noise=noise, scale_accuracy=sa, scale_latency=sl)
    return DefenseSpec()


def _defenses(source: str, data: Mapping[str, Any]) -> Mapping[str, DefenseSpec]:
    if "defense" in data and "defenses" in data:
        _fail(source, "defenses", "give either defense (every tenant) or defenses (per defense class), not both")
    if "defense" in data:
        return MappingProxyType({"default": _defense(source, "defense", data["defense"])})
    if "defenses" not in data:
        return default_defenses()
    classes = data["defenses"]
    if not isinstance(classes, Mapping) or not classes:
        _fail(source, "defenses", f"expected a mapping of defense class -> defense, with 'default'; got {classes!r}")
    for name in classes:
        if not isinstance(name, str) or not _DEFENSE_CLASS.fullmatch(name):
            _fail(source, f"defenses.{name}", f"expected a defense class name (1-32 of a-z 0-9 _ -), got {name!r}")
    if "default" not in classes:
        _fail(source, "defenses", "needs a 'default' class (it serves tenants of every class not named here)")
    return MappingProxyType({name: _defense(source, f"defenses.{name}", classes[name]) for name in sorted(classes)})


def parse_zoo_spec(name: str, data: Any, *, source: str) -> ZooSpec:
    """Validate the parsed YAML ``data`` of zoo ``name``; errors name ``source`` and the field."""
    if data is None:
        _fail(source, "", f"empty file; required: {', '.join(_REQUIRED)}")
    if not isinstance(data, Mapping):
        _fail(source, "", f"expected a mapping of {', '.join(_KEYS)}, got {type(data).__name__}")
    for key in data:
        if key not in _KEYS:
            _unknown_key(source, "", key, _KEYS)
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
        defenses=_defenses(source, data),
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
