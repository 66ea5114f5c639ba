"""TensorFlow Serving REST compatibility codec (``/v1/models/...:predict`` and model status).

Pure functions, no I/O. TF-Serving clients send JSON without datatypes or shapes, so the
model's signature (``ModelMetadata``) supplies each input's datatype and the nesting of the
JSON supplies its shape:

* row format ``{"instances": [...]}``: one entry per batch row; for a single-input model each
  entry is that input's value, otherwise an object mapping input names to values. The batch
  dimension is the number of instances, and every instance must agree in shape.
* columnar format ``{"inputs": ...}``: a single-input model may send the value itself (or
  ``{name: value}``); several inputs are an object mapping names to values.

``{"b64": "..."}`` objects carry binary strings for BYTES tensors, in requests and responses
(an output is base64-encoded when it is not valid UTF-8 or, as in TF-Serving, its name ends in
``_bytes``). TF-Serving's JSON allows the ``NaN``/``Infinity`` tokens: a body that orjson refuses
and that contains them is re-read with the standard library parser, and non-finite float
outputs are written with those tokens as TF-Serving does.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson

from bastion.core.datatypes import DATATYPE_TO_NUMPY, MAX_DIMS
from bastion.core.errors import InvalidInput, PayloadTooLarge
from bastion.core.limits import DEFAULT_LIMITS, RequestLimits
from bastion.core.metadata import ModelMetadata, TensorSpec, VersionStatus
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor
from bastion.protocol.v2_rest import array_from_json, check_json_depth

__all__ = [
    "DEFAULT_SIGNATURE",
    "decode_predict_request",
    "encode_model_status",
    "encode_predict_response",
]

DEFAULT_SIGNATURE = "serving_default"
_NUMPY_OPTS = orjson.OPT_SERIALIZE_NUMPY
_FLOAT_KINDS = "fc"
_ORJSON_MAX_DEPTH = 1024
_REQUEST_KEYS = frozenset({"instances", "inputs", "signature_name"})
# {"instances": [{"name": [...]}]}: the deepest skeleton around the input values. Smaller
# depth limits get a walk of the whole body, so the checks below can take these as allowed.
_SKELETON_DEPTH = 3


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, (list, dict)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _is_b64(value: Any) -> bool:
    return type(value) is dict and len(value) == 1 and "b64" in value


# --------------------------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------------------------


def _too_deep(limit: int, what: str = "request body:") -> InvalidInput:
    return InvalidInput(
        f"{what} nested deeper than max_json_depth ({limit} levels, counting the request body object as 1)"
    )


def _load(body: bytes, max_depth: int) -> tuple[dict, bool]:
    """The body's JSON object, and whether it may hold explicit NaN/Infinity."""
    try:
        obj, extended = orjson.loads(body), False
    except orjson.JSONDecodeError as exc:
        if b"NaN" not in body and b"Infinity" not in body:
            # orjson stops at 1024 levels on its own; a smaller configured limit is the one to name
            if max_depth < _ORJSON_MAX_DEPTH and "depth limit" in str(exc):
                raise _too_deep(max_depth) from None
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        try:
            obj, extended = json.loads(body), True
        except (ValueError, RecursionError) as exc2:
            raise InvalidInput(f"request body is not valid JSON: {exc2}") from None
    if type(obj) is not dict:
        raise InvalidInput(f"request body: expected a JSON object, got {_show(obj)}")
    return obj, extended


def _check_signature(obj: dict) -> None:
    name = obj.get("signature_name")
    if name is None or name == DEFAULT_SIGNATURE:
        return
    if type(name) is not str:
        raise InvalidInput(f"signature_name: expected a string, got {_show(name)}")
    raise InvalidInput(f"signature_name: unknown signature '{name}'; this model has '{DEFAULT_SIGNATURE}'")


def _names(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(spec.name for spec in specs)


def _check_known(names: Any, specs: dict[str, TensorSpec], field: str) -> None:
    for name in names:
        if name not in specs:
            raise InvalidInput(
                f"{field}: unknown input '{name}'; the model's inputs are {_names(tuple(specs.values()))}"
            )


def _named_instances(instances: list, specs: dict[str, TensorSpec]) -> dict[str, list]:
    """Row format with named inputs: transpose a list of objects into one list per input."""
    first = instances[0]
    if not first:
        raise InvalidInput("instances[0]: expected at least one input")
    _check_known(first, specs, "instances[0]")
    keys = first.keys()
    for i, inst in enumerate(instances):
        if type(inst) is not dict or _is_b64(inst):
            raise InvalidInput(f"instances[{i}]: expected an object mapping input names to values")
        if inst.keys() != keys:
            raise InvalidInput(
                f"instances[{i}]: has inputs {sorted(inst)} but instances[0] has {sorted(keys)}; "
                "every instance must name the same inputs"
            )
    return {name: [inst[name] for inst in instances] for name in keys}


# Each returns the input values and how many body levels enclose a value's list of rows:
# the row list of named instances is built here, and stands at the level of the instance
# objects, its members (the values) one level below.


def _row_values(instances: Any, specs: dict[str, TensorSpec]) -> tuple[dict[str, Any], int]:
    if type(instances) is not list or not instances:
        raise InvalidInput(f"instances: expected a non-empty list (one entry per row), got {_show(instances)}")
    first = instances[0]
    if type(first) is dict and not _is_b64(first):
        return _named_instances(instances, specs), 2  # {"instances": [{"x": value}]}
    if len(specs) != 1:
        raise InvalidInput(
            f"instances[0]: the model has {len(specs)} inputs ({_names(tuple(specs.values()))}); "
            "each instance must be an object mapping input names to values"
        )
    return {next(iter(specs)): instances}, 1  # {"instances": [value]}


def _columnar_values(inputs: Any, specs: dict[str, TensorSpec]) -> tuple[dict[str, Any], int]:
    if type(inputs) is dict and not _is_b64(inputs):
        if not inputs:
            raise InvalidInput("inputs: expected at least one input")
        _check_known(inputs, specs, "inputs")
        return inputs, 2  # {"inputs": {"x": value}}
    if len(specs) != 1:
        raise InvalidInput(
            f"inputs: the model has {len(specs)} inputs ({_names(tuple(specs.values()))}); "
            "expected an object mapping input names to values"
        )
    return {next(iter(specs)): inputs}, 1  # {"inputs": value}


def _b64_or_utf8(item: Any, label: str, max_string_bytes: int) -> bytes:
    if type(item) is str:
        try:
            raw = item.encode()
        except UnicodeEncodeError:
            raise InvalidInput(f"{label}: holds a string that is not valid Unicode") from None
    elif _is_b64(item) and type(item["b64"]) is str:
        text = item["b64"]
        # decoded size is at most 3/4 of the text: refuse before decoding what cannot fit
        if len(text) // 4 * 3 - 2 > max_string_bytes:
            raise PayloadTooLarge(
                f'{label}: a "b64" value of {len(text)} characters decodes to more than '
                f"max_string_bytes ({max_string_bytes}) bytes"
            )
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f'{label}: a "b64" value is not valid base64') from None
    else:
        raise InvalidInput(f'{label}: datatype BYTES expects strings or {{"b64": ...}} objects, got {_show(item)}')
    if len(raw) > max_string_bytes:
        raise PayloadTooLarge(
            f"{label}: a BYTES value is {len(raw)} bytes, more than max_string_bytes ({max_string_bytes})"
        )
    return raw


def _bytes_array(value: Any, label: str, json_level: int, limits: RequestLimits) -> np.ndarray:
    """BYTES from strings and ``{"b64": ...}`` objects; the value sits below ``json_level`` levels."""
    try:
        # With dtype=object numpy keeps ragged rows as list cells instead of refusing them.
        cells = np.array(value, dtype=object)
    except ValueError:  # nested deeper than numpy's dimension limit
        raise InvalidInput(f"{label}: values are nested too deeply") from None
    max_depth = limits.max_json_depth
    # numpy stops at its dimension limit and keeps what is deeper as list cells (refused below)
    if json_level + cells.ndim > max_depth:
        raise _too_deep(max_depth, f"{label}: values are")
    if cells.ndim > MAX_DIMS:
        raise InvalidInput(f"{label}: values are nested deeper than {MAX_DIMS} levels")
    items = cells.reshape(-1).tolist()
    types = set(map(type, items))
    if list in types:
        raise InvalidInput(f"{label}: values are not a rectangular array (rows differ in shape)")
    if dict in types and json_level + cells.ndim + 1 > max_depth:  # {"b64": ...} is one more level
        raise _too_deep(max_depth, f"{label}: values are")
    out = np.empty(len(items), dtype=object)
    out[:] = [_b64_or_utf8(item, label, limits.max_string_bytes) for item in items]
    return out.reshape(cells.shape)


def _to_array(
    value: Any, spec: TensorSpec, label: str, extended: bool, json_level: int, limits: RequestLimits
) -> np.ndarray:
    """A TF-Serving JSON value (scalar or nested list) as an array of the input's datatype.

    ``json_level``: how many body levels enclose ``value`` (bounded by ``max_json_depth``).
    """
    if spec.datatype == "BYTES":
        return _bytes_array(value, label, json_level, limits)
    if type(value) is list:
        return array_from_json(
            value,
            spec.datatype,
            label,
            check_overflow=not extended,
            max_json_depth=limits.max_json_depth,
            json_level=json_level,
        )
    # a scalar is wrapped into a list that stands in for the level enclosing it
    return array_from_json(
        [value],
        spec.datatype,
        label,
        check_overflow=not extended,
        max_json_depth=limits.max_json_depth,
        json_level=json_level - 1,
    ).reshape(())


def decode_predict_request(
    body: bytes,
    model_name: str,
    model_version: str | None,
    signature: ModelMetadata,
    max_elements: int | None = None,
    *,
    limits: RequestLimits = DEFAULT_LIMITS,
) -> tuple[InferenceRequest, bool]:
    """Parse a TF-Serving ``:predict`` body into an ``InferenceRequest`` and its ``row_format``.

    ``row_format`` is True for ``instances`` and False for ``inputs``; the response must use the
    same format. Datatypes come from ``signature``; shapes from the JSON nesting. Raises
    ``InvalidInput`` naming the field for any malformed request.

    ``limits`` bounds the request's shape: ``max_elements`` over all inputs,
    ``max_batch_size`` for every input's first dimension (the number of instances in row
    format) and ``max_json_depth`` (all ``InvalidInput``), ``max_string_bytes`` per string or
    decoded ``b64`` value (``PayloadTooLarge``). ``max_elements``, when given, overrides
    ``limits.max_elements`` (the older spelling).
    """
    if max_elements is None:
        max_elements = limits.max_elements
    max_depth = limits.max_json_depth
    max_batch = limits.max_batch_size
    obj, extended = _load(body, max_depth)
    if max_depth < _SKELETON_DEPTH:
        check_json_depth(obj, 1, max_depth, "request body")
    elif not obj.keys() <= _REQUEST_KEYS:
        # members the decoder ignores are still part of the body and bounded like the rest
        for key, value in obj.items():
            if key not in _REQUEST_KEYS:
                check_json_depth(value, 2, max_depth, f"request body field {_show(key)}")
    _check_signature(obj)
    has_rows, has_columns = "instances" in obj, "inputs" in obj
    if has_rows == has_columns:
        raise InvalidInput(
            "request body: expected exactly one of 'instances' (row format) or 'inputs' (columnar format)"
        )
    specs = {spec.name: spec for spec in signature.inputs}
    if not specs:
        raise InvalidInput(f"model '{model_name}' declares no inputs; cannot map a TF-Serving request")
    values, json_level = _row_values(obj["instances"], specs) if has_rows else _columnar_values(obj["inputs"], specs)
    tensors = []
    total = 0
    for name, value in values.items():
        spec = specs[name]
        label = f"input '{name}'"
        # a list's length is the tensor's first dimension: refuse before converting anything
        if max_batch is not None and type(value) is list and len(value) > max_batch:
            rows = "instances" if has_rows else "rows"
            raise InvalidInput(
                f"{label}: batch size {len(value)} ({rows}, the first dimension) is more than "
                f"max_batch_size ({max_batch})"
            )
        arr = _to_array(value, spec, label, extended, json_level, limits)
        total += arr.size
        if total > max_elements:
            raise InvalidInput(f"request holds more than {max_elements} elements in total, the max_elements limit")
        tensors.append(InferTensor(name, spec.datatype, arr.shape, arr))
    return InferenceRequest(model_name, model_version, tensors), has_rows


# --------------------------------------------------------------------------------------------
# Response
# --------------------------------------------------------------------------------------------


def _bytes_item(item: Any, force_b64: bool) -> Any:
    raw = item if isinstance(item, bytes) else str(item).encode()
    if not force_b64:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(raw).decode()}


def _json_value(tensor: InferTensor) -> tuple[Any, bool]:
    """A value orjson can write (nested lists or a contiguous array) and whether it is finite."""
    arr = np.asarray(tensor.data)
    if tensor.datatype == "BYTES" or arr.dtype.kind in "OSU":
        force_b64 = tensor.name.endswith("_bytes")
        items = [_bytes_item(item, force_b64) for item in arr.reshape(-1).tolist()]
        cells = np.empty(len(items), dtype=object)
        cells[:] = items
        return cells.reshape(arr.shape).tolist(), True
    dtype = DATATYPE_TO_NUMPY.get(tensor.datatype)
    if dtype is not None and arr.dtype != dtype:  # e.g. float64 data for an FP32 output
        arr = arr.astype(dtype)
    elif not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.ndim == 0:
        return arr.item(), arr.dtype.kind not in _FLOAT_KINDS or math.isfinite(arr.item())
    arr = np.ascontiguousarray(arr)
    finite = arr.dtype.kind not in _FLOAT_KINDS or bool(np.isfinite(arr).all())
    return arr, finite


def _rows(outputs: list[InferTensor], values: list[Any]) -> list[dict[str, Any]]:
    sizes = {tensor.name: np.shape(tensor.data)[:1] for tensor in outputs}
    batch = {size for size in sizes.values()}
    if len(batch) != 1 or () in batch:
        raise InvalidInput(
            "row format ('instances') needs every output to share its 0-th dimension, "
            f"but output shapes start with {sizes}; send 'inputs' (columnar format) instead"
        )
    (n,) = batch.pop()
    # a 1-D output's rows are numpy scalars, and orjson refuses some of their types (e.g.
    # numpy.longlong from ONNX Runtime): plain Python numbers serialize everywhere
    # (floats stay numpy: orjson writes float32 in its shortest float32 form)
    columns = [v.tolist() if isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iub" else v for v in values]
    return [{t.name: v[i] for t, v in zip(outputs, columns, strict=True)} for i in range(n)]


def _dumps(payload: dict, finite: bool) -> bytes:
    if finite:
        return orjson.dumps(payload, option=_NUMPY_OPTS)
    # TF-Serving writes NaN/Infinity tokens; orjson would write null.
    return json.dumps(payload, default=_plain, separators=(",", ":")).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__name__}")


def encode_predict_response(response: InferenceResponse, row_format: bool) -> bytes:
    """Serialize a response the way TF-Serving answers ``:predict``.

    Row format: ``{"predictions": [...]}`` — per-row values for one output, per-row objects
    name→value for several. Columnar: ``{"outputs": value}`` or ``{"outputs": {name: value}}``.
    """
    outputs = response.outputs
    encoded = [_json_value(tensor) for tensor in outputs]
    values = [value for value, _ in encoded]
    finite = all(ok for _, ok in encoded)
    if row_format:
        if len(outputs) == 1:
            if np.ndim(outputs[0].data) == 0:
                raise InvalidInput(
                    f"row format ('instances') needs a batched output but '{outputs[0].name}' is a "
                    "scalar; send 'inputs' (columnar format) instead"
                )
            payload: dict[str, Any] = {"predictions": values[0]}
        else:
            payload = {"predictions": _rows(outputs, values)}
    elif len(outputs) == 1:
        payload = {"outputs": values[0]}
    else:
        payload = {"outputs": {t.name: v for t, v in zip(outputs, values, strict=True)}}
    return _dumps(payload, finite)


# the data plane's version states in TF-Serving's vocabulary (START, LOADING, AVAILABLE,
# UNLOADING, END): a version that does not serve, for whatever reason, is UNAVAILABLE
_TF_STATES = {"READY": "AVAILABLE", "LOADING": "LOADING"}


def encode_model_status(versions: Iterable[VersionStatus]) -> bytes:
    """TF-Serving's ``GetModelStatus`` JSON; ``error_code`` is ``OK`` unless there is a reason."""
    return orjson.dumps(
        {
            "model_version_status": [
                {
                    "version": v.version,
                    "state": _TF_STATES.get(v.state, "UNAVAILABLE"),
                    "status": {"error_code": "UNKNOWN" if v.reason else "OK", "error_message": v.reason},
                }
                for v in versions
            ]
        }
    )
