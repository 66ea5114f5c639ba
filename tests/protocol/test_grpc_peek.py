"""``grpc_peek.peek_model_name``: the model name of a ModelInferRequest, off the wire, unparsed."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.core.errors import InvalidInput
from bastion.protocol import grpc_peek
from bastion.protocol.grpc_v2 import grpc_service_pb2 as pb2

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.text(max_size=300)
requests = st.builds(
    lambda name, version, rid, params, raw: _request(name, version, rid, params, raw),
    names,
    st.text(max_size=20),
    st.text(max_size=20),
    st.dictionaries(st.text(max_size=10), st.integers(-(1 << 63), (1 << 63) - 1), max_size=3),
    st.lists(st.binary(max_size=200), max_size=3),
)


def _request(name: str, version: str, rid: str, params: dict[str, int], raw: list[bytes]) -> pb2.ModelInferRequest:
    msg = pb2.ModelInferRequest(model_name=name, model_version=version, id=rid)
    for key, value in params.items():
        msg.parameters[key].int64_param = value
    for i, data in enumerate(raw):
        msg.inputs.add(name=f"INPUT{i}", datatype="UINT8", shape=[len(data)])
        msg.raw_input_contents.append(data)
    return msg


@FUZZ
@given(requests)
def test_the_name_of_any_serialized_request(msg: pb2.ModelInferRequest) -> None:
    assert grpc_peek.peek_model_name(msg.SerializeToString()) == msg.model_name


@FUZZ
@given(st.binary(max_size=64))
def test_garbage_is_a_name_an_empty_name_or_invalid_input(data: bytes) -> None:
    try:
        name = grpc_peek.peek_model_name(data)
    except InvalidInput as err:
        assert err.message.startswith(("request is not a valid inference.ModelInferRequest message: ", "model_name:"))
        return
    assert isinstance(name, str)


def test_a_name_after_other_fields_and_the_first_of_two() -> None:
    later = pb2.ModelInferRequest(id="x", model_version="2").SerializeToString()
    assert grpc_peek.peek_model_name(later + pb2.ModelInferRequest(model_name="m").SerializeToString()) == "m"
    two = pb2.ModelInferRequest(model_name="a").SerializeToString() + pb2.ModelInferRequest(
        model_name="b"
    ).SerializeToString()
    assert grpc_peek.peek_model_name(two) == "a"  # the parser keeps "b": the transport compares
    assert pb2.ModelInferRequest.FromString(two).model_name == "b"


def test_only_the_first_fields_are_looked_at() -> None:
    """Cost independent of the message: a name behind more than PEEK_MAX_FIELDS fields is not
    looked for ("" then, and the parsed name differs, which the transport refuses)."""
    filler = pb2.ModelInferRequest(id="x").SerializeToString() * grpc_peek.PEEK_MAX_FIELDS
    data = filler + pb2.ModelInferRequest(model_name="m").SerializeToString()
    assert grpc_peek.peek_model_name(data) == ""
    assert grpc_peek.peek_model_name(b"") == ""
    assert grpc_peek.peek_model_name(pb2.ModelInferRequest(id="x").SerializeToString()) == ""


def test_a_large_message_is_not_copied() -> None:
    msg = pb2.ModelInferRequest(model_name="simple")
    msg.raw_input_contents.append(bytes(8 << 20))
    data = memoryview(msg.SerializeToString())
    assert grpc_peek.peek_model_name(data) == "simple"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xff\xff", "a field tag is cut off at byte 3"),
        (b"\x0a\x7fsimple", "field 1 at byte 0 claims 127 bytes, 6 are left"),
        (b"\x0a", "the length of field 1 is cut off at byte 1"),
        (b"\x00\x01", "field number 0 at byte 0"),
        (b"\x08" + b"\xff" * 11, "varint field 1 ending at byte 11 is longer than 10 bytes"),
        (b"\x11\x00\x00", "field 2 at byte 0 is cut off"),
    ],
)
def test_malformed_bytes_before_the_name(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        grpc_peek.peek_model_name(data)
    assert info.value.message == f"request is not a valid inference.ModelInferRequest message: {message}"


def test_a_name_that_is_not_utf8() -> None:
    with pytest.raises(InvalidInput) as info:
        grpc_peek.peek_model_name(b"\x0a\x02\xff\xfe")
    assert info.value.message == "model_name: not valid UTF-8"
    with pytest.raises(Exception):  # noqa: B017 - the parser refuses it too
        pb2.ModelInferRequest.FromString(b"\x0a\x02\xff\xfe")
