"""One audit record type and its builders: every line of the audit log starts here.

Inference answers, refusals (401/403/429 and every other 4xx), admin actions and
extraction alerts all become an ``AuditRecord`` (``AuditRecord.of`` for actions and
refusals, ``inference_record`` for a decoded inference); ``AuditRecord.fields`` is what
``guard.audit.AuditLog.append`` chains and writes. The inference fields (variant, digests,
latency) are written only for a request the data plane decoded and ran (or refused after
decoding), so an admin line or a refusal at the door stays short.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bastion.core.errors import BastionError
from bastion.core.tensors import InferenceRequest, InferenceResponse
from bastion.guard.digest import tensors_digest
from bastion.guard.principal import Principal

# client-chosen strings are capped: a record must not grow with what a client sends
MAX_NAME = 200
MAX_REASON = 300


def reason_of(err: BastionError) -> str:
    """How a refusal reads in the log: the error class and its message, capped."""
    return f"{type(err).__name__}: {err.message}"[:MAX_REASON]


@dataclass(slots=True)
class AuditRecord:
    """Who did what to which model, and what the server decided."""

    action: str  # infer, metadata, load, keys.create, extraction_alert, ...
    decision: str  # served, accepted, rejected; for alerts the monitor's action
    status: int  # the HTTP status answered (0 for events that answer nobody)
    tenant: str | None = None
    key_id: str | None = None
    transport: str = ""
    model: str = ""
    reason: str = ""
    ts: float = 0.0
    # inference only
    variant: str | None = None
    version: str | None = None
    request_id: str | None = None
    input_digest: str | None = None
    output_digest: str | None = None
    latency_ms: float | None = None

    @classmethod
    def of(
        cls,
        who: Principal | None,
        transport: str,
        action: str,
        model: str,
        *,
        decision: str,
        status: int,
        reason: str = "",
        ts: float | None = None,
    ) -> AuditRecord:
        """The builder: the caller's identity, the action on ``model`` and the decision."""
        return cls(
            action=action,
            decision=decision,
            status=status,
            tenant=who.tenant if who is not None else None,
            key_id=who.key_id if who is not None else None,
            transport=transport,
            model=model[:MAX_NAME],
            reason=reason,
            ts=time.time() if ts is None else ts,
        )

    @classmethod
    def refusal(cls, who: Principal | None, transport: str, action: str, model: str, err: BastionError) -> AuditRecord:
        return cls.of(who, transport, action, model, decision="rejected", status=err.http_status, reason=reason_of(err))

    def fields(self) -> dict[str, Any]:
        """The record as the audit log writes it (the inference fields only when it is one).
        Dict literals rather than a dict filled in step by step: this runs once per answer."""
        if self.latency_ms is None:
            return {"ts": self.ts, "tenant": self.tenant, "key_id": self.key_id, "transport": self.transport,
                    "action": self.action, "model": self.model, "decision": self.decision, "status": self.status,
                    "reason": self.reason}
        # an inference that reached the plane (decoded, digested)
        return {"ts": self.ts, "tenant": self.tenant, "key_id": self.key_id, "transport": self.transport,
                "action": self.action, "model": self.model, "variant": self.variant, "version": self.version,
                "request_id": self.request_id, "input_digest": self.input_digest,
                "output_digest": self.output_digest, "decision": self.decision, "status": self.status,
                "reason": self.reason, "latency_ms": self.latency_ms}


def inference_record(
    who: Principal,
    transport: str,
    request: InferenceRequest,
    ts: float,
    started: float,
    *,
    variant: str | None,
    version: str | None,
    response: InferenceResponse | None,
    err: BastionError | None,
) -> AuditRecord:
    """The record of one inference the data plane ran or refused after decoding it: digests
    of the inputs and outputs (never the data), the variant that served, the latency."""
    if err is None:
        decision, status, reason = "served", 200, ""
    else:
        decision, status, reason = "rejected", err.http_status, reason_of(err)
    request_id = request.id
    # one positional call (field order of the class): keywords and attribute stores after
    # ``of`` cost twice as much, once per answer
    return AuditRecord(
        "infer", decision, status, who.tenant, who.key_id, transport, request.model_name[:MAX_NAME], reason, ts,
        variant, version, request_id[:MAX_NAME] if request_id else request_id, tensors_digest(request.inputs),
        tensors_digest(response.outputs) if response is not None else None,
        round((time.perf_counter() - started) * 1000.0, 3),
    )
