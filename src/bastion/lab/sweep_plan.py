"""The sweep's plan and the experimenter's copy of the repository: one tenant defense class
per (defense, strength) point, written into the copy's ``zoo.yaml``, and the output
hardening settings written into every variant's ``config.yaml``.

Pure except :func:`prepare_copy` and :func:`apply_hardening`, which write the work copy
(never the repository they were given); the server reads both files as usual, which is
why the lab can run the experiment without importing any server code.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "BASELINE",
    "DEFAULT_HARDENING",
    "DEFAULT_STRENGTHS",
    "KIND_PREFIX",
    "NOISE_LATENCY_RATIO",
    "NO_HARDENING",
    "QUICK_STRENGTHS",
    "HardeningSetting",
    "SweepPoint",
    "apply_hardening",
    "class_name",
    "defense_block",
    "parse_hardening_setting",
    "plan_points",
    "prepare_copy",
    "rewrite_model_config",
    "rewrite_zoo_yaml",
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


# ---- the plan ------------------------------------------------------------------------------------
def _strength_text(strength: float) -> str:
    # a class name is [a-z0-9_-]{1,32} (the key store's rule): 0.5 -> 0p5, 1e+06 -> 1e06
    return f"{strength:g}".replace(".", "p").replace("+", "")


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
    """One point of the sweep: the tenants measured at it are moved into ``defense_class``,
    whose ``zoo.yaml`` defense is ``spec``."""

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

