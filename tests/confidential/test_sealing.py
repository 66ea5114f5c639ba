from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import cbor2
import numpy as np
import pytest

from bastion.confidential import identity as identity_module
from bastion.confidential.identity import (
    NotATrustedWorker,
    UnsealError,
    WorkerIdentity,
    current_identity,
    seal_to,
    set_current_identity,
)
from bastion.confidential.sealing import (
    REQUEST_INFO,
    OpenedRequest,
    ReplayCache,
    RequestSecret,
    SealedRemoteError,
    SealingError,
    open_request,
    open_response,
    seal_error,
    seal_request,
    seal_response,
)
from bastion.confidential.tensor_codec import encode_tensors
from bastion.core.errors import BastionError, Overloaded

NOW = 1_700_000_000.0


class _Producer:
    """Evidence is not what these tests are about: the worker key is."""

    kind = "test"

    def evidence(self, public_key: bytes, nonce: bytes | None, user_data: bytes | None = None) -> bytes:
        return public_key + (nonce or b"")


@pytest.fixture
def worker() -> WorkerIdentity:
    return WorkerIdentity.generate(_Producer())


def _inputs() -> dict[str, np.ndarray]:
    return {
        "x": np.arange(6, dtype=np.float32).reshape(2, 3),
        "ids": np.array([[1, -(2**40)]], dtype=np.int64),
        "text": np.array([b"caf\xc3\xa9", b""], dtype=object),
    }


def _open(worker: WorkerIdentity, envelope: bytes, **kwargs: Any) -> OpenedRequest:
    kwargs.setdefault("model", "m")
    kwargs.setdefault("replay", ReplayCache())
    kwargs.setdefault("now", NOW)
    return open_request(worker, envelope, **kwargs)


def _raw_request(worker: WorkerIdentity, body: Any, model: str = "m", *, raw: bytes | None = None) -> bytes:
    """An envelope with arbitrary (possibly malformed) plaintext, properly sealed."""
    plaintext = cbor2.dumps(body) if raw is None else raw
    return b"BSE1" + seal_to(worker.public_key, plaintext, REQUEST_INFO + model.encode())


def _body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "model": "m",
        "ts": int(NOW * 1000),
        "rid": os.urandom(16),
        "resp_key": os.urandom(32),
        "inputs": encode_tensors({"x": np.zeros(2, np.float32)}),
        "outputs": None,
    }
    body.update(overrides)
    return body


# ------------------------------------------------------------------ round trips


def test_request_and_response_round_trip(worker: WorkerIdentity) -> None:
    envelope, secret = seal_request(worker.public_key, "m", _inputs(), outputs=["y"], now=NOW)
    assert envelope[:4] == b"BSE1"
    assert b"caf" not in envelope  # the front sees ciphertext only
    opened = _open(worker, envelope)
    assert opened.model == "m" and opened.outputs == ("y",)
    assert opened.rid == secret.rid and opened.resp_key == secret.resp_key
    for name, array in _inputs().items():
        assert opened.inputs[name].dtype == array.dtype
        assert opened.inputs[name].tolist() == array.tolist()

    outputs = {"y": np.array([[0.25, -1.0]], dtype=np.float32), "label": np.array([b"cat"], dtype=object)}
    response = seal_response(opened, outputs)
    assert response[:4] == b"BSR1" and b"cat" not in response
    got = open_response(secret, response)
    assert got.keys() == outputs.keys()
    np.testing.assert_array_equal(got["y"], outputs["y"])
    assert got["label"].tolist() == [b"cat"]


def test_secrets_do_not_show_in_repr(worker: WorkerIdentity) -> None:
    envelope, secret = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    opened = _open(worker, envelope)
    assert secret.resp_key.hex() not in repr(secret)
    assert secret.resp_key.hex() not in repr(opened)
    assert "private" not in repr(worker).lower()


def test_sealed_error_reaches_the_client_only(worker: WorkerIdentity) -> None:
    envelope, secret = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    opened = _open(worker, envelope)
    response = seal_error(opened, 422, "input x: secret-dependent detail")
    assert b"secret-dependent" not in response
    with pytest.raises(SealedRemoteError) as err:
        open_response(secret, response)
    assert (err.value.status, err.value.http_status) == (422, 422)
    assert err.value.message == "input x: secret-dependent detail"
    assert err.value.grpc_code == "FAILED_PRECONDITION"
    # a status outside 4xx/5xx is a bug on the worker side: reported as 500
    with pytest.raises(SealedRemoteError) as err:
        open_response(secret, seal_error(opened, 200, "not an error"))
    assert err.value.status == 500


# ------------------------------------------------------------------ refusals: envelope


def test_ciphertext_for_another_key_is_refused(worker: WorkerIdentity) -> None:
    other = WorkerIdentity.generate(_Producer())
    envelope, _ = seal_request(other.public_key, "m", _inputs(), now=NOW)
    with pytest.raises(SealingError, match=r"does not open: not sealed to this worker's key or for model 'm'"):
        _open(worker, envelope)


def test_ciphertext_for_another_model_is_refused(worker: WorkerIdentity) -> None:
    envelope, _ = seal_request(worker.public_key, "cheap", _inputs(), now=NOW)
    assert _open(worker, envelope, model="cheap").model == "cheap"
    with pytest.raises(SealingError, match=r"not sealed to this worker's key or for model 'secret', or corrupted"):
        _open(worker, envelope, model="secret")


@pytest.mark.parametrize("cut", [2, 4, 40, 51])
def test_truncated_envelope_is_refused(worker: WorkerIdentity, cut: int) -> None:
    envelope, _ = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    with pytest.raises(SealingError, match=r"^sealed request: truncated \(\d+ bytes; at least 52 expected\)"):
        _open(worker, envelope[:cut])


def test_truncated_ciphertext_does_not_open(worker: WorkerIdentity) -> None:
    envelope, _ = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    with pytest.raises(SealingError, match="does not open"):
        _open(worker, envelope[:-1])


def test_flipped_bit_does_not_open(worker: WorkerIdentity) -> None:
    envelope = bytearray(seal_request(worker.public_key, "m", _inputs(), now=NOW)[0])
    envelope[60] ^= 1
    with pytest.raises(SealingError, match="does not open"):
        _open(worker, bytes(envelope))


def test_oversized_envelope_is_refused_before_anything_else(worker: WorkerIdentity) -> None:
    big = b"XXXX" + b"\x00" * 1000  # bad magic too: the size is checked first
    with pytest.raises(SealingError, match=r"^sealed request: 1004 bytes, more than the 1000 accepted") as err:
        _open(worker, big, max_bytes=1000)
    assert err.value.http_status == 413


def test_bad_magic_and_unknown_version_are_refused(worker: WorkerIdentity) -> None:
    envelope, _ = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    with pytest.raises(SealingError, match=r"bad magic b'GET '; .*\(not a sealed request\)"):
        _open(worker, b"GET " + envelope[4:])
    with pytest.raises(SealingError, match=r"envelope version b'2' is not supported; this worker reads b'BSE1'"):
        _open(worker, b"BSE2" + envelope[4:])


def test_not_bytes_is_refused(worker: WorkerIdentity) -> None:
    with pytest.raises(SealingError, match="expected bytes, got str"):
        _open(worker, "BSE1...")  # type: ignore[arg-type]


# ------------------------------------------------------------------ refusals: content


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], r"^sealed request: expected a map, got list"),
        (_body(extra=1), r"^sealed request: unexpected fields \['extra'\]"),
        ({k: v for k, v in _body().items() if k != "rid"}, r"^sealed request: missing fields \['rid'\]"),
        (_body(v=2), r"^sealed request\.v: version 2 is not supported"),
        (_body(v=True), r"^sealed request\.v: version True is not supported"),
        (_body(model=7), r"^sealed request\.model: expected a string, got int"),
        (_body(model="other"), r"^sealed request\.model: does not match the model it was sent to \('m'\)"),
        (_body(ts=float(NOW * 1000)), r"^sealed request\.ts: expected an integer"),
        (_body(rid=b"short"), r"^sealed request\.rid: expected 16 bytes"),
        (_body(resp_key="k" * 32), r"^sealed request\.resp_key: expected 32 bytes, got str"),
    ],
)
def test_malformed_plaintext_is_refused_naming_the_field(worker: WorkerIdentity, body: Any, message: str) -> None:
    with pytest.raises(SealingError, match=message) as err:
        _open(worker, _raw_request(worker, body))
    assert err.value.opened is None  # no response key yet: answered in the clear


def test_not_cbor_is_refused(worker: WorkerIdentity) -> None:
    with pytest.raises(SealingError, match=r"^sealed request: not valid CBOR"):
        _open(worker, _raw_request(worker, None, raw=b"\xff\xfe"))
    with pytest.raises(SealingError, match=r"^sealed request: 1 bytes of trailing data"):
        _open(worker, _raw_request(worker, None, raw=cbor2.dumps(_body()) + b"\x00"))


@pytest.mark.parametrize(
    ("overrides", "message", "status"),
    [
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": b""}]}, r"^inputs\[0\]\.shape: ", 400),
        ({"inputs": "x"}, r"^inputs: expected a list of tensors", 400),
        ({"outputs": ["y", "y"]}, r"^sealed request\.outputs: names must be unique", 400),
        ({"outputs": [""]}, r"^sealed request\.outputs: expected null or a list", 400),
    ],
)
def test_bad_content_of_an_authentic_request_is_answered_sealed(
    worker: WorkerIdentity, overrides: dict[str, Any], message: str, status: int
) -> None:
    body = _body(**overrides)
    with pytest.raises(SealingError, match=message) as err:
        _open(worker, _raw_request(worker, body))
    opened = err.value.opened
    assert opened is not None and err.value.http_status == status
    secret = RequestSecret(rid=body["rid"], resp_key=body["resp_key"], model="m")
    with pytest.raises(SealedRemoteError, match=message):
        open_response(secret, seal_error(opened, err.value.http_status, err.value.message))


def test_too_many_tensors_are_answered_sealed(worker: WorkerIdentity) -> None:
    body = _body(inputs=encode_tensors({"a": np.zeros(1), "b": np.zeros(1)}))
    with pytest.raises(SealingError, match=r"^inputs: 2 tensors, more than the 1 accepted") as err:
        _open(worker, _raw_request(worker, body), max_tensors=1)
    assert err.value.opened is not None and err.value.http_status == 400


# ------------------------------------------------------------------ freshness and replay


@pytest.mark.parametrize(("offset", "word"), [(-301.0, "old"), (301.0, "in the future")])
def test_stale_request_is_refused(worker: WorkerIdentity, offset: float, word: str) -> None:
    envelope, _ = seal_request(worker.public_key, "m", _inputs(), now=NOW + offset)
    message = rf"^stale sealed request: its timestamp is 301 s {word}, outside the ±300 s"
    with pytest.raises(SealingError, match=message):
        _open(worker, envelope)
    assert _open(worker, envelope, max_skew_s=302, replay=ReplayCache(window_s=604)).model == "m"


def test_replayed_request_is_refused(worker: WorkerIdentity) -> None:
    replay = ReplayCache()
    envelope, _ = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    _open(worker, envelope, replay=replay)
    with pytest.raises(SealingError, match=r"^replayed request"):
        _open(worker, envelope, replay=replay, now=NOW + 299)
    other, _ = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    _open(worker, other, replay=replay)  # a new request is fine


def test_a_refused_request_does_not_spend_its_id(worker: WorkerIdentity) -> None:
    """Only authentic, fresh requests are recorded: a stale one leaves no trace to fill the cache."""
    replay = ReplayCache()
    envelope, _ = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    with pytest.raises(SealingError, match="stale"):
        _open(worker, envelope, replay=replay, now=NOW + 1000)
    assert len(replay) == 0


def test_replay_window_must_cover_twice_the_skew(worker: WorkerIdentity) -> None:
    envelope, _ = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    with pytest.raises(ValueError, match="at least twice max_skew_s"):
        _open(worker, envelope, replay=ReplayCache(window_s=100), max_skew_s=60)


def test_replay_cache_forgets_expired_ids_and_refuses_when_full() -> None:
    cache = ReplayCache(window_s=10, max_entries=2)
    cache.check_and_add(b"a" * 16, now=0)
    cache.check_and_add(b"b" * 16, now=5)
    with pytest.raises(SealingError, match="replayed request"):
        cache.check_and_add(b"a" * 16, now=9.9)
    with pytest.raises(Overloaded, match=r"replay cache full \(2 request ids") as err:
        cache.check_and_add(b"c" * 16, now=9.9)
    assert err.value.http_status == 503 and err.value.retry_after == pytest.approx(0.1)
    assert len(cache) == 2  # nothing unexpired was forgotten to make room
    cache.check_and_add(b"c" * 16, now=10)  # "a" expired at 10, making room
    assert len(cache) == 2
    with pytest.raises(Overloaded):
        cache.check_and_add(b"a" * 16, now=14)  # "b" lives until 15, "c" until 20
    cache.check_and_add(b"a" * 16, now=15)  # "a" itself was forgotten: its window is over


# ------------------------------------------------------------------ responses


def test_tampered_response_is_refused(worker: WorkerIdentity) -> None:
    envelope, secret = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    response = bytearray(seal_response(_open(worker, envelope), {"y": np.ones(3, np.float32)}))
    response[-1] ^= 1
    with pytest.raises(SealingError, match="does not open: tampered with, or not the answer to this request"):
        open_response(secret, bytes(response))


def test_response_to_another_request_is_refused(worker: WorkerIdentity) -> None:
    replay = ReplayCache()
    first, secret1 = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    second, _ = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    _open(worker, first, replay=replay)
    answer_to_second = seal_response(_open(worker, second, replay=replay), {"y": np.ones(1, np.float32)})
    with pytest.raises(SealingError, match="not the answer to this request"):
        open_response(secret1, answer_to_second)
    # same key but another rid: the AAD binds the answer to its request id
    spliced = RequestSecret(rid=os.urandom(16), resp_key=secret1.resp_key, model="m")
    opened1 = OpenedRequest(
        model="m", rid=secret1.rid, resp_key=secret1.resp_key, inputs={}, outputs=None, timestamp_ms=0
    )
    with pytest.raises(SealingError, match="not the answer to this request"):
        open_response(spliced, seal_response(opened1, {"y": np.ones(1, np.float32)}))


def test_malformed_responses_are_refused(worker: WorkerIdentity) -> None:
    envelope, secret = seal_request(worker.public_key, "m", _inputs(), now=NOW)
    response = seal_response(_open(worker, envelope), {"y": np.ones(3, np.float32)})
    with pytest.raises(SealingError, match=r"^sealed response: truncated"):
        open_response(secret, response[:20])
    with pytest.raises(SealingError, match=r"^sealed response: bad magic"):
        open_response(secret, b"BSE1" + response[4:])
    with pytest.raises(SealingError, match=r"^sealed response: \d+ bytes, more than the 10 accepted"):
        open_response(secret, response, max_bytes=10)


# ------------------------------------------------------------------ identity


def test_identity_open_and_seal_to() -> None:
    worker = WorkerIdentity.generate(_Producer())
    sealed = seal_to(worker.public_key, b"secret", b"purpose A")
    assert worker.open(sealed, b"purpose A") == b"secret"
    with pytest.raises(UnsealError, match="does not open with this worker's key"):
        worker.open(sealed, b"purpose B")
    with pytest.raises(ValueError, match="32 raw bytes"):
        seal_to(b"short", b"x", b"")
    with pytest.raises(ValueError, match="cannot seal to this public key"):
        seal_to(b"\x00" * 32, b"x", b"")  # a low-order point: the shared secret would be public
    kind, evidence = worker.evidence(b"n" * 32)
    assert kind == "test" and evidence == worker.public_key + b"n" * 32


@pytest.fixture
def _no_identity() -> Iterator[None]:
    saved = identity_module._current
    set_current_identity(None)
    yield
    set_current_identity(saved)


@pytest.mark.usefixtures("_no_identity")
def test_current_identity_outside_a_worker_is_a_clear_error() -> None:
    with pytest.raises(NotATrustedWorker, match="no worker identity") as err:
        current_identity()
    assert isinstance(err.value, BastionError) and err.value.http_status == 500
    worker = WorkerIdentity.generate(_Producer())
    set_current_identity(worker)
    assert current_identity() is worker


def test_sealing_uses_real_time_by_default(worker: WorkerIdentity) -> None:
    envelope, _ = seal_request(worker.public_key, "m", _inputs())
    opened = open_request(worker, envelope, model="m", replay=ReplayCache())
    assert abs(opened.timestamp_ms / 1000 - time.time()) < 60
