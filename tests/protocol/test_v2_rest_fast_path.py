"""The fast decoder for plain JSON requests must agree with the full decoder exactly:
same arrays on valid input, and on anything else it must step aside so the full decoder
answers (with its worded error)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.core.errors import InvalidInput
from bastion.protocol import v2_rest, v2_rest_fast

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}


def _both(doc: dict) -> tuple[object, object]:
    """Decode through the fast path, and through the full path (an empty `parameters`
    object is outside the fast path's shape but means the same request)."""
    out = []
    for d in (doc, {**doc, "parameters": {}}):
        try:
            out.append(v2_rest.decode_infer_request(orjson.dumps(d), "m", None))
        except InvalidInput as err:
            out.append(("error", str(err)))
    return out[0], out[1]


values = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)


@settings(max_examples=300, deadline=None)
@given(
    datatype=st.sampled_from([*DTYPES, "FP16", "UINT8", "BOOL"]),
    shape=st.lists(st.integers(min_value=0, max_value=4), max_size=3),
    data=st.lists(values, max_size=20),
    with_id=st.booleans(),
)
def test_fast_path_agrees_with_full_decoder(datatype: str, shape: list[int], data: list, with_id: bool) -> None:
    doc: dict = {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}
    if with_id:
        doc["id"] = "r1"
    fast, full = _both(doc)
    if isinstance(full, tuple):
        assert fast == full  # the fast path stepped aside: the same worded error
        return
    assert not isinstance(fast, tuple)
    assert fast.id == full.id
    a, b = fast.inputs[0], full.inputs[0]
    assert (a.name, a.datatype, a.shape) == (b.name, b.datatype, b.shape)
    assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
    np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize(
    "doc",
    [
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1e39, 0.0]}]},
        {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": [2**31, 0]}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [True, 0.0]}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 0.0]}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]},
                    {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1.0]}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], "id": 7},
        {"inputs": [{"name": "x", "datatype": [], "shape": [1], "data": [1.0]}]},
        {"inputs": [{"name": ["x"], "datatype": "FP32", "shape": [1], "data": [1.0]}]},
        {"inputs": [{"name": "x", "datatype": {}, "shape": {}, "data": {}}]},
    ],
)
def test_bad_requests_get_the_full_decoders_error(doc: dict) -> None:
    fast, full = _both(doc)
    assert isinstance(fast, tuple) and fast == full


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(name=json_values | st.just("x"), datatype=json_values | st.sampled_from([*DTYPES]),
       shape=json_values | st.just([2]), data=json_values | st.just([1, 2]), request_id=json_values)
def test_any_field_values_never_escape_as_anything_but_the_full_decoders_answer(
    name: object, datatype: object, shape: object, data: object, request_id: object
) -> None:
    doc = {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}], "id": request_id}
    fast, full = _both(doc)
    if isinstance(full, tuple) or isinstance(fast, tuple):
        assert fast == full
    else:
        np.testing.assert_array_equal(fast.inputs[0].data, full.inputs[0].data)


@pytest.mark.parametrize(
    "outputs",
    [
        [{"name": "p"}],
        [{"name": "p"}, {"name": "label"}],
        [{"name": "p", "parameters": {"binary_data": False}}],  # parameters: the full path
        [{"name": "p"}, {"name": "p"}],
        [{"name": ""}],
        [{"nme": "p"}],
        [],
        {"name": "p"},
        None,
    ],
)
def test_requested_outputs_agree_on_both_paths(outputs: object) -> None:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.5, -2.0]}], "outputs": outputs}
    fast, full = _both(doc)
    if isinstance(full, tuple):
        assert fast == full
        return
    assert not isinstance(fast, tuple)
    assert fast.outputs == full.outputs
    np.testing.assert_array_equal(fast.inputs[0].data, full.inputs[0].data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80) | st.lists(st.sampled_from([b"true", b"false", b"u", b"l", b"tr", b"fa", b"1.5", b'"'])
                                          , max_size=30).map(b"".join))
def test_boolean_scan_agrees_with_a_substring_search(text: bytes) -> None:
    assert v2_rest_fast.has_json_boolean(text) == (b"true" in text or b"false" in text)


def test_boolean_scan_of_a_text_full_of_its_letters_stays_linear() -> None:
    text = b"ul" * 200_000
    assert not v2_rest_fast.has_json_boolean(text)
    assert v2_rest_fast.has_json_boolean(text + b"false")
