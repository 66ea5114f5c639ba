"""Development evidence: shaped like a Nitro document, signed by the worker itself.

Where no TEE exists (this machine, CI, a laptop), the trusted worker still has to hand
out evidence so that every other code path (verify_evidence, nonce, freshness, key
binding, measurement policy, key release) runs exactly as it will on Nitro. Dev
evidence is a ``COSE_Sign1`` (EdDSA, Ed25519) whose CBOR payload mirrors the Nitro
attestation document: ``module_id``, ``digest`` ("SHA384"), ``timestamp`` (ms),
``measurement`` (the worker's own SHA-384, see :mod:`bastion.confidential.measurement`),
``public_key``, ``nonce``, ``user_data``, plus ``signing_key``: the raw Ed25519 public
key that signed it.

It is SELF-SIGNED: the key that signs is the key the evidence carries, so the signature
proves only that the bytes were not altered after signing (integrity), not who signed
them nor what the host runs. Anyone can produce dev evidence with any measurement;
:func:`bastion.confidential.attestation.verify_evidence` refuses it unless the policy
says ``allow_dev``.
"""

from __future__ import annotations

import datetime
import time

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from pycose import algorithms, headers
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import Sign1Message

from bastion.confidential.attestation import Attestation, AttestationError
from bastion.confidential.nitro import (
    PayloadFields,
    cose_sign1_from_evidence,
    decode_cbor,
    decode_sign1,
    timestamp_from_ms,
)

__all__ = ["DevEvidenceProducer", "DevVerifier"]

# The same bounds as the Nitro document's (bytes .size (0..1024)); a measurement is a
# digest, 64 bytes at most (SHA-512), 48 for the SHA-384 that measurement.py produces.
_MAX_USER_BYTES = 1024
_MAX_MEASUREMENT_BYTES = 64
_ED25519_KEY_BYTES = 32
_FIELDS = frozenset(
    {"module_id", "digest", "timestamp", "measurement", "public_key", "nonce", "user_data", "signing_key"}
)


class DevEvidenceProducer:
    """Inside the dev worker: signs evidence with a fresh Ed25519 key (one per process;
    nothing persists it, so a restarted worker has a new signing key)."""

    kind = "dev"

    def __init__(self, measurement: bytes, module_id: str = "bastion-dev-worker") -> None:
        if not isinstance(measurement, bytes) or not 1 <= len(measurement) <= _MAX_MEASUREMENT_BYTES:
            raise AttestationError(f"dev evidence: measurement: expected 1..{_MAX_MEASUREMENT_BYTES} bytes")
        if not isinstance(module_id, str) or not module_id:
            raise AttestationError("dev evidence: module_id: expected non-empty text")
        self.measurement = measurement
        self.module_id = module_id
        signer = Ed25519PrivateKey.generate()
        self._key = OKPKey(
            crv=Ed25519,
            d=signer.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            x=signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        )

    @property
    def signing_key(self) -> bytes:
        """The raw Ed25519 public key this producer signs with (32 bytes)."""
        return bytes(self._key.x)

    def evidence(self, public_key: bytes, nonce: bytes | None, user_data: bytes | None = None) -> bytes:
        _check_input("public_key", public_key, optional=False)
        _check_input("nonce", nonce, optional=True)
        _check_input("user_data", user_data, optional=True)
        payload = {
            "module_id": self.module_id,
            "digest": "SHA384",
            "timestamp": time.time_ns() // 1_000_000,
            "measurement": self.measurement,
            "public_key": public_key,
            "nonce": nonce,
            "user_data": user_data,
            "signing_key": self.signing_key,
        }
        msg = Sign1Message(phdr={headers.Algorithm: algorithms.EdDSA}, payload=cbor2.dumps(payload), key=self._key)
        return msg.encode(tag=True)


class DevVerifier:
    """Checks dev evidence (``kind = "dev"``): structure, fields and the Ed25519 signature
    made with the key the evidence itself carries. Integrity only, see the module doc."""

    kind = "dev"

    def verify(self, evidence: bytes, *, now: datetime.datetime | None = None) -> Attestation:
        # ``now`` is unused: dev evidence has no certificates to be valid or expired;
        # freshness (the signed timestamp against now) is verify_evidence's, as for Nitro.
        cose, framing = cose_sign1_from_evidence(evidence, envelopes=False)
        msg = decode_sign1(cose, alg=algorithms.EdDSA)
        doc = PayloadFields(decode_cbor(msg.payload, "payload"), "payload")

        signing_key = doc.bytes_("signing_key", _ED25519_KEY_BYTES, _ED25519_KEY_BYTES)
        msg.key = OKPKey(crv=Ed25519, x=signing_key)
        try:
            valid = msg.verify_signature()
        except Exception as exc:  # pycose/cryptography raise on keys that are not curve points, odd lengths, ...
            raise AttestationError(f"COSE signature: cannot be checked ({type(exc).__name__}: {exc})") from None
        if not valid:
            raise AttestationError("COSE signature does not verify with the embedded signing key")

        doc.reject_unknown(_FIELDS)
        module_id = doc.text("module_id")
        digest = doc.text("digest")
        if digest != "SHA384":
            raise AttestationError(f"payload: digest: expected 'SHA384', got {digest[:40]!r}")
        timestamp = timestamp_from_ms(doc.uint("timestamp"), "payload: timestamp")
        measurement = doc.bytes_("measurement", 1, _MAX_MEASUREMENT_BYTES)
        public_key = doc.optional_bytes("public_key", _MAX_USER_BYTES)
        nonce = doc.optional_bytes("nonce", _MAX_USER_BYTES)
        user_data = doc.optional_bytes("user_data", _MAX_USER_BYTES)
        return Attestation(
            kind=self.kind,
            measurement={"measurement": measurement.hex()},
            public_key=public_key or b"",
            nonce=nonce,
            user_data=user_data,
            timestamp=timestamp,
            module_id=module_id,
            details={
                "digest": digest,
                "signing_key": signing_key.hex(),
                "trust": "self-signed: proves integrity only, nothing about the host",
                "framing": framing,
            },
        )


def _check_input(name: str, value: bytes | None, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bytes):
        raise AttestationError(f"dev evidence: {name}: expected bytes, got {type(value).__name__}")
    if len(value) > _MAX_USER_BYTES:
        raise AttestationError(f"dev evidence: {name}: {len(value)} bytes, more than {_MAX_USER_BYTES}")
