"""V2 REST codec: decoding rules and errors, encoding choices, round trips, fuzzing, and
wire compatibility with tritonclient in both directions."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton_http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bastion.core.datatypes import DATATYPE_TO_NUMPY
from bastion.core.errors import InternalError, InvalidInput
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor, RequestedOutput
from bastion.protocol.v2_rest import (
    array_from_json,
    decode_infer_request,
    decode_infer_response,
    encode_error,
    encode_infer_request,
    encode_infer_response,
)

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
ALL_TYPES = [*NUMERIC, "BYTES"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def body_of(obj: Any, binary: bytes = b"") -> tuple[bytes, int | None]:
    header = orjson.dumps(obj)
    return (header + binary, len(header)) if binary else (header, None)


def decode(obj: Any, binary: bytes = b"", **kwargs: Any) -> InferenceRequest:
    body, length = body_of(obj, binary)
    return decode_infer_request(body, "m", "1", length, **kwargs)


def one_input(**fields: Any) -> dict:
    tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    tensor.update(fields)
    return {"inputs": [{k: v for k, v in tensor.items() if v is not ...}]}


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    if want.dtype == object:
        assert got.reshape(-1).tolist() == want.reshape(-1).tolist()
    else:
        np.testing.assert_array_equal(got, want)  # NaN == NaN here


def objects(items: list, shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    n = int(np.prod(shape))
    if datatype == "BYTES":
        return objects([f"s{i}".encode() for i in range(n)], shape)
    if datatype == "BOOL":
        return (np.arange(n) % 2 == 0).reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype]
    values = np.arange(n) - (n // 2 if dtype.kind != "u" else 0)
    if dtype.kind == "f":
        values = values / 4
    return values.astype(dtype).reshape(shape)


# --------------------------------------------------------------------------------------------
# Decoding requests: JSON data
# --------------------------------------------------------------------------------------------


def test_decode_minimal_fp32_request() -> None:
    req = decode({"id": "r1", "parameters": {"p": 1}, **one_input()})
    assert (req.model_name, req.model_version, req.id, req.parameters) == ("m", "1", "r1", {"p": 1})
    assert req.outputs is None
    (x,) = req.inputs
    assert (x.name, x.datatype, x.shape, x.parameters) == ("x", "FP32", (1, 4), {})
    assert_same(x.data, np.array([[1, 2, 3, 4]], dtype=np.float32))


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_decode_json_every_datatype_flat_and_nested(datatype: str) -> None:
    want = sample(datatype)
    nested = want.tolist() if datatype != "BYTES" else [[b.decode() for b in row] for row in want.tolist()]
    flat = [v for row in nested for v in row]
    for data in (flat, nested):
        req = decode(one_input(datatype=datatype, shape=[2, 3], data=data))
        assert_same(req.inputs[0].data, want)


def test_decode_nested_layout_may_differ_from_shape_when_counts_match() -> None:
    req = decode(one_input(shape=[2, 2], data=[[1], [2], [3], [4]]))
    assert_same(req.inputs[0].data, np.array([[1, 2], [3, 4]], dtype=np.float32))


def test_decode_bytes_become_utf8_bytes() -> None:
    req = decode(one_input(datatype="BYTES", shape=[2], data=["héllo", ""]))
    assert req.inputs[0].data.tolist() == ["héllo".encode(), b""]


def test_decode_empty_and_scalar_shapes() -> None:
    assert decode(one_input(shape=[0], data=[])).inputs[0].data.shape == (0,)
    assert decode(one_input(datatype="INT32", shape=[2, 0], data=[[], []])).inputs[0].data.shape == (2, 0)
    scalar = decode(one_input(datatype="INT64", shape=[], data=[7])).inputs[0].data
    assert scalar.shape == () and scalar.dtype == np.int64 and int(scalar) == 7


def test_decode_extreme_integers() -> None:
    req = decode(one_input(datatype="UINT64", shape=[2], data=[0, 2**64 - 1]))
    assert req.inputs[0].data.tolist() == [0, 2**64 - 1]
    req = decode(one_input(datatype="INT64", shape=[2], data=[-(2**63), 2**63 - 1]))
    assert req.inputs[0].data.tolist() == [-(2**63), 2**63 - 1]
    req = decode(one_input(datatype="INT8", shape=[2], data=[-128, 127]))
    assert req.inputs[0].data.tolist() == [-128, 127]


def test_decode_float_limits_round_like_a_cast() -> None:
    """The shortest text of the FP32/FP16 max is above the max yet must read back as the max."""
    f32 = decode(one_input(shape=[2], data=[3.4028235e38, -3.4028235e38])).inputs[0].data
    assert f32.tolist() == [np.finfo(np.float32).max, -np.finfo(np.float32).max]
    f16 = decode(one_input(datatype="FP16", shape=[2], data=[65519.99, 1e-9])).inputs[0].data
    assert f16.tolist() == [65504.0, 0.0]
    with pytest.raises(InvalidInput, match="value out of range for FP16"):
        decode(one_input(datatype="FP16", shape=[1], data=[-65520]))


def test_decode_ints_are_fine_for_floats() -> None:
    req = decode(one_input(datatype="FP64", shape=[3], data=[1, 2.5, -3]))
    assert req.inputs[0].data.tolist() == [1.0, 2.5, -3.0]


def test_decode_requested_outputs_and_parameters() -> None:
    obj = {
        **one_input(),
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
    }
    req = decode(obj)
    assert req.outputs == [RequestedOutput("y", {"binary_data": False}), RequestedOutput("z", {})]
    assert req.parameters == {"binary_data_output": True}


def test_decode_keeps_tensor_parameters_but_not_binary_size() -> None:
    req = decode(
        {"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "parameters": {"binary_data_size": 1, "k": "v"}}]},
        b"\x05",
    )
    assert req.inputs[0].parameters == {"k": "v"}


# --------------------------------------------------------------------------------------------
# Decoding requests: errors
# --------------------------------------------------------------------------------------------

ERRORS = [
    ([], "request body: expected a JSON object"),
    ({}, "inputs: expected a non-empty list"),
    ({"inputs": []}, "inputs: expected a non-empty list"),
    ({"inputs": {"x": 1}}, "inputs: expected a non-empty list"),
    ({"inputs": [5]}, "inputs[0]: expected an object, got 5"),
    (one_input(name=...), "inputs[0].name: expected a non-empty string, got nothing"),
    (one_input(name=""), "inputs[0].name: expected a non-empty string"),
    (one_input(name=3), "inputs[0].name: expected a non-empty string, got 3"),
    (one_input(shape=[1, -4]), "inputs[0].shape: expected a list of at most 32 non-negative integers, got [1, -4]"),
    (one_input(shape="1,4"), "inputs[0].shape: expected a list"),
    (one_input(shape=[1, True]), "inputs[0].shape: expected a list"),
    (one_input(shape=[1, 4.0]), "inputs[0].shape: expected a list"),
    (one_input(shape=[1] * 33), "inputs[0].shape: expected a list of at most 32"),
    (one_input(datatype="BF16"), "inputs[0].datatype: unsupported datatype 'BF16'"),
    (one_input(datatype=...), 'inputs[0].datatype: expected a datatype name such as "FP32"'),
    (one_input(data=...), "input 'x': no data; expected 'data' or parameters.binary_data_size"),
    (one_input(data=5), "input 'x': data: expected an array, got 5"),
    (one_input(data=[1, 2, 3]), "input 'x': data has 3 elements but shape [1, 4] needs 4"),
    (one_input(data=[1, "2", 3, 4]), "input 'x': datatype FP32 expects numbers, got string"),
    (one_input(data=[1, True, 3, 4]), "input 'x': datatype FP32 expects numbers, got boolean"),
    (one_input(data=[1, None, 3, 4]), "input 'x': datatype FP32 expects numbers, got null"),
    (one_input(data=[1, {}, 3, 4]), "input 'x': datatype FP32 expects numbers, got object"),
    (one_input(data=[[1, 2], [3]]), "input 'x': data is not a rectangular array"),
    (one_input(data=[[1, 2], 3, 4]), "input 'x': data mixes arrays and scalars"),
    (one_input(datatype="INT32", data=[True, False, True, True]), "datatype INT32 expects integers, got boolean"),
    (one_input(datatype="INT32", data=[1.5, 2, 3, 4]), "datatype INT32 expects integers, got a non-integer"),
    (one_input(datatype="INT32", data=[1.0, 2, 3, 4]), "datatype INT32 expects integers, got a non-integer"),
    (one_input(datatype="UINT8", data=[300, 2, 3, 4]), "input 'x': value out of range for UINT8 [0, 255]"),
    (one_input(datatype="UINT8", data=[-1, 2, 3, 4]), "value out of range for UINT8"),
    (one_input(datatype="INT8", data=[[1, 2], [3, -129]], shape=[2, 2]), "value out of range for INT8"),
    (one_input(datatype="INT64", data=[2**63, 2, 3, 4]), "value out of range for INT64"),
    (one_input(datatype="UINT64", data=[-1, 2, 3, 4]), "value out of range for UINT64"),
    (one_input(datatype="FP32", data=[1e39, 2, 3, 4]), "value out of range for FP32"),
    (one_input(datatype="FP16", data=[70000, 2, 3, 4]), "value out of range for FP16"),
    (one_input(datatype="BOOL", data=[1, 0, 1, 0]), "datatype BOOL expects true or false, got integer"),
    (one_input(datatype="BYTES", data=[1, "a", "b", "c"]), "datatype BYTES expects strings, got integer"),
    (one_input(datatype="BYTES", data=[["a"], ["b", "c", "d"]], shape=[4]), "not a rectangular array"),
    (one_input(parameters=[1]), "inputs[0].parameters: expected an object"),
    (one_input(parameters={"binary_data_size": -1}), "inputs[0].parameters.binary_data_size: expected a non-negative"),
    (one_input(parameters={"binary_data_size": True}), "binary_data_size: expected a non-negative integer"),
    (one_input(parameters={"binary_data_size": 16}), "input 'x': has both 'data' and parameters.binary_data_size"),
    (one_input(parameters={"shared_memory_region": "r"}), "shared-memory tensors are not supported"),
    ({"inputs": [one_input()["inputs"][0]] * 2}, "inputs: duplicate input name 'x'"),
    ({**one_input(), "id": 5}, "id: expected a string, got 5"),
    ({**one_input(), "parameters": [1]}, "parameters: expected an object"),
    ({**one_input(), "parameters": {"binary_data_output": 1}}, "parameters.binary_data_output: expected true or false"),
    ({**one_input(), "outputs": {"name": "y"}}, "outputs: expected a list of objects"),
    ({**one_input(), "outputs": ["y"]}, "outputs[0]: expected an object"),
    ({**one_input(), "outputs": [{"name": 1}]}, "outputs[0].name: expected a non-empty string"),
    ({**one_input(), "outputs": [{"name": "y"}, {"name": "y"}]}, "outputs: duplicate output name 'y'"),
    (
        {**one_input(), "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]},
        "outputs[0].parameters.binary_data: expected true or false",
    ),
]


@pytest.mark.parametrize(("obj", "message"), ERRORS)
def test_decode_errors_name_the_field(obj: Any, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode(obj)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "request body is not valid JSON"),
        (b"{", "request body is not valid JSON"),
        (b'{"inputs": [NaN]}', "request body is not valid JSON"),
        (b"\xff\xfe", "request body is not valid JSON"),
        (b"42", "request body: expected a JSON object, got 42"),
    ],
)
def test_decode_malformed_json(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match="^" + message.replace("[", r"\[")):
        decode_infer_request(body, "m", None)


@pytest.mark.parametrize(
    ("length", "message"),
    [
        (-1, "Inference-Header-Content-Length: expected a non-negative integer"),
        (10_000, "Inference-Header-Content-Length is 10000 but the body is only"),
        (3, "request body is not valid JSON"),
    ],
)
def test_decode_bad_header_length(length: int, message: str) -> None:
    body, _ = body_of(one_input())
    with pytest.raises(InvalidInput, match=message):
        decode_infer_request(body, "m", None, length)


def test_decode_max_elements() -> None:
    decode(one_input(), max_elements=4)
    with pytest.raises(InvalidInput, match="more than 3 elements"):
        decode(one_input(), max_elements=3)
    huge = {
        "inputs": [{"name": "x", "shape": [2**40, 2**40], "datatype": "FP32", "parameters": {"binary_data_size": 0}}]
    }
    with pytest.raises(InvalidInput, match="more than 67108864 elements"):
        decode(huge)


def test_numpy1_integer_range_check() -> None:
    """NumPy 1 wraps out-of-range ints silently, so the codec checks them itself there."""
    from bastion.protocol.v2_rest import _legacy_int_range

    _legacy_int_range([[0, 255]], np.dtype(np.uint8), "input 'x'", "UINT8")
    with pytest.raises(InvalidInput, match=r"input 'x': value out of range for UINT8 \[0, 255\]"):
        _legacy_int_range([[0, 256]], np.dtype(np.uint8), "input 'x'", "UINT8")


def test_array_from_json_is_usable_alone() -> None:
    arr = array_from_json([[1, 2], [3, 4]], "INT16", "input 'a'")
    assert arr.dtype == np.int16 and arr.shape == (2, 2)
    assert np.isnan(array_from_json([1.0, None], "FP32", "o", allow_null=True)[1])
    with pytest.raises(InvalidInput, match="data is nested deeper than 32"):
        deep: Any = [1.0]
        for _ in range(40):
            deep = [deep]
        array_from_json(deep, "FP32", "input 'a'")


# --------------------------------------------------------------------------------------------
# Decoding requests: binary tensor data
# --------------------------------------------------------------------------------------------


def binary_input(name: str, datatype: str, shape: list[int], size: int) -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}


def bytes_section(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


@pytest.mark.parametrize("datatype", NUMERIC)
def test_decode_binary_every_fixed_datatype(datatype: str) -> None:
    want = sample(datatype, (2, 2))
    raw = want.astype(want.dtype.newbyteorder("<")).tobytes()
    req = decode({"inputs": [binary_input("x", datatype, [2, 2], len(raw))]}, raw)
    assert_same(req.inputs[0].data, want)


def test_decode_binary_mixed_with_json_in_input_order() -> None:
    a = np.arange(4, dtype=np.float16)
    strings = [b"\x00\xff", b"", "é".encode()]
    binary = a.tobytes() + bytes_section(strings)
    obj = {
        "inputs": [
            binary_input("a", "FP16", [4], 8),
            {"name": "j", "shape": [1], "datatype": "INT32", "data": [9]},
            binary_input("s", "BYTES", [3], len(binary) - 8),
        ]
    }
    req = decode(obj, binary)
    assert_same(req.inputs[0].data, a)
    assert req.inputs[1].data.tolist() == [9]
    assert req.inputs[2].data.tolist() == strings


def test_decode_binary_tensor_is_aligned_and_its_own() -> None:
    raw = np.arange(16, dtype=np.int32).tobytes()
    req = decode({"inputs": [binary_input("x", "INT32", [1, 16], 64)]}, raw)
    arr = req.inputs[0].data
    assert arr.flags.aligned and arr.shape == (1, 16)
    assert arr.tolist() == [list(range(16))]


BINARY_ERRORS = [
    (
        [binary_input("x", "INT32", [1, 16], 60)],
        b"\0" * 60,
        "binary_data_size of input 'x' is 60 but shape [1, 16] of INT32 needs 64",
    ),
    ([binary_input("x", "INT32", [1, 16], 64)], b"\0" * 10, "binary section is 10 bytes but inputs declare 64"),
    ([binary_input("x", "INT8", [2], 2)], b"\0" * 5, "binary section is 5 bytes but inputs declare 2"),
    ([binary_input("x", "BOOL", [2], 2)], b"\x01\x02", "BOOL binary data must be bytes 0 or 1"),
    ([binary_input("x", "BYTES", [2], 6)], bytes_section([b"ab"]), "2 BYTES elements (shape [2]) need at least 8"),
    ([binary_input("x", "BYTES", [2], 9)], bytes_section([b"abcde"]), "ends after 1 of 2 BYTES elements"),
    ([binary_input("x", "BYTES", [1], 5)], struct.pack("<I", 9) + b"a", "element 0 declares 9 bytes past the end"),
    ([binary_input("x", "BYTES", [1], 10)], bytes_section([b"a", b"b"]), "is 10 but its 1 BYTES elements use 5"),
]


@pytest.mark.parametrize(("inputs", "binary", "message"), BINARY_ERRORS)
def test_decode_binary_errors(inputs: list, binary: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode({"inputs": inputs}, binary)
    assert message in str(info.value)


def test_decode_binary_without_header_length() -> None:
    header = orjson.dumps({"inputs": [binary_input("x", "INT8", [2], 2)]})
    with pytest.raises(InvalidInput, match="no binary section"):
        decode_infer_request(header, "m", None)
    with pytest.raises(InvalidInput, match="binary section is 2 bytes but inputs declare 0"):
        decode_infer_request(orjson.dumps(one_input()) + b"ab", "m", None, len(orjson.dumps(one_input())))


# --------------------------------------------------------------------------------------------
# Encoding responses
# --------------------------------------------------------------------------------------------


def response(*tensors: InferTensor, **kwargs: Any) -> InferenceResponse:
    return InferenceResponse("m", kwargs.pop("version", "1"), list(tensors), **kwargs)


def request(outputs: list[RequestedOutput] | None = None, **parameters: Any) -> InferenceRequest:
    x = InferTensor("x", "FP32", (1,), np.zeros(1, np.float32))
    return InferenceRequest("m", None, [x], outputs=outputs, parameters=parameters)


def tensor(name: str, data: np.ndarray, datatype: str | None = None) -> InferTensor:
    datatype = datatype or (
        "BYTES" if data.dtype == object else {v: k for k, v in DATATYPE_TO_NUMPY.items()}[data.dtype]
    )
    return InferTensor(name, datatype, data.shape, data)


def test_encode_json_response_shape() -> None:
    y = np.array([[0.5, 1.5]], dtype=np.float32)
    body, length = encode_infer_response(response(tensor("y", y), id="r1", parameters={"k": 1}), request())
    assert length is None
    assert orjson.loads(body) == {
        "model_name": "m",
        "model_version": "1",
        "id": "r1",
        "parameters": {"k": 1},
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 1.5]}],
    }
    body, _ = encode_infer_response(response(tensor("y", y), version=None), request())
    assert set(orjson.loads(body)) == {"model_name", "outputs"}
    with_id = request()
    with_id.id = "from-request"
    body, _ = encode_infer_response(response(tensor("y", y)), with_id)
    assert orjson.loads(body)["id"] == "from-request"


@pytest.mark.parametrize(
    ("outputs", "params", "binary"),
    [
        (None, {}, {"a": False, "b": False}),
        (None, {"binary_data_output": True}, {"a": True, "b": True}),
        ([RequestedOutput("a", {"binary_data": True}), RequestedOutput("b")], {}, {"a": True, "b": False}),
        (
            [RequestedOutput("a", {"binary_data": False}), RequestedOutput("b")],
            {"binary_data_output": True},
            {"a": False, "b": True},
        ),
    ],
)
def test_encode_binary_choice(outputs: list | None, params: dict, binary: dict[str, bool]) -> None:
    a = np.arange(3, dtype=np.int16)
    b = np.array([b"x", b"yz"], dtype=object)
    body, length = encode_infer_response(response(tensor("a", a), tensor("b", b)), request(outputs, **params))
    header = orjson.loads(body[:length] if length else body)
    for out in header["outputs"]:
        assert ("binary_data_size" in out.get("parameters", {})) == binary[out["name"]]
        assert ("data" in out) != binary[out["name"]]
    assert (length is None) == (not any(binary.values()))
    decoded = decode_infer_response(body, length)
    assert_same(decoded.outputs[0].data, a)
    assert_same(decoded.outputs[1].data, b)


def test_encode_non_utf8_bytes_output_goes_binary() -> None:
    b = np.array([b"\xff\x00", b"ok"], dtype=object)
    body, length = encode_infer_response(response(tensor("b", b)), request())
    assert length is not None
    out = orjson.loads(body[:length])["outputs"][0]
    assert out["parameters"] == {"binary_data_size": 4 + 2 + 4 + 2}
    assert_same(decode_infer_response(body, length).outputs[0].data, b)


def test_encode_str_elements_and_non_finite_json() -> None:
    s = np.array(["é", "b"], dtype=object)
    f = np.array([np.nan, np.inf, 1.0], dtype=np.float32)
    body, length = encode_infer_response(response(tensor("s", s), tensor("f", f)), request())
    outs = orjson.loads(body)["outputs"]
    assert outs[0]["data"] == ["é", "b"]
    assert outs[1]["data"] == [None, None, 1.0]  # JSON has no NaN/Inf; binary_data keeps them
    assert np.isnan(decode_infer_response(body, length).outputs[1].data[:2]).all()


def test_encode_casts_and_lays_out_data() -> None:
    f = np.arange(6, dtype=">f8").reshape(2, 3).T  # big-endian, not C-contiguous
    body, _ = encode_infer_response(response(InferTensor("f", "FP32", (3, 2), f)), request())
    out = orjson.loads(body)["outputs"][0]
    assert out["shape"] == [3, 2] and out["data"] == [0, 3, 1, 4, 2, 5]
    body, length = encode_infer_response(
        response(InferTensor("f", "FP32", (3, 2), f)), request(binary_data_output=True)
    )
    assert_same(decode_infer_response(body, length).outputs[0].data, f.astype(np.float32))


def test_encode_unknown_datatype_is_a_server_bug() -> None:
    bad = InferTensor("y", "BF16", (1,), np.zeros(1, np.float32))
    with pytest.raises(InternalError, match="unsupported datatype 'BF16'"):
        encode_infer_response(response(bad), request())


def test_encode_error() -> None:
    assert orjson.loads(encode_error("input 'x': bad")) == {"error": "input 'x': bad"}


def test_decode_infer_response_errors() -> None:
    with pytest.raises(InvalidInput, match="model_name: expected a string"):
        decode_infer_response(b'{"outputs": []}', None)
    with pytest.raises(InvalidInput, match="outputs: expected a non-empty list"):
        decode_infer_response(b'{"model_name": "m"}', None)
    with pytest.raises(InvalidInput, match="response body is not valid JSON"):
        decode_infer_response(b"nope", None)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True])
def test_request_round_trip_every_datatype(binary: bool) -> None:
    inputs = [tensor(f"in_{dt}", sample(dt), dt) for dt in ALL_TYPES]
    outputs = [RequestedOutput("y", {"binary_data": True})]
    req = InferenceRequest("m", "2", inputs, id="abc", outputs=outputs, parameters={"p": "q"})
    body, length = encode_infer_request(req, binary)
    assert (length is not None) == binary
    got = decode_infer_request(body, "m", "2", length)
    assert (got.id, got.outputs, got.parameters) == ("abc", outputs, {"p": "q"})
    for a, b in zip(got.inputs, inputs, strict=True):
        assert (a.name, a.datatype, a.shape) == (b.name, b.datatype, b.shape)
        assert_same(a.data, b.data)


@pytest.mark.parametrize("binary", [False, True])
def test_response_round_trip_every_datatype(binary: bool) -> None:
    outputs = [tensor(f"out_{dt}", sample(dt), dt) for dt in ALL_TYPES]
    resp = response(*outputs, id="abc")
    body, length = encode_infer_response(resp, request(binary_data_output=binary))
    got = decode_infer_response(body, length)
    assert (got.model_name, got.model_version, got.id) == ("m", "1", "abc")
    for a, b in zip(got.outputs, outputs, strict=True):
        assert (a.name, a.datatype, a.shape) == (b.name, b.datatype, b.shape)
        assert_same(a.data, b.data)


def arrays_of(datatype: str, finite: bool = False) -> st.SearchStrategy[np.ndarray]:
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
    if datatype == "BYTES":
        return shapes.flatmap(
            lambda s: st.lists(st.binary(max_size=6), min_size=int(np.prod(s)), max_size=int(np.prod(s))).map(
                lambda items: objects(items, s)
            )
        )
    dtype = DATATYPE_TO_NUMPY[datatype]
    elements = None
    if dtype.kind == "f":
        elements = st.floats(width=dtype.itemsize * 8, allow_nan=True, allow_infinity=not finite)
    return hnp.arrays(dtype, shapes, elements=elements)


@FAST
@given(data=st.data(), datatype=st.sampled_from(ALL_TYPES), binary=st.booleans())
def test_property_request_round_trip(data: st.DataObject, datatype: str, binary: bool) -> None:
    arr = data.draw(arrays_of(datatype))
    req = InferenceRequest("m", None, [tensor("x", arr, datatype)])
    body, length = encode_infer_request(req, binary)
    assert_same(decode_infer_request(body, "m", None, length).inputs[0].data, arr)


@FAST
@given(data=st.data(), datatype=st.sampled_from(ALL_TYPES), binary=st.booleans())
def test_property_response_round_trip(data: st.DataObject, datatype: str, binary: bool) -> None:
    arr = data.draw(arrays_of(datatype, finite=not binary))  # JSON writes inf as null
    resp = response(tensor("y", arr, datatype))
    body, length = encode_infer_response(resp, request(binary_data_output=binary))
    assert_same(decode_infer_response(body, length).outputs[0].data, arr)


# --------------------------------------------------------------------------------------------
# Fuzzing: nothing but InvalidInput ever escapes
# --------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
scalars = st.one_of(
    st.integers(-300, 300),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)


@st.composite
def request_bodies(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """Nearly valid requests (JSON and binary tensors) with a few fields swapped for junk, so
    that the fuzz reaches the deep code paths rather than stopping at the first field."""
    rng = draw(st.randoms(use_true_random=False))

    def junk_or(value: Any) -> Any:
        return draw(json_values) if rng.random() > 0.95 else value  # draws near 0 are valid

    tensors, section = [], b""
    for i in range(rng.randint(1, 3)):
        shape = junk_or([rng.randint(0, 3) for _ in range(rng.randint(0, 3))])
        datatype = junk_or(rng.choice([*ALL_TYPES, "BF16"]))
        count = int(np.prod(shape)) if isinstance(shape, list) and all(type(d) is int for d in shape) else 1
        count = min(max(count, 0), 50) + (rng.random() > 0.9)
        obj: dict[str, Any] = {"name": junk_or(f"t{i}"), "shape": shape, "datatype": datatype}
        if rng.random() < 0.5:
            itemsize = DATATYPE_TO_NUMPY[datatype].itemsize if datatype in NUMERIC else 1
            raw = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
            if datatype == "BYTES":
                raw = bytes_section(draw(st.lists(st.binary(max_size=3), min_size=count, max_size=count)))
            section += raw
            obj["parameters"] = {"binary_data_size": junk_or(len(raw))}
        else:
            element = rng.choice([scalars, st.integers(-300, 300), st.booleans(), st.text(max_size=2)])
            obj["data"] = junk_or(draw(st.lists(element, min_size=count, max_size=count)))
        tensors.append(junk_or(obj))
    request: dict[str, Any] = {"inputs": junk_or(tensors)}
    if rng.random() < 0.3:
        request["outputs"] = junk_or([{"name": rng.choice("yz"), "parameters": junk_or({})}])
    if rng.random() < 0.3:
        request["parameters"] = junk_or({"binary_data_output": junk_or(True)})
    if rng.random() < 0.25:  # the same tensors as a response, for decode_infer_response
        request = {"model_name": "m", "outputs": request["inputs"]}
    header = orjson.dumps(request)
    section += b"\x00" if rng.random() > 0.95 else b""
    length = None if not section and rng.random() < 0.5 else len(header) + rng.choice([0] * 18 + [-1, 1])
    return header + section, length


def only_invalid_input(body: bytes, length: int | None) -> None:
    with contextlib.suppress(InvalidInput):
        decode_infer_request(body, "m", None, length, max_elements=10_000)
    with contextlib.suppress(InvalidInput):
        decode_infer_response(body, length, max_elements=10_000)


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=64), length=st.none() | st.integers(-3, 70))
def test_fuzz_arbitrary_bytes(body: bytes, length: int | None) -> None:
    only_invalid_input(body, length)


@settings(max_examples=150, deadline=None)
@given(value=json_values)
def test_fuzz_arbitrary_json(value: Any) -> None:
    only_invalid_input(orjson.dumps(value), None)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=request_bodies())
def test_fuzz_request_shaped_bodies(request: tuple[bytes, int | None]) -> None:
    only_invalid_input(*request)


# --------------------------------------------------------------------------------------------
# Compatibility with tritonclient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_request_decodes_exactly(binary: bool) -> None:
    arrays = {dt: sample(dt) for dt in ALL_TYPES}
    arrays["BYTES"] = np.array([["a", "b", "c"], ["d", "é", ""]], dtype=object) if not binary else arrays["BYTES"]
    inputs = []
    for dt, arr in arrays.items():
        item = triton_http.InferInput(f"in_{dt}", list(arr.shape), dt)
        item.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(item)
    outputs = [triton_http.InferRequestedOutput("y", binary_data=True)]
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="req-7", parameters={"custom": 3}
    )
    req = decode_infer_request(body, "m", None, json_size)
    assert req.id == "req-7" and req.parameters == {"custom": 3}
    assert req.outputs == [RequestedOutput("y", {"binary_data": True})]
    for got, (dt, arr) in zip(req.inputs, arrays.items(), strict=True):
        want = (
            np.array([s.encode() for s in arr.reshape(-1)], dtype=object).reshape(arr.shape)
            if (dt == "BYTES" and not binary)
            else arr
        )
        assert got.name == f"in_{dt}"
        assert_same(got.data, want)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_parses_our_response(binary: bool) -> None:
    outputs = [tensor(f"out_{dt}", sample(dt), dt) for dt in ALL_TYPES]
    outputs.append(tensor("raw", np.array([b"\xff", b"a"], dtype=object)))  # goes binary regardless
    body, length = encode_infer_response(response(*outputs, id="i"), request(binary_data_output=binary))
    result = triton_http.InferenceServerClient.parse_response_body(body, header_length=length)
    assert result.get_response()["id"] == "i"
    for out in outputs:
        got = result.as_numpy(out.name)
        want = out.data
        if out.datatype == "BYTES" and not binary and out.name != "raw":
            want = np.array([b.decode() for b in want.reshape(-1)], dtype=object).reshape(want.shape)
        assert_same(got, want)
