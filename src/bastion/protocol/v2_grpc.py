"""Open Inference Protocol (KServe V2) gRPC messages <-> ``bastion.core`` types.

Pure functions, no I/O. The server side decodes ``ModelInferRequest`` and
encodes ``ModelInferResponse`` and the metadata / repository answers; the client
side (CLI, tests, lab) uses the mirror images ``encode_infer_request`` and
``decode_infer_response``.

Tensor data travels in one of two forms (see ``grpc_service.proto``):

* raw: one ``bytes`` entry per tensor in ``raw_input_contents`` /
  ``raw_output_contents``, row-major little-endian; a BYTES element is a 4-byte
  little-endian length followed by its bytes. The only form for FP16, the one
  tritonclient sends, and what Triton returns.
* typed: the repeated field of ``InferTensorContents`` that matches the datatype.

Every mistake in a request is an ``InvalidInput`` whose message names the field
and what was expected; a response that cannot be encoded is Bastion's bug and
raises ``InternalError``.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import numpy as np

from bastion.core.datatypes import DATATYPE_TO_NUMPY, DATATYPES, MAX_DIMS
from bastion.core.errors import BastionError, InternalError, InvalidInput, PayloadTooLarge
from bastion.core.limits import DEFAULT_LIMITS, RequestLimits
from bastion.core.metadata import ModelMetadata, TensorSpec
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor, RequestedOutput
from bastion.protocol.grpc_v2 import grpc_service_pb2 as pb2

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_ELEMENTS",
    "MAX_DIMS",
    "decode_infer_request",
    "decode_infer_response",
    "decode_model_load_request",
    "decode_model_metadata",
    "decode_model_ref",
    "decode_model_unload_request",
    "decode_parameters",
    "encode_infer_request",
    "encode_infer_response",
    "encode_model_metadata",
    "encode_repository_index",
    "encode_server_metadata",
    "response_uses_raw",
]

# DEFAULT_LIMITS (core/limits.py): the limits a decoder applies when its caller passes none.
# Refuse absurd element counts before anything is allocated for them (kept for callers
# that predate RequestLimits).
DEFAULT_MAX_ELEMENTS = DEFAULT_LIMITS.max_elements

# Datatype -> the InferTensorContents field that carries it in typed form.
# FP16 is absent on purpose: the protocol has no 16-bit float field.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# The numpy dtype a typed field decodes to; narrower datatypes (INT8, UINT16, ...) are
# range-checked from it and then cast.
_FIELD_DTYPE: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}

_NARROW_INTS = frozenset({"INT8", "INT16", "UINT8", "UINT16"})

# The wire is little-endian; on a little-endian host (all the usual ones) these are the
# native dtypes, so np.frombuffer is a zero-copy view.
_WIRE_DTYPE: dict[str, np.dtype] = {
    dt: np.dtype(npdt).newbyteorder("<") for dt, npdt in DATATYPE_TO_NUMPY.items() if dt != "BYTES"
}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"

_U32 = struct.Struct("<I")

# Triton's shared-memory parameters point into memory of the client's machine; Bastion
# never reads memory a request points at.
_SHM_PARAMETERS = frozenset({"shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"})

_DATATYPE_LIST = ", ".join(sorted(DATATYPES))
_PARAM_KINDS = "bool_param, int64_param, string_param, double_param or uint64_param"

_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1


# ------------------------------------------------------------------ formatting helpers


def _q(text: str, limit: int = 64) -> str:
    """Quote a client-chosen string for an error message, bounded in length.

    Messages travel back as gRPC status details; an unbounded name would let a client
    make the server build (and log) arbitrarily large errors.
    """
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


def _fmt_shape(shape: Iterable[int]) -> str:
    dims = list(shape)
    if len(dims) > 8:
        return "[" + ",".join(map(str, dims[:8])) + f",...] ({len(dims)} dims)"
    return "[" + ",".join(map(str, dims)) + "]"


# ------------------------------------------------------------------ parameters


def decode_parameters(params: Mapping[str, pb2.InferParameter], where: str = "") -> dict[str, Any]:
    """``map<string, InferParameter>`` -> ``{key: bool | int | str | float}``.

    ``where`` prefixes error messages (e.g. ``"input 'X': "``).
    """
    out: dict[str, Any] = {}
    if not params:  # the usual case; skips building an items view (hot path)
        return out
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidInput(f"{where}parameter {_q(key)}: no value set; expected one of {_PARAM_KINDS}")
        out[key] = getattr(param, kind)
    return out


def _encode_parameters(
    into: MutableMapping[str, pb2.InferParameter],
    params: Mapping[str, Any],
    where: str,
    error: type[BastionError],
) -> None:
    for key, value in params.items():
        if not isinstance(key, str):
            raise error(f"{where}parameter {key!r}: keys must be str")
        param = into[key]
        # bool before int: bool is a subclass of int.
        if isinstance(value, (bool, np.bool_)):
            param.bool_param = bool(value)
        elif isinstance(value, (int, np.integer)):
            number = int(value)
            if _INT64_MIN <= number <= _INT64_MAX:
                param.int64_param = number
            elif 0 <= number <= _UINT64_MAX:
                param.uint64_param = number
            else:
                raise error(f"{where}parameter {_q(key)}: {number} does not fit in int64 or uint64")
        elif isinstance(value, (float, np.floating)):
            param.double_param = float(value)
        elif isinstance(value, str):
            param.string_param = value
        else:
            raise error(
                f"{where}parameter {_q(key)}: a {type(value).__name__} cannot be sent; expected bool, int, float or str"
            )


def _refuse_shared_memory(params: Mapping[str, Any], where: str, alternative: str) -> None:
    for key in params:
        if key in _SHM_PARAMETERS:
            raise InvalidInput(f"{where}parameter {_q(key)}: shared memory is not supported by Bastion; {alternative}")


# ------------------------------------------------------------------ tensor decoding


def _check_shape(label: str, dims: Iterable[int], max_elements: int) -> tuple[tuple[int, ...], int]:
    shape = tuple(dims)
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"{label}: shape has {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    for dim in shape:
        if dim < 0:
            raise InvalidInput(
                f"{label}: shape {_fmt_shape(shape)} has negative dimension {dim}; dimensions must be >= 0"
            )
        if dim > max_elements:
            raise InvalidInput(
                f"{label}: shape {_fmt_shape(shape)} has dimension {dim}, "
                f"more than the limit of {max_elements} elements (max_elements)"
            )
    count = math.prod(shape)
    if count > max_elements:
        raise InvalidInput(
            f"{label}: shape {_fmt_shape(shape)} has {count} elements, more than the limit of {max_elements} "
            "(max_elements)"
        )
    return shape, count


def _string_too_long(label: str, where: str, index: int, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{label}: {where} element {index} is {size} bytes, more than max_string_bytes ({limit})")


def _split_bytes(label: str, raw: bytes, count: int, shape: tuple[int, ...], max_string_bytes: int) -> np.ndarray:
    """Raw BYTES content (4-byte LE length + data, per element) -> object array of bytes.

    ``max_string_bytes`` bounds each element's length (the prefix's value).
    """
    size = len(raw)
    # Every element costs at least its 4-byte prefix: refuse before allocating `count` slots.
    if count * 4 > size:
        raise InvalidInput(
            f"{label}: raw BYTES content is {size} bytes, too short for the {count} elements of shape "
            f"{_fmt_shape(shape)} (each needs a 4-byte length prefix)"
        )
    out = np.empty(count, dtype=object)
    offset = 0
    # A loop is unavoidable here: every element's position depends on the previous lengths.
    for i in range(count):
        if offset + 4 > size:
            raise InvalidInput(
                f"{label}: raw BYTES content ends after {i} of {count} elements; "
                f"element {i} has no 4-byte length prefix"
            )
        (length,) = _U32.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise InvalidInput(
                f"{label}: raw BYTES element {i} declares {length} bytes but only {size - offset} remain"
            )
        if length > max_string_bytes:
            raise _string_too_long(label, "raw BYTES", i, length, max_string_bytes)
        out[i] = raw[offset : offset + length]
        offset += length
    if offset != size:
        raise InvalidInput(
            f"{label}: raw BYTES content has {size - offset} bytes left over after the {count} elements "
            f"of shape {_fmt_shape(shape)}"
        )
    return out


def _decode_raw(
    label: str, datatype: str, raw: bytes, shape: tuple[int, ...], count: int, max_string_bytes: int
) -> np.ndarray:
    if datatype == "BYTES":
        return _split_bytes(label, raw, count, shape, max_string_bytes)
    wire = _WIRE_DTYPE[datatype]
    needed = count * wire.itemsize
    if len(raw) != needed:
        raise InvalidInput(
            f"{label}: raw content is {len(raw)} bytes but shape {_fmt_shape(shape)} of {datatype} needs {needed}"
        )
    if datatype == "BOOL":
        octets = np.frombuffer(raw, dtype=np.uint8)
        # numpy would happily make a bool out of any octet; the protocol says 0 or 1.
        if count and int(octets.max()) > 1:
            raise InvalidInput(f"{label}: raw BOOL content must hold bytes 0 or 1, found {int(octets.max())}")
        array = octets.view(np.bool_)
    else:
        # Zero-copy and read-only: the array is a view of the request's bytes.
        array = np.frombuffer(raw, dtype=wire)
        if not _LITTLE_ENDIAN_HOST:
            array = array.astype(DATATYPE_TO_NUMPY[datatype])
    return array


def _decode_typed(
    label: str,
    datatype: str,
    contents: pb2.InferTensorContents,
    count: int,
    shape: tuple[int, ...],
    raw_field: str,
    max_string_bytes: int,
) -> np.ndarray:
    expected = CONTENTS_FIELD.get(datatype)
    present = [field.name for field, _ in contents.ListFields()]
    for name in present:
        if name != expected:
            if expected is None:
                raise InvalidInput(
                    f"{label}: contents.{name} given, but {datatype} has no typed contents field; "
                    f"send it in {raw_field}"
                )
            raise InvalidInput(
                f"{label}: contents.{name} given, but datatype {datatype} is carried in contents.{expected}"
            )
    if expected is None:
        if count == 0:
            return np.empty(0, dtype=DATATYPE_TO_NUMPY[datatype])
        raise InvalidInput(
            f"{label}: no data; {datatype} needs {count} elements in {raw_field} (it has no typed contents field)"
        )
    values = getattr(contents, expected)
    if len(values) != count:
        if not present:
            raise InvalidInput(
                f"{label}: no data; expected {count} values in contents.{expected} or an entry in {raw_field}"
            )
        raise InvalidInput(
            f"{label}: contents.{expected} has {len(values)} values but shape {_fmt_shape(shape)} needs {count}"
        )
    if datatype == "BYTES":
        items = list(values)
        if count and max(map(len, items)) > max_string_bytes:  # in C; the index only words the error
            index = next(i for i, item in enumerate(items) if len(item) > max_string_bytes)
            raise _string_too_long(label, f"contents.{expected}", index, len(items[index]), max_string_bytes)
        array = np.empty(count, dtype=object)
        array[:] = items
        return array
    # upb containers convert to numpy in C: no per-element Python work.
    wide = np.asarray(values, dtype=_FIELD_DTYPE[expected])
    dtype = DATATYPE_TO_NUMPY[datatype]
    if datatype in _NARROW_INTS and count:
        info = np.iinfo(dtype)
        low, high = wide.min(), wide.max()
        if low < info.min or high > info.max:
            bad = int(low) if low < info.min else int(high)
            raise InvalidInput(
                f"{label}: contents.{expected} value {bad} is out of range for {datatype} [{info.min}, {info.max}]"
            )
    return wide.astype(dtype, copy=False)


def _tensor_shape(label: str, datatype: str, dims: Iterable[int], max_elements: int) -> tuple[tuple[int, ...], int]:
    """The datatype checked, then the shape and its element count."""
    if datatype not in DATATYPES:
        raise InvalidInput(f"{label}: unsupported datatype {_q(datatype, 16)}; expected one of {_DATATYPE_LIST}")
    return _check_shape(label, dims, max_elements)


def _decode_tensor(
    label: str,
    datatype: str,
    shape: tuple[int, ...],
    count: int,
    contents: pb2.InferTensorContents,
    raw: bytes | None,
    raw_field: str,
    max_string_bytes: int,
) -> np.ndarray:
    if raw is not None:
        if contents.ListFields():
            raise InvalidInput(
                f"{label}: contents must be empty when {raw_field} is used; send each tensor in one form"
            )
        flat = _decode_raw(label, datatype, raw, shape, count, max_string_bytes)
    else:
        flat = _decode_typed(label, datatype, contents, count, shape, raw_field, max_string_bytes)
    return flat.reshape(shape)


def _raw_entries(entries: Any, tensors: int, raw_field: str, tensor_field: str) -> list[bytes] | None:
    if not entries:
        return None
    if len(entries) != tensors:
        raise InvalidInput(
            f"{raw_field}: {len(entries)} entries but {tensors} {tensor_field}; "
            f"send one entry per tensor, in the order of {tensor_field}"
        )
    return list(entries)


def decode_infer_request(
    msg: pb2.ModelInferRequest,
    max_elements: int | None = None,
    *,
    limits: RequestLimits = DEFAULT_LIMITS,
) -> InferenceRequest:
    """``ModelInferRequest`` -> ``InferenceRequest``; ``InvalidInput`` for any malformed field.

    Numeric tensors sent raw are read-only zero-copy views of the message's bytes.
    Whether the tensors fit the model's signature is the data plane's business.

    ``limits`` bounds the request's shape, each checked before the tensor's data is
    touched: ``max_elements`` over all inputs and ``max_batch_size`` for every input's first
    dimension (``InvalidInput``), ``max_string_bytes`` per BYTES element, typed or raw
    (``PayloadTooLarge``). The message size is the transport's (gRPC's receive limit).
    ``max_elements``, when given, overrides ``limits.max_elements`` (the older spelling).
    """
    if max_elements is None:
        max_elements = limits.max_elements
    max_batch = limits.max_batch_size
    total = 0
    if not msg.model_name:
        raise InvalidInput("model_name: must not be empty")
    raw = _raw_entries(msg.raw_input_contents, len(msg.inputs), "raw_input_contents", "inputs")
    inputs: list[InferTensor] = []
    seen: set[str] = set()
    for i, tensor in enumerate(msg.inputs):
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{i}].name: must not be empty")
        label = f"input {_q(name)}"
        if name in seen:
            raise InvalidInput(f"{label}: given more than once; input names must be unique")
        seen.add(name)
        params = decode_parameters(tensor.parameters, f"{label}: ")
        _refuse_shared_memory(params, f"{label}: ", "send the data in raw_input_contents")
        shape, count = _tensor_shape(label, tensor.datatype, tensor.shape, max_elements)
        total += count
        if total > max_elements:
            raise InvalidInput(
                f"inputs: with {label} the tensors hold {total} elements in total, more than the limit of "
                f"{max_elements} (max_elements)"
            )
        # server-wide cap, before any data is read; the model's own cap is the data plane's
        if max_batch is not None and shape and shape[0] > max_batch:
            raise InvalidInput(
                f"{label}: batch size {shape[0]} (first dimension of shape {_fmt_shape(shape)}) is more than "
                f"max_batch_size ({max_batch})"
            )
        data = _decode_tensor(
            label,
            tensor.datatype,
            shape,
            count,
            tensor.contents,
            None if raw is None else raw[i],
            "raw_input_contents",
            limits.max_string_bytes,
        )
        inputs.append(InferTensor(name, tensor.datatype, shape, data, params))

    outputs: list[RequestedOutput] | None = None
    if msg.outputs:
        outputs = []
        wanted: set[str] = set()
        for i, requested in enumerate(msg.outputs):
            if not requested.name:
                raise InvalidInput(f"outputs[{i}].name: must not be empty")
            label = f"output {_q(requested.name)}"
            if requested.name in wanted:
                raise InvalidInput(f"{label}: requested more than once")
            wanted.add(requested.name)
            params = decode_parameters(requested.parameters, f"{label}: ")
            _refuse_shared_memory(params, f"{label}: ", "leave it out to receive the data in the response")
            outputs.append(RequestedOutput(requested.name, params))

    return InferenceRequest(
        model_name=msg.model_name,
        model_version=msg.model_version or None,
        inputs=inputs,
        id=msg.id or None,
        outputs=outputs,
        parameters=decode_parameters(msg.parameters),
    )


def response_uses_raw(msg: pb2.ModelInferRequest) -> bool:
    """Whether the response to ``msg`` should carry raw contents.

    Raw unless the client itself sent typed contents: raw is what Triton always returns
    and the only form tritonclient's ``InferResult.as_numpy`` reads for numeric tensors.
    """
    if msg.raw_input_contents:
        return True
    return not any(tensor.HasField("contents") and tensor.contents.ListFields() for tensor in msg.inputs)


# ------------------------------------------------------------------ tensor encoding


def _to_bytes(element: Any, label: str, error: type[BastionError]) -> bytes:
    if isinstance(element, bytes):  # includes np.bytes_
        return bytes(element)
    if isinstance(element, str):  # includes np.str_
        return element.encode("utf-8")
    if isinstance(element, (bytearray, memoryview)):
        return bytes(element)
    raise error(f"{label}: BYTES elements must be bytes or str, found {type(element).__name__}")


def _encode_array(tensor: InferTensor, label: str, error: type[BastionError]) -> tuple[tuple[int, ...], np.ndarray]:
    """Check a tensor's declared datatype and shape against its data; returns (shape, array)."""
    dtype = DATATYPE_TO_NUMPY.get(tensor.datatype)
    if dtype is None:
        raise error(f"{label}: unsupported datatype {_q(str(tensor.datatype), 16)}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise error(f"{label}: shape {_fmt_shape(shape)} has a negative dimension")
    try:
        array = np.asarray(tensor.data)
        if tensor.datatype == "BYTES":
            array = array.astype(object, copy=False)
        elif array.dtype != dtype:
            # Same-kind casts follow the declaration (a float64 result declared FP32); a
            # float declared INT32 would be silently truncated, so it is refused.
            if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                raise TypeError(f"a {array.dtype} array is not a {tensor.datatype} tensor")
            array = array.astype(dtype)
    except (TypeError, ValueError) as exc:
        raise error(f"{label}: data cannot be sent as {tensor.datatype}: {exc}") from None
    count = math.prod(shape)
    if array.size != count:
        raise error(f"{label}: data has {array.size} elements but shape {_fmt_shape(shape)} needs {count}")
    return shape, array


def _raw_bytes(datatype: str, array: np.ndarray, label: str, error: type[BastionError]) -> bytes:
    if datatype == "BYTES":
        parts: list[bytes] = []
        for element in array.ravel():
            data = _to_bytes(element, label, error)
            if len(data) > 0xFFFFFFFF:
                raise error(f"{label}: a BYTES element of {len(data)} bytes exceeds the 4 GiB length prefix")
            parts.append(_U32.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    if not _LITTLE_ENDIAN_HOST:
        array = array.astype(_WIRE_DTYPE[datatype])
    # tobytes() writes row-major order whatever the array's strides.
    return array.tobytes()


def _fill_typed(
    contents: pb2.InferTensorContents,
    datatype: str,
    array: np.ndarray,
    label: str,
    error: type[BastionError],
) -> None:
    values = getattr(contents, CONTENTS_FIELD[datatype])
    flat = array.ravel()
    if datatype == "BYTES":
        values.extend([_to_bytes(element, label, error) for element in flat])
    else:
        # tolist() converts in C; extending from the ndarray itself is ~5x slower.
        values.extend(flat.tolist())


def _needs_raw(tensors: Iterable[InferTensor]) -> bool:
    # FP16 has no typed field, and the protocol forbids mixing forms in one message.
    return any(tensor.datatype not in CONTENTS_FIELD for tensor in tensors)


def encode_infer_response(response: InferenceResponse, raw: bool = True) -> pb2.ModelInferResponse:
    """``InferenceResponse`` -> ``ModelInferResponse``.

    ``raw=True`` fills ``raw_output_contents`` (what Triton does, what tritonclient reads);
    ``raw=False`` typed contents, unless an output has no typed field (FP16): then the
    whole response is raw. An output inconsistent with its own declaration is a bug in
    Bastion and raises ``InternalError``.
    """
    msg = pb2.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version or "",
        id=response.id or "",
    )
    _encode_parameters(msg.parameters, response.parameters, "response: ", InternalError)
    use_raw = raw or _needs_raw(response.outputs)
    for tensor in response.outputs:
        label = f"output {_q(tensor.name)}"
        shape, array = _encode_array(tensor, label, InternalError)
        out = msg.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        _encode_parameters(out.parameters, tensor.parameters, f"{label}: ", InternalError)
        if use_raw:
            msg.raw_output_contents.append(_raw_bytes(tensor.datatype, array, label, InternalError))
        else:
            _fill_typed(out.contents, tensor.datatype, array, label, InternalError)
    return msg


def encode_infer_request(request: InferenceRequest, raw: bool = True) -> pb2.ModelInferRequest:
    """Client side: ``InferenceRequest`` -> ``ModelInferRequest`` (raw or typed, as above)."""
    msg = pb2.ModelInferRequest(
        model_name=request.model_name,
        model_version=request.model_version or "",
        id=request.id or "",
    )
    _encode_parameters(msg.parameters, request.parameters, "request: ", InvalidInput)
    use_raw = raw or _needs_raw(request.inputs)
    for tensor in request.inputs:
        label = f"input {_q(tensor.name)}"
        shape, array = _encode_array(tensor, label, InvalidInput)
        inp = msg.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        _encode_parameters(inp.parameters, tensor.parameters, f"{label}: ", InvalidInput)
        if use_raw:
            msg.raw_input_contents.append(_raw_bytes(tensor.datatype, array, label, InvalidInput))
        else:
            _fill_typed(inp.contents, tensor.datatype, array, label, InvalidInput)
    for requested in request.outputs or ():
        out = msg.outputs.add(name=requested.name)
        _encode_parameters(out.parameters, requested.parameters, f"output {_q(requested.name)}: ", InvalidInput)
    return msg


def decode_infer_response(msg: pb2.ModelInferResponse, max_elements: int = DEFAULT_MAX_ELEMENTS) -> InferenceResponse:
    """Client side: ``ModelInferResponse`` -> ``InferenceResponse`` (raw or typed contents)."""
    raw = _raw_entries(msg.raw_output_contents, len(msg.outputs), "raw_output_contents", "outputs")
    outputs: list[InferTensor] = []
    for i, tensor in enumerate(msg.outputs):
        label = f"output {_q(tensor.name)}"
        params = decode_parameters(tensor.parameters, f"{label}: ")
        shape, count = _tensor_shape(label, tensor.datatype, tensor.shape, max_elements)
        data = _decode_tensor(
            label,
            tensor.datatype,
            shape,
            count,
            tensor.contents,
            None if raw is None else raw[i],
            "raw_output_contents",
            sys.maxsize,  # client side: a response's strings are as long as the server made them
        )
        outputs.append(InferTensor(tensor.name, tensor.datatype, shape, data, params))
    return InferenceResponse(
        model_name=msg.model_name,
        model_version=msg.model_version or None,
        outputs=outputs,
        id=msg.id or None,
        parameters=decode_parameters(msg.parameters),
    )


# ------------------------------------------------------------------ metadata & repository


def decode_model_ref(msg: pb2.ModelReadyRequest | pb2.ModelMetadataRequest) -> tuple[str, str | None]:
    """(name, version or None) of a ModelReady / ModelMetadata request."""
    if not msg.name:
        raise InvalidInput("name: must not be empty")
    return msg.name, msg.version or None


def encode_server_metadata(metadata: Mapping[str, Any]) -> pb2.ServerMetadataResponse:
    """``{"name", "version", "extensions"}`` (the data plane's dict) -> ``ServerMetadataResponse``."""
    return pb2.ServerMetadataResponse(
        name=str(metadata.get("name", "")),
        version=str(metadata.get("version", "")),
        extensions=[str(e) for e in metadata.get("extensions", ())],
    )


def _tensor_metadata(spec: TensorSpec) -> pb2.ModelMetadataResponse.TensorMetadata:
    return pb2.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def encode_model_metadata(metadata: ModelMetadata) -> pb2.ModelMetadataResponse:
    return pb2.ModelMetadataResponse(
        name=metadata.name,
        versions=list(metadata.versions),
        platform=metadata.platform,
        inputs=[_tensor_metadata(t) for t in metadata.inputs],
        outputs=[_tensor_metadata(t) for t in metadata.outputs],
    )


def decode_model_metadata(msg: pb2.ModelMetadataResponse) -> ModelMetadata:
    """Client side: ``ModelMetadataResponse`` -> ``ModelMetadata``."""
    return ModelMetadata(
        name=msg.name,
        versions=tuple(msg.versions),
        platform=msg.platform,
        inputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in msg.inputs),
        outputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in msg.outputs),
    )


def encode_repository_index(
    entries: Iterable[Mapping[str, Any]], ready_only: bool = False
) -> pb2.RepositoryIndexResponse:
    """The data plane's ``[{"name", "version", "state", "reason"}]`` -> ``RepositoryIndexResponse``.

    ``ready_only`` keeps the READY entries (RepositoryIndexRequest.ready).
    """
    msg = pb2.RepositoryIndexResponse()
    for entry in entries:
        state = str(entry.get("state") or "")
        if ready_only and state != "READY":
            continue
        version = entry.get("version")
        msg.models.add(
            name=str(entry.get("name", "")),
            version="" if version is None else str(version),
            state=state,
            reason=str(entry.get("reason") or ""),
        )
    return msg


def _repository_parameters(params: Mapping[str, pb2.ModelRepositoryParameter]) -> dict[str, Any]:
    """The parameters as plain values; which ones an action accepts is the data plane's rule
    (``dataplane/admin.py``), the same for every transport."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidInput(f"parameters[{_q(key)}]: no value set")
        out[key] = getattr(param, choice)
    return out


def decode_model_load_request(msg: pb2.RepositoryModelLoadRequest) -> tuple[str, dict[str, Any]]:
    """The model to load and the request's parameters.

    ``repository_name`` is ignored: Bastion serves one repository.
    """
    if not msg.model_name:
        raise InvalidInput("model_name: must not be empty")
    return msg.model_name, _repository_parameters(msg.parameters)


def decode_model_unload_request(msg: pb2.RepositoryModelUnloadRequest) -> tuple[str, dict[str, Any]]:
    """The model to unload and the request's parameters."""
    if not msg.model_name:
        raise InvalidInput("model_name: must not be empty")
    return msg.model_name, _repository_parameters(msg.parameters)
