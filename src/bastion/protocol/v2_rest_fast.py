"""The V2 REST decoder's fast path: the request shape nearly every client sends, decoded in
one pass (``fast_request``); anything else goes to the full decoder in ``v2_rest``, which
also words every error. The two must agree exactly (``tests/protocol/test_v2_rest_fast_path.py``).
"""

from __future__ import annotations

import array
from typing import Any

import numpy as np

from bastion.core.datatypes import DATATYPE_TO_NUMPY, MAX_DIMS
from bastion.core.tensors import InferenceRequest, InferTensor, RequestedOutput

_NUMBERS = frozenset({float, int})  # what orjson yields for a JSON number

# The request shape nearly every client sends: JSON only, inputs of exactly name/datatype/
# shape/data with flat numeric data, nothing else but an id. ``fast_request`` decodes it in
# one pass; anything else, and anything it finds wrong, goes through the full decoder,
# which also words the error. Float types wider than the check below are left out: FP16's
# range check and BOOL/BYTES conversions stay on the full path.
_FAST_KEYS = frozenset({"name", "datatype", "shape", "data"})
_FAST_TOP = frozenset({"inputs", "id", "outputs"})  # "inputs" required, the others optional
_FAST_TYPES: dict[str, tuple[np.dtype, frozenset[type], str]] = {
    # (dtype, the JSON value types allowed, the array module typecode that converts them)
    "FP32": (DATATYPE_TO_NUMPY["FP32"], _NUMBERS, "d"),
    "FP64": (DATATYPE_TO_NUMPY["FP64"], _NUMBERS, "d"),
    "INT32": (DATATYPE_TO_NUMPY["INT32"], frozenset({int}), "i"),
    "INT64": (DATATYPE_TO_NUMPY["INT64"], frozenset({int}), "q"),
}
# Every body the fast path accepts nests exactly this deep ({"inputs": [{"data": [1.0]}]}:
# keys and types are checked exactly and data must be flat), so max_json_depth costs it one
# comparison per request instead of a walk.
FAST_DEPTH = 4


def fast_request(
    obj: dict, text: Any, model_name: str, model_version: str | None, max_elements: int, max_batch: int | None
) -> InferenceRequest | None:
    """``obj``, parsed from the JSON ``text``, as a request; or None to leave it to the full
    decoder."""
    keys = obj.keys()
    if not keys <= _FAST_TOP or "inputs" not in keys:  # a view compared in place: no set built
        return None
    outputs = None
    raw_outputs = obj.get("outputs")
    if raw_outputs is not None:
        # outputs asked for by name only ({"name": "probabilities"}); with parameters, the full path
        if type(raw_outputs) is not list or not raw_outputs:
            return None
        names_out = []
        for item in raw_outputs:
            if type(item) is not dict or len(item) != 1 or type(item.get("name")) is not str or not item["name"]:
                return None
            names_out.append(item["name"])
        if len(set(names_out)) != len(names_out):
            return None
        outputs = [RequestedOutput(name, {}) for name in names_out]
    request_id = obj.get("id")
    raw_inputs = obj["inputs"]
    if (request_id is not None and type(request_id) is not str) or type(raw_inputs) is not list or not raw_inputs:
        return None
    tensors = []
    names = set()
    total = 0
    no_booleans: bool | None = None
    for item in raw_inputs:
        if type(item) is not dict or item.keys() != _FAST_KEYS:
            return None
        name, datatype, shape, data = item["name"], item["datatype"], item["shape"], item["data"]
        if type(datatype) is not str or type(name) is not str or not name or name in names:
            return None
        fast = _FAST_TYPES.get(datatype)
        if fast is None or type(shape) is not list:
            return None
        if type(data) is not list or len(shape) > MAX_DIMS:
            return None
        count = 1
        for d in shape:
            if type(d) is not int or d < 0:
                return None
            count *= d
        total += count
        if count != len(data) or total > max_elements:
            return None
        if max_batch is not None and shape and shape[0] > max_batch:
            return None
        dtype = fast[0]
        if no_booleans is None:  # once per request, and only when numbers are to be converted
            no_booleans = type(text) is bytes and not has_json_boolean(text)
        try:
            if no_booleans:
                # Python's array module converts and type-checks in one C loop: a str, None,
                # list or object raises TypeError, an int beyond the type OverflowError (a
                # float in an integer type TypeError). A bool would pass as 0/1, but the
                # text has none. About half of np.array's cost plus the type census below.
                arr = np.frombuffer(array.array(fast[2], data), fast[2])
                if datatype == "FP32":
                    with np.errstate(over="ignore"):
                        arr = arr.astype(dtype)
            else:
                if not set(map(type, data)) <= fast[1]:
                    return None
                with np.errstate(over="ignore"):
                    arr = np.array(data, dtype)
            if datatype == "FP32" and not np.isfinite(arr).all():
                # values at or past FP32's rounding threshold became inf in the cast; one
                # vectorised check after it is ~100x cheaper than Python's max/min over the
                # list (the full decoder words that error)
                return None
        except (OverflowError, ValueError, TypeError):
            return None
        names.add(name)
        # orjson yields no NaN/Inf and FP32 was range-checked: float data here is finite
        tensors.append(InferTensor(name, datatype, tuple(shape), arr.reshape(shape), {}, True))
    return InferenceRequest(model_name, model_version, tensors, request_id, outputs, {})


def has_json_boolean(text: bytes) -> bool:
    """Whether ``true`` or ``false`` occurs anywhere in ``text`` (also inside strings: then
    the caller takes the slower path, never a wrong one).

    A substring search runs at ~1.6 GB/s here (11 µs for a 64-row body, twice); a single
    byte is found with memchr at ~70 GB/s. Numbers never hold a ``u`` or an ``l``, and a
    plain request has only a few (``inputs``, ``outputs``), so each is checked in place.
    Text with many of them goes to the substring search after a few looks: the Python
    loop must not grow with what a client sends."""
    for letter, word in ((b"u", b"true"), (b"l", b"false")):
        i = text.find(letter)
        looks = 0
        while i != -1:
            if text.startswith(word, i - 2):  # u and l are the third letter of their word
                return True
            looks += 1
            if looks > 16:
                if word in text:
                    return True
                break
            i = text.find(letter, i + 1)
    return False
