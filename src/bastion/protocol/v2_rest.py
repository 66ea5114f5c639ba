"""Open Inference Protocol (KServe V2) REST codec, with Triton's binary tensor data extension.

Pure functions between HTTP bodies and the core request/response types; no I/O.

The server half (``decode_infer_request``, ``encode_infer_response``, ``encode_error``) is on
the hot path of every REST request, so it is written for speed:

* the JSON header is parsed once with orjson;
* numeric ``data`` is converted with a single ``np.asarray(data, dtype=...)`` call, which also
  handles nested (row-major) lists; sizes and shapes are then checked on the array;
* one C-level type scan (``set(map(type, data))``) guards that call, because numpy silently
  turns ``"1.5"``, ``true`` and ``null`` into numbers and would hide client mistakes (this scan
  is the only way to catch a ``true`` among numbers: ``np.asarray`` makes it 1.0);
* integer range errors come from numpy itself (NumPy 2 raises ``OverflowError`` for a Python
  int that does not fit the dtype; an explicit check covers NumPy 1); FP16/FP32 go through
  float64 with one magnitude check, so a too-large value is an error rather than a silent inf;
* binary tensors are ``np.frombuffer`` views of the body (read-only, copied only when
  unaligned), and outputs are serialized with orjson's native numpy support.

Every client mistake ends as ``InvalidInput`` naming the field and what was expected; no
numpy or orjson exception escapes. NaN/Inf are not checked here: the data plane decides per
model.

Wire choices clients depend on:

* JSON has no NaN/Infinity. Non-finite float *outputs* sent as JSON are written as ``null``
  (tritonclient reads that back as NaN); ask for ``binary_data`` to get exact values.
* A BYTES output element that is not valid UTF-8 cannot be a JSON string. Triton copies the
  raw bytes into the JSON string, which makes the whole body invalid JSON; Bastion instead
  sends that output as binary data (with ``binary_data_size``), which binary-extension
  clients such as tritonclient read transparently and losslessly.
* The client-side ``encode_infer_request`` likewise sends non-UTF-8 BYTES and non-finite
  float inputs as binary data even when ``binary=False``, since JSON cannot carry them.
"""

from __future__ import annotations

import math
import reprlib
import struct
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from bastion.core.datatypes import DATATYPE_TO_NUMPY, MAX_DIMS, numpy_dtype
from bastion.core.errors import InternalError, InvalidInput, PayloadTooLarge
from bastion.core.limits import DEFAULT_LIMITS, RequestLimits
from bastion.core.metadata import ModelMetadata
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor, RequestedOutput
from bastion.protocol.v2_rest_fast import FAST_DEPTH, fast_request

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_ELEMENTS",
    "array_from_json",
    "check_json_depth",
    "decode_infer_request",
    "decode_infer_response",
    "decode_repository_request",
    "encode_error",
    "encode_infer_request",
    "encode_infer_response",
    "encode_model_metadata",
]

# DEFAULT_LIMITS (core/limits.py): the limits a decoder applies when its caller passes none.

DEFAULT_MAX_ELEMENTS = DEFAULT_LIMITS.max_elements
"""Total tensor elements accepted in one request (kept for callers that predate ``RequestLimits``)."""

_NUMPY2 = int(np.__version__.split(".")[0]) >= 2
_LITTLE_ENDIAN = {name: dt.newbyteorder("<") for name, dt in DATATYPE_TO_NUMPY.items()}
_NUMPY_OPTS = orjson.OPT_SERIALIZE_NUMPY
_LEN_PREFIX = struct.Struct("<I")

_FLOATS = frozenset({"FP16", "FP32", "FP64"})
_ORJSON_MAX_DEPTH = 1024


def _overflow_threshold(dtype: np.dtype) -> float:
    """The smallest magnitude that rounds to inf when narrowed to ``dtype``: its max plus half
    an ulp (``3.4028235e38``, the shortest text of the FP32 max, is above it yet rounds to it)."""
    top = np.finfo(dtype).max
    ulp = float(top) - float(np.nextafter(top, dtype.type(0)))
    return float(top) + ulp / 2


_FLOAT_LIMITS = {dt: _overflow_threshold(DATATYPE_TO_NUMPY[dt]) for dt in ("FP16", "FP32")}
_NONE = type(None)

# Python types that orjson yields and each datatype accepts, with the words used in errors.
_NUMBER_TYPES = frozenset({float, int})
_ALLOWED: dict[str, tuple[frozenset[type], str]] = {
    **{dt: (_NUMBER_TYPES, "numbers") for dt in _FLOATS},
    **{
        dt: (frozenset({int}), "integers")
        for dt in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
    },
    "BOOL": (frozenset({bool}), "true or false"),
    "BYTES": (frozenset({str}), "strings"),
}
_NULLABLE_NUMBERS = frozenset({float, int, _NONE})

_JSON_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    _NONE: "null",
}


class _Missing:
    def __repr__(self) -> str:
        return "nothing (field missing)"


_MISSING: Any = _Missing()

_short = reprlib.Repr()
_short.maxlist = 6
_short.maxdict = 4
_short.maxstring = 40
_short.maxother = 40
_short.maxlevel = 3


def _show(value: Any) -> str:
    """A short rendering of a client value for error messages (never the whole payload)."""
    if value is None:
        return "null"
    if type(value) is bool:
        return "true" if value else "false"
    return _short.repr(value)


def _expected(field: str, what: str, got: Any) -> InvalidInput:
    return InvalidInput(f"{field}: expected {what}, got {_show(got)}")


# --------------------------------------------------------------------------------------------
# Request limits
# --------------------------------------------------------------------------------------------


def _too_deep(field: str, limit: int) -> InvalidInput:
    return InvalidInput(
        f"{field}: nested deeper than max_json_depth ({limit} levels, counting the request body object as 1)"
    )


def check_json_depth(value: Any, level: int, limit: int, field: str) -> None:
    """Refuse ``value`` when its arrays/objects reach past nesting level ``limit``.

    ``value`` itself sits at ``level`` (the body's top object is level 1). Iterative, so no
    input depth can exhaust Python's stack; each container's members are type-scanned in C
    and only nested containers are visited one by one, so flat ones cost one scan.
    """
    kind = type(value)
    if kind is dict:
        members: Any = value.values()
    elif kind is list:
        members = value
    else:
        return
    if level > limit:
        raise _too_deep(field, limit)
    types = set(map(type, members))
    if list not in types and dict not in types:
        return
    stack = [(value, level)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise _too_deep(field, limit)
        members = node.values() if type(node) is dict else node
        types = set(map(type, members))
        if list in types or dict in types:
            for member in members:
                if type(member) is list or type(member) is dict:
                    stack.append((member, depth + 1))


def _check_unknown_depth(obj: dict, known: frozenset[str], level: int, limit: int, where: str) -> None:
    """Members the decoder ignores are still part of the body and bounded like the rest."""
    for key, value in obj.items():
        if key not in known:
            check_json_depth(value, level, limit, f"{where}{_show(key)}")


def _data_too_deep(label: str, json_limit: int | None) -> InvalidInput:
    if json_limit is None:
        return InvalidInput(f"{label}: data is nested deeper than {MAX_DIMS} levels")
    return InvalidInput(
        f"{label}: data is nested deeper than max_json_depth ({json_limit} levels, counting the request body object "
        "as 1)"
    )


def _string_too_long(label: str, index: int, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{label}: BYTES element {index} is {size} bytes, more than max_string_bytes ({limit})")


def _check_string_sizes(items: list[bytes], label: str, limit: int | None) -> None:
    if limit is None or not items:
        return
    if max(map(len, items)) > limit:  # in C; the index is looked for only to word the error
        index = next(i for i, item in enumerate(items) if len(item) > limit)
        raise _string_too_long(label, index, len(items[index]), limit)


# --------------------------------------------------------------------------------------------
# JSON data -> numpy
# --------------------------------------------------------------------------------------------


def _leaf_types(
    data: list, types: set[type], label: str, levels: int, json_limit: int | None, depth: int = 1
) -> set[type]:
    """Python types of the scalars of a nested list; ``types`` are those of ``data`` itself.

    ``data`` may nest ``levels`` lists deep (``json_limit`` is the body limit when that is
    what bounds it, for the error message).
    """
    if len(types) > 1:
        raise InvalidInput(f"{label}: data mixes arrays and scalars at nesting level {depth}")
    if depth >= levels:
        raise _data_too_deep(label, json_limit)
    leaves: set[type] = set()
    for row in data:
        row_types = set(map(type, row))
        if list in row_types:
            leaves |= _leaf_types(row, row_types, label, levels, json_limit, depth + 1)
        else:
            leaves |= row_types
    return leaves


def _bad_elements(label: str, datatype: str, bad: set[type], what: str) -> InvalidInput:
    names = sorted(_JSON_NAMES.get(t, t.__name__) for t in bad)
    if what == "integers" and names == ["number"]:
        got = "a non-integer number (or an integer beyond 64 bits)"
    else:
        got = " and ".join(names)
    return InvalidInput(f"{label}: datatype {datatype} expects {what}, got {got}")


def _range_text(dtype: np.dtype) -> str:
    if dtype.kind == "f":
        return f"(|x| <= {np.finfo(dtype).max})"
    info = np.iinfo(dtype)
    return f"[{info.min}, {info.max}]"


def _legacy_int_range(data: list, dtype: np.dtype, label: str, datatype: str) -> None:
    """NumPy 1 wraps out-of-range Python ints silently; NumPy 2 raises on its own."""
    flat = np.asarray(data, dtype=object).reshape(-1)
    info = np.iinfo(dtype)
    if flat.size and (min(flat) < info.min or max(flat) > info.max):
        raise InvalidInput(f"{label}: value out of range for {datatype} {_range_text(dtype)}")


def _numbers_to_array(data: list, dtype: np.dtype, datatype: str, label: str, check_overflow: bool) -> np.ndarray:
    """One numpy conversion; numpy's own errors become InvalidInput.

    FP16/FP32 go via float64 and a magnitude check before narrowing: casting a too-large value
    gives inf *and* a RuntimeWarning (an exception under ``-W error``), and this check is exact
    and cheaper than an ``np.errstate`` block. Without ``check_overflow`` (JSON that may hold
    explicit Infinity) overflow becomes inf.
    """
    try:
        if datatype in _FLOAT_LIMITS:
            wide = np.asarray(data, dtype=np.float64)
            if not check_overflow:
                with np.errstate(over="ignore"):
                    return wide.astype(dtype)
            if wide.size and np.abs(wide).max() >= _FLOAT_LIMITS[datatype]:
                raise InvalidInput(f"{label}: value out of range for {datatype} {_range_text(dtype)}")
            return wide.astype(dtype)
        if not _NUMPY2 and dtype.kind in "iu":
            _legacy_int_range(data, dtype, label, datatype)
        return np.asarray(data, dtype=dtype)
    except OverflowError:  # NumPy 2: a Python int outside the dtype; stdlib JSON: an int beyond float
        raise InvalidInput(f"{label}: value out of range for {datatype} {_range_text(dtype)}") from None
    except (ValueError, TypeError):
        raise InvalidInput(f"{label}: data is not a rectangular array (nested lists of different lengths)") from None


def _strings_to_array(data: list, label: str, nested: bool, max_string_bytes: int | None) -> np.ndarray:
    """BYTES from JSON strings: an object array of the strings' UTF-8 bytes, nesting kept."""
    if nested:
        # With dtype=object numpy keeps ragged rows as list cells instead of refusing them.
        cells = np.array(data, dtype=object)
        flat: Any = cells.reshape(-1).tolist()
        if list in set(map(type, flat)):
            raise InvalidInput(f"{label}: data is not a rectangular array (nested lists of different lengths)")
        shape = cells.shape
    else:
        flat, shape = data, (len(data),)
    try:
        items = [s.encode() for s in flat]
    except UnicodeEncodeError:
        raise InvalidInput(f"{label}: data holds a string that is not valid Unicode") from None
    _check_string_sizes(items, label, max_string_bytes)
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def array_from_json(
    data: Any,
    datatype: str,
    label: str,
    *,
    allow_null: bool = False,
    check_overflow: bool = True,
    max_json_depth: int | None = None,
    json_level: int = 0,
    max_string_bytes: int | None = None,
) -> np.ndarray:
    """Convert a JSON (possibly nested) list into an array of ``datatype``, keeping its nesting.

    ``label`` (e.g. ``input 'x'``) prefixes error messages. ``allow_null`` reads ``null`` as NaN
    for float datatypes (responses written by JSON encoders that have no NaN). ``check_overflow``
    refuses finite values too large for FP16/FP32; callers whose JSON may hold explicit
    Infinity turn it off. Shared with the TF-Serving codec.

    Request limits: ``data`` sits inside ``json_level`` levels of the body and the body may
    nest ``max_json_depth`` levels (None: only numpy's dimension limit applies); a BYTES
    element longer than ``max_string_bytes`` raises ``PayloadTooLarge``.
    """
    if type(data) is not list:
        raise _expected(f"{label}: data", "an array", data)
    levels, json_limit = MAX_DIMS, None
    if max_json_depth is not None and max_json_depth - json_level < MAX_DIMS:
        levels, json_limit = max_json_depth - json_level, max_json_depth
        if levels < 1:
            raise _data_too_deep(label, json_limit)
    types = set(map(type, data))
    nested = list in types
    if nested:
        types = _leaf_types(data, types, label, levels, json_limit)
    allowed, what = _ALLOWED[datatype]
    if allow_null and datatype in _FLOATS:
        allowed = _NULLABLE_NUMBERS
    if not types <= allowed:
        raise _bad_elements(label, datatype, types - allowed, what)
    if datatype == "BYTES":
        return _strings_to_array(data, label, nested, max_string_bytes)
    return _numbers_to_array(data, DATATYPE_TO_NUMPY[datatype], datatype, label, check_overflow)


# --------------------------------------------------------------------------------------------
# Tensor headers
# --------------------------------------------------------------------------------------------


_TENSOR_KEYS = frozenset({"name", "datatype", "shape", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})
_REQUEST_KEYS = frozenset({"inputs", "outputs", "parameters", "id"})


@dataclass(slots=True)
class _Head:
    """One tensor's JSON object, validated, before its data is converted."""

    name: str
    label: str  # "input 'x'", for error messages
    datatype: str
    shape: tuple[int, ...]
    count: int
    parameters: dict[str, Any]
    data: Any
    binary_size: int | None


def _valid_shape(shape: Any) -> bool:
    if type(shape) is not list or len(shape) > MAX_DIMS:
        return False
    for dim in shape:  # noqa: SIM110 - a plain loop is 2x faster than all() on short shapes
        if type(dim) is not int or dim < 0:
            return False
    return True


def _tensor_parameters(raw: dict, field: str, label: str) -> tuple[dict[str, Any], int | None]:
    """The tensor's parameters without the wire-only ``binary_data_size``, and that size.

    ``raw`` is freshly parsed JSON owned by the decoder, so it is edited in place.
    """
    params = raw.get("parameters")
    if params is None:
        return {}, None
    if type(params) is not dict:
        raise _expected(f"{field}.parameters", "an object", params)
    if "shared_memory_region" in params:
        raise InvalidInput(f"{label}: shared-memory tensors are not supported by this server")
    size = params.pop("binary_data_size", None)
    if size is not None and (type(size) is not int or size < 0):
        raise _expected(f"{field}.parameters.binary_data_size", "a non-negative integer", size)
    return params, size


def _parse_head(raw: Any, field: str, kind: str, max_batch: int | None, max_depth: int | None) -> _Head:
    """One tensor object; ``max_depth`` (None: unchecked) bounds its parameters and unknown keys
    (the object sits at level 3 of the body; its data is bounded when converted)."""
    if type(raw) is not dict:
        raise _expected(field, "an object", raw)
    name = raw.get("name", _MISSING)
    if type(name) is not str or not name:
        raise _expected(f"{field}.name", "a non-empty string", name)
    datatype = raw.get("datatype", _MISSING)
    if type(datatype) is not str:
        raise _expected(f"{field}.datatype", 'a datatype name such as "FP32"', datatype)
    if datatype not in DATATYPE_TO_NUMPY:
        numpy_dtype(datatype, f"{field}.datatype")
    shape = raw.get("shape", _MISSING)
    if not _valid_shape(shape):
        what = f"a list of at most {MAX_DIMS} non-negative integers"
        raise _expected(f"{field}.shape", what, shape)
    label = f"{kind} '{name}'"
    # Server-wide cap, checked before any data is converted; the model's own cap is the data plane's.
    if max_batch is not None and shape and shape[0] > max_batch:
        raise InvalidInput(
            f"{label}: batch size {shape[0]} (first dimension of shape {shape}) is more than "
            f"max_batch_size ({max_batch})"
        )
    has_params = "parameters" in raw
    params, binary_size = _tensor_parameters(raw, field, label) if has_params else ({}, None)
    data = raw.get("data", _MISSING)
    if max_depth is not None:
        if params:
            check_json_depth(params, 4, max_depth, f"{field}.parameters")
        # name, datatype and shape are present by now: counting finds unknown keys cheaply
        # (4 keys, the usual count, can hold none: one of parameters and data must be there)
        if len(raw) > 4 and len(raw) > 3 + has_params + (data is not _MISSING):
            _check_unknown_depth(raw, _TENSOR_KEYS, 4, max_depth, f"{field}.")
    if (binary_size is None) == (data is _MISSING):
        if data is _MISSING:
            raise InvalidInput(f"{label}: no data; expected 'data' or parameters.binary_data_size")
        raise InvalidInput(f"{label}: has both 'data' and parameters.binary_data_size; send one")
    return _Head(name, label, datatype, tuple(shape), math.prod(shape), params, data, binary_size)


def _parse_heads(
    raw: Any, field: str, kind: str, max_elements: int, max_batch: int | None, max_depth: int | None
) -> list[_Head]:
    if type(raw) is not list or not raw:
        raise _expected(field, "a non-empty list of tensor objects", raw)
    heads = []
    seen: set[str] = set()
    total = 0
    for i, item in enumerate(raw):
        head = _parse_head(item, f"{field}[{i}]", kind, max_batch, max_depth)
        if head.name in seen:
            raise InvalidInput(f"{field}: duplicate {kind} name '{head.name}'")
        seen.add(head.name)
        total += head.count
        if total > max_elements:
            raise InvalidInput(
                f"{field}: tensors hold more than {max_elements} elements in total, the max_elements limit "
                f"({head.label} has shape {list(head.shape)})"
            )
        heads.append(head)
    return heads


# --------------------------------------------------------------------------------------------
# Binary section -> numpy
# --------------------------------------------------------------------------------------------


def _fixed_from_buffer(buf: Any, offset: int, head: _Head) -> np.ndarray:
    """A zero-copy view of the body when aligned (numpy's keyword arguments cost more here
    than the call itself, hence positional ones)."""
    label = head.label
    datatype = head.datatype
    dtype = _LITTLE_ENDIAN[datatype]
    needed = head.count * dtype.itemsize
    if head.binary_size != needed:
        raise InvalidInput(
            f"binary_data_size of {label} is {head.binary_size} but shape {list(head.shape)} "
            f"of {datatype} needs {needed}"
        )
    if not needed:
        return np.empty(head.shape, dtype=DATATYPE_TO_NUMPY[datatype])
    if datatype == "BOOL":
        raw = np.frombuffer(buf, np.uint8, head.count, offset)
        if raw.max() > 1:
            raise InvalidInput(f"{label}: BOOL binary data must be bytes 0 or 1")
    arr = np.frombuffer(buf, dtype, head.count, offset)
    if not arr.flags.aligned or not dtype.isnative:
        arr = arr.astype(DATATYPE_TO_NUMPY[datatype])
    return arr.reshape(head.shape)


def _bytes_from_buffer(buf: Any, offset: int, head: _Head, max_string_bytes: int | None) -> np.ndarray:
    """BYTES elements: each a 4-byte little-endian length followed by that many bytes.

    ``max_string_bytes`` bounds each element's length (the prefix's value, not counting the
    prefix itself, as for a JSON string's bytes).
    """
    label = head.label
    cap = sys.maxsize if max_string_bytes is None else max_string_bytes
    if head.count * 4 > head.binary_size:  # refuse before allocating the element array
        raise InvalidInput(
            f"binary_data_size of {label} is {head.binary_size} but {head.count} BYTES elements "
            f"(shape {list(head.shape)}) need at least {head.count * 4}"
        )
    view = memoryview(buf)[offset : offset + head.binary_size]
    out = np.empty(head.count, dtype=object)
    pos, end = 0, len(view)
    for i in range(head.count):
        if pos + 4 > end:
            raise InvalidInput(
                f"{label}: binary data ends after {i} of {head.count} BYTES elements (shape {list(head.shape)})"
            )
        (length,) = _LEN_PREFIX.unpack_from(view, pos)
        pos += 4
        if pos + length > end:
            raise InvalidInput(f"{label}: BYTES element {i} declares {length} bytes past the end of its data")
        if length > cap:
            raise _string_too_long(label, i, length, cap)
        out[i] = bytes(view[pos : pos + length])
        pos += length
    if pos != end:
        raise InvalidInput(
            f"binary_data_size of {label} is {head.binary_size} but its {head.count} BYTES elements use {pos}"
        )
    return out.reshape(head.shape)


def _check_binary_section(heads: list[_Head], field: str, available: int, has_section: bool) -> None:
    """The binary section must hold exactly the bytes the tensors declare, no more, no less."""
    declared = 0
    for head in heads:
        if head.binary_size is not None:
            declared += head.binary_size
    if declared and not has_section:
        raise InvalidInput(
            f"{field} declare {declared} bytes of binary data but the body has no binary section "
            "(missing Inference-Header-Content-Length)"
        )
    if declared != available:
        raise InvalidInput(f"binary section is {available} bytes but {field} declare {declared}")


def _json_tensor(head: _Head, allow_null: bool, max_string_bytes: int | None, max_json_depth: int | None) -> np.ndarray:
    # data sits at level 4 of the body: {"inputs": [{"data": [...]}]}
    arr = array_from_json(
        head.data,
        head.datatype,
        head.label,
        allow_null=allow_null,
        max_json_depth=max_json_depth,
        json_level=3,
        max_string_bytes=max_string_bytes,
    )
    if arr.size != head.count:
        raise InvalidInput(
            f"{head.label}: data has {arr.size} elements but shape {list(head.shape)} needs {head.count}"
        )
    return arr if arr.shape == head.shape else arr.reshape(head.shape)


def _build_tensors(
    heads: list[_Head],
    field: str,
    body: Any,
    start: int,
    has_section: bool,
    allow_null: bool,
    max_string_bytes: int | None = None,
    max_json_depth: int | None = None,
) -> list[InferTensor]:
    """Convert every tensor's data; binary ones are read in order from ``body[start:]``."""
    _check_binary_section(heads, field, len(body) - start, has_section)
    tensors = []
    offset = start
    for head in heads:
        if head.binary_size is None:
            arr = _json_tensor(head, allow_null, max_string_bytes, max_json_depth)
        else:
            if head.datatype == "BYTES":
                arr = _bytes_from_buffer(body, offset, head, max_string_bytes)
            else:
                arr = _fixed_from_buffer(body, offset, head)
            offset += head.binary_size
        tensors.append(InferTensor(head.name, head.datatype, head.shape, arr, head.parameters))
    return tensors


# --------------------------------------------------------------------------------------------
# Envelope
# --------------------------------------------------------------------------------------------


def _split_body(body: Any, header_length: int | None) -> tuple[Any, int]:
    """The JSON header and the offset where the binary section starts."""
    if header_length is None:
        return body, len(body)
    if type(header_length) is not int or header_length < 0:
        raise InvalidInput(f"Inference-Header-Content-Length: expected a non-negative integer, got {header_length!r}")
    if header_length > len(body):
        raise InvalidInput(f"Inference-Header-Content-Length is {header_length} but the body is only {len(body)} bytes")
    return body[:header_length], header_length


def _load_object(header: Any, what: str, max_json_depth: int | None = None) -> dict:
    try:
        obj = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        # orjson stops at 1024 levels on its own; a smaller configured limit is the one to name
        if max_json_depth is not None and max_json_depth < _ORJSON_MAX_DEPTH and "depth limit" in str(exc):
            raise _too_deep(what, max_json_depth) from None
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise _expected(what, "a JSON object", obj)
    return obj


def _optional_str(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and type(value) is not str:
        raise _expected(key, "a string", value)
    return value


def _parameters(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if type(value) is not dict:
        raise _expected(field, "an object", value)
    return value


def _check_bool_param(params: dict, key: str, field: str) -> None:
    value = params.get(key)
    if value is not None and type(value) is not bool:
        raise _expected(f"{field}.{key}", "true or false", value)


def _requested_outputs(raw: Any, max_depth: int) -> list[RequestedOutput] | None:
    """The requested outputs; each object sits at level 3 of the body, its parameters at 4."""
    if raw is None:
        return None
    if type(raw) is not list:
        raise _expected("outputs", "a list of objects", raw)
    outputs = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        field = f"outputs[{i}]"  # named in errors only
        if type(item) is not dict:
            raise _expected(field, "an object", item)
        name = item.get("name", _MISSING)
        if type(name) is not str or not name:
            raise _expected(f"{field}.name", "a non-empty string", name)
        if name in seen:
            raise InvalidInput(f"outputs: duplicate output name '{name}'")
        seen.add(name)
        params = item.get("parameters")
        known = 1  # the name; counting finds unknown keys (null parameters only cost a needless look)
        if params is None:
            params = {}
        elif type(params) is not dict:
            raise _expected(f"{field}.parameters", "an object", params)
        else:
            known = 2
            _check_bool_param(params, "binary_data", f"{field}.parameters")
            if len(params) > 1 or "binary_data" not in params:  # tritonclient's usual one is flat
                check_json_depth(params, 4, max_depth, f"{field}.parameters")
        if len(item) > known:
            _check_unknown_depth(item, _OUTPUT_KEYS, 4, max_depth, f"{field}.")
        outputs.append(RequestedOutput(name, params))
    return outputs


def decode_infer_request(
    body: bytes,
    model_name: str,
    model_version: str | None,
    header_length: int | None = None,
    *,
    limits: RequestLimits = DEFAULT_LIMITS,
    max_elements: int | None = None,
) -> InferenceRequest:
    """Parse a V2 REST inference request body into an ``InferenceRequest``.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (None: the whole body
    is JSON); binary tensors follow the JSON in input order. The model name and version come
    from the URL. Tensors are arrays of their datatype's dtype in their declared shape; binary
    ones may be read-only views of ``body``. Raises ``InvalidInput`` for any malformed or
    inconsistent request.

    ``limits`` bounds the request's shape: ``max_elements`` over all inputs,
    ``max_batch_size`` for every input's first dimension and ``max_json_depth`` (all
    ``InvalidInput``), ``max_string_bytes`` per BYTES element (``PayloadTooLarge``). The body
    size is the transport's. ``max_elements``, when given, overrides ``limits.max_elements``
    (the older spelling).
    """
    if max_elements is None:
        max_elements = limits.max_elements
    max_depth = limits.max_json_depth
    header, start = _split_body(body, header_length)
    obj = _load_object(header, "request body", max_depth)
    if header_length is None and max_depth >= FAST_DEPTH:
        fast = fast_request(obj, header, model_name, model_version, max_elements, limits.max_batch_size)
        if fast is not None:
            return fast
    raw_inputs = obj.get("inputs", _MISSING)
    raw_parameters = obj.get("parameters")
    raw_outputs = obj.get("outputs")
    request_id = obj.get("id")
    if max_depth < FAST_DEPTH:
        # Limits this small are never practical; walking everything keeps the checks below
        # free to assume the fixed levels of a request's skeleton (4 deep) are allowed.
        check_json_depth(obj, 1, max_depth, "request body")
    # counting the known keys finds unknown ones cheaper than a set comparison (a known key
    # set to null counts as unknown, which only costs a needless look; a lone key is either
    # "inputs" or refused below for the missing inputs)
    elif len(obj) > 1 and len(obj) > (raw_inputs is not _MISSING) + (raw_parameters is not None) + (
        raw_outputs is not None
    ) + (request_id is not None):
        _check_unknown_depth(obj, _REQUEST_KEYS, 2, max_depth, "request body field ")
    heads = _parse_heads(raw_inputs, "inputs", "input", max_elements, limits.max_batch_size, max_depth)
    parameters = _parameters(raw_parameters, "parameters")
    if parameters:
        _check_bool_param(parameters, "binary_data_output", "parameters")
        check_json_depth(parameters, 2, max_depth, "parameters")
    if request_id is not None and type(request_id) is not str:
        raise _expected("id", "a string", request_id)
    outputs = _requested_outputs(raw_outputs, max_depth)
    inputs = _build_tensors(
        heads, "inputs", body, start, header_length is not None, False, limits.max_string_bytes, max_depth
    )
    return InferenceRequest(model_name, model_version, inputs, request_id, outputs, parameters)


def decode_infer_response(
    body: bytes, header_length: int | None, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> InferenceResponse:
    """Client side: parse a V2 REST inference response (JSON and/or binary outputs).

    ``null`` in float JSON data is read as NaN, since JSON encoders write non-finite values so.
    """
    header, start = _split_body(body, header_length)
    obj = _load_object(header, "response body")
    model_name = obj.get("model_name", _MISSING)
    if type(model_name) is not str:
        raise _expected("model_name", "a string", model_name)
    model_version = _optional_str(obj, "model_version")
    heads = _parse_heads(obj.get("outputs", _MISSING), "outputs", "output", max_elements, None, None)
    outputs = _build_tensors(heads, "outputs", body, start, header_length is not None, True)
    parameters = _parameters(obj.get("parameters"), "parameters")
    return InferenceResponse(model_name, model_version, outputs, _optional_str(obj, "id"), parameters)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _bytes_items(arr: np.ndarray) -> list[bytes]:
    """BYTES elements as ``bytes``; ``str`` is UTF-8 encoded, anything else via ``str()``."""
    items = []
    for item in arr.reshape(-1).tolist():
        if isinstance(item, bytes):
            items.append(item)
        elif isinstance(item, str):
            items.append(item.encode())
        else:
            items.append(str(item).encode())
    return items


def _serialize_bytes(items: list[bytes]) -> bytes:
    parts = []
    for item in items:
        parts.append(_LEN_PREFIX.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def _typed(tensor: InferTensor) -> np.ndarray:
    """The tensor's data as a native array of its declared datatype (no copy when it already is)."""
    arr = np.asarray(tensor.data)
    if tensor.datatype == "BYTES":
        return arr
    dtype = DATATYPE_TO_NUMPY.get(tensor.datatype)
    if dtype is None:  # the server built this tensor: a bug, not a client mistake
        raise InternalError(f"tensor '{tensor.name}' has unsupported datatype {tensor.datatype!r}")
    return arr if arr.dtype == dtype else arr.astype(dtype)


def _bytes_payload(arr: np.ndarray, binary: bool) -> tuple[list[str] | None, bytes | None]:
    """JSON strings, or the binary encoding when asked for or when an element is not UTF-8."""
    items = _bytes_items(arr)
    if not binary:
        try:
            return [item.decode() for item in items], None
        except UnicodeDecodeError:
            pass
    return None, _serialize_bytes(items)


def _fixed_payload(
    arr: np.ndarray, datatype: str, binary: bool, finite_json: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Flat JSON data (orjson writes the array natively) or little-endian binary data."""
    if not binary and finite_json and datatype in _FLOATS and not np.isfinite(arr).all():
        binary = True
    if binary:
        return None, np.ascontiguousarray(arr, dtype=_LITTLE_ENDIAN[datatype]).ravel()
    return arr.ravel(), None  # ravel, unlike reshape, always yields a contiguous array


def _encode_tensor(tensor: InferTensor, binary: bool, finite_json: bool) -> tuple[dict, Any]:
    """The tensor's JSON object and, when it goes binary, its bytes (else None).

    BYTES that are not UTF-8 go binary regardless; so do non-finite floats when
    ``finite_json`` is set (client requests, which the server would refuse as null).
    """
    arr = _typed(tensor)
    if tensor.datatype == "BYTES":
        data, chunk = _bytes_payload(arr, binary)
    else:
        data, chunk = _fixed_payload(arr, tensor.datatype, binary, finite_json)
    entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": arr.shape}
    params = tensor.parameters
    if chunk is not None:
        params = {**params, "binary_data_size": len(chunk) if type(chunk) is bytes else chunk.nbytes}
    if params:
        entry["parameters"] = params
    if data is not None:
        entry["data"] = data
    return entry, chunk


def _assemble(head: dict, chunks: list[Any]) -> tuple[bytes, int | None]:
    header = orjson.dumps(head, option=_NUMPY_OPTS)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _binary_outputs(request: InferenceRequest) -> tuple[bool, dict[str, bool]]:
    """The request-level default and the per-output overrides of ``binary_data``."""
    default = request.parameters.get("binary_data_output") is True
    overrides: dict[str, bool] = {}
    for out in request.outputs or ():
        flag = out.parameters.get("binary_data")
        if type(flag) is bool:
            overrides[out.name] = flag
    return default, overrides


def encode_infer_response(response: InferenceResponse, request: InferenceRequest) -> tuple[bytes, int | None]:
    """Serialize a response as the V2 REST body: ``(body, json_header_length)``.

    An output is binary when its requested output says ``binary_data: true``, or the request
    says ``binary_data_output: true`` and the output's own request does not say false. The
    header length is None when nothing is binary (the body is then plain JSON); otherwise the
    transport sends it as ``Inference-Header-Content-Length``. Outputs are encoded as given:
    filtering to the requested ones is the data plane's job.
    """
    default, overrides = _binary_outputs(request)
    entries = []
    chunks = []
    for tensor in response.outputs:
        entry, chunk = _encode_tensor(tensor, overrides.get(tensor.name, default), False)
        entries.append(entry)
        if chunk is not None:
            chunks.append(chunk)
    head: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        head["model_version"] = response.model_version
    request_id = response.id if response.id is not None else request.id
    if request_id is not None:
        head["id"] = request_id
    if response.parameters:
        head["parameters"] = response.parameters
    head["outputs"] = entries
    return _assemble(head, chunks)


def encode_infer_request(request: InferenceRequest, binary: bool) -> tuple[bytes, int | None]:
    """Client side: serialize a request as the V2 REST body: ``(body, json_header_length)``.

    ``binary`` sends every input as binary data; without it inputs are JSON except those JSON
    cannot carry (non-UTF-8 BYTES, non-finite floats). Binary *outputs* are asked for through
    ``request.parameters['binary_data_output']`` or each requested output's ``binary_data``.
    """
    entries = []
    chunks = []
    for tensor in request.inputs:
        entry, chunk = _encode_tensor(tensor, binary, True)
        entries.append(entry)
        if chunk is not None:
            chunks.append(chunk)
    head: dict[str, Any] = {}
    if request.id is not None:
        head["id"] = request.id
    if request.parameters:
        head["parameters"] = request.parameters
    head["inputs"] = entries
    if request.outputs is not None:
        head["outputs"] = [
            {"name": out.name, "parameters": out.parameters} if out.parameters else {"name": out.name}
            for out in request.outputs
        ]
    return _assemble(head, chunks)


def encode_model_metadata(metadata: ModelMetadata) -> bytes:
    """V2 model metadata JSON; a model that is not serving also says its state and why."""
    doc = metadata.as_dict()
    if metadata.state:
        doc["state"] = metadata.state
        doc["reason"] = metadata.reason
    return orjson.dumps(doc)


def decode_repository_request(body: bytes) -> dict[str, Any]:
    """The ``parameters`` of a repository load/unload request body (``{}`` or empty: none).
    Which parameters an action takes is the data plane's rule, as on gRPC."""
    if not body.strip():
        return {}
    doc = _load_object(body, "request body")
    unknown = sorted(set(doc) - {"parameters"})
    if unknown:
        raise InvalidInput(f"request body: unknown field(s) {', '.join(unknown)}; expected 'parameters'")
    return _parameters(doc.get("parameters"), "parameters")


def encode_error(message: str) -> bytes:
    """The V2 error body ``{"error": message}``."""
    return orjson.dumps({"error": message})
