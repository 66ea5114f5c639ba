"""Dev evidence: Nitro-shaped, Ed25519-signed by the worker itself, integrity only."""

from __future__ import annotations

import datetime
import os
import re
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from pycose import algorithms, headers
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import Sign1Message

from bastion.confidential.attestation import AttestationError, EvidenceProducer, Verifier, verifier_for
from bastion.confidential.dev_evidence import DevEvidenceProducer, DevVerifier

MEASUREMENT = bytes(range(48))
KEY = b"\x07" * 32


def _signer() -> tuple[OKPKey, bytes]:
    sk = Ed25519PrivateKey.generate()
    raw = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    d = sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return OKPKey(crv=Ed25519, d=d, x=raw), raw


def _payload(signing_key: bytes, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "module_id": "bastion-dev-worker",
        "digest": "SHA384",
        "timestamp": 1_900_000_000_000,
        "measurement": MEASUREMENT,
        "public_key": KEY,
        "nonce": b"n" * 16,
        "user_data": None,
        "signing_key": signing_key,
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not _DROP}


_DROP = object()


def _sign(payload: dict[str, Any] | bytes, key: OKPKey, *, alg: Any = algorithms.EdDSA) -> bytes:
    body = payload if isinstance(payload, bytes) else cbor2.dumps(payload)
    return Sign1Message(phdr={headers.Algorithm: alg}, payload=body, key=key).encode(tag=True)


def test_round_trip() -> None:
    producer = DevEvidenceProducer(MEASUREMENT, module_id="worker-a")
    before = datetime.datetime.now(datetime.timezone.utc)
    evidence = producer.evidence(KEY, b"n" * 16, b"hello")
    att = DevVerifier().verify(evidence)
    assert att.kind == "dev"
    assert att.measurement == {"measurement": MEASUREMENT.hex()}
    assert (att.public_key, att.nonce, att.user_data, att.module_id) == (KEY, b"n" * 16, b"hello", "worker-a")
    assert abs((att.timestamp - before).total_seconds()) < 5
    assert att.details["signing_key"] == producer.signing_key.hex()
    assert att.details["digest"] == "SHA384"
    assert "self-signed" in att.details["trust"]
    # the same shape as a Nitro document: a COSE_Sign1 whose payload has the same field names
    payload = cbor2.loads(cbor2.loads(evidence).value[2])
    assert {"module_id", "digest", "timestamp", "public_key", "nonce", "user_data"} <= set(payload)


def test_untagged_and_optional_fields() -> None:
    producer = DevEvidenceProducer(MEASUREMENT)
    evidence = producer.evidence(KEY, None)
    assert evidence[0] == 0xD2
    att = DevVerifier().verify(evidence[1:])  # the same array, without tag 18
    assert (att.nonce, att.user_data, att.module_id) == (None, None, "bastion-dev-worker")


def test_every_producer_has_its_own_key() -> None:
    a, b = DevEvidenceProducer(MEASUREMENT), DevEvidenceProducer(MEASUREMENT)
    assert len(a.signing_key) == 32 and a.signing_key != b.signing_key


def test_protocols_and_registry() -> None:
    assert isinstance(DevEvidenceProducer(MEASUREMENT), EvidenceProducer)
    assert isinstance(DevVerifier(), Verifier)
    assert isinstance(verifier_for("dev"), DevVerifier)


def test_every_byte_tampered_is_refused() -> None:
    evidence = DevEvidenceProducer(MEASUREMENT).evidence(KEY, b"n" * 16, b"u")
    verifier = DevVerifier()
    for pos in range(len(evidence)):
        tampered = bytearray(evidence)
        tampered[pos] ^= 0x01
        with pytest.raises(AttestationError) as caught:
            verifier.verify(bytes(tampered))
        assert re.match(r"(COSE_Sign1: |COSE signature |payload: |evidence: )", str(caught.value)), (pos, caught.value)


def test_signature_must_match_the_embedded_key() -> None:
    _, raw = _signer()
    other, _ = _signer()
    with pytest.raises(AttestationError, match=r"^COSE signature does not verify with the embedded signing key$"):
        DevVerifier().verify(_sign(_payload(raw), other))


def test_self_signed_proves_integrity_only() -> None:
    """Anyone can mint dev evidence with any measurement: that is why verify_evidence
    refuses it unless the policy allows dev, and why it must never be allowed in production."""
    key, raw = _signer()
    att = DevVerifier().verify(_sign(_payload(raw, measurement=b"\xff" * 48), key))
    assert att.measurement == {"measurement": "ff" * 48}


def test_algorithm_must_be_eddsa() -> None:
    _, raw = _signer()
    cose = cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -35}), {}, cbor2.dumps(_payload(raw)), b"s" * 64]))
    with pytest.raises(AttestationError, match=r"^COSE_Sign1: protected header alg must be EDDSA \(-8\), got ES384$"):
        DevVerifier().verify(cose)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"measurement": b""}, r"^payload: measurement: 0 bytes, expected 1\.\.64$"),
        ({"measurement": _DROP}, r"^payload: measurement: missing$"),
        ({"measurement": "00ff"}, r"^payload: measurement: expected bytes, got text$"),
        ({"digest": "SHA512"}, r"^payload: digest: expected 'SHA384', got 'SHA512'$"),
        ({"timestamp": 1.5}, r"^payload: timestamp: expected an unsigned integer, got float$"),
        ({"module_id": ""}, r"^payload: module_id: empty$"),
        ({"nonce": 3}, r"^payload: nonce: expected bytes, got integer$"),
        ({"user_data": b"u" * 1025}, r"^payload: user_data: 1025 bytes, expected 0\.\.1024$"),
        ({"extra": True}, r"^payload: unexpected field 'extra'$"),
    ],
)
def test_fields_are_type_checked(overrides: dict[str, Any], reason: str) -> None:
    key, raw = _signer()
    with pytest.raises(AttestationError, match=reason):
        DevVerifier().verify(_sign(_payload(raw, **overrides), key))


def test_signing_key_must_be_32_bytes() -> None:
    key, raw = _signer()
    with pytest.raises(AttestationError, match=r"^payload: signing_key: 31 bytes, expected 32\.\.32$"):
        DevVerifier().verify(_sign(_payload(raw[:31]), key))
    with pytest.raises(AttestationError, match=r"^payload: signing_key: missing$"):
        DevVerifier().verify(_sign(_payload(_DROP), key))  # type: ignore[arg-type]


def test_framing_and_bounds() -> None:
    with pytest.raises(
        AttestationError,
        match=r"^evidence: starts with 00020000: not a CBOR COSE_Sign1 \(tag 18 or a 4-element array\)$",
    ):
        DevVerifier().verify(b"\x00\x02" + bytes(10))
    with pytest.raises(AttestationError, match=r"^evidence: 70000 bytes, more than the 65536 accepted$"):
        DevVerifier().verify(bytes(70000))
    with pytest.raises(AttestationError, match=r"^evidence: expected bytes, got str$"):
        DevVerifier().verify("d284")  # type: ignore[arg-type]


def test_producer_checks_its_inputs() -> None:
    with pytest.raises(AttestationError, match=r"measurement: expected 1\.\.64 bytes"):
        DevEvidenceProducer(b"")
    with pytest.raises(AttestationError, match=r"module_id: expected non-empty text"):
        DevEvidenceProducer(MEASUREMENT, module_id="")
    producer = DevEvidenceProducer(MEASUREMENT)
    with pytest.raises(AttestationError, match=r"public_key: expected bytes, got str"):
        producer.evidence("key", None)  # type: ignore[arg-type]
    with pytest.raises(AttestationError, match=r"nonce: 1025 bytes, more than 1024"):
        producer.evidence(KEY, os.urandom(1025))
