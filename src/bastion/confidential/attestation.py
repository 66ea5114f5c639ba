"""Attestation evidence: what a trusted worker proves about itself, and who checks it.

A worker holds one X25519 key pair (its *attested key*). Its evidence binds the public
half, and a verifier-chosen nonce, to a *measurement* of what runs: on AWS Nitro the
enclave image's PCRs, signed by the Nitro hypervisor's certificate chain; in
development a self-computed digest, self-signed (``dev``), which proves nothing about
the host and is refused unless the verifier opts in.

Every verifier implements :class:`Verifier` and returns an :class:`Attestation` or
raises :class:`AttestationError` with a reason a person can act on. Verification
order is always: bound the bytes, parse, check signatures and chain, then interpret
(nonce, freshness, public key); nothing unauthenticated is trusted on the way.
"""

from __future__ import annotations

import datetime
import hmac
import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from bastion.core.errors import BastionError

__all__ = [
    "MAX_EVIDENCE_BYTES",
    "Attestation",
    "AttestationError",
    "EvidenceProducer",
    "MeasurementPolicy",
    "Verifier",
    "parse_expected_measurement",
    "verifier_for",
    "verify_evidence",
]

# A Nitro document is ~4.5 KiB; 64 KiB bounds any evidence before a parser sees it.
MAX_EVIDENCE_BYTES = 64 * 1024
# Evidence older than this (by its own signed timestamp) is refused as stale.
DEFAULT_MAX_AGE_S = 300.0
_HEX = re.compile(r"[0-9a-f]+")

# kind -> "module:class" of its verifier; imported lazily (the Nitro one needs pycose).
_VERIFIERS: dict[str, str] = {
    "nitro": "bastion.confidential.nitro:NitroVerifier",
    "dev": "bastion.confidential.dev_evidence:DevVerifier",
}


class AttestationError(BastionError):
    """Evidence that does not verify, or that verifies but does not satisfy the policy."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class Attestation:
    """What verified evidence says. ``measurement`` maps names to lowercase hex:
    ``pcr0``..``pcrN`` for Nitro, ``measurement`` for dev evidence."""

    kind: str
    measurement: Mapping[str, str]
    public_key: bytes  # raw X25519 public key (32 bytes) the worker holds the private half of
    nonce: bytes | None
    user_data: bytes | None
    timestamp: datetime.datetime  # UTC, from the signed document
    module_id: str = ""
    details: Mapping[str, str] = field(default_factory=dict)  # e.g. the leaf certificate subject


@runtime_checkable
class Verifier(Protocol):
    kind: str

    def verify(self, evidence: bytes, *, now: datetime.datetime | None = None) -> Attestation:
        """Check signature, chain and validity at ``now`` (default: the current time).

        Nonce, freshness and measurement are checked by :func:`verify_evidence`, the same
        way for every kind."""
        ...


@runtime_checkable
class EvidenceProducer(Protocol):
    """Inside the worker: evidence binding ``public_key`` and ``nonce`` to this worker."""

    kind: str

    def evidence(self, public_key: bytes, nonce: bytes | None, user_data: bytes | None = None) -> bytes: ...


def verifier_for(kind: str) -> Verifier:
    target = _VERIFIERS.get(kind)
    if target is None:
        raise AttestationError(f"evidence kind {kind!r}: expected one of {', '.join(sorted(_VERIFIERS))}")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)()


@dataclass(frozen=True)
class MeasurementPolicy:
    """What a client or key-release service accepts: the expected measurement values
    (every named value must match exactly), whether dev evidence is acceptable at all,
    and how old evidence may be."""

    expected: Mapping[str, str]
    allow_dev: bool = False
    max_age_s: float = DEFAULT_MAX_AGE_S

    def __post_init__(self) -> None:
        # hex compared as lowercase ASCII: "AB12" from a config must match "ab12" in evidence
        normal = {}
        for name, value in self.expected.items():
            if not isinstance(value, str) or not value.isascii() or not _HEX.fullmatch(value.lower()):
                raise AttestationError(f"expected measurement {name}: expected hex digits, got {str(value)[:80]!r}")
            normal[str(name).lower()] = value.lower()
        object.__setattr__(self, "expected", normal)

    def check(self, att: Attestation) -> None:
        if not self.expected:
            raise AttestationError("no expected measurement given: refusing to trust any worker")
        for name, want in self.expected.items():
            have = att.measurement.get(name)
            if have is None:
                raise AttestationError(
                    f"measurement {name}: expected {want}, but {att.kind} evidence has no value named {name!r} "
                    f"(it has {', '.join(sorted(att.measurement)) or 'none'})"
                )
            if not hmac.compare_digest(have, want):
                raise AttestationError(f"measurement {name}: expected {want}, the worker attests {have}")


def parse_expected_measurement(spec: str) -> dict[str, str]:
    """``--expect-measurement`` text: ``name=hex[,name=hex...]`` or a bare hex digest,
    which names the dev ``measurement``. Hex is lowercased; names are checked."""
    spec = spec.strip()
    if not spec:
        raise AttestationError("expected measurement: empty")
    out: dict[str, str] = {}
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            name, value = "measurement", name
        name, value = name.strip().lower(), value.strip().lower()
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
            raise AttestationError(f"expected measurement: bad name {name!r}")
        if not _HEX.fullmatch(value) or len(value) % 2 or len(value) > 256:
            raise AttestationError(f"expected measurement {name}: expected hex digits, got {value[:80]!r}")
        out[name] = value
    return out


def verify_evidence(
    kind: str,
    evidence: bytes,
    *,
    nonce: bytes | None,
    policy: MeasurementPolicy,
    now: datetime.datetime | None = None,
) -> Attestation:
    """Verify ``evidence`` of ``kind`` and apply ``policy``; ``nonce`` is the one this
    verifier chose (``None`` only where freshness comes from elsewhere)."""
    if not isinstance(evidence, bytes | bytearray | memoryview):
        raise AttestationError("evidence: expected bytes")
    if len(evidence) > MAX_EVIDENCE_BYTES:
        raise AttestationError(f"evidence: {len(evidence)} bytes, more than the {MAX_EVIDENCE_BYTES} accepted")
    if kind == "dev" and not policy.allow_dev:
        raise AttestationError(
            "dev evidence is self-signed and proves nothing about the host; refused unless explicitly allowed "
            "(--allow-dev-attestation)"
        )
    if now is not None and now.tzinfo is None:
        raise ValueError("now: expected an aware datetime (UTC)")
    when = now or datetime.datetime.now(datetime.timezone.utc)
    att = verifier_for(kind).verify(bytes(evidence), now=when)
    if nonce is not None and (att.nonce is None or not hmac.compare_digest(att.nonce, nonce)):
        raise AttestationError("evidence nonce does not match the nonce sent: stale or replayed evidence")
    age = (when - att.timestamp).total_seconds()
    if age > policy.max_age_s:
        raise AttestationError(f"evidence is {age:.0f} s old, more than the {policy.max_age_s:.0f} s accepted")
    if age < -60:  # a clock a little ahead is normal; a document from the future is not
        raise AttestationError(f"evidence timestamp is {-age:.0f} s in the future")
    if len(att.public_key) != 32:
        raise AttestationError(f"evidence public key: expected a 32-byte X25519 key, got {len(att.public_key)} bytes")
    policy.check(att)
    return att
