"""Parsing and bounding a ``release``/``generate`` request body before anything is decided on it.

``kms.py`` hands the body here and gets back a :class:`_KeyRequest` or a
:class:`FieldError` (a 400 naming the field at fault). Every field is bounded before it is
decoded: base64 text longer than any encoding of the field's limit is refused unread,
the evidence is capped at ``attestation.MAX_EVIDENCE_BYTES``, the wrapped key at what
bundles accept, and unknown fields are refused, so nothing unbounded or unexpected
reaches the verifier or the key store. ``MAX_BODY_BYTES`` bounds the whole body, which
the server enforces before reading it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from bastion.confidential.attestation import MAX_EVIDENCE_BYTES
from bastion.confidential.kms_policy import NONCE_BYTES
from bastion.core.errors import InvalidInput

__all__ = ["MAX_BODY_BYTES", "MAX_WRAPPED_BYTES", "FieldError"]

# evidence (at most 64 KiB, 87 KiB as base64) and three short fields; checked before parsing
MAX_BODY_BYTES = 256 * 1024
MAX_WRAPPED_BYTES = 4096  # bundles refuse larger wrapped keys (bundles._MAX_WRAPPED_KEY)
_KIND_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


class FieldError(InvalidInput):
    """A 400 that names the request field at fault."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.field = name


@dataclass(frozen=True)
class _KeyRequest:
    kind: str
    evidence: bytes
    nonce: bytes
    wrapped: bytes | None  # None for generate


_RELEASE_FIELDS = ("kind", "evidence", "nonce", "wrapped")
_GENERATE_FIELDS = ("kind", "evidence", "nonce")


def _b64_field(body: Mapping[str, Any], name: str, limit: int) -> bytes:
    value = body.get(name)
    if value is None:
        raise FieldError(name, "missing (expected base64 text)")
    if not isinstance(value, str):
        raise FieldError(name, f"expected base64 text, got {type(value).__name__}")
    if len(value) > (limit + 2) // 3 * 4 + 4:  # longer than any base64 of ``limit`` bytes: not decoded
        raise FieldError(name, f"more than {limit} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(name, "not base64 (standard alphabet, padded)") from None
    if len(raw) > limit:
        raise FieldError(name, f"{len(raw)} bytes, more than {limit}")
    return raw


def _parse_key_request(body: bytes, *, generate: bool = False) -> _KeyRequest:
    fields = _GENERATE_FIELDS if generate else _RELEASE_FIELDS
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise FieldError("body", "not JSON; expected {" + ", ".join(f'"{f}"' for f in fields) + "}") from None
    if not isinstance(data, dict):
        raise FieldError("body", f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FieldError(unknown[0][:40], f"unknown field (expected {', '.join(fields)})")
    kind = data.get("kind")
    if not isinstance(kind, str) or not kind or len(kind) > 32 or not set(kind) <= _KIND_CHARS:
        raise FieldError("kind", 'expected the evidence kind, e.g. "nitro" or "dev"')
    nonce = _b64_field(data, "nonce", NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise FieldError("nonce", f"{len(nonce)} bytes, expected {NONCE_BYTES} (the nonce POST /v1/nonce gave)")
    evidence = _b64_field(data, "evidence", MAX_EVIDENCE_BYTES)
    if not evidence:
        raise FieldError("evidence", "empty")
    if generate:
        return _KeyRequest(kind, evidence, nonce, None)
    wrapped = _b64_field(data, "wrapped", MAX_WRAPPED_BYTES)
    if not wrapped:
        raise FieldError("wrapped", "empty")
    return _KeyRequest(kind, evidence, nonce, wrapped)
