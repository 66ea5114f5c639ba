"""End-to-end encrypted inference: the client seals inputs to the worker's attested key,
the worker seals outputs back, and the front process only ever forwards ciphertext.

Request envelope (client -> worker)::

    b"BSE1" || HPKE(enc || ciphertext)       # RFC 9180 base mode, SUITE_NAME below
    info      = b"bastion-e2e-v1 request\\x00" || model name (UTF-8)
    plaintext = CBOR {"v": 1, "model": str, "ts": int (ms since the epoch), "rid": 16 bytes,
                      "resp_key": 32 bytes, "inputs": [tensor...], "outputs": [str...] | null}

Response envelope (worker -> client)::

    b"BSR1" || nonce (12 bytes) || AES-256-GCM(resp_key, nonce, plaintext, aad)
    aad       = b"bastion-e2e-v1 response\\x00" || rid
    plaintext = CBOR {"v": 1, "outputs": [tensor...]}
             or CBOR {"v": 1, "error": {"status": int, "message": str}}

Tensors are :mod:`bastion.confidential.tensor_codec` maps. Binding the model name into
HPKE's ``info`` means the untrusted host cannot take a request sealed for one model and
run it on another; the timestamp and the replay cache mean it cannot run a captured
request again; ``resp_key`` is fresh per request, so only the client that sealed the
request can read the answer, and ``rid`` in the AAD ties the answer to its request.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.confidential.identity import HPKE_ENC_BYTES, HPKE_TAG_BYTES, UnsealError, WorkerIdentity, seal_to
from bastion.confidential.tensor_codec import (
    DEFAULT_MAX_TENSORS,
    decode_tensors,
    dumps_cbor,
    encode_tensors,
    loads_cbor,
)
from bastion.confidential.wire_names import PARAMETER, SEALED_TENSOR, SUITE_NAME
from bastion.core.errors import BastionError, InvalidInput, Overloaded

__all__ = [
    "PARAMETER",
    "REQUEST_MAGIC",
    "RESPONSE_MAGIC",
    "SEALED_TENSOR",
    "SUITE_NAME",
    "OpenedRequest",
    "ReplayCache",
    "RequestSecret",
    "SealedRemoteError",
    "SealingError",
    "open_request",
    "open_response",
    "seal_error",
    "seal_request",
    "seal_response",
]


REQUEST_MAGIC = b"BSE1"
RESPONSE_MAGIC = b"BSR1"
REQUEST_INFO = b"bastion-e2e-v1 request\x00"
RESPONSE_AAD = b"bastion-e2e-v1 response\x00"
VERSION = 1
RID_BYTES = 16
RESP_KEY_BYTES = 32
NONCE_BYTES = 12
_GCM_TAG_BYTES = 16

DEFAULT_MAX_SEALED_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_SKEW_S = 300.0
DEFAULT_REPLAY_WINDOW_S = 600.0
# ~150 bytes an entry: ~15 MiB, affordable inside an enclave; 100k fresh requests in a
# 10-minute window is ~170 requests/s sustained before the cache refuses new ones.
DEFAULT_REPLAY_ENTRIES = 100_000
MAX_ERROR_MESSAGE_CHARS = 4096
_MIN_REQUEST = len(REQUEST_MAGIC) + HPKE_ENC_BYTES + HPKE_TAG_BYTES
_MIN_RESPONSE = len(RESPONSE_MAGIC) + NONCE_BYTES + _GCM_TAG_BYTES
_REQUEST_FIELDS = frozenset({"v", "model", "ts", "rid", "resp_key", "inputs", "outputs"})
_MAX_OUTPUT_NAMES = 64


class SealingError(BastionError):
    """A sealed envelope that cannot be accepted.

    ``opened`` is set when the request itself was authentic and fresh but its content
    (inputs, outputs) is not acceptable: the message then describes the client's
    plaintext, so the caller must answer with ``seal_error(err.opened, err.http_status,
    err.message)``, never in the clear through the untrusted front."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, opened: OpenedRequest | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.opened = opened
        if http_status is not None:
            self.http_status = http_status


_GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    422: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class SealedRemoteError(BastionError):
    """The worker answered with a sealed error: only this client can read it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.http_status = status
        self.grpc_code = _GRPC_CODES.get(status, "INTERNAL")


@dataclass(frozen=True)
class RequestSecret:
    """What the client keeps to open the answer to one sealed request."""

    rid: bytes
    resp_key: bytes = field(repr=False)
    model: str


@dataclass(frozen=True)
class OpenedRequest:
    model: str
    rid: bytes
    resp_key: bytes = field(repr=False)
    inputs: dict[str, np.ndarray] = field(repr=False)
    outputs: tuple[str, ...] | None
    timestamp_ms: int


def _request_info(model: str) -> bytes:
    return REQUEST_INFO + model.encode("utf-8")


def _response_aad(rid: bytes) -> bytes:
    return RESPONSE_AAD + rid


def _check_model_name(model: object) -> str:
    if not isinstance(model, str) or not model:
        raise ValueError("model: expected a non-empty model name")
    return model


# ------------------------------------------------------------------ replay protection


class ReplayCache:
    """Request ids seen in the last ``window_s`` seconds, in bounded memory.

    ``window_s`` must be at least twice the accepted clock skew: a request stamped
    ``skew`` seconds ahead, seen now, stays acceptable for ``2 * skew`` seconds, and
    its id has to be remembered for all of that time.

    Thread-safe: the worker may open requests on several threads."""

    def __init__(self, window_s: float = DEFAULT_REPLAY_WINDOW_S, max_entries: int = DEFAULT_REPLAY_ENTRIES) -> None:
        if window_s <= 0 or max_entries <= 0:
            raise ValueError("ReplayCache: window_s and max_entries must be positive")
        self.window_s = float(window_s)
        self.max_entries = int(max_entries)
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # rid -> expiry, in insertion (= expiry) order
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def _evict(self, now: float) -> None:
        seen = self._seen
        # Entries go in with now + window, so the oldest expire first; a clock that steps
        # back only keeps some entries longer than needed, which is the safe direction.
        while seen:
            rid, expiry = next(iter(seen.items()))
            if expiry > now:
                break
            del seen[rid]

    def check_and_add(self, rid: bytes, *, now: float | None = None) -> None:
        """Record ``rid``; raise :class:`SealingError` if it was already seen in the window."""
        when = time.time() if now is None else now
        with self._lock:
            self._evict(when)
            if rid in self._seen:
                raise SealingError("replayed request: this request id was already accepted; seal a new request")
            if len(self._seen) >= self.max_entries:
                # Refuse rather than forget: dropping an unexpired id to make room would let
                # whoever filled the cache (anyone can seal valid requests to a public key)
                # replay a captured request that is still fresh. Refusing fails closed and
                # only costs availability until the oldest entry expires.
                oldest = next(iter(self._seen.values()))
                raise Overloaded(
                    f"replay cache full ({self.max_entries} request ids in the last {self.window_s:.0f} s); "
                    "try again shortly",
                    retry_after=max(0.0, oldest - when),
                )
            self._seen[rid] = when + self.window_s


# ------------------------------------------------------------------ client side


def seal_request(
    public_key: bytes,
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    outputs: Sequence[str] | None = None,
    now: float | None = None,
) -> tuple[bytes, RequestSecret]:
    """Seal ``inputs`` for ``model`` to the worker's attested ``public_key`` (which the
    caller must have verified attestation evidence for). Returns the envelope and the
    secret that opens the answer."""
    _check_model_name(model)
    if outputs is not None:
        if isinstance(outputs, str) or not all(isinstance(o, str) and o for o in outputs):
            raise ValueError("outputs: expected a sequence of non-empty output names")
        outputs = list(outputs)
    rid = os.urandom(RID_BYTES)
    resp_key = os.urandom(RESP_KEY_BYTES)
    ts = int((time.time() if now is None else now) * 1000)
    body = {
        "v": VERSION,
        "model": model,
        "ts": ts,
        "rid": rid,
        "resp_key": resp_key,
        "inputs": encode_tensors(inputs),
        "outputs": outputs,
    }
    sealed = seal_to(public_key, dumps_cbor(body), _request_info(model))
    return REQUEST_MAGIC + sealed, RequestSecret(rid=rid, resp_key=resp_key, model=model)


def open_response(
    secret: RequestSecret,
    envelope: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> dict[str, np.ndarray]:
    """Open the worker's answer: the outputs, or :class:`SealedRemoteError` if it sealed
    an error. Anything tampered with, or not the answer to this request, is a
    :class:`SealingError`."""
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise SealingError(f"sealed response: expected bytes, got {type(envelope).__name__}")
    view = memoryview(envelope).cast("B")
    if view.nbytes > max_bytes:
        raise SealingError(f"sealed response: {view.nbytes} bytes, more than the {max_bytes} accepted")
    if view.nbytes < _MIN_RESPONSE:
        raise SealingError(
            f"sealed response: truncated ({view.nbytes} bytes; at least {_MIN_RESPONSE} expected)",
        )
    if view[:4] != RESPONSE_MAGIC:
        raise SealingError(f"sealed response: bad magic {bytes(view[:4])!r}, expected {RESPONSE_MAGIC!r}")
    nonce = view[4 : 4 + NONCE_BYTES]
    try:
        plaintext = AESGCM(secret.resp_key).decrypt(nonce, view[4 + NONCE_BYTES :], _response_aad(secret.rid))
    except InvalidTag:
        raise SealingError("sealed response does not open: tampered with, or not the answer to this request") from None
    try:
        body = loads_cbor(plaintext, "sealed response")
    except InvalidInput as exc:
        raise SealingError(exc.message) from None
    if not isinstance(body, dict) or body.get("v") != VERSION or type(body.get("v")) is not int:
        raise SealingError("sealed response: expected a map with v = 1")
    if set(body) == {"v", "outputs"}:
        try:
            return decode_tensors(body["outputs"], max_tensors=max_tensors, max_bytes=max_bytes, field="outputs")
        except BastionError as exc:
            raise SealingError(f"sealed response: {exc.message}") from None
    if set(body) == {"v", "error"}:
        error = body["error"]
        if not isinstance(error, dict) or set(error) != {"status", "message"}:
            raise SealingError("sealed response: error must be a map of status and message")
        status, message = error["status"], error["message"]
        if type(status) is not int or not 400 <= status <= 599 or not isinstance(message, str):
            raise SealingError("sealed response: error.status must be an int in 400..599 and error.message a string")
        raise SealedRemoteError(status, message)
    raise SealingError(f"sealed response: unexpected fields {sorted(map(str, body))}; expected v and outputs or error")


# ------------------------------------------------------------------ worker side


def _field_error(name: str, expected: str, value: object) -> SealingError:
    return SealingError(f"sealed request.{name}: expected {expected}, got {type(value).__name__}")


def _bytes_field(body: dict[str, Any], name: str, size: int) -> bytes:
    value = body[name]
    if not isinstance(value, bytes) or len(value) != size:
        raise _field_error(name, f"{size} bytes", value)
    return value


def open_request(
    identity: WorkerIdentity,
    envelope: bytes,
    *,
    model: str,
    replay: ReplayCache,
    max_bytes: int = DEFAULT_MAX_SEALED_BYTES,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
    max_tensors: int = DEFAULT_MAX_TENSORS,
    now: float | None = None,
) -> OpenedRequest:
    """Open a client's sealed request for ``model`` inside the worker.

    Order: bound the size, check the magic, decrypt (which authenticates the client's
    choice of model), parse, check freshness, then record the id against replay; only
    then decode tensors. Failures are :class:`SealingError`; see its ``opened``."""
    _check_model_name(model)
    if replay.window_s < 2 * max_skew_s:
        raise ValueError(f"replay window ({replay.window_s} s) must be at least twice max_skew_s ({max_skew_s} s)")
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise SealingError(f"sealed request: expected bytes, got {type(envelope).__name__}")
    view = memoryview(envelope).cast("B")
    size = view.nbytes
    if size > max_bytes:
        raise SealingError(f"sealed request: {size} bytes, more than the {max_bytes} accepted", http_status=413)
    if size < len(REQUEST_MAGIC):
        raise SealingError(f"sealed request: truncated ({size} bytes; at least {_MIN_REQUEST} expected)")
    magic = bytes(view[:4])
    if magic != REQUEST_MAGIC:
        if magic[:3] == REQUEST_MAGIC[:3]:
            raise SealingError(
                f"sealed request: envelope version {magic[3:]!r} is not supported; this worker reads {REQUEST_MAGIC!r}"
            )
        raise SealingError(f"sealed request: bad magic {magic!r}; expected {REQUEST_MAGIC!r} (not a sealed request)")
    if size < _MIN_REQUEST:
        raise SealingError(f"sealed request: truncated ({size} bytes; at least {_MIN_REQUEST} expected)")
    try:
        plaintext = identity.open(view[4:], _request_info(model))
    except UnsealError:
        raise SealingError(
            f"sealed request does not open: not sealed to this worker's key or for model {model!r}, or corrupted"
        ) from None

    try:
        body = loads_cbor(plaintext, "sealed request")
    except InvalidInput as exc:
        raise SealingError(exc.message) from None
    if not isinstance(body, dict):
        raise SealingError(f"sealed request: expected a map, got {type(body).__name__}")
    if set(body) != _REQUEST_FIELDS:
        missing = sorted(_REQUEST_FIELDS - set(body))
        extra = sorted(str(k)[:40] for k in set(body) - _REQUEST_FIELDS)
        raise SealingError(
            f"sealed request: missing fields {missing}" if missing else f"sealed request: unexpected fields {extra}"
        )
    if type(body["v"]) is not int or body["v"] != VERSION:
        raise SealingError(f"sealed request.v: version {body['v']!r:.40} is not supported; expected {VERSION}")
    if not isinstance(body["model"], str):
        raise _field_error("model", "a string", body["model"])
    if body["model"] != model:
        # Reachable only by a client that sealed for one model and named another inside:
        # HPKE's info already refuses a request moved between models.
        raise SealingError(f"sealed request.model: does not match the model it was sent to ({model!r})")
    ts = body["ts"]
    if type(ts) is not int:
        raise _field_error("ts", "an integer (milliseconds since the epoch)", ts)
    rid = _bytes_field(body, "rid", RID_BYTES)
    resp_key = _bytes_field(body, "resp_key", RESP_KEY_BYTES)

    when = time.time() if now is None else now
    skew = ts / 1000 - when
    if abs(skew) > max_skew_s:
        direction = "in the future" if skew > 0 else "old"
        raise SealingError(
            f"stale sealed request: its timestamp is {abs(skew):.0f} s {direction}, outside the ±{max_skew_s:.0f} s "
            "accepted (seal a new request; check the client's clock)"
        )
    replay.check_and_add(rid, now=when)

    # Authentic, fresh and new: from here on errors describe the client's plaintext, so they
    # carry `opened` and must be sealed back rather than sent through the front in the clear.
    shell = OpenedRequest(model=model, rid=rid, resp_key=resp_key, inputs={}, outputs=None, timestamp_ms=ts)
    outputs = body["outputs"]
    if outputs is not None:
        if (
            not isinstance(outputs, list)
            or len(outputs) > _MAX_OUTPUT_NAMES
            or not all(isinstance(o, str) and o for o in outputs)
        ):
            raise SealingError(
                f"sealed request.outputs: expected null or a list of at most {_MAX_OUTPUT_NAMES} non-empty names",
                opened=shell,
            )
        if len(set(outputs)) != len(outputs):
            raise SealingError("sealed request.outputs: names must be unique", opened=shell)
        outputs = tuple(outputs)
    try:
        inputs = decode_tensors(body["inputs"], max_tensors=max_tensors, max_bytes=max_bytes, field="inputs")
    except BastionError as exc:
        raise SealingError(exc.message, opened=shell, http_status=exc.http_status) from None
    return OpenedRequest(model=model, rid=rid, resp_key=resp_key, inputs=inputs, outputs=outputs, timestamp_ms=ts)


def _seal_body(opened: OpenedRequest, body: dict[str, Any]) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(opened.resp_key).encrypt(nonce, dumps_cbor(body), _response_aad(opened.rid))
    return RESPONSE_MAGIC + nonce + ciphertext


def seal_response(opened: OpenedRequest, outputs: Mapping[str, np.ndarray]) -> bytes:
    """The outputs, readable only by the client that sealed ``opened``."""
    return _seal_body(opened, {"v": VERSION, "outputs": encode_tensors(outputs)})


def seal_error(opened: OpenedRequest, status: int, message: str) -> bytes:
    """An error about a sealed request, sealed: its message may describe the client's
    inputs, which the front must not see. ``status`` outside 400..599 becomes 500."""
    if type(status) is not int or not 400 <= status <= 599:
        status = 500
    text = str(message)[:MAX_ERROR_MESSAGE_CHARS]
    return _seal_body(opened, {"v": VERSION, "error": {"status": status, "message": text}})
