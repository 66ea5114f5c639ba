"""Output hardening: answer with less than the model knows, so copying it costs more.

An extraction attacker trains a copy on the server's answers; full probability vectors
are the richest training signal (soft labels, and through them gradients). Hardening
rewrites a classifier's probability output on the way out, per row, without ever
changing the top-1 class a client sees (the answer's accuracy stays the model's):

``label_only``
    Drop the probabilities. If the response carries the label output
    (``label_output``), the probabilities output is removed and the label is the only
    answer. If it does not (the model has no label output, ``label_output: null``, or
    the label was not among the outputs handed in), the probabilities output is
    replaced by a one-hot row of its argmax, same name, shape and dtype: client code
    that reads ``probabilities`` keeps working and learns only the label. Excludes
    the other modes (there is nothing left to perturb).
``reverse_sigmoid`` (Lee et al., IEEE S&P Workshops 2019)
    ``y' = normalise(max(0, y - beta * (sigmoid(gamma * logit(y)) - 1/2)))`` with
    ``logit`` taken on ``y`` clipped to ``[1e-7, 1 - 1e-7]``. For ``beta * gamma > 1``
    the map is not monotone around 1/2, so it can reorder classes; that is the point
    (the soft labels and their gradients mislead a copy), but the top-1 must not move:
    a row whose argmax moved gets its original argmax's and the new argmax's values
    swapped (the row keeps the same multiset of values and its sum), then a remaining
    exact tie with an earlier index is broken by raising the top value one ulp.
    Deterministic on purpose: the same query gets the same answer, so an attacker
    cannot average the perturbation away by repeating it.
``top_k``
    Keep the ``k`` largest probabilities of each row, zero the others, and divide by
    the kept sum (``renormalize: true``, the default) or leave the kept values as they
    are. Ties at the k-th place go to the lower class index, the way ``argmax`` breaks
    them, so the top-1 class is always among the kept ones.
``round``
    Quantise to ``decimals`` places with the largest-remainder method: each value is
    floored to a multiple of ``10**-decimals`` and the units still missing from the
    row's (rounded) total go to the largest remainders. Every value is within one unit
    of its probability, and a row that summed to 1 sums to exactly 1 in units. The
    method is monotone (a larger probability never gets fewer units), so rounding can
    create a tie with the top-1 but never overtake it; a tie with an earlier class
    index (which ``argmax`` would pick) is broken by moving one unit from that class
    to the top-1 class. ``decimals: 0`` of a normalised row is the one-hot argmax.

Order when combined: ``reverse_sigmoid`` → ``top_k`` → ``round``. The perturbation runs
on the full distribution (it lifts small probabilities, so it would undo top-k's zeros
if it ran later), top-k truncates the perturbed row, and rounding comes last so what the
client reads has exactly the configured decimals. The top-1 is checked after every step
and once more after the cast back to the output's dtype (a float32 cast can merge two
float64 values into a tie).

Outputs: ``probabilities_output`` (default ``probabilities``) is a float tensor whose last
axis is the class axis (at least 2 classes); every other axis is a row, so ``[batch,
classes]`` hardens each batch row. Other outputs pass through untouched, including the
label (the model's own argmax, which hardening never changes). Outputs the model did not
return (e.g. a client asked for the label only) are not invented. Everything is
vectorised numpy over the whole batch: no Python loop runs per row.

Configured in a model's ``config.yaml`` (the lead places the block)::

    hardening:
      top_k: 3                 # int >= 1, or null
      renormalize: true        # only with top_k
      round: 2                 # decimals 0..12, or null
      reverse_sigmoid: {beta: 1.0, gamma: 0.1}
      label_only: false        # true excludes top_k, round, reverse_sigmoid
      probabilities_output: probabilities
      label_output: label      # or null: label_only then answers a one-hot
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from bastion.core.errors import InternalError, InvalidInput
from bastion.core.metadata import TensorSpec

__all__ = ["HardeningSpec", "ReverseSigmoid", "check_against", "harden", "parse_hardening"]

_KEYS = (
    "label_only",
    "top_k",
    "renormalize",
    "round",
    "reverse_sigmoid",
    "probabilities_output",
    "label_output",
)
_RS_KEYS = ("beta", "gamma")
# 10**12 units are still exact integers in float64 with room for a row's sum; past float64's
# ~15 significant digits more decimals would only round noise.
_MAX_DECIMALS = 12
_CLIP = 1e-7  # keeps logit(y) finite for y in {0, 1}
_FLOAT_TYPES = ("FP16", "FP32", "FP64")


@dataclass(frozen=True, slots=True)
class ReverseSigmoid:
    """Lee et al.'s perturbation strength ``beta`` and sigmoid slope ``gamma`` (both > 0)."""

    beta: float = 1.0
    gamma: float = 0.1


@dataclass(frozen=True, slots=True)
class HardeningSpec:
    """What to strip from a classifier's answer. The default hardens nothing."""

    label_only: bool = False
    top_k: int | None = None
    renormalize: bool = True
    round: int | None = None
    reverse_sigmoid: ReverseSigmoid | None = None
    probabilities_output: str = "probabilities"
    label_output: str | None = "label"

    @property
    def enabled(self) -> bool:
        return self.label_only or self.top_k is not None or self.round is not None or self.reverse_sigmoid is not None


# --------------------------------------------------------------------------- parsing


def _fail(where: str, key: str, message: str) -> NoReturn:
    raise InvalidInput(f"{where}.{key}: {message}" if key else f"{where}: {message}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"


def _check_keys(where: str, path: str, value: Any, keys: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(where, path, f"expected a mapping of {', '.join(keys)}, got {_show(value)}")
    for key in value:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            name = f"{path}.{key}" if path else str(key)
            _fail(where, name, f"unknown key; {hint}expected one of {', '.join(keys)}")
    return value


def _boolean(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(where, key, f"expected true or false, got {_show(value)}")
    return value


def _integer(where: str, key: str, value: Any, lo: int, hi: int | None = None) -> int:
    # bool is an int in Python; "top_k: yes" is a mistake, not 1
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        _fail(where, key, f"expected an integer {bound}, got {_show(value)}")
    return value


def _positive(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        _fail(where, key, f"expected a finite number > 0, got {_show(value)}")
    return float(value)


def _name(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        _fail(where, key, f"expected an output name, got {_show(value)}")
    return value


def parse_hardening(mapping: Any, where: str) -> HardeningSpec:
    """Validate a parsed YAML/JSON ``hardening`` block strictly (unknown keys are errors).

    ``where`` prefixes every message, e.g. ``"digits/config.yaml: hardening"`` gives
    ``digits/config.yaml: hardening.top_k: expected an integer >= 1, got int 0``.
    """
    data = _check_keys(where, "", mapping, _KEYS)
    label_only = _boolean(where, "label_only", data.get("label_only", False))
    top_k = data.get("top_k")
    if top_k is not None:
        top_k = _integer(where, "top_k", top_k, 1)
    if "renormalize" in data and top_k is None:
        _fail(where, "renormalize", "only applies with top_k; set top_k or remove renormalize")
    renormalize = _boolean(where, "renormalize", data.get("renormalize", True))
    decimals = data.get("round")
    if decimals is not None:
        decimals = _integer(where, "round", decimals, 0, _MAX_DECIMALS)
    rs = data.get("reverse_sigmoid")
    reverse = None
    if rs is not None:
        rs = _check_keys(where, "reverse_sigmoid", rs, _RS_KEYS)
        defaults = ReverseSigmoid()
        reverse = ReverseSigmoid(
            beta=_positive(where, "reverse_sigmoid.beta", rs.get("beta", defaults.beta)),
            gamma=_positive(where, "reverse_sigmoid.gamma", rs.get("gamma", defaults.gamma)),
        )
    if label_only:
        others = [k for k, v in (("top_k", top_k), ("round", decimals), ("reverse_sigmoid", reverse)) if v is not None]
        if others:
            _fail(where, "label_only", f"answers no probabilities, so {', '.join(others)} cannot apply; drop one")
    probabilities = _name(where, "probabilities_output", data.get("probabilities_output", "probabilities"))
    label = data.get("label_output", "label")
    if label is not None:
        label = _name(where, "label_output", label)
        if label == probabilities:
            _fail(where, "label_output", f"must differ from probabilities_output ({probabilities!r})")
    return HardeningSpec(
        label_only=label_only,
        top_k=top_k,
        renormalize=renormalize,
        round=decimals,
        reverse_sigmoid=reverse,
        probabilities_output=probabilities,
        label_output=label,
    )


def check_against(spec: HardeningSpec, outputs: Iterable[str | TensorSpec], *, where: str = "hardening") -> None:
    """Refuse a spec that names outputs the model does not have (bind time, not per request).

    ``outputs`` are the model's output names or, better, its ``TensorSpec`` s: with specs
    the probabilities output must also be a float tensor with a class axis of >= 2.
    """
    if not spec.enabled:
        return
    specs: dict[str, TensorSpec | None] = {}
    for item in outputs:
        if isinstance(item, TensorSpec):
            specs[item.name] = item
        else:
            specs[item] = None
    available = ", ".join(sorted(specs)) or "none"
    prob = spec.probabilities_output
    if prob not in specs:
        _fail(where, "probabilities_output", f"{prob!r} is not an output of the model; outputs: {available}")
    if spec.label_only and spec.label_output is not None and spec.label_output not in specs:
        _fail(
            where,
            "label_output",
            f"{spec.label_output!r} is not an output of the model (outputs: {available}); set label_output: null "
            f"to answer a one-hot of the argmax in {prob!r} instead",
        )
    ts = specs[prob]
    if ts is not None:
        if ts.datatype not in _FLOAT_TYPES:
            _fail(where, "probabilities_output", f"{prob!r} is {ts.datatype}; hardening needs FP16, FP32 or FP64")
        if not ts.shape or (ts.shape[-1] != -1 and ts.shape[-1] < 2):
            _fail(
                where,
                "probabilities_output",
                f"{prob!r} has shape {list(ts.shape)}; hardening needs a last (class) axis of at least 2",
            )


def served_outputs(outputs: Iterable[TensorSpec], spec: HardeningSpec | None) -> tuple[TensorSpec, ...]:
    """The output signature a hardened model publishes: label-only answers drop the
    probabilities when the model has a label output, and the signature says so too."""
    outputs = tuple(outputs)
    if spec is not None and spec.label_only and any(t.name == spec.label_output for t in outputs):
        return tuple(t for t in outputs if t.name != spec.probabilities_output)
    return outputs


# --------------------------------------------------------------------------- hardening


def harden(
    outputs: dict[str, np.ndarray], spec: HardeningSpec, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Return a new outputs mapping with the probabilities hardened; ``outputs`` is not modified.

    ``rng`` is accepted for randomised modes; every current mode is deterministic (see the
    module docstring for why) and ignores it.
    """
    del rng
    result = dict(outputs)
    name = spec.probabilities_output
    probs = outputs.get(name)
    if probs is None or not spec.enabled:
        return result
    if probs.dtype.kind != "f" or probs.ndim == 0 or probs.shape[-1] < 2:
        # a configuration mistake that check_against catches at bind time; never the client's
        raise InternalError(
            f"hardening: output {name!r} must be a float tensor with a class axis of >= 2, "
            f"got {probs.dtype} {list(probs.shape)}"
        )
    if spec.label_only:
        if spec.label_output is not None and spec.label_output in outputs:
            del result[name]
        else:
            result[name] = _one_hot(probs)
        return result
    result[name] = _harden_rows(probs, spec)
    return result


def _one_hot(probs: np.ndarray) -> np.ndarray:
    rows = probs.reshape(-1, probs.shape[-1])
    out = np.zeros_like(rows)
    if rows.size:
        out[np.arange(rows.shape[0]), rows.argmax(axis=1)] = 1
    return out.reshape(probs.shape)


def _harden_rows(probs: np.ndarray, spec: HardeningSpec) -> np.ndarray:
    rows = probs.reshape(-1, probs.shape[-1])
    if rows.shape[0] == 0:
        return probs.copy()
    top = rows.argmax(axis=1)
    y = rows.astype(np.float64)  # a copy: the model's array is never written
    # NaN from a model that allows non-finite inputs must pass through, not warn or raise
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if spec.reverse_sigmoid is not None:
            y = _reverse_sigmoid(y, spec.reverse_sigmoid.beta, spec.reverse_sigmoid.gamma)
            _keep_top1(y, top)
        if spec.top_k is not None:
            y = _top_k(y, spec.top_k, spec.renormalize)
            _keep_top1(y, top)
        if spec.round is not None:
            y = _round(y, spec.round, top)
        out = y.astype(probs.dtype, copy=False)
        _keep_top1(out, top)
    return out.reshape(probs.shape)


def _reverse_sigmoid(y: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    c = np.clip(y, _CLIP, 1.0 - _CLIP)
    logit = np.log(c) - np.log1p(-c)
    # sigmoid through tanh: no exp overflow for any gamma * logit
    s = 0.5 * np.tanh(0.5 * gamma * logit)  # = sigmoid(gamma * logit) - 1/2
    z = y - beta * s
    # a large beta can push the top value below 0; a negative "probability" is no answer
    np.maximum(z, 0.0, out=z)
    total = z.sum(axis=1, keepdims=True)
    np.divide(z, total, out=z, where=total > 0)
    return z


def _top_k(y: np.ndarray, k: int, renormalize: bool) -> np.ndarray:
    n = y.shape[1]
    out = y
    if k < n:
        # stable sort of -y: equal values keep index order, as argmax breaks ties
        keep = np.argsort(-y, axis=1, kind="stable")[:, :k]
        out = np.zeros_like(y)
        np.put_along_axis(out, keep, np.take_along_axis(y, keep, axis=1), axis=1)
    if renormalize:
        total = out.sum(axis=1, keepdims=True)
        out = np.divide(out, total, out=out.copy() if out is y else out, where=total > 0)
    return out


def _round(y: np.ndarray, decimals: int, top: np.ndarray) -> np.ndarray:
    n = y.shape[1]
    scale = 10.0**decimals
    units = y * scale
    floor = np.floor(units)
    missing = np.rint(units.sum(axis=1)) - floor.sum(axis=1)  # 0 <= missing <= n (see module doc)
    remainder = units - floor
    remainder[y <= 0] = -1.0  # a zeroed class (top-k) stays zero
    order = np.argsort(-remainder, axis=1, kind="stable")
    bump = np.zeros_like(floor)
    np.put_along_axis(bump, order, (np.arange(n)[None, :] < missing[:, None]).astype(floor.dtype), axis=1)
    floor += bump
    got = floor.argmax(axis=1)
    bad = np.flatnonzero(got != top)
    if bad.size:
        # a rounding tie with an earlier class: move one unit from it to the top-1 class
        donors = got[bad]
        can_give = floor[bad, donors] > 0
        floor[bad[can_give], donors[can_give]] -= 1.0
        floor[bad, top[bad]] += 1.0
    return floor / scale


def _keep_top1(y: np.ndarray, top: np.ndarray) -> None:
    """Make ``y.argmax(axis=1) == top`` in place: swap the two values, then break exact ties."""
    got = y.argmax(axis=1)
    bad = np.flatnonzero(got != top)
    if not bad.size:
        return
    a, b = top[bad], got[bad]
    va = y[bad, a]
    y[bad, a] = y[bad, b]
    y[bad, b] = va
    still = bad[y[bad].argmax(axis=1) != a]
    if still.size:
        y[still, top[still]] = np.nextafter(y[still].max(axis=1), np.inf, dtype=y.dtype)
