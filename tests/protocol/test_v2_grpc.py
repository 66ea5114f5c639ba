"""Open Inference Protocol gRPC codec: wire compatibility, validation, round trips, fuzz."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bastion.core.datatypes import DATATYPE_TO_NUMPY, DATATYPES
from bastion.core.errors import InternalError, InvalidInput
from bastion.core.metadata import ModelMetadata, TensorSpec
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor, RequestedOutput
from bastion.protocol import v2_grpc
from bastion.protocol.grpc_v2 import grpc_service_pb2 as pb2

NUMERIC = sorted(DATATYPES - {"BYTES"})
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw_request(datatype: str, shape: list[int], raw: bytes, name: str = "INPUT0") -> pb2.ModelInferRequest:
    msg = pb2.ModelInferRequest(model_name="m")
    msg.inputs.add(name=name, datatype=datatype, shape=shape)
    msg.raw_input_contents.append(raw)
    return msg


def typed_request(datatype: str, shape: list[int], **contents: list) -> pb2.ModelInferRequest:
    msg = pb2.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return msg


def bytes_raw(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def assert_same(actual: np.ndarray, expected: np.ndarray, datatype: str) -> None:
    assert actual.dtype == DATATYPE_TO_NUMPY[datatype]
    assert actual.shape == expected.shape
    if datatype == "BYTES":
        assert [bytes(x) for x in actual.ravel()] == [bytes(x) for x in expected.ravel()]
    else:
        np.testing.assert_array_equal(actual, expected)


# ------------------------------------------------------------------ wire compatibility


def _shape_of(descriptor) -> dict:
    """Everything about a message that reaches the wire: names, numbers, types, nesting."""
    fields = {}
    for f in descriptor.fields:
        fields[f.name] = (
            f.number,
            f.type,
            f.is_repeated if hasattr(f, "is_repeated") else f.label,
            f.message_type.full_name if f.message_type else None,
            f.containing_oneof.name if f.containing_oneof else None,
        )
    nested = {n.name: _shape_of(n) for n in descriptor.nested_types}
    return {"fields": fields, "nested": nested}


def test_messages_match_tritonclient_field_for_field():
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")
    for name, ours in pb2.DESCRIPTOR.message_types_by_name.items():
        theirs = triton.DESCRIPTOR.message_types_by_name[name]
        assert theirs.full_name == ours.full_name
        assert _shape_of(ours) == _shape_of(theirs), name


def test_service_methods_match_tritonclient():
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")
    ours = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    expected = {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    }
    assert {m.name for m in ours.methods} == expected
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
        assert not method.client_streaming and not method.server_streaming


def test_tritonclient_request_decodes_and_our_response_reads_in_tritonclient():
    """Offline interop: tritonclient's own message building and result parsing."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import _utils as tc_utils

    arrays = {
        "INT32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "FP32": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        "FP16": np.array([[0.5, -2.0, 65504.0]], dtype=np.float16),
        "BYTES": np.array([[b"a", b"", "h\u00e9".encode()]], dtype=object),
        "BOOL": np.array([True, False, True]),
        "UINT8": np.array([0, 255], dtype=np.uint8),
        "INT64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
        "FP64": np.array([np.pi], dtype=np.float64),
    }
    inputs = []
    for datatype, array in arrays.items():
        infer_input = grpcclient.InferInput(f"IN_{datatype}", list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    wire = tc_utils._get_inference_request(
        model_name="m",
        inputs=inputs,
        model_version="",
        request_id="r1",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters={"p": "v"},
    ).SerializeToString()

    request = v2_grpc.decode_infer_request(pb2.ModelInferRequest.FromString(wire))
    assert request.id == "r1" and request.parameters == {"p": "v"}
    for tensor in request.inputs:
        assert_same(tensor.data, arrays[tensor.datatype], tensor.datatype)

    response = InferenceResponse(
        "m", "1", [InferTensor(f"OUT_{t.datatype}", t.datatype, t.shape, t.data) for t in request.inputs]
    )
    wire = v2_grpc.encode_infer_response(response, raw=True).SerializeToString()
    result = grpcclient.InferResult(grpcclient.service_pb2.ModelInferResponse.FromString(wire))
    for datatype, array in arrays.items():
        assert_same(result.as_numpy(f"OUT_{datatype}"), array, datatype)


# ------------------------------------------------------------------ decoding: good requests


def test_decode_raw_request_fields():
    msg = raw_request("FP32", [1, 4], np.arange(4, dtype="<f4").tobytes())
    msg.model_version = "3"
    msg.id = "req-1"
    msg.parameters["a"].bool_param = True
    msg.parameters["b"].int64_param = -5
    msg.parameters["c"].string_param = "s"
    msg.parameters["d"].double_param = 0.25
    msg.parameters["e"].uint64_param = 2**64 - 1
    msg.inputs[0].parameters["x"].int64_param = 1
    msg.outputs.add(name="OUT").parameters["k"].uint64_param = 3
    request = v2_grpc.decode_infer_request(msg)
    assert request.model_name == "m" and request.model_version == "3" and request.id == "req-1"
    assert request.parameters == {"a": True, "b": -5, "c": "s", "d": 0.25, "e": 2**64 - 1}
    [tensor] = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("INPUT0", "FP32", (1, 4))
    assert tensor.parameters == {"x": 1}
    np.testing.assert_array_equal(tensor.data, np.arange(4, dtype=np.float32).reshape(1, 4))
    assert request.outputs == [RequestedOutput("OUT", {"k": 3})]


def test_decode_defaults_to_none():
    request = v2_grpc.decode_infer_request(raw_request("INT8", [0], b""))
    assert request.model_version is None and request.id is None and request.outputs is None
    assert request.inputs[0].data.shape == (0,)


def test_decode_raw_is_zero_copy_little_endian():
    raw = struct.pack("<3i", 1, -2, 3)
    tensor = v2_grpc.decode_infer_request(raw_request("INT32", [3], raw)).inputs[0]
    assert tensor.data.tolist() == [1, -2, 3]
    assert tensor.data.dtype == np.int32
    assert not tensor.data.flags.writeable  # a view of the message's bytes


def test_decode_typed_each_datatype():
    cases = {
        "BOOL": ("bool_contents", [True, False]),
        "INT8": ("int_contents", [-128, 127]),
        "INT16": ("int_contents", [-32768, 32767]),
        "INT32": ("int_contents", [-(2**31), 2**31 - 1]),
        "INT64": ("int64_contents", [-(2**63), 2**63 - 1]),
        "UINT8": ("uint_contents", [0, 255]),
        "UINT16": ("uint_contents", [0, 65535]),
        "UINT32": ("uint_contents", [0, 2**32 - 1]),
        "UINT64": ("uint64_contents", [0, 2**64 - 1]),
        "FP32": ("fp32_contents", [1.5, -0.0]),
        "FP64": ("fp64_contents", [1e300, -2.5]),
        "BYTES": ("bytes_contents", [b"\x00\xff", b""]),
    }
    for datatype, (field, values) in cases.items():
        tensor = v2_grpc.decode_infer_request(typed_request(datatype, [2, 1], **{field: values})).inputs[0]
        expected = np.array(values, dtype=DATATYPE_TO_NUMPY[datatype]).reshape(2, 1)
        assert_same(tensor.data, expected, datatype)


def test_decode_raw_bytes_elements():
    elements = [b"", b"abc", "\u00e9".encode(), b"\x00" * 5]
    tensor = v2_grpc.decode_infer_request(raw_request("BYTES", [2, 2], bytes_raw(elements))).inputs[0]
    assert tensor.data.dtype == object and tensor.data.shape == (2, 2)
    assert tensor.data.ravel().tolist() == elements


# ------------------------------------------------------------------ decoding: bad requests


def test_raw_size_mismatch_names_input_and_sizes():
    with pytest.raises(InvalidInput) as info:
        v2_grpc.decode_infer_request(raw_request("INT32", [1, 16], b"\x00" * 60))
    assert info.value.message == "input 'INPUT0': raw content is 60 bytes but shape [1,16] of INT32 needs 64"
    assert info.value.grpc_code == "INVALID_ARGUMENT"


def _two_inputs_one_raw() -> pb2.ModelInferRequest:
    msg = raw_request("INT32", [1], b"\x00" * 4)
    msg.inputs.add(name="B", datatype="INT32", shape=[1])
    return msg


def _raw_and_typed() -> pb2.ModelInferRequest:
    msg = raw_request("INT32", [1], b"\x00" * 4)
    msg.inputs[0].contents.int_contents.append(1)
    return msg


def _duplicate_inputs() -> pb2.ModelInferRequest:
    msg = typed_request("INT32", [1], int_contents=[1])
    msg.inputs.add(name="INPUT0", datatype="INT32", shape=[1]).contents.int_contents.append(2)
    return msg


def _empty_parameter() -> pb2.ModelInferRequest:
    msg = typed_request("INT32", [1], int_contents=[1])
    msg.parameters["p"].SetInParent()
    return msg


def _shared_memory() -> pb2.ModelInferRequest:
    msg = pb2.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
    tensor.parameters["shared_memory_region"].string_param = "region0"
    return msg


def _duplicate_outputs() -> pb2.ModelInferRequest:
    msg = typed_request("INT32", [1], int_contents=[1])
    msg.outputs.add(name="O")
    msg.outputs.add(name="O")
    return msg


BAD_REQUESTS = {
    "no model name": (lambda: pb2.ModelInferRequest(), "model_name: must not be empty"),
    "raw count": (_two_inputs_one_raw, "raw_input_contents: 1 entries but 2 inputs"),
    "raw and typed": (_raw_and_typed, "input 'INPUT0': contents must be empty when raw_input_contents"),
    "unknown datatype": (
        lambda: raw_request("FLOAT", [1], b""),
        "input 'INPUT0': unsupported datatype 'FLOAT'; expected one of BOOL,",
    ),
    "BF16": (lambda: raw_request("BF16", [1], b"\x00\x00"), "unsupported datatype 'BF16'"),
    "negative dim": (
        lambda: raw_request("FP32", [1, -1], b""),
        "input 'INPUT0': shape [1,-1] has negative dimension -1",
    ),
    "too many elements": (
        lambda: raw_request("UINT8", [1 << 20, 1 << 20], b""),
        "input 'INPUT0': shape [1048576,1048576] has 1099511627776 elements, more than the limit",
    ),
    "too many dims": (lambda: raw_request("UINT8", [1] * 40, b"\x00"), "shape has 40 dimensions"),
    "wrong typed field": (
        lambda: typed_request("INT32", [2], fp32_contents=[1.0, 2.0]),
        "input 'INPUT0': contents.fp32_contents given, but datatype INT32 is carried in "
        "contents.int_contents",
    ),
    "typed count": (
        lambda: typed_request("FP32", [3], fp32_contents=[1.0, 2.0]),
        "input 'INPUT0': contents.fp32_contents has 2 values but shape [3] needs 3",
    ),
    "no data": (
        lambda: typed_request("FP64", [2]),
        "input 'INPUT0': no data; expected 2 values in contents.fp64_contents or an entry in "
        "raw_input_contents",
    ),
    "typed FP16": (
        lambda: typed_request("FP16", [1], fp32_contents=[1.0]),
        "contents.fp32_contents given, but FP16 has no typed contents field; send it in raw_input_contents",
    ),
    "FP16 no data": (lambda: typed_request("FP16", [2]), "FP16 needs 2 elements in raw_input_contents"),
    "INT8 out of range": (
        lambda: typed_request("INT8", [2], int_contents=[1, 200]),
        "input 'INPUT0': contents.int_contents value 200 is out of range for INT8 [-128, 127]",
    ),
    "UINT16 out of range": (
        lambda: typed_request("UINT16", [1], uint_contents=[70000]),
        "value 70000 is out of range for UINT16 [0, 65535]",
    ),
    "raw BOOL not 0/1": (lambda: raw_request("BOOL", [2], b"\x01\x02"), "must hold bytes 0 or 1, found 2"),
    "BYTES short": (
        lambda: raw_request("BYTES", [3], bytes_raw([b"a"])),
        "too short for the 3 elements of shape [3]",
    ),
    "BYTES truncated element": (
        lambda: raw_request("BYTES", [1], struct.pack("<I", 10) + b"abc"),
        "raw BYTES element 0 declares 10 bytes but only 3 remain",
    ),
    "BYTES missing prefix": (
        lambda: raw_request("BYTES", [2], struct.pack("<I", 2) + b"ab\x00\x00"),
        "raw BYTES content ends after 1 of 2 elements; element 1 has no 4-byte length prefix",
    ),
    "BYTES trailing": (
        lambda: raw_request("BYTES", [1], bytes_raw([b"a"]) + b"zz"),
        "2 bytes left over after the 1 elements",
    ),
    "empty input name": (lambda: raw_request("FP32", [0], b"", name=""), "inputs[0].name: must not be empty"),
    "duplicate input": (_duplicate_inputs, "input 'INPUT0': given more than once"),
    "duplicate output": (_duplicate_outputs, "output 'O': requested more than once"),
    "parameter without value": (_empty_parameter, "parameter 'p': no value set; expected one of bool_param"),
    "shared memory": (_shared_memory, "parameter 'shared_memory_region': shared memory is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_message_names_field_and_expectation(case):
    build, expected = BAD_REQUESTS[case]
    with pytest.raises(InvalidInput) as info:
        v2_grpc.decode_infer_request(build())
    assert expected in info.value.message


def test_long_names_are_truncated_in_errors():
    msg = raw_request("INT32", [1], b"", name="N" * 10_000)
    with pytest.raises(InvalidInput) as info:
        v2_grpc.decode_infer_request(msg)
    assert len(info.value.message) < 300


def test_max_elements_is_configurable():
    msg = raw_request("UINT8", [10], b"\x00" * 10)
    v2_grpc.decode_infer_request(msg, max_elements=10)
    with pytest.raises(InvalidInput, match="more than the limit of 9"):
        v2_grpc.decode_infer_request(msg, max_elements=9)


# ------------------------------------------------------------------ encoding


def test_encode_response_raw_and_typed():
    response = InferenceResponse(
        "m",
        "2",
        [InferTensor("OUT", "INT16", (2,), np.array([-1, 7], dtype=np.int16), {"p": 1.5})],
        id="x",
        parameters={"flag": True, "big": 2**64 - 1, "name": "v"},
    )
    raw = v2_grpc.encode_infer_response(response, raw=True)
    assert (raw.model_name, raw.model_version, raw.id) == ("m", "2", "x")
    assert raw.raw_output_contents == [struct.pack("<2h", -1, 7)]
    assert not raw.outputs[0].HasField("contents")
    assert raw.parameters["big"].WhichOneof("parameter_choice") == "uint64_param"
    assert raw.parameters["flag"].WhichOneof("parameter_choice") == "bool_param"
    assert raw.outputs[0].parameters["p"].double_param == 1.5
    typed = v2_grpc.encode_infer_response(response, raw=False)
    assert not typed.raw_output_contents
    assert list(typed.outputs[0].contents.int_contents) == [-1, 7]


def test_encode_typed_falls_back_to_raw_for_fp16():
    response = InferenceResponse(
        "m",
        None,
        [
            InferTensor("A", "FP16", (1,), np.array([1.0], dtype=np.float16)),
            InferTensor("B", "FP32", (1,), np.array([2.0], dtype=np.float32)),
        ],
    )
    msg = v2_grpc.encode_infer_response(response, raw=False)
    # The protocol forbids mixing forms, so every output is raw.
    assert len(msg.raw_output_contents) == 2
    assert not any(o.HasField("contents") for o in msg.outputs)


def test_encode_accepts_str_and_numpy_bytes_elements():
    data = np.array(["h\u00e9", "x"])  # a numpy unicode array
    response = InferenceResponse("m", None, [InferTensor("S", "BYTES", (2,), data)])
    msg = v2_grpc.encode_infer_response(response)
    assert msg.raw_output_contents[0] == bytes_raw(["h\u00e9".encode(), b"x"])
    decoded = v2_grpc.decode_infer_response(msg)
    assert decoded.outputs[0].data.tolist() == ["h\u00e9".encode(), b"x"]


def test_encode_casts_same_kind_and_refuses_truncation():
    ok = InferenceResponse("m", None, [InferTensor("O", "FP32", (2,), np.array([0.5, 1.0]))])
    assert v2_grpc.encode_infer_response(ok).raw_output_contents[0] == np.array([0.5, 1.0], "<f4").tobytes()
    bad = InferenceResponse("m", None, [InferTensor("O", "INT32", (1,), np.array([0.5]))])
    with pytest.raises(InternalError, match="output 'O': data cannot be sent as INT32"):
        v2_grpc.encode_infer_response(bad)


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (
            InferTensor("O", "FP32", (3,), np.zeros(2, np.float32)),
            "data has 2 elements but shape [3] needs 3",
        ),
        (InferTensor("O", "BF16", (1,), np.zeros(1)), "unsupported datatype 'BF16'"),
        (InferTensor("O", "BYTES", (1,), np.array([3], dtype=object)), "must be bytes or str, found int"),
    ],
)
def test_inconsistent_output_is_internal_error(tensor, expected):
    with pytest.raises(InternalError) as info:
        v2_grpc.encode_infer_response(InferenceResponse("m", None, [tensor]))
    assert expected in info.value.message
    assert info.value.grpc_code == "INTERNAL"


def test_unsupported_parameter_type():
    response = InferenceResponse("m", None, [], parameters={"x": [1, 2]})
    with pytest.raises(InternalError, match="parameter 'x': a list cannot be sent"):
        v2_grpc.encode_infer_response(response)
    request = InferenceRequest("m", None, [], parameters={"x": 2**64})
    with pytest.raises(InvalidInput, match="does not fit in int64 or uint64"):
        v2_grpc.encode_infer_request(request)


def test_response_uses_raw():
    assert v2_grpc.response_uses_raw(raw_request("INT32", [1], b"\x00" * 4))
    assert not v2_grpc.response_uses_raw(typed_request("INT32", [1], int_contents=[1]))
    # no data at all (e.g. only zero-element inputs): Triton's default, raw
    assert v2_grpc.response_uses_raw(typed_request("INT32", [0]))
    assert v2_grpc.response_uses_raw(pb2.ModelInferRequest(model_name="m"))


# ------------------------------------------------------------------ round trips (hypothesis)

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def tensors(draw, datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        return draw(hnp.arrays(object, shapes, elements=st.binary(max_size=6)))
    return draw(hnp.arrays(DATATYPE_TO_NUMPY[datatype], shapes))


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_round_trip_every_datatype(datatype, raw):
    @ROUND_TRIP
    @given(array=tensors(datatype), request_id=st.text(max_size=5))
    def check(array, request_id):
        request = InferenceRequest(
            "model", "1", [InferTensor("IN", datatype, array.shape, array)], id=request_id or None
        )
        wire = v2_grpc.encode_infer_request(request, raw=raw).SerializeToString()
        decoded = v2_grpc.decode_infer_request(pb2.ModelInferRequest.FromString(wire))
        assert decoded.id == request.id and decoded.model_version == "1"
        [tensor] = decoded.inputs
        assert tensor.shape == array.shape
        assert_same(tensor.data, array, datatype)
        if raw and datatype != "BYTES":
            assert tensor.data.tobytes() == array.tobytes()  # bit-exact, NaN payloads included

        response = InferenceResponse("model", "1", [InferTensor("OUT", datatype, array.shape, array)])
        wire = v2_grpc.encode_infer_response(response, raw=raw).SerializeToString()
        back = v2_grpc.decode_infer_response(pb2.ModelInferResponse.FromString(wire))
        assert back.outputs[0].shape == array.shape
        assert_same(back.outputs[0].data, array, datatype)

    check()


@ROUND_TRIP
@given(
    params=st.dictionaries(
        st.text(max_size=4),
        st.one_of(
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(allow_nan=False),
            st.text(max_size=8),
        ),
        max_size=4,
    )
)
def test_parameters_round_trip(params):
    request = InferenceRequest("m", None, [], parameters=params)
    decoded = v2_grpc.decode_infer_request(
        pb2.ModelInferRequest.FromString(v2_grpc.encode_infer_request(request).SerializeToString())
    )
    assert decoded.parameters == params
    assert {k: type(v) for k, v in decoded.parameters.items()} == {k: type(v) for k, v in params.items()}


# ------------------------------------------------------------------ fuzz: only InvalidInput escapes

_INT32 = st.integers(-(2**31), 2**31 - 1)
_UINT32 = st.integers(0, 2**32 - 1)
_CONTENT_VALUES = {
    "bool_contents": st.booleans(),
    "int_contents": _INT32,
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": _UINT32,
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=6),
}
_DIMS = st.one_of(st.integers(-2, 5), st.integers(-(2**63), 2**63 - 1))
_DATATYPE = st.one_of(
    st.sampled_from(sorted(DATATYPES)), st.sampled_from(["BF16", "", "fp32"]), st.text(max_size=6)
)


@st.composite
def fuzz_tensor(draw, message):
    tensor = message.inputs.add(
        name=draw(st.sampled_from(["A", "B", ""])),
        datatype=draw(_DATATYPE),
        shape=draw(st.lists(_DIMS, max_size=4)),
    )
    for field in draw(st.sets(st.sampled_from(sorted(_CONTENT_VALUES)), max_size=2)):
        getattr(tensor.contents, field).extend(draw(st.lists(_CONTENT_VALUES[field], max_size=6)))
    for key in draw(st.lists(st.sampled_from(["x", "shared_memory_region"]), max_size=2)):
        param = tensor.parameters[key]
        choice = draw(st.sampled_from(["none", "bool", "str", "int"]))
        if choice == "bool":
            param.bool_param = True
        elif choice == "str":
            param.string_param = "s"
        elif choice == "int":
            param.int64_param = 3
        else:
            param.SetInParent()


@st.composite
def fuzz_request(draw) -> pb2.ModelInferRequest:
    message = pb2.ModelInferRequest(model_name=draw(st.sampled_from(["m", ""])), id=draw(st.text(max_size=3)))
    for _ in range(draw(st.integers(0, 3))):
        draw(fuzz_tensor(message))
    if draw(st.booleans()):
        count = draw(st.sampled_from([len(message.inputs), draw(st.integers(0, 4))]))
        for _ in range(count):
            message.raw_input_contents.append(draw(st.binary(max_size=40)))
    for name in draw(st.lists(st.sampled_from(["O", "P", ""]), max_size=3)):
        message.outputs.add(name=name)
    return message


@FUZZ
@given(message=fuzz_request())
def test_fuzz_fields_raise_only_invalid_input(message):
    try:
        request = v2_grpc.decode_infer_request(message, max_elements=1 << 20)
    except InvalidInput:
        return
    for tensor in request.inputs:
        assert tensor.data.dtype == DATATYPE_TO_NUMPY[tensor.datatype]
        assert tensor.data.shape == tensor.shape


@st.composite
def mutated_wire(draw) -> bytes:
    """A valid serialized request with a few bytes overwritten, inserted or cut: random bytes
    alone almost never parse, mutations of a real message mostly do."""
    data = bytearray(draw(fuzz_request()).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["set", "insert", "cut"]))
        if action == "insert" or not data:
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif action == "set":
            data[min(position, len(data) - 1)] = draw(st.integers(0, 255))
        else:
            del data[position : position + draw(st.integers(1, 4))]
    return bytes(data)


@FUZZ
@given(data=mutated_wire())
def test_fuzz_wire_bytes_raise_only_invalid_input(data):
    try:
        message = pb2.ModelInferRequest.FromString(data)
    except DecodeError:
        return  # the server answers INVALID_ARGUMENT before the codec runs
    with contextlib.suppress(InvalidInput):
        v2_grpc.decode_infer_request(message, max_elements=1 << 20)


@FUZZ
@given(message=fuzz_request())
def test_fuzz_response_decoder_raises_only_invalid_input(message):
    # The same tensors as a response: the client-side decoder is as strict as the server's.
    response = pb2.ModelInferResponse(model_name=message.model_name)
    for tensor in message.inputs:
        response.outputs.add().CopyFrom(
            pb2.ModelInferResponse.InferOutputTensor.FromString(tensor.SerializeToString())
        )
    response.raw_output_contents.extend(message.raw_input_contents)
    with contextlib.suppress(InvalidInput):
        v2_grpc.decode_infer_response(response, max_elements=1 << 20)


# ------------------------------------------------------------------ metadata & repository


def test_model_metadata_round_trip():
    metadata = ModelMetadata(
        name="m",
        versions=("1", "2"),
        platform="onnxruntime_onnx",
        inputs=(TensorSpec("IN", "FP32", (-1, 4)),),
        outputs=(TensorSpec("OUT", "INT64", (-1,)),),
    )
    msg = v2_grpc.encode_model_metadata(metadata)
    assert list(msg.inputs[0].shape) == [-1, 4]
    assert (
        v2_grpc.decode_model_metadata(pb2.ModelMetadataResponse.FromString(msg.SerializeToString()))
        == metadata
    )


def test_server_metadata():
    msg = v2_grpc.encode_server_metadata(
        {"name": "bastion", "version": "0.1.0", "extensions": ["model_repository"]}
    )
    assert (msg.name, msg.version, list(msg.extensions)) == ("bastion", "0.1.0", ["model_repository"])


def test_model_ref_requires_a_name():
    assert v2_grpc.decode_model_ref(pb2.ModelReadyRequest(name="m")) == ("m", None)
    assert v2_grpc.decode_model_ref(pb2.ModelMetadataRequest(name="m", version="2")) == ("m", "2")
    with pytest.raises(InvalidInput, match="name: must not be empty"):
        v2_grpc.decode_model_ref(pb2.ModelReadyRequest())


def test_repository_index_ready_filter():
    entries = [
        {"name": "a", "version": 1, "state": "READY", "reason": ""},
        {"name": "b", "version": None, "state": "UNAVAILABLE", "reason": "unloaded"},
    ]
    full = v2_grpc.encode_repository_index(entries)
    assert [(m.name, m.version, m.state, m.reason) for m in full.models] == [
        ("a", "1", "READY", ""),
        ("b", "", "UNAVAILABLE", "unloaded"),
    ]
    assert [m.name for m in v2_grpc.encode_repository_index(entries, ready_only=True).models] == ["a"]


def test_repository_requests_decode_name_and_parameters():
    # which parameters an action takes is the plane's rule (tests/integration: REST and gRPC alike)
    assert v2_grpc.decode_model_load_request(pb2.RepositoryModelLoadRequest(model_name="m")) == ("m", {})
    msg = pb2.RepositoryModelLoadRequest(model_name="m")
    msg.parameters["config"].string_param = "{}"
    msg.parameters["n"].int64_param = 3
    assert v2_grpc.decode_model_load_request(msg) == ("m", {"config": "{}", "n": 3})
    with pytest.raises(InvalidInput, match="model_name: must not be empty"):
        v2_grpc.decode_model_load_request(pb2.RepositoryModelLoadRequest())
    unload = pb2.RepositoryModelUnloadRequest(model_name="m")
    unload.parameters["unload_dependents"].bool_param = False
    assert v2_grpc.decode_model_unload_request(unload) == ("m", {"unload_dependents": False})
    unload.parameters["empty"].CopyFrom(pb2.ModelRepositoryParameter())
    with pytest.raises(InvalidInput, match=r"parameters\['empty'\]: no value set"):
        v2_grpc.decode_model_unload_request(unload)
    with pytest.raises(InvalidInput, match="model_name: must not be empty"):
        v2_grpc.decode_model_unload_request(pb2.RepositoryModelUnloadRequest())

