from __future__ import annotations

from typing import Any

import cbor2
import numpy as np
import pytest

from bastion.confidential.tensor_codec import decode_tensors, dumps_cbor, encode_tensors, loads_cbor
from bastion.core.datatypes import MAX_DIMS
from bastion.core.errors import InvalidInput, PayloadTooLarge


def _roundtrip(tensors: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    return decode_tensors(cbor2.loads(cbor2.dumps(encode_tensors(tensors))), **kwargs)


def _item(**overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [2], "data": b"\x00" * 8}
    item.update(overrides)
    return item


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array([-(2**62), 0, 2**62], dtype=np.int64),
        np.array([1.5, -2.25], dtype=np.float16),
        np.array([[True, False]], dtype=np.bool_),
        np.array([0, 255], dtype=np.uint8),
        np.array(3.25, dtype=np.float64),  # a scalar: shape []
        np.zeros((0, 4), dtype=np.int32),
        np.array([2**64 - 1], dtype=np.uint64),
    ],
)
def test_numeric_round_trip(array: np.ndarray) -> None:
    out = _roundtrip({"t": array})["t"]
    assert out.dtype == array.dtype
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_bytes_round_trip_keeps_shape_and_turns_str_into_utf8() -> None:
    array = np.array([[b"a", b""], [b"\x00\xff", b"long" * 100]], dtype=object)
    out = _roundtrip({"b": array, "s": np.array(["h\u00e9"])})
    assert out["b"].dtype == object and out["b"].shape == (2, 2)
    assert out["b"].tolist() == array.tolist()
    assert out["s"].tolist() == ["h\u00e9".encode()]


def test_wire_is_little_endian_c_order_even_for_views_and_big_endian_input() -> None:
    base = np.arange(12, dtype=">i4").reshape(3, 4)
    view = base[:, ::2]  # not contiguous, big-endian
    [item] = encode_tensors({"v": view})
    assert item["datatype"] == "INT32"
    assert item["shape"] == [3, 2]
    assert item["data"] == np.ascontiguousarray(view, dtype="<i4").tobytes()
    np.testing.assert_array_equal(_roundtrip({"v": view})["v"], view)


def test_decoded_numeric_arrays_are_read_only_views_of_the_data() -> None:
    data = np.arange(4, dtype="<f4").tobytes()
    out = decode_tensors([_item(shape=[4], data=data)])["x"]
    assert not out.flags.writeable
    assert np.shares_memory(out, np.frombuffer(data, dtype=np.uint8))


def test_field_prefix_names_where_the_problem_is() -> None:
    with pytest.raises(InvalidInput, match=r"^outputs\[1\]\.shape: "):
        decode_tensors([_item(), _item(name="y", shape=[-1])], field="outputs")


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ({"name": "x"}, r"^inputs: expected a list of tensors, got dict"),
        (["x"], r"^inputs\[0\]: expected a map, got str"),
        ([{"name": "x", "datatype": "FP32", "shape": [2]}], r"^inputs\[0\]: missing data"),
        ([_item(extra=1)], r"^inputs\[0\]: unexpected 'extra'"),
        ([_item(name="")], r"^inputs\[0\]\.name: expected a non-empty string"),
        ([_item(name=b"x")], r"^inputs\[0\]\.name: expected a non-empty string"),
        ([_item(), _item()], r"^inputs\[1\]\.name: 'x' appears more than once"),
        ([_item(datatype="BF16")], r"^inputs\[0\]\.datatype: unsupported datatype 'BF16'"),
        ([_item(datatype=7)], r"^inputs\[0\]\.datatype: expected a string, got int"),
        ([_item(shape="2")], r"^inputs\[0\]\.shape: expected a list of integers, got str"),
        ([_item(shape=[1] * (MAX_DIMS + 1), data=b"\x00" * 4)], rf"^inputs\[0\]\.shape: {MAX_DIMS + 1} dimensions"),
        ([_item(shape=[-2])], r"^inputs\[0\]\.shape: dimension -2 is negative"),
        ([_item(shape=[True, 2])], r"^inputs\[0\]\.shape: dimensions must be integers, found bool"),
        ([_item(shape=[1.0])], r"^inputs\[0\]\.shape: dimensions must be integers, found float"),
        ([_item(shape=[2**63])], r"^inputs\[0\]\.shape: dimension \d+ does not fit in int64"),
        ([_item(shape=[0, 2**62], data=b"")], r"^inputs\[0\]\.shape: .* is too large for an array"),
        ([_item(shape=[3])], r"^inputs\[0\]\.data: 8 bytes, but shape \[3\] of FP32 needs 12 bytes"),
        ([_item(shape=[2**40, 2**40])], r"^inputs\[0\]\.data: 8 bytes, but shape .* needs \d+ bytes"),
        ([_item(data=[b"a", b"b"])], r"^inputs\[0\]\.data: FP32 data must be a byte string, got list"),
        ([_item(datatype="BOOL", data=b"\x01\x02")], r"^inputs\[0\]\.data: BOOL data must hold bytes 0 or 1"),
        ([_item(datatype="BYTES", data=b"ab")], r"^inputs\[0\]\.data: BYTES data must be a list"),
        ([_item(datatype="BYTES", data=[b"a"])], r"^inputs\[0\]\.data: 1 BYTES elements, but shape \[2\] has 2"),
        ([_item(datatype="BYTES", data=[b"a", "b"])], r"^inputs\[0\]\.data\[1\]: expected a byte string, got str"),
    ],
)
def test_malformed_tensors_are_refused_naming_the_field(items: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_tensors(items)


def test_tensor_count_is_bounded_before_decoding() -> None:
    items = [_item(name=f"t{i}") for i in range(5)]
    with pytest.raises(InvalidInput, match=r"^inputs: 5 tensors, more than the 4 accepted"):
        decode_tensors(items, max_tensors=4)
    assert len(decode_tensors(items, max_tensors=5)) == 5


def test_total_bytes_are_bounded() -> None:
    items = [_item(name="a"), _item(name="b", datatype="BYTES", shape=[1], data=[b"x" * 9])]
    with pytest.raises(PayloadTooLarge, match=r"more than 16 bytes of tensor data \(at inputs\[1\]\)"):
        decode_tensors(items, max_bytes=16)
    assert set(decode_tensors(items, max_bytes=17)) == {"a", "b"}


def test_encode_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(InvalidInput, match=r"tensors\[0\]\.name"):
        encode_tensors({"": np.zeros(1)})
    with pytest.raises(InvalidInput, match=r"tensors\[0\]\.data: BYTES elements must be bytes or str, found int"):
        encode_tensors({"o": np.array([1, b"x"], dtype=object)})


def test_loads_cbor_is_strict() -> None:
    assert loads_cbor(cbor2.dumps({"a": [1, b"x"]}), "m") == {"a": [1, b"x"]}
    with pytest.raises(InvalidInput, match=r"^m: 1 bytes of trailing data"):
        loads_cbor(cbor2.dumps({"a": 1}) + b"\x00", "m")
    with pytest.raises(InvalidInput, match=r"^m: not valid CBOR"):
        loads_cbor(b"\xa2\x61a\x01\x61a\x02", "m")  # duplicate key "a"
    with pytest.raises(InvalidInput, match=r"^m: not valid CBOR"):
        loads_cbor(cbor2.dumps(cbor2.CBORTag(30, [1, 3])), "m")  # a Fraction, built-in
    with pytest.raises(InvalidInput, match=r"^m: not valid CBOR"):
        loads_cbor(cbor2.dumps(cbor2.CBORTag(9999, 1)), "m")  # an unknown tag
    with pytest.raises(InvalidInput, match=r"^m: not valid CBOR"):
        loads_cbor(b"\x81" * 40 + b"\x01", "m")  # nested 40 deep
    with pytest.raises(InvalidInput, match=r"^m: not valid CBOR"):
        loads_cbor(b"\x5a\xff\xff\xff\xff", "m")  # a 4 GiB byte string announced, absent


def test_dumps_cbor_writes_memoryviews_as_byte_strings() -> None:
    array = np.arange(3, dtype="<i4")
    assert loads_cbor(dumps_cbor({"d": memoryview(array)}), "m") == {"d": array.tobytes()}
    assert dumps_cbor({"d": memoryview(b"ab")}) == cbor2.dumps({"d": b"ab"})
