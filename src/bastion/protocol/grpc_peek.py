"""The model name of a gRPC ``ModelInferRequest``, read off the wire without parsing the
message, so that the caller is admitted for that model (scope, rate limit, query budget)
before the server parses what it sent (``transport/grpc_server.py``).
"""

from __future__ import annotations

from bastion.core.errors import InvalidInput

# ModelInferRequest.model_name: field 1, wire type 2 (length-delimited)
_MODEL_NAME_TAG = (1 << 3) | 2
# top-level fields looked at for model_name; serializers write fields in number order, so
# a real client's model_name is the first field, or absent (proto3 leaves "" out)
PEEK_MAX_FIELDS = 8
_NOT_A_REQUEST = "request is not a valid inference.ModelInferRequest message: "


def _varint(data: bytes | memoryview, pos: int, end: int, what: str) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):  # a varint is at most 10 bytes
        if pos >= end:
            raise InvalidInput(f"{_NOT_A_REQUEST}{what} is cut off at byte {pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise InvalidInput(f"{_NOT_A_REQUEST}{what} ending at byte {pos} is longer than 10 bytes")


def peek_model_name(data: bytes | memoryview, max_fields: int = PEEK_MAX_FIELDS) -> str:
    """The ``model_name`` of a serialized ``ModelInferRequest``, read without parsing it.

    For admission before the message is parsed: only the tags and lengths of the first
    ``max_fields`` top-level fields are read and only the name is copied, so the cost does
    not grow with the message. Returns the first ``model_name`` among them, or "" when
    there is none (proto3 leaves an empty name out). A parser keeps the *last* occurrence
    of a field, so the caller checks the parsed message's name against this one.

    ``InvalidInput`` (naming the byte) when the fields before the name are not valid wire
    format, or the name is not UTF-8.
    """
    end = len(data)
    pos = 0
    for _ in range(max_fields):
        if pos >= end:
            break
        tag_at = pos
        tag, pos = _varint(data, pos, end, "a field tag")
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            raise InvalidInput(f"{_NOT_A_REQUEST}field number 0 at byte {tag_at}")
        if wire_type == 2:  # length-delimited: strings, bytes, messages
            size, pos = _varint(data, pos, end, f"the length of field {field}")
            if size > end - pos:
                raise InvalidInput(f"{_NOT_A_REQUEST}field {field} at byte {tag_at} claims {size} bytes, "
                                   f"{end - pos} are left")
            if tag == _MODEL_NAME_TAG:
                try:
                    return bytes(data[pos : pos + size]).decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInput("model_name: not valid UTF-8") from None
            pos += size
        elif wire_type == 0:
            _, pos = _varint(data, pos, end, f"varint field {field}")
        elif wire_type == 1 or wire_type == 5:  # fixed64, fixed32
            pos += 8 if wire_type == 1 else 4
            if pos > end:
                raise InvalidInput(f"{_NOT_A_REQUEST}field {field} at byte {tag_at} is cut off")
        else:  # groups (3, 4) and the invalid types 6, 7: nothing of this message; the parser judges
            break
    return ""
