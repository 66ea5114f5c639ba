"""Step 4-5 for end-to-end sealed requests: the host checks the envelope's shape, never its content.

A sealed request carries one BYTES tensor (``bastion_sealed``) holding an HPKE envelope
that only the trusted worker can open, and the parameter ``bastion_confidential`` naming
the suite (confidential.sealing). It is not batched here (the host cannot merge what it
cannot read) and not hardened or monitored here: the worker applies the hardening of the
model's own sealed config. The answer is one sealed BYTES tensor; an error the worker
found inside the request is sealed too (only the client reads its message), with its
status in the ``bastion_status`` response parameter.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from bastion.confidential.wire_names import (  # names only: plain models never import the crypto
    PARAMETER,
    PARTITIONED_PARAMETER,
    ROWS_PARAMETER,
    SEALED_TENSOR,
    STATUS_PARAMETER,
    SUITE_NAME,
)
from bastion.core.datatypes import datatype_of
from bastion.core.errors import BastionError, InvalidInput, NotFound
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor

__all__ = [
    "PARAMETER",
    "ROWS_PARAMETER",
    "SEALED_TENSOR",
    "STATUS_PARAMETER",
    "SealedError",
    "attestation_document",
    "is_sealed",
    "run_sealed",
]


class SealedError(BastionError):
    """For the audit record of a sealed answer that carries an error: its status, not its message."""

    def __init__(self, status: int) -> None:
        super().__init__(f"error sealed to the client (status {status})")
        self.http_status = status


def is_sealed(request: InferenceRequest) -> bool:
    return PARAMETER in request.parameters


def _envelope(request: InferenceRequest) -> tuple[bytes, int | None]:
    suite = request.parameters.get(PARAMETER)
    if suite != SUITE_NAME:
        raise InvalidInput(f"parameter {PARAMETER}: expected {SUITE_NAME!r}, got {str(suite)[:80]!r}")
    if len(request.inputs) != 1 or request.inputs[0].name != SEALED_TENSOR:
        names = ", ".join(t.name for t in request.inputs[:8])
        raise InvalidInput(f"a sealed request has exactly one input, {SEALED_TENSOR!r} (BYTES, shape [1]); got {names}")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES" or tensor.data.size != 1:
        raise InvalidInput(f"input {SEALED_TENSOR!r}: expected BYTES of shape [1], got {tensor.datatype} "
                           f"{list(tensor.shape)}")
    envelope = tensor.data.reshape(-1)[0]
    if not isinstance(envelope, bytes | bytearray):
        raise InvalidInput(f"input {SEALED_TENSOR!r}: expected bytes")
    rows: Any = request.parameters.get(ROWS_PARAMETER)
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise InvalidInput(f"parameter {ROWS_PARAMETER}: expected a positive integer (the rows sealed inside)")
    return bytes(envelope), rows


async def run_sealed(runtime: Any, version: str, request: InferenceRequest) -> tuple[InferenceResponse, int]:
    """Forward the envelope to the worker; (response, the worker's status)."""
    if not hasattr(runtime, "infer_sealed"):
        raise InvalidInput(f"model {request.model_name!r} is not confidential: there is no attested key to seal "
                           f"inputs to; send them without the {PARAMETER!r} parameter")
    envelope, rows = _envelope(request)
    # sealed for the name the client asked for (a zoo's name when the host picks a variant)
    status, answer = await runtime.infer_sealed(envelope, rows, request.model_name)
    params: dict[str, Any] = {PARAMETER: SUITE_NAME, STATUS_PARAMETER: status}
    if isinstance(answer, dict):
        # a partitioned model: the head ran on the sealed input in the worker, the tail here;
        # its outputs are in the clear (the host ran the tail on the features it saw)
        params[PARTITIONED_PARAMETER] = True
        outputs = [InferTensor(name, datatype_of(arr), tuple(arr.shape), arr) for name, arr in answer.items()]
        return InferenceResponse(request.model_name, version, outputs, id=request.id, parameters=params), status
    data = np.empty(1, dtype=object)
    data[0] = answer
    out = InferTensor(SEALED_TENSOR, "BYTES", (1,), data)
    return InferenceResponse(request.model_name, version, [out], id=request.id, parameters=params), status


async def attestation_document(registry: Any, zoos: Any, name: str, version: str | None,
                               nonce_hex: str) -> dict[str, Any]:
    """``GET /v2/models/{name}/attestation/{nonce}``: the worker's evidence for this nonce."""
    try:
        nonce = bytes.fromhex(nonce_hex)
    except ValueError:
        raise InvalidInput("nonce: expected hex digits") from None
    if not 16 <= len(nonce) <= 64:
        raise InvalidInput(f"nonce: expected 16 to 64 bytes (32 to 128 hex digits), got {len(nonce)} bytes")
    zoo = zoos.zoo_named(name)
    served = zoos.first_variant(zoo) if zoo is not None else registry.resolve(name, version)
    runtime = served.loaded.runtime
    if not hasattr(runtime, "attest"):
        raise NotFound(f"model {name!r} is not confidential: it has no trusted worker to attest")
    kind, evidence = await runtime.attest(nonce)
    return {
        "model": name,
        "kind": kind,
        "evidence": base64.b64encode(evidence).decode("ascii"),
        "suite": SUITE_NAME,
        "input": SEALED_TENSOR,
        "parameter": PARAMETER,
    }

