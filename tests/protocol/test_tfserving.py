"""TF-Serving REST codec: row and columnar predict requests, responses, model status."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bastion.core.errors import InvalidInput
from bastion.core.metadata import ModelMetadata, TensorSpec, VersionStatus
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor
from bastion.protocol.tfserving import decode_predict_request, encode_model_status, encode_predict_response


def signature(*inputs: tuple[str, str]) -> ModelMetadata:
    specs = tuple(TensorSpec(name, datatype, (-1,)) for name, datatype in inputs)
    return ModelMetadata("m", ("1",), "onnx", specs, ())


SINGLE = signature(("x", "FP32"))
MULTI = signature(("tag", "BYTES"), ("signal", "INT32"), ("sensor", "FP64"))


def decode(obj: Any, sig: ModelMetadata = SINGLE, **kwargs: Any) -> tuple[InferenceRequest, bool]:
    body = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return decode_predict_request(body, "m", "1", sig, **kwargs)


def arrays(req: InferenceRequest) -> dict[str, np.ndarray]:
    for t in req.inputs:
        assert t.shape == t.data.shape
    return {t.name: t.data for t in req.inputs}


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


def test_row_format_single_input_scalars() -> None:
    req, row = decode({"instances": [1.0, 2.0, 5.0]})
    assert row is True
    assert (req.model_name, req.model_version, req.outputs) == ("m", "1", None)
    x = arrays(req)["x"]
    assert x.dtype == np.float32 and x.tolist() == [1.0, 2.0, 5.0]


def test_row_format_single_input_tensors_keep_nesting() -> None:
    req, _ = decode({"instances": [[[1, 2]], [[3, 4]]]})
    assert arrays(req)["x"].shape == (2, 1, 2)


def test_row_format_named_instances() -> None:
    obj = {
        "signature_name": "serving_default",
        "instances": [
            {"tag": "foo", "signal": [1, 2, 3, 4, 5], "sensor": [[1, 2], [3, 4]]},
            {
                "tag": {"b64": base64.b64encode(b"\xff\x00").decode()},
                "signal": [3, 4, 1, 2, 5],
                "sensor": [[4, 5], [6, 8]],
            },
        ],
    }
    req, row = decode(obj, MULTI)
    got = arrays(req)
    assert row is True
    assert got["tag"].tolist() == [b"foo", b"\xff\x00"]
    assert got["signal"].dtype == np.int32 and got["signal"].shape == (2, 5)
    assert got["sensor"].dtype == np.float64 and got["sensor"].shape == (2, 2, 2)
    assert [t.datatype for t in req.inputs] == ["BYTES", "INT32", "FP64"]


def test_row_format_named_single_input() -> None:
    req, _ = decode({"instances": [{"x": [1, 2]}, {"x": [3, 4]}]})
    assert arrays(req)["x"].tolist() == [[1, 2], [3, 4]]


def test_columnar_formats() -> None:
    req, row = decode({"inputs": [[1, 2], [3, 4]]})
    assert row is False and arrays(req)["x"].shape == (2, 2)
    req, _ = decode({"inputs": {"x": [1, 2, 3]}})
    assert arrays(req)["x"].shape == (3,)
    req, _ = decode({"inputs": 5})
    scalar = arrays(req)["x"]
    assert scalar.shape == () and scalar.dtype == np.float32 and float(scalar) == 5.0
    obj = {"inputs": {"tag": ["a", "b"], "signal": [[1], [2], [3]], "sensor": 0.5}}
    got = arrays(decode(obj, MULTI)[0])
    assert got["tag"].tolist() == [b"a", b"b"] and got["signal"].shape == (3, 1) and got["sensor"].shape == ()


def test_b64_values_for_a_single_bytes_input() -> None:
    sig = signature(("image_bytes", "BYTES"))
    req, _ = decode({"instances": [{"b64": "aGVsbG8="}, {"b64": ""}]}, sig)
    assert arrays(req)["image_bytes"].tolist() == [b"hello", b""]
    req, _ = decode({"inputs": {"b64": "aGVsbG8="}}, sig)
    assert arrays(req)["image_bytes"].shape == () and arrays(req)["image_bytes"].item() == b"hello"


def test_nan_and_infinity_tokens_are_accepted() -> None:
    req, _ = decode(b'{"instances": [NaN, Infinity, -Infinity, 1e39]}')
    x = arrays(req)["x"]
    assert np.isnan(x[0]) and x[1] == np.inf and x[2] == -np.inf and x[3] == np.inf


def test_other_datatypes() -> None:
    sig = signature(("b", "BOOL"), ("u", "UINT8"), ("h", "FP16"))
    got = arrays(decode({"inputs": {"b": [True, False], "u": [0, 255], "h": [0.5]}}, sig)[0])
    assert got["b"].dtype == np.bool_ and got["u"].dtype == np.uint8 and got["h"].dtype == np.float16


ERRORS = [
    ({"instances": [1], "inputs": [1]}, SINGLE, "expected exactly one of 'instances' (row format) or 'inputs'"),
    ({"signature_name": "serving_default"}, SINGLE, "expected exactly one of 'instances'"),
    ({"signature_name": "other", "instances": [1]}, SINGLE, "signature_name: unknown signature 'other'"),
    ({"signature_name": 3, "instances": [1]}, SINGLE, "signature_name: expected a string"),
    ({"instances": []}, SINGLE, "instances: expected a non-empty list"),
    ({"instances": 5}, SINGLE, "instances: expected a non-empty list"),
    ({"instances": [[1, 2], [3]]}, SINGLE, "input 'x': data is not a rectangular array"),
    ({"instances": [1, "a"]}, SINGLE, "input 'x': datatype FP32 expects numbers, got string"),
    ({"instances": [{"y": 1}]}, SINGLE, "instances[0]: unknown input 'y'; the model's inputs are x"),
    ({"instances": [{"x": 1}, 2]}, SINGLE, "instances[1]: expected an object mapping input names to values"),
    ({"instances": [{"x": 1}, {"x": 1, "z": 2}]}, SINGLE, "instances[1]: has inputs ['x', 'z'] but instances[0]"),
    ({"instances": [1, 2]}, MULTI, "instances[0]: the model has 3 inputs (tag, signal, sensor)"),
    ({"instances": [{"b64": "AA=="}]}, SINGLE, "datatype FP32 expects numbers, got object"),
    ({"inputs": [1, 2]}, MULTI, "inputs: the model has 3 inputs"),
    ({"inputs": {}}, SINGLE, "inputs: expected at least one input"),
    ({"instances": [{}]}, SINGLE, "instances[0]: expected at least one input"),
    ({"inputs": {"nope": [1]}}, MULTI, "inputs: unknown input 'nope'"),
    ({"inputs": {"tag": [{"b64": "!!"}]}}, MULTI, "input 'tag': a \"b64\" value is not valid base64"),
    ({"inputs": {"tag": [1]}}, MULTI, "input 'tag': datatype BYTES expects strings or {\"b64\": ...} objects"),
    ({"inputs": {"tag": [["a"], ["b", "c"]]}}, MULTI, "input 'tag': values are not a rectangular array"),
    ({"inputs": {"signal": [300.5]}}, MULTI, "input 'signal': datatype INT32 expects integers"),
    ({"inputs": {"signal": [2**40]}}, MULTI, "input 'signal': value out of range for INT32"),
    ([1, 2], SINGLE, "request body: expected a JSON object"),
]


@pytest.mark.parametrize(("obj", "sig", "message"), ERRORS)
def test_request_errors_name_the_field(obj: Any, sig: ModelMetadata, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode(obj, sig)
    assert message in str(info.value)


def test_request_body_errors_and_limits() -> None:
    with pytest.raises(InvalidInput, match="request body is not valid JSON"):
        decode(b"{nope")
    with pytest.raises(InvalidInput, match="request body is not valid JSON"):
        decode(b'{"instances": [NaN')
    with pytest.raises(InvalidInput, match="more than 3 elements"):
        decode({"instances": [1, 2, 3, 4]}, max_elements=3)
    with pytest.raises(InvalidInput, match="declares no inputs"):
        decode({"instances": [1]}, signature())
    with pytest.raises(InvalidInput, match="value out of range for INT32"):
        decode(b'{"inputs": {"signal": [1' + b"0" * 400 + b'], "sensor": NaN}}', MULTI)  # via stdlib json
    with pytest.raises(InvalidInput, match="value out of range for FP32"):
        decode(b'{"inputs": [1' + b"0" * 400 + b", NaN]}")


# --------------------------------------------------------------------------------------------
# Responses and model status
# --------------------------------------------------------------------------------------------


def response(**outputs: np.ndarray) -> InferenceResponse:
    tensors = [
        InferTensor(name, "BYTES" if arr.dtype == object else "FP32", arr.shape, arr) for name, arr in outputs.items()
    ]
    return InferenceResponse("m", "1", tensors)


def test_row_format_responses() -> None:
    probs = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    assert orjson.loads(encode_predict_response(response(probs=probs), True)) == {
        "predictions": [[0.25, 0.75], [0.5, 0.5]]
    }
    label = np.array([b"cat", b"\xff"], dtype=object)
    body = encode_predict_response(response(probs=probs, label=label), True)
    assert orjson.loads(body) == {
        "predictions": [
            {"probs": [0.25, 0.75], "label": "cat"},
            {"probs": [0.5, 0.5], "label": {"b64": base64.b64encode(b"\xff").decode()}},
        ]
    }


def test_columnar_responses() -> None:
    score = np.array(0.5, dtype=np.float32)
    assert orjson.loads(encode_predict_response(response(score=score), False)) == {"outputs": 0.5}
    image_bytes = np.array([b"png"], dtype=object)  # TF-Serving base64-encodes *_bytes outputs
    body = encode_predict_response(response(score=score, image_bytes=image_bytes), False)
    assert orjson.loads(body) == {"outputs": {"score": 0.5, "image_bytes": [{"b64": "cG5n"}]}}


def test_non_finite_outputs_use_tf_tokens() -> None:
    y = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    body = encode_predict_response(response(y=y), True)
    assert body == b'{"predictions":[NaN,Infinity,-Infinity,1.0]}'
    body = encode_predict_response(response(y=y, z=np.array([1.5, 2, 3, 4], dtype=np.float32)), True)
    assert json.loads(body)["predictions"][1] == {"y": float("inf"), "z": 2.0}


def test_row_format_needs_a_shared_batch_dimension() -> None:
    with pytest.raises(InvalidInput, match="share its 0-th dimension"):
        encode_predict_response(response(a=np.zeros((2, 1), np.float32), b=np.zeros(3, np.float32)), True)
    with pytest.raises(InvalidInput, match="is a scalar"):
        encode_predict_response(response(a=np.array(1.0, np.float32)), True)
    body = encode_predict_response(response(a=np.zeros((2, 1), np.float32), b=np.zeros(3, np.float32)), False)
    assert orjson.loads(body) == {"outputs": {"a": [[0.0], [0.0]], "b": [0.0, 0.0, 0.0]}}


def test_response_types_and_layouts() -> None:
    tensors = [
        InferTensor("i", "INT64", (2,), np.array([1, 2], dtype=">i8")),
        InferTensor("b", "BOOL", (2,), np.array([True, False])),
        InferTensor("h", "FP16", (2,), np.array([0.5, 1.0], dtype=np.float16)),
        InferTensor("t", "FP32", (2, 2), np.arange(4, dtype=np.float32).reshape(2, 2).T),
        InferTensor("d", "FP32", (2,), np.array([0.1, 0.2])),  # float64 data, FP32 output
    ]
    body = encode_predict_response(InferenceResponse("m", None, tensors), True)
    assert orjson.loads(body)["predictions"] == [
        {"i": 1, "b": True, "h": 0.5, "t": [0.0, 2.0], "d": 0.1},
        {"i": 2, "b": False, "h": 1.0, "t": [1.0, 3.0], "d": 0.2},
    ]


def test_model_status() -> None:
    # the plane's neutral states in TF-Serving's words: READY is AVAILABLE, whatever does not serve is UNAVAILABLE
    body = encode_model_status([VersionStatus("1", "READY"), VersionStatus("2", "LOADING"),
                                VersionStatus("3", "FAILED", "failed: bad file"), VersionStatus("4", "UNAVAILABLE")])
    assert orjson.loads(body) == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
            {"version": "2", "state": "LOADING", "status": {"error_code": "OK", "error_message": ""}},
            {"version": "3", "state": "UNAVAILABLE",
             "status": {"error_code": "UNKNOWN", "error_message": "failed: bad file"}},
            {"version": "4", "state": "UNAVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
        ]
    }
    assert orjson.loads(encode_model_status([])) == {"model_version_status": []}


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["x", "tag", "b64", "k"]), inner),
    max_leaves=10,
)
request_objects = st.fixed_dictionaries(
    {},
    optional={
        "instances": json_values,
        "inputs": json_values,
        "signature_name": st.sampled_from(["serving_default", "x"]) | json_values,
    },
)


@settings(max_examples=250, deadline=None)
@given(obj=request_objects | json_values, sig=st.sampled_from([SINGLE, MULTI, signature(("tag", "BYTES"))]))
def test_fuzz_only_invalid_input(obj: Any, sig: ModelMetadata) -> None:
    with contextlib.suppress(InvalidInput):
        decode(obj, sig, max_elements=10_000)


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=40) | st.just(b"NaN"))
def test_fuzz_bytes_only_invalid_input(body: bytes) -> None:
    with contextlib.suppress(InvalidInput):
        decode(body)


@settings(max_examples=60, deadline=None)
@given(
    arr=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    row=st.booleans(),
)
def test_property_values_round_trip(arr: np.ndarray, row: bool) -> None:
    """What encode_predict_response writes, decode_predict_request reads back exactly."""
    body = encode_predict_response(response(x=arr), row)
    sent = orjson.loads(body)["predictions" if row else "outputs"]
    req, row_format = decode({"instances" if row else "inputs": sent})
    assert row_format is row
    np.testing.assert_array_equal(arrays(req)["x"], arr)
    assert arrays(req)["x"].dtype == np.float32


def test_row_format_with_longlong_outputs() -> None:
    """ONNX Runtime returns INT64 outputs as numpy.longlong, whose scalars orjson refuses."""
    from bastion.core.tensors import InferenceResponse, InferTensor
    from bastion.protocol import tfserving as tfs

    labels = np.array([3, 7], dtype=np.longlong)
    probs = np.zeros((2, 2), dtype=np.float32)
    response = InferenceResponse("m", "1", [InferTensor("label", "INT64", (2,), labels),
                                            InferTensor("p", "FP32", (2, 2), probs)])
    doc = orjson.loads(tfs.encode_predict_response(response, row_format=True))
    assert doc == {"predictions": [{"label": 3, "p": [0.0, 0.0]}, {"label": 7, "p": [0.0, 0.0]}]}
