"""The trusted worker's identity: its attested X25519 key pair and what proves it.

The private key is generated inside the worker and never leaves it: evidence binds
the public half to the worker's measurement, so whoever seals something to that key
(a client's request, the front's channel secret) knows only that measured code can
open it. One identity per process; :func:`current_identity` is how code running in
the worker (a key provider, the request handler) reaches it without threading it
through every call.
"""

from __future__ import annotations

import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from bastion.confidential.attestation import EvidenceProducer
from bastion.core.errors import BastionError, InternalError

__all__ = [
    "HPKE_ENC_BYTES",
    "HPKE_SUITE",
    "HPKE_TAG_BYTES",
    "NotATrustedWorker",
    "UnsealError",
    "WorkerIdentity",
    "current_identity",
    "seal_to",
    "set_current_identity",
]

# RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM. The
# single-shot ciphertext is enc (the 32-byte ephemeral public key) || AEAD ciphertext+tag.
HPKE_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
HPKE_ENC_BYTES = 32
HPKE_TAG_BYTES = 16


class UnsealError(BastionError):
    """A ciphertext that this worker's key does not open."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class NotATrustedWorker(InternalError):
    """Code that needs the worker's key ran in a process that has none: a deployment bug."""


def _public_key(raw: bytes) -> X25519PublicKey:
    if not isinstance(raw, bytes | bytearray | memoryview) or len(raw) != 32:
        raise ValueError("an X25519 public key is 32 raw bytes")
    return X25519PublicKey.from_public_bytes(bytes(raw))


def seal_to(public_key: bytes, plaintext: bytes, info: bytes) -> bytes:
    """HPKE-encrypt ``plaintext`` to a raw X25519 ``public_key``; ``info`` binds the
    ciphertext to its purpose, so one sealed for one use cannot be opened for another.

    Raises ValueError for a malformed key, including the low-order points X25519
    refuses (the shared secret would be all zeros, known to everyone)."""
    key = _public_key(public_key)
    try:
        return HPKE_SUITE.encrypt(plaintext, key, info=info)
    except Exception as exc:  # OpenSSL reports a degenerate key as a generic error
        raise ValueError(f"cannot seal to this public key: {exc or type(exc).__name__}") from None


class WorkerIdentity:
    """The worker's private key plus the producer of evidence about it."""

    def __init__(self, private_key: X25519PrivateKey, producer: EvidenceProducer) -> None:
        if not isinstance(private_key, X25519PrivateKey):
            raise TypeError("WorkerIdentity needs an X25519PrivateKey")
        self._private_key = private_key
        self._producer = producer
        self._public_key = private_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, producer: EvidenceProducer) -> WorkerIdentity:
        """A fresh key pair: generated in the worker, so it exists nowhere else."""
        return cls(X25519PrivateKey.generate(), producer)

    @property
    def public_key(self) -> bytes:
        """Raw 32-byte X25519 public key: what evidence binds and clients seal to."""
        return self._public_key

    @property
    def kind(self) -> str:
        return self._producer.kind

    def evidence(self, nonce: bytes | None, user_data: bytes | None = None) -> tuple[str, bytes]:
        """``(kind, evidence)`` binding this identity's public key and ``nonce``."""
        return self._producer.kind, self._producer.evidence(self._public_key, nonce, user_data)

    def open(self, sealed: bytes, info: bytes) -> bytes:
        """HPKE-decrypt what :func:`seal_to` sealed to this identity with the same ``info``."""
        try:
            return HPKE_SUITE.decrypt(sealed, self._private_key, info=info)
        except (InvalidTag, ValueError) as exc:
            raise UnsealError(
                "ciphertext does not open with this worker's key: sealed to another key, for another purpose, "
                f"or corrupted ({type(exc).__name__})"
            ) from None

    def __repr__(self) -> str:  # never the private key
        return f"WorkerIdentity(kind={self.kind!r}, public_key={self._public_key.hex()})"


_lock = threading.Lock()
_current: WorkerIdentity | None = None


def set_current_identity(identity: WorkerIdentity | None) -> None:
    """Called once by the worker at start-up (``None`` clears it, for tests)."""
    global _current
    with _lock:
        _current = identity


def current_identity() -> WorkerIdentity:
    identity = _current
    if identity is None:
        raise NotATrustedWorker(
            "this process has no worker identity: confidential keys and sealed requests are only handled inside "
            "the trusted worker, never in the front process"
        )
    return identity
