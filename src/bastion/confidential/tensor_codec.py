"""Tensors as CBOR-able values, and the strict CBOR decoding every confidential message uses.

Sealed requests and responses, and the front <-> worker channel, carry tensors as a
list of maps ``{"name", "datatype", "shape", "data"}``: ``data`` is the raw
little-endian element bytes (C order), or for BYTES a list of byte strings, one per
element. Whatever arrives here came from someone we do not trust to be well-formed
(a client, or the untrusted host), so decoding checks every field and names it in the
error, bounds counts and sizes before allocating, and never trusts a shape that
the data does not match.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Mapping
from typing import Any

import cbor2
import numpy as np

from bastion.core.datatypes import DATATYPE_TO_NUMPY, MAX_DIMS, datatype_of, numpy_dtype
from bastion.core.errors import InvalidInput, PayloadTooLarge

__all__ = [
    "DEFAULT_MAX_TENSORS",
    "DEFAULT_MAX_TENSOR_BYTES",
    "decode_tensors",
    "dumps_cbor",
    "encode_tensors",
    "loads_cbor",
]

DEFAULT_MAX_TENSORS = 64
# The frame and envelope bounds are what really limit a message; this is the backstop
# for callers that decode tensors from somewhere else.
DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024
_INT64_MAX = 2**63 - 1
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
_TENSOR_FIELDS = frozenset({"name", "datatype", "shape", "data"})
# Wire dtypes: explicitly little-endian, whatever the host.
_WIRE_DTYPE: dict[str, np.dtype] = {
    name: dtype.newbyteorder("<") for name, dtype in DATATYPE_TO_NUMPY.items() if name != "BYTES"
}

# cbor2 turns these tags into Python objects (datetimes, regexes, fractions, shared or
# referenced values...). No confidential message uses a tag, and some of them cost an
# attacker nothing to send and us real work to build (a Fraction of two huge integers,
# a compiled regex), so every one of them is refused, as is any tag cbor2 does not know.
_BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000, 55799)


def _refuse_tag(*_args: object) -> object:
    raise ValueError("CBOR tags are not accepted")


_NO_TAGS: dict[int, Any] = dict.fromkeys(_BUILTIN_TAGS, _refuse_tag)


def _encode_memoryview(encoder: cbor2.CBOREncoder, value: memoryview) -> None:
    octets = value.cast("B") if value.format != "B" or value.ndim != 1 else value
    encoder.encode_length(2, octets.nbytes)
    encoder.write(octets)


_ENCODERS = {memoryview: _encode_memoryview}


def dumps_cbor(value: Any) -> bytes:
    """CBOR of ``value``, with ``memoryview`` values written as byte strings (cbor2 alone
    would write a list of integers): callers can hand over views of large buffers
    without first copying them into ``bytes``. Views must be C-contiguous."""
    return cbor2.dumps(value, encoders=_ENCODERS)


def loads_cbor(data: bytes, what: str, *, max_depth: int = 16) -> Any:
    """Decode exactly one CBOR item from ``data``, strictly: no tags, no duplicate map
    keys, no trailing bytes, bounded nesting. Errors are :class:`InvalidInput` naming
    ``what``; callers that need their own error class catch and re-raise."""
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            tag_hook=_refuse_tag,
            semantic_decoders=_NO_TAGS,
            max_depth=max_depth,
            allow_duplicate_keys=False,
        )
        value = decoder.decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidInput(f"{what}: not valid CBOR ({exc})") from None
    if stream.tell() != len(data):
        raise InvalidInput(f"{what}: {len(data) - stream.tell()} bytes of trailing data after the CBOR item")
    return value


# ------------------------------------------------------------------ encoding


def _element_bytes(value: object, where: str) -> bytes:
    if isinstance(value, bytes):
        return bytes(value)  # np.bytes_ -> bytes; a no-op for bytes itself
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidInput(f"{where}: BYTES elements must be bytes or str, found {type(value).__name__}")


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Tensors -> the list of maps that CBOR carries (see the module docstring).

    Numeric data is copied once, into little-endian C-order ``bytes``: cbor2 needs
    ``bytes`` (it would encode a memoryview as a list of integers)."""
    out: list[dict[str, Any]] = []
    for index, (name, value) in enumerate(tensors.items()):
        where = f"tensors[{index}]"
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{where}.name: expected a non-empty str, got {name!r}")
        array = np.asarray(value)
        if array.ndim > MAX_DIMS:
            raise InvalidInput(f"{where}.shape: {array.ndim} dimensions; at most {MAX_DIMS} are supported")
        if array.dtype.byteorder == ">":  # datatype_of knows native dtypes only
            datatype = datatype_of(np.empty(0, array.dtype.newbyteorder("=")))
        else:
            datatype = datatype_of(array)
        data: bytes | list[bytes]
        if datatype == "BYTES":
            data = [_element_bytes(item, f"{where}.data") for item in array.reshape(-1, order="C").tolist()]
        else:
            data = np.ascontiguousarray(array, dtype=_WIRE_DTYPE[datatype]).tobytes()
        out.append({"name": name, "datatype": datatype, "shape": [int(d) for d in array.shape], "data": data})
    return out


# ------------------------------------------------------------------ decoding


def _shape(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise InvalidInput(f"{where}.shape: expected a list of integers, got {type(value).__name__}")
    if len(value) > MAX_DIMS:
        raise InvalidInput(f"{where}.shape: {len(value)} dimensions; at most {MAX_DIMS} are supported")
    for dim in value:
        # bool is an int subclass; a shape of [true] is a mistake, not a 1.
        if type(dim) is not int:
            raise InvalidInput(f"{where}.shape: dimensions must be integers, found {type(dim).__name__}")
        if dim < 0:
            raise InvalidInput(f"{where}.shape: dimension {dim} is negative; dimensions must be >= 0")
        if dim > _INT64_MAX:
            raise InvalidInput(f"{where}.shape: dimension {dim} does not fit in int64")
    return tuple(value)


def _fixed(where: str, datatype: str, data: object, shape: tuple[int, ...], count: int) -> np.ndarray:
    if not isinstance(data, bytes):
        raise InvalidInput(f"{where}.data: {datatype} data must be a byte string, got {type(data).__name__}")
    wire = _WIRE_DTYPE[datatype]
    needed = count * wire.itemsize
    if len(data) != needed:
        raise InvalidInput(
            f"{where}.data: {len(data)} bytes, but shape {list(shape)} of {datatype} needs {needed} bytes"
        )
    if datatype == "BOOL":
        octets = np.frombuffer(data, dtype=np.uint8)
        # numpy would make a bool of any octet; only 0 and 1 mean something.
        if count and int(octets.max()) > 1:
            raise InvalidInput(f"{where}.data: BOOL data must hold bytes 0 or 1, found {int(octets.max())}")
        array = octets.view(np.bool_)
    else:
        array = np.frombuffer(data, dtype=wire)  # zero-copy, read-only view of the message's bytes
        if not _LITTLE_ENDIAN_HOST:
            array = array.astype(DATATYPE_TO_NUMPY[datatype])
    return _reshape(array, shape, where)


def _reshape(array: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    try:
        return array.reshape(shape)
    except ValueError:
        # numpy refuses shapes whose extent overflows its index type even with zero elements.
        raise InvalidInput(f"{where}.shape: {list(shape)} is too large for an array") from None


def _strings(where: str, data: object, shape: tuple[int, ...], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidInput(f"{where}.data: BYTES data must be a list of byte strings, got {type(data).__name__}")
    if len(data) != count:
        raise InvalidInput(f"{where}.data: {len(data)} BYTES elements, but shape {list(shape)} has {count}")
    for i, item in enumerate(data):
        if not isinstance(item, bytes):
            raise InvalidInput(f"{where}.data[{i}]: expected a byte string, got {type(item).__name__}")
    array = np.empty(count, dtype=object)
    array[:] = data
    return _reshape(array, shape, where)


def decode_tensors(
    items: object,
    *,
    max_tensors: int = DEFAULT_MAX_TENSORS,
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    field: str = "inputs",
) -> dict[str, np.ndarray]:
    """The list :func:`encode_tensors` made (after a CBOR round trip) -> ``{name: array}``.

    Every problem is an :class:`InvalidInput` naming the field (``inputs[1].shape: ...``;
    ``field`` sets the prefix); more than ``max_bytes`` of tensor data in all is a
    :class:`PayloadTooLarge`. Numeric arrays are read-only views of the decoded bytes."""
    if not isinstance(items, list):
        raise InvalidInput(f"{field}: expected a list of tensors, got {type(items).__name__}")
    if len(items) > max_tensors:
        raise InvalidInput(f"{field}: {len(items)} tensors, more than the {max_tensors} accepted")
    out: dict[str, np.ndarray] = {}
    total = 0
    for index, item in enumerate(items):
        where = f"{field}[{index}]"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where}: expected a map, got {type(item).__name__}")
        keys = set(item)
        if keys != _TENSOR_FIELDS:
            missing = sorted(_TENSOR_FIELDS - keys)
            extra = sorted(repr(k) for k in keys - _TENSOR_FIELDS)
            problem = f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"
            raise InvalidInput(f"{where}: {problem} (a tensor has exactly name, datatype, shape, data)")
        name = item["name"]
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{where}.name: expected a non-empty string")
        if name in out:
            raise InvalidInput(f"{where}.name: {name[:100]!r} appears more than once")
        datatype = item["datatype"]
        if not isinstance(datatype, str):
            raise InvalidInput(f"{where}.datatype: expected a string, got {type(datatype).__name__}")
        numpy_dtype(datatype, f"{where}.datatype")
        shape = _shape(item["shape"], where)
        count = math.prod(shape)
        data = item["data"]
        if datatype == "BYTES":
            array = _strings(where, data, shape, count)
            total += sum(len(b) for b in data)
        else:
            array = _fixed(where, datatype, data, shape, count)
            total += array.nbytes
        if total > max_bytes:
            raise PayloadTooLarge(f"{field}: more than {max_bytes} bytes of tensor data (at {where})")
        out[name] = array
    return out
