"""The client's side of end-to-end encrypted inference.

1. ``GET /v2/models/{m}/attestation/{nonce}`` with a fresh nonce; verify the evidence
   against the measurement this client expects (and refuse dev evidence unless the
   caller opted in). Nothing is sent before this succeeds.
2. Seal the input tensors to the attested key with HPKE (``sealing.seal_request``) and
   send them as one BYTES tensor with the ``bastion_confidential`` parameter, over any V2
   transport (this module's REST client, or tritonclient: ``confidential.triton``).
3. Open the sealed answer with the per-request secret; a sealed error raises with the
   worker's status and message.

The attestation is re-fetched when older than ``refresh_s`` and after a failure that may
mean the worker restarted with a new key (it generates one at each start).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bastion.confidential.attestation import (
    Attestation,
    MeasurementPolicy,
    parse_expected_measurement,
    verify_evidence,
)
from bastion.confidential.sealing import (
    RequestSecret,
    open_response,
    seal_request,
)
from bastion.confidential.wire_names import PARAMETER, ROWS_PARAMETER, SEALED_TENSOR, SUITE_NAME

log = logging.getLogger("bastion.client")

__all__ = ["ROWS_PARAMETER", "SEALED_TENSOR", "ConfidentialSession", "policy_from", "sealed_tensor"]

DEV_WARNING = ("WARNING: accepting DEV attestation: the worker's evidence is self-signed and proves nothing about "
               "the machine it runs on; never use --allow-dev-attestation with real data")


def policy_from(expect: Mapping[str, str] | str, *, allow_dev: bool = False, max_age_s: float = 300.0
                ) -> MeasurementPolicy:
    expected = parse_expected_measurement(expect) if isinstance(expect, str) else dict(expect)
    if allow_dev:
        log.warning(DEV_WARNING)
    return MeasurementPolicy(expected=expected, allow_dev=allow_dev, max_age_s=max_age_s)


class ConfidentialSession:
    """Seals requests for one model to its attested worker.

    ``fetch(model, nonce_hex) -> (kind, evidence)`` gets the evidence (REST GET); the
    session verifies it. ``refresh_s`` bounds how long a verified key is reused."""

    def __init__(self, model: str, fetch: Callable[[str, str], tuple[str, bytes]], policy: MeasurementPolicy,
                 *, refresh_s: float = 60.0) -> None:
        self.model = model
        self.policy = policy
        self.refresh_s = min(refresh_s, policy.max_age_s)
        self._fetch = fetch
        self._att: Attestation | None = None
        self._at = 0.0

    def attest(self) -> Attestation:
        """Fetch and verify fresh evidence (raises AttestationError: nothing is sent then)."""
        nonce = secrets.token_bytes(32)
        kind, evidence = self._fetch(self.model, nonce.hex())
        self._att = verify_evidence(kind, evidence, nonce=nonce, policy=self.policy)
        self._at = time.monotonic()
        return self._att

    def attestation(self) -> Attestation:
        if self._att is None or time.monotonic() - self._at > self.refresh_s:
            return self.attest()
        return self._att

    def forget(self) -> None:
        self._att = None

    def seal(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
             ) -> tuple[bytes, RequestSecret, dict[str, Any]]:
        """(envelope, secret, request parameters) for one request."""
        att = self.attestation()
        envelope, secret = seal_request(att.public_key, self.model, inputs, outputs=outputs)
        rows = _rows(inputs)
        params: dict[str, Any] = {PARAMETER: SUITE_NAME}
        if rows is not None:
            params[ROWS_PARAMETER] = rows
        return envelope, secret, params

    @staticmethod
    def open(secret: RequestSecret, envelope: bytes) -> dict[str, np.ndarray]:
        return open_response(secret, envelope)


def _rows(inputs: Mapping[str, np.ndarray]) -> int | None:
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else None
    return None


def sealed_tensor(envelope: bytes) -> np.ndarray:
    data = np.empty(1, dtype=object)
    data[0] = envelope
    return data


