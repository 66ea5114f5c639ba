"""What a key release is decided on, apart from the request itself: the nonce and the measurement.

``kms.py`` answers ``release`` and ``generate`` only for evidence that is fresh and that
attests an accepted measurement. Both halves live here, independent of HTTP:

* :class:`NonceBook` -- the nonces the service issued: single use, short lived, bounded in
  number, never evicted while unexpired (a flood of nonce requests must not void the
  honest workers' nonces).
* :func:`_measurement_policy` -- a key id's ``kms_store.ReleasePolicy`` as the
  ``attestation.MeasurementPolicy`` that ``verify_evidence`` checks, accepting any one of
  the policy's measurements and raising :class:`PolicyMismatch` (which carries the
  attestation, so the refusal is audited with what the worker attests).
* :func:`release_info` -- the HPKE ``info`` that binds a sealed answer to its key id and
  nonce; the client (``kms_client.py``) opens with the same bytes.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bastion.confidential.attestation import Attestation, AttestationError, MeasurementPolicy
from bastion.confidential.kms_store import ReleasePolicy
from bastion.core.errors import Overloaded, PermissionDenied

__all__ = [
    "MAX_NONCES",
    "NONCE_BYTES",
    "NONCE_TTL_S",
    "RELEASE_INFO_PREFIX",
    "NonceBook",
    "PolicyMismatch",
    "release_info",
]

RELEASE_INFO_PREFIX = b"bastion-kms-release-v1\x00"
NONCE_BYTES = 32
NONCE_TTL_S = 120.0
MAX_NONCES = 4096  # outstanding at once: ~34 releases a second sustained at a 120 s lifetime


def release_info(key_id: str, nonce: bytes) -> bytes:
    """The HPKE ``info`` a released key is sealed with: binds the answer to its key id and nonce."""
    return RELEASE_INFO_PREFIX + key_id.encode() + b"\x00" + nonce


# ---------------------------------------------------------------------- nonces


class NonceBook:
    """Nonces this service issued and not yet seen back: single use, ``ttl_s`` lifetime,
    at most ``capacity`` outstanding. Insertion order is expiry order (one lifetime for
    all, a monotonic clock), so expired ones are dropped from the front."""

    def __init__(
        self, *, capacity: int = MAX_NONCES, ttl_s: float = NONCE_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if capacity < 1 or ttl_s <= 0:
            raise ValueError("NonceBook: capacity >= 1 and ttl_s > 0")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._live: dict[bytes, float] = {}  # nonce -> expiry (monotonic)
        self._lock = threading.Lock()  # the loop thread only under HttpServer; cheap insurance elsewhere

    def __len__(self) -> int:
        return len(self._live)

    def _purge(self, now: float) -> None:
        while self._live:
            nonce, expiry = next(iter(self._live.items()))
            if expiry > now:
                return
            del self._live[nonce]

    def issue(self) -> bytes:
        """A fresh nonce; :class:`Overloaded` (503, with the wait) when the table is full."""
        with self._lock:
            now = self._clock()
            self._purge(now)
            if len(self._live) >= self.capacity:
                wait = next(iter(self._live.values())) - now
                raise Overloaded(
                    f"{self.capacity} nonces are outstanding, the most this service holds; retry in {wait:.0f} s",
                    retry_after=max(wait, 1.0),
                )
            nonce = secrets.token_bytes(NONCE_BYTES)
            self._live[nonce] = now + self.ttl_s
            return nonce

    def consume(self, nonce: bytes) -> None:
        """Use ``nonce`` up, or raise :class:`PermissionDenied` saying why it is not acceptable."""
        with self._lock:
            expiry = self._live.pop(nonce, None)
        if expiry is None:
            raise PermissionDenied("unknown nonce or already used: ask POST /v1/nonce for a fresh one, use it once")
        if expiry <= self._clock():
            raise PermissionDenied(f"nonce expired (nonces live {self.ttl_s:.0f} s): ask POST /v1/nonce again")


# ---------------------------------------------------------------------- policy


class PolicyMismatch(AttestationError):
    """Evidence that verified (signature, nonce, freshness) but whose measurement the
    policy does not accept; carries the attestation so the refusal can be audited with
    what the worker attests."""

    def __init__(self, message: str, attestation: Attestation) -> None:
        super().__init__(message)
        self.attestation = attestation


@dataclass(frozen=True)
class _AnyOf(MeasurementPolicy):
    """A ``MeasurementPolicy`` accepting any one of several measurements.

    ``verify_evidence`` calls ``check`` last, after signature, chain, nonce, freshness and
    public key have passed: one verification, however many measurements are accepted.
    ``expected`` holds the first of them (the base class reads it as "something is expected").
    """

    accepted: tuple[Mapping[str, str], ...] = ()

    def check(self, att: Attestation) -> None:
        reasons = []
        for want in self.accepted:
            try:
                MeasurementPolicy(expected=want).check(att)
                return
            except AttestationError as exc:
                reasons.append(str(exc))
        if not reasons:
            raise PolicyMismatch("the policy accepts no measurement", att)
        if len(reasons) == 1:
            raise PolicyMismatch(reasons[0], att)
        listed = "; ".join(f"[{i}] {r}" for i, r in enumerate(reasons, 1))
        raise PolicyMismatch(f"the worker matches none of the {len(reasons)} accepted measurements: {listed}", att)


def _measurement_policy(policy: ReleasePolicy) -> _AnyOf:
    return _AnyOf(
        expected=policy.accept[0], allow_dev=policy.allow_dev, max_age_s=policy.max_age_s, accepted=policy.accept
    )
