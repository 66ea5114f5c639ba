"""Request limits (core/limits.py) in the three request decoders: V2 REST (JSON, its fast
path, the binary extension), V2 gRPC (typed and raw contents) and TF-Serving REST.

Each limit gives the documented error class (InvalidInput 400 for shape and structure,
PayloadTooLarge 413 for sizes) with a message that names the limit; the defaults accept
ordinary requests; and no body, however nested, gets any other exception out of a decoder.
"""

from __future__ import annotations

import base64
import contextlib
import re
import struct
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.core.errors import InvalidInput, PayloadTooLarge
from bastion.core.limits import RequestLimits
from bastion.core.metadata import ModelMetadata, TensorSpec
from bastion.core.tensors import InferenceRequest
from bastion.protocol import tfserving, v2_grpc, v2_rest
from bastion.protocol.grpc_v2 import grpc_service_pb2 as pb2

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def limits(**kwargs: Any) -> RequestLimits:
    return RequestLimits(**kwargs)


def nest(value: Any, levels: int, kind: str = "list") -> Any:
    """``value`` wrapped in ``levels`` arrays (or objects)."""
    for _ in range(levels):
        value = [value] if kind == "list" else {"k": value}
    return value


# --------------------------------------------------------------------------------------------
# V2 REST
# --------------------------------------------------------------------------------------------


def rest(obj: Any, binary: bytes = b"", **kwargs: Any) -> InferenceRequest:
    header = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    if binary:
        return v2_rest.decode_infer_request(header + binary, "m", None, len(header), **kwargs)
    return v2_rest.decode_infer_request(header, "m", None, **kwargs)


def tensor(shape: list[int], data: Any, datatype: str = "FP32", name: str = "x", **extra: Any) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data, **extra}


def binary_tensor(shape: list[int], size: int, datatype: str = "FP32", name: str = "x") -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


def bytes_section(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


FAST_BODY = {"inputs": [tensor([1, 4], [1.0, 2.0, 3.0, 4.0])]}  # the shape the fast path takes
FULL_BODY = {"inputs": [tensor([2, 2], [[1.0, 2.0], [3.0, 4.0]])]}  # nested data: the full decoder


@pytest.mark.parametrize("body", [FAST_BODY, FULL_BODY], ids=["fast", "full"])
def test_rest_max_elements(body: dict) -> None:
    assert rest(body, limits=limits(max_elements=4)).inputs[0].data.size == 4
    with pytest.raises(InvalidInput, match=r"more than 3 elements.*max_elements"):
        rest(body, limits=limits(max_elements=3))


def test_rest_max_elements_counts_all_inputs_and_binary() -> None:
    two = {"inputs": [tensor([1, 4], [1.0] * 4), tensor([1, 4], [1.0] * 4, name="y")]}
    rest(two, limits=limits(max_elements=8))
    with pytest.raises(InvalidInput, match=r"more than 7 elements in total, the max_elements limit"):
        rest(two, limits=limits(max_elements=7))
    section = np.zeros(4, "<f4").tobytes()
    with pytest.raises(InvalidInput, match="max_elements"):
        rest({"inputs": [binary_tensor([1, 4], 16)]}, section, limits=limits(max_elements=3))


def test_rest_legacy_max_elements_keyword_overrides_limits() -> None:
    rest(FAST_BODY, limits=limits(max_elements=1), max_elements=4)
    with pytest.raises(InvalidInput, match="more than 3 elements"):
        rest(FAST_BODY, max_elements=3)


@pytest.mark.parametrize("body", [FAST_BODY, FULL_BODY], ids=["fast", "full"])
def test_rest_max_batch_size(body: dict) -> None:
    first = body["inputs"][0]["shape"][0]
    assert rest(body, limits=limits(max_batch_size=first)).inputs[0].shape[0] == first
    assert rest(body, limits=limits(max_batch_size=None)).inputs[0].shape[0] == first
    with pytest.raises(InvalidInput, match=rf"input 'x': batch size {first} .* max_batch_size \({first - 1}\)"):
        rest(body, limits=limits(max_batch_size=first - 1))


def test_rest_max_batch_size_binary_and_every_input() -> None:
    section = np.zeros(8, "<f4").tobytes()
    with pytest.raises(InvalidInput, match=r"batch size 8 .*max_batch_size"):
        rest({"inputs": [binary_tensor([8], 32)]}, section, limits=limits(max_batch_size=4))
    two = {"inputs": [tensor([1, 1], [1.0]), tensor([5], [1.0] * 5, name="y")]}
    with pytest.raises(InvalidInput, match="input 'y': batch size 5"):
        rest(two, limits=limits(max_batch_size=4))


def test_rest_max_batch_size_leaves_scalars_alone() -> None:
    assert rest({"inputs": [tensor([], [2.5])]}, limits=limits(max_batch_size=0)).inputs[0].shape == ()


def test_rest_max_string_bytes_json() -> None:
    ok = {"inputs": [tensor([2], ["abcd", "é"], "BYTES")]}
    assert rest(ok, limits=limits(max_string_bytes=4)).inputs[0].data.tolist() == [b"abcd", "é".encode()]
    with pytest.raises(PayloadTooLarge, match=r"input 'x': BYTES element 0 is 4 bytes, more than max_string_bytes"):
        rest(ok, limits=limits(max_string_bytes=3))
    # counted in UTF-8 bytes, not characters
    utf8 = {"inputs": [tensor([1, 2], [["ab", "ééé"]], "BYTES")]}
    with pytest.raises(PayloadTooLarge, match=r"BYTES element 1 is 6 bytes, more than max_string_bytes \(5\)"):
        rest(utf8, limits=limits(max_string_bytes=5))


def test_rest_max_string_bytes_binary() -> None:
    section = bytes_section([b"", b"abcd"])
    head = {"inputs": [binary_tensor([2], len(section), "BYTES")]}
    assert rest(head, section, limits=limits(max_string_bytes=4)).inputs[0].data.tolist() == [b"", b"abcd"]
    with pytest.raises(PayloadTooLarge, match=r"BYTES element 1 is 4 bytes, more than max_string_bytes \(3\)"):
        rest(head, section, limits=limits(max_string_bytes=3))
    assert PayloadTooLarge.http_status == 413


def test_rest_fast_path_still_taken_under_limits() -> None:
    # only the fast path marks float data finite (orjson yields no NaN and it range-checks)
    assert rest(FAST_BODY).inputs[0].finite
    tight = limits(max_elements=4, max_batch_size=1, max_string_bytes=0, max_json_depth=4)
    assert rest(FAST_BODY, limits=tight).inputs[0].finite
    assert not rest(FULL_BODY, limits=limits(max_json_depth=5)).inputs[0].finite


def test_rest_max_json_depth_fast_path_shape() -> None:
    # a plain request nests 4 deep: {"inputs": [{"data": [...]}]}
    assert rest(FAST_BODY, limits=limits(max_json_depth=4)).inputs[0].shape == (1, 4)
    with pytest.raises(InvalidInput, match=r"max_json_depth \(3 levels"):
        rest(FAST_BODY, limits=limits(max_json_depth=3))


def test_rest_max_json_depth_data() -> None:
    data = nest([1.0], 5)  # the data list and 5 more: 4 + 5 = 9 levels
    body = {"inputs": [tensor([1] * 6, data)]}
    assert rest(body, limits=limits(max_json_depth=9)).inputs[0].shape == (1,) * 6
    with pytest.raises(InvalidInput, match=r"input 'x': data is nested deeper than max_json_depth .*8 levels"):
        rest(body, limits=limits(max_json_depth=8))
    # above 32 dimensions the decoder's own bound words the error, as before
    deep = {"inputs": [tensor([1], nest([1.0], 32))]}
    with pytest.raises(InvalidInput, match="nested deeper than 32 levels"):
        rest(deep, limits=limits(max_json_depth=100))


@pytest.mark.parametrize(
    ("where", "body", "levels"),
    [
        ("parameters", {"inputs": [tensor([1], [1.0])], "parameters": {"a": nest(1, 3)}}, 5),
        ("parameters", {"inputs": [tensor([1], [1.0])], "parameters": {"a": nest(1, 3, "dict")}}, 5),
        ("inputs[0].parameters", {"inputs": [tensor([1], [1.0], parameters={"a": nest(1, 2)})]}, 6),
        (
            "outputs[0].parameters",
            {"inputs": [tensor([1], [1.0])], "outputs": [{"name": "y", "parameters": {"a": [[1]]}}]},
            6,
        ),
        ("request body field 'extra'", {"inputs": [tensor([1], [1.0])], "extra": nest(1, 4)}, 5),
        ("inputs[0].'extra'", {"inputs": [tensor([1], [1.0], extra=nest(1, 2))]}, 5),
        ("outputs[0].'extra'", {"inputs": [tensor([1], [1.0])], "outputs": [{"name": "y", "extra": [[1]]}]}, 5),
    ],
)
def test_rest_max_json_depth_everywhere(where: str, body: dict, levels: int) -> None:
    rest(body, limits=limits(max_json_depth=levels))
    pattern = re.escape(f"{where}: nested deeper than max_json_depth ({levels - 1} levels")
    with pytest.raises(InvalidInput, match=pattern):
        rest(body, limits=limits(max_json_depth=levels - 1))


def test_rest_max_json_depth_binary_header() -> None:
    section = np.zeros(1, "<f4").tobytes()
    head = {"inputs": [binary_tensor([1], 4)], "parameters": {"p": nest(1, 40)}}
    with pytest.raises(InvalidInput, match=r"parameters: nested deeper than max_json_depth \(32 levels"):
        rest(head, section)
    assert rest(head, section, limits=limits(max_json_depth=42)).parameters["p"] == nest(1, 40)


def test_rest_max_json_depth_beyond_the_parser() -> None:
    too_deep = b'{"inputs": [], "p": ' + b"[" * 1100 + b"]" * 1100 + b"}"
    with pytest.raises(InvalidInput, match=r"request body: nested deeper than max_json_depth \(32 levels"):
        rest(too_deep)
    with pytest.raises(InvalidInput, match="not valid JSON"):  # orjson's own 1024 binds first
        rest(too_deep, limits=limits(max_json_depth=5000))
    # just under orjson's limit: walked without recursion, accepted when configured so
    # (built by hand: orjson writes at most 254 levels)
    deep = b"[" * 1015 + b"1" + b"]" * 1015
    body = orjson.dumps({"inputs": [tensor([1], [1.0])]})[:-1] + b', "parameters": {"p": ' + deep + b"}}"
    assert type(rest(body, limits=limits(max_json_depth=1024)).parameters["p"]) is list
    with pytest.raises(InvalidInput, match="max_json_depth"):
        rest(body, limits=limits(max_json_depth=1000))


def test_rest_tiny_depth_limits_walk_the_whole_body() -> None:
    with pytest.raises(InvalidInput, match=r"request body: nested deeper than max_json_depth \(1 levels"):
        rest({"inputs": [tensor([1], [1.0])]}, limits=limits(max_json_depth=1))
    with pytest.raises(InvalidInput, match="max_json_depth"):
        rest({"inputs": []}, limits=limits(max_json_depth=1))


def test_rest_defaults_accept_ordinary_requests() -> None:
    section = bytes_section([b"x" * 1000])
    rest({"inputs": [binary_tensor([1], len(section), "BYTES")]}, section)
    rest({"inputs": [tensor([1] * 6, nest([1.0], 5))], "outputs": [{"name": "y"}], "id": "r"})
    rest({"inputs": [tensor([3], ["a" * 100_000, "", "b"], "BYTES")], "parameters": {"k": "v"}})
    rest(FAST_BODY, limits=v2_rest.DEFAULT_LIMITS)
    assert RequestLimits() == v2_rest.DEFAULT_LIMITS


# --------------------------------------------------------------------------------------------
# V2 gRPC
# --------------------------------------------------------------------------------------------


def grpc_raw(*tensors: tuple[str, str, list[int], bytes]) -> pb2.ModelInferRequest:
    msg = pb2.ModelInferRequest(model_name="m")
    for name, datatype, shape, raw in tensors:
        msg.inputs.add(name=name, datatype=datatype, shape=shape)
        msg.raw_input_contents.append(raw)
    return msg


def grpc_typed(datatype: str, shape: list[int], **contents: list) -> pb2.ModelInferRequest:
    msg = pb2.ModelInferRequest(model_name="m")
    t = msg.inputs.add(name="x", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(t.contents, field).extend(values)
    return msg


def test_grpc_max_elements_per_tensor_and_in_total() -> None:
    one = grpc_raw(("a", "UINT8", [2, 3], bytes(6)))
    v2_grpc.decode_infer_request(one, limits=limits(max_elements=6))
    with pytest.raises(InvalidInput, match=r"has 6 elements, more than the limit of 5 \(max_elements\)"):
        v2_grpc.decode_infer_request(one, limits=limits(max_elements=5))
    two = grpc_raw(("a", "UINT8", [4], bytes(4)), ("b", "UINT8", [4], bytes(4)))
    v2_grpc.decode_infer_request(two, limits=limits(max_elements=8))
    with pytest.raises(InvalidInput, match=r"inputs: with input 'b' the tensors hold 8 elements .*\(max_elements\)"):
        v2_grpc.decode_infer_request(two, limits=limits(max_elements=7))
    typed = grpc_typed("INT32", [3], int_contents=[1, 2, 3])
    with pytest.raises(InvalidInput, match="max_elements"):
        v2_grpc.decode_infer_request(typed, limits=limits(max_elements=2))


def test_grpc_legacy_positional_max_elements() -> None:
    msg = grpc_raw(("a", "UINT8", [4], bytes(4)))
    v2_grpc.decode_infer_request(msg, 4, limits=limits(max_elements=1))  # the transport's current call
    with pytest.raises(InvalidInput, match="max_elements"):
        v2_grpc.decode_infer_request(msg, 3)


@pytest.mark.parametrize(
    "msg",
    [grpc_raw(("x", "FP32", [3, 1], bytes(12))), grpc_typed("FP32", [3, 1], fp32_contents=[1.0, 2.0, 3.0])],
    ids=["raw", "typed"],
)
def test_grpc_max_batch_size(msg: pb2.ModelInferRequest) -> None:
    v2_grpc.decode_infer_request(msg, limits=limits(max_batch_size=3))
    v2_grpc.decode_infer_request(msg, limits=limits(max_batch_size=None))
    with pytest.raises(InvalidInput, match=r"input 'x': batch size 3 .* max_batch_size \(2\)"):
        v2_grpc.decode_infer_request(msg, limits=limits(max_batch_size=2))


def test_grpc_max_batch_size_leaves_scalars_alone() -> None:
    msg = grpc_raw(("x", "FP32", [], bytes(4)))
    assert v2_grpc.decode_infer_request(msg, limits=limits(max_batch_size=0)).inputs[0].shape == ()


def test_grpc_max_string_bytes_typed() -> None:
    msg = grpc_typed("BYTES", [3], bytes_contents=[b"", b"abcd", b"ab"])
    v2_grpc.decode_infer_request(msg, limits=limits(max_string_bytes=4))
    with pytest.raises(
        PayloadTooLarge, match=r"contents.bytes_contents element 1 is 4 bytes, more than max_string_bytes \(3\)"
    ):
        v2_grpc.decode_infer_request(msg, limits=limits(max_string_bytes=3))


def test_grpc_max_string_bytes_raw() -> None:
    msg = grpc_raw(("x", "BYTES", [2], bytes_section([b"abc", b"abcd"])))
    data = v2_grpc.decode_infer_request(msg, limits=limits(max_string_bytes=4)).inputs[0].data
    assert [bytes(x) for x in data] == [b"abc", b"abcd"]
    with pytest.raises(PayloadTooLarge, match=r"raw BYTES element 1 is 4 bytes, more than max_string_bytes \(3\)"):
        v2_grpc.decode_infer_request(msg, limits=limits(max_string_bytes=3))


def test_grpc_defaults_accept_ordinary_requests() -> None:
    v2_grpc.decode_infer_request(grpc_raw(("x", "BYTES", [1], bytes_section([b"x" * 100_000]))))
    v2_grpc.decode_infer_request(grpc_typed("FP32", [64, 8], fp32_contents=[0.0] * 512))
    assert RequestLimits() == v2_grpc.DEFAULT_LIMITS


# --------------------------------------------------------------------------------------------
# TF-Serving
# --------------------------------------------------------------------------------------------


def signature(*inputs: tuple[str, str]) -> ModelMetadata:
    return ModelMetadata("m", ("1",), "onnx", tuple(TensorSpec(n, d, (-1,)) for n, d in inputs), ())


SINGLE = signature(("x", "FP32"))
TEXT = signature(("t", "BYTES"))
MULTI = signature(("t", "BYTES"), ("x", "FP32"))


def tfs(obj: Any, sig: ModelMetadata = SINGLE, **kwargs: Any) -> InferenceRequest:
    body = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return tfserving.decode_predict_request(body, "m", "1", sig, **kwargs)[0]


def b64(raw: bytes) -> dict:
    return {"b64": base64.b64encode(raw).decode()}


@pytest.mark.parametrize(
    "obj",
    [{"instances": [[1.0, 2.0], [3.0, 4.0]]}, {"inputs": {"x": [[1.0, 2.0], [3.0, 4.0]]}}],
    ids=["rows", "columns"],
)
def test_tfserving_max_elements(obj: dict) -> None:
    tfs(obj, limits=limits(max_elements=4))
    with pytest.raises(InvalidInput, match="more than 3 elements in total, the max_elements limit"):
        tfs(obj, limits=limits(max_elements=3))
    with pytest.raises(InvalidInput, match="more than 3 elements"):
        tfs(obj, max_elements=3)  # the older keyword still works


@pytest.mark.parametrize(
    ("obj", "sig"),
    [
        ({"instances": [1.0, 2.0, 3.0]}, SINGLE),
        ({"instances": [{"t": "a", "x": 1.0}, {"t": "b", "x": 2.0}, {"t": "c", "x": 3.0}]}, MULTI),
        ({"inputs": [[1.0], [2.0], [3.0]]}, SINGLE),
        ({"inputs": {"t": ["a", "b", "c"], "x": [1.0]}}, MULTI),
    ],
    ids=["instances", "named-instances", "inputs", "named-inputs"],
)
def test_tfserving_max_batch_size(obj: dict, sig: ModelMetadata) -> None:
    tfs(obj, sig, limits=limits(max_batch_size=3))
    with pytest.raises(InvalidInput, match=r"batch size 3 .*max_batch_size \(2\)"):
        tfs(obj, sig, limits=limits(max_batch_size=2))


def test_tfserving_max_batch_size_leaves_scalars_alone() -> None:
    assert tfs({"inputs": 2.5}, limits=limits(max_batch_size=0)).inputs[0].shape == ()


@pytest.mark.parametrize(
    "obj",
    [
        {"instances": ["ab", "abcd"]},
        {"instances": [{"t": "ab"}, {"t": "abcd"}]},
        {"inputs": [["ab", "abcd"]]},
        {"instances": [b64(b"ab"), b64(b"\xff\x00\x01\x02")]},
        {"inputs": {"t": [b64(b"abcd")]}},
    ],
    ids=["strings", "named", "columns", "b64", "b64-columns"],
)
def test_tfserving_max_string_bytes(obj: dict) -> None:
    tfs(obj, TEXT, limits=limits(max_string_bytes=4))
    with pytest.raises(PayloadTooLarge, match=r"input 't': .* more than max_string_bytes \(3\)"):
        tfs(obj, TEXT, limits=limits(max_string_bytes=3))


def test_tfserving_large_b64_refused_before_decoding() -> None:
    obj = {"instances": [b64(b"x" * 3000)]}
    with pytest.raises(
        PayloadTooLarge, match=r'a "b64" value of 4000 characters decodes to more than max_string_bytes'
    ):
        tfs(obj, TEXT, limits=limits(max_string_bytes=100))


@pytest.mark.parametrize(
    ("obj", "sig", "levels"),
    [
        ({"instances": nest([1.0], 3)}, SINGLE, 5),  # instances list at 2, data lists 3..5
        ({"instances": [{"x": nest(1.0, 2)}]}, SINGLE, 5),  # object at 3, value lists 4..5
        ({"inputs": {"x": nest(1.0, 3)}}, SINGLE, 5),  # object at 2, value lists 3..5
        ({"inputs": nest(1.0, 4)}, SINGLE, 5),  # value lists 2..5
        ({"instances": [[b64(b"a")]]}, TEXT, 4),  # the b64 object is a level too
        ({"instances": [{"t": [b64(b"a")]}]}, TEXT, 5),
        ({"inputs": nest("a", 3)}, TEXT, 4),
        ({"instances": [1.0], "extra": nest(1, 4)}, SINGLE, 5),  # keys the decoder ignores count too
    ],
)
def test_tfserving_max_json_depth(obj: dict, sig: ModelMetadata, levels: int) -> None:
    tfs(obj, sig, limits=limits(max_json_depth=levels))
    with pytest.raises(InvalidInput, match=rf"max_json_depth \({levels - 1} levels"):
        tfs(obj, sig, limits=limits(max_json_depth=levels - 1))


def test_tfserving_max_json_depth_parser_and_nan_bodies() -> None:
    with pytest.raises(InvalidInput, match=r"request body: nested deeper than max_json_depth \(32 levels"):
        tfs(b'{"instances": ' + b"[" * 1100 + b"]" * 1100 + b"}")
    # NaN sends the body through the standard library parser; its result is bounded the same
    nan_body = b'{"instances": ' + b"[" * 40 + b"NaN" + b"]" * 40 + b"}"
    with pytest.raises(InvalidInput, match="max_json_depth"):
        tfs(nan_body)
    tiny = {"instances": [1.0]}
    with pytest.raises(InvalidInput, match=r"max_json_depth \(1 levels"):
        tfs(tiny, limits=limits(max_json_depth=1))
    tfs(tiny, limits=limits(max_json_depth=2))


def test_tfserving_defaults_accept_ordinary_requests() -> None:
    tfs({"instances": np.zeros((64, 8)).tolist()})
    tfs({"instances": [{"t": b64(b"x" * 10_000), "x": 1.0}]}, MULTI)
    tfs({"inputs": {"t": [["a", "b"]], "x": [[1.0, 2.0]]}, "signature_name": "serving_default"}, MULTI)


# --------------------------------------------------------------------------------------------
# Fuzz: any JSON, any limits -> only InvalidInput / PayloadTooLarge
# --------------------------------------------------------------------------------------------

# orjson writes at most 254 levels, so deeper bodies are spliced in as text: a string value
# DEEP anywhere in a body is replaced by a chain of arrays/objects of a drawn depth.
DEEP = "@deep@"
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.just(DEEP)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["a", "b64", "x", "t"]), inner, max_size=3)
    ),
    max_leaves=20,
)


@st.composite
def chains(draw: st.DrawFn) -> bytes:
    """A long chain of arrays/objects around a scalar: what hypothesis rarely builds alone."""
    depth = draw(st.sampled_from([0, 0, 0, 3, 31, 40, 1020, 1100]))
    kinds = draw(st.lists(st.sampled_from([b"[", b'{"k":']), min_size=1, max_size=3))
    opens = [kinds[i % len(kinds)] for i in range(depth)]
    closes = [b"]" if o == b"[" else b"}" for o in reversed(opens)]
    return b"".join(opens) + orjson.dumps(draw(st.integers(0, 2) | st.text(max_size=2))) + b"".join(closes)


def json_body(obj: Any, chain: bytes) -> bytes:
    return orjson.dumps(obj).replace(orjson.dumps(DEEP), chain)


random_limits = st.builds(
    RequestLimits,
    max_elements=st.integers(0, 64),
    max_batch_size=st.none() | st.integers(0, 4),
    max_string_bytes=st.integers(0, 8),
    max_json_depth=st.sampled_from([32, 4, 5, 8, 1024, 5000, 3, 1]),
)
v2_tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y"]) | json_values,
        "datatype": st.sampled_from(["FP32", "INT32", "BYTES", "BOOL", "FP16"]) | json_values,
        "shape": st.lists(st.integers(0, 3), max_size=3) | json_values,
        "data": json_values,
    },
    optional={"parameters": st.dictionaries(st.sampled_from(["p", "binary_data_size"]), json_values, max_size=2)},
)


@st.composite
def plausible_data(draw: st.DrawFn) -> tuple[str, list[int], Any]:
    """A datatype, shape and data that agree, so that decoding gets as far as the limits."""
    shape = draw(st.lists(st.integers(0, 3), max_size=4))
    datatype = draw(st.sampled_from(["FP32", "INT32", "BYTES"]))
    leaf = st.text(max_size=10) if datatype == "BYTES" else st.integers(-100, 100)
    data = np.empty(shape, dtype=object)
    for index in np.ndindex(*shape):
        data[index] = draw(leaf)
    return datatype, shape, data.tolist()


@st.composite
def plausible_tensors(draw: st.DrawFn) -> dict:
    datatype, shape, data = draw(plausible_data())
    out: dict[str, Any] = {"name": draw(st.sampled_from(["x", "y", "z"])), "datatype": datatype, "shape": shape}
    out["data"] = data if shape else (data if draw(st.booleans()) else [data])
    if draw(st.booleans()):
        out["parameters"] = draw(st.dictionaries(st.sampled_from(["p", "q"]), json_values, max_size=2))
    return out


v2_bodies = st.fixed_dictionaries(
    {"inputs": st.lists(plausible_tensors() | v2_tensors, max_size=3) | json_values},
    optional={
        "id": st.text(max_size=3) | json_values,
        "parameters": st.dictionaries(st.sampled_from(["p", "q"]), json_values, max_size=2) | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["y", "z"])},
                optional={"parameters": st.dictionaries(st.just("p"), json_values), "extra": json_values},
            ),
            max_size=2,
        ),
        "extra": json_values,
    },
)
tfs_values = plausible_data().map(lambda d: d[2]) | json_values
tfs_bodies = st.fixed_dictionaries(
    {},
    optional={
        "instances": tfs_values | st.lists(st.fixed_dictionaries({"t": tfs_values, "x": tfs_values}), max_size=3),
        "inputs": tfs_values | st.fixed_dictionaries({"t": tfs_values, "x": tfs_values}),
        "signature_name": st.just("serving_default") | json_values,
        "z": json_values,
    },
)


@FUZZ
@given(
    obj=v2_bodies | json_values,
    chain=chains(),
    lim=random_limits,
    section=st.none() | st.binary(max_size=24),
)
def test_fuzz_rest_decoder(obj: Any, chain: bytes, lim: RequestLimits, section: bytes | None) -> None:
    header = json_body(obj, chain)
    with contextlib.suppress(InvalidInput, PayloadTooLarge):
        if section is None:
            v2_rest.decode_infer_request(header, "m", None, limits=lim)
        else:
            v2_rest.decode_infer_request(header + section, "m", None, len(header), limits=lim)


@FUZZ
@given(
    obj=tfs_bodies | json_values,
    chain=chains(),
    sig=st.sampled_from([SINGLE, TEXT, MULTI]),
    lim=random_limits,
    nan=st.booleans(),
)
def test_fuzz_tfserving_decoder(obj: Any, chain: bytes, sig: ModelMetadata, lim: RequestLimits, nan: bool) -> None:
    body = json_body(obj, chain)
    if nan:  # through the standard library parser
        body = body.replace(b"null", b"NaN", 1)
    with contextlib.suppress(InvalidInput, PayloadTooLarge):
        tfs(body, sig, limits=lim)


@FUZZ
@given(
    datatype=st.sampled_from(["BYTES", "FP32", "UINT8"]),
    shape=st.lists(st.integers(0, 5), max_size=3),
    raw=st.none() | st.binary(max_size=40),
    strings=st.lists(st.binary(max_size=10), max_size=6),
    lim=random_limits,
)
def test_fuzz_grpc_decoder(
    datatype: str, shape: list[int], raw: bytes | None, strings: list[bytes], lim: RequestLimits
) -> None:
    msg = pb2.ModelInferRequest(model_name="m")
    t = msg.inputs.add(name="x", datatype=datatype, shape=shape)
    if raw is not None:
        msg.raw_input_contents.append(bytes_section(strings) if datatype == "BYTES" and raw[:1] == b"\x00" else raw)
    elif datatype == "BYTES":
        t.contents.bytes_contents.extend(strings)
    with contextlib.suppress(InvalidInput, PayloadTooLarge):
        v2_grpc.decode_infer_request(msg, limits=lim)
