"""The gate every request passes, below the transports: authenticate, authorize, limit,
and write the audit record.

Transports only extract credentials (the ``Authorization`` header, gRPC metadata
``authorization``, the client certificate's fingerprint) and call ``DataPlane.admit``
before they decode a body, so an unauthenticated client never makes the server parse
its payload; everything else is decided here, once, for REST, gRPC and TF-Serving REST.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bastion.core.errors import BastionError, PermissionDenied, ServiceUnavailable, Unauthenticated
from bastion.guard.audit_record import AuditRecord
from bastion.guard.limits import Limiter, QuotaExhausted
from bastion.guard.principal import ANONYMOUS, Authenticator, Limits, Principal
from bastion.observability.metrics import Metrics

log = logging.getLogger("bastion.guard")

_MISSING = "missing API key: send the header 'Authorization: Bearer <key>' (gRPC: metadata 'authorization')"


def bearer_token(value: str | bytes | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` value; None when absent."""
    if value is None:
        return None
    if isinstance(value, bytes):
        if value.startswith(b"Bearer "):
            token = value[7:]
            if token and b" " not in token and token.isascii():
                return token.decode("ascii")  # the usual form, parsed without the general path
        value = value.decode("latin-1")
    value = value.strip()
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthenticated("malformed Authorization header: expected 'Bearer <key>'")
    return token


class Gate:
    """Auth, scopes, limits and audit for one server process.

    ``authenticator`` None means auth is off (``--insecure-no-auth``): every caller is
    ``ANONYMOUS`` (admin, unlimited), but requests are still audited when a log is set.
    """

    def __init__(
        self,
        *,
        authenticator: Authenticator | None,
        limiter: Limiter | None = None,
        audit: Any = None,  # guard.audit.AuditLog: append(dict) / append_batched(dict) / close()
        metrics: Metrics | None = None,
        open_metrics: bool = False,
        monitor: Any = None,  # guard.monitor.ExtractionMonitor
        probe_monitor: Any = None,  # guard.probes.ProbeMonitor
    ) -> None:
        self.authenticator = authenticator
        self.limiter = limiter
        self.audit = audit
        self.metrics = metrics
        self.open_metrics = open_metrics or authenticator is None
        self.monitor = monitor
        self.probe_monitor = probe_monitor
        # tenants the extraction monitor blocked (this process; until restart or unblock)
        self.blocked: set[str] = set()

    @property
    def auth_enabled(self) -> bool:
        return self.authenticator is not None

    def authenticate(
        self, authorization: str | bytes | None, cert_fp: str | None, *, transport: str, action: str, model: str
    ) -> Principal:
        """The caller, or ``Unauthenticated`` (counted and audited)."""
        auth = self.authenticator
        if auth is None:
            return ANONYMOUS
        try:
            token = bearer_token(authorization)
            if token is None and cert_fp is None:
                raise Unauthenticated(_MISSING)
            return auth.authenticate(token, cert_fp)
        except Unauthenticated as err:
            reason = "missing" if err.message == _MISSING else "invalid"
            if self.metrics is not None:
                self.metrics.auth_failure(transport, reason)
            self.record_rejection(None, transport, action, model, err)
            raise

    def check_scope(self, principal: Principal, model: str, *, transport: str, action: str) -> None:
        """403 unless the key may use ``model``; says nothing about whether it exists."""
        if self.blocked and principal.tenant in self.blocked:
            err = PermissionDenied(f"tenant '{principal.tenant}' is blocked: its queries look like model extraction")
            self.record_rejection(principal, transport, action, model, err)
            raise err
        if not principal.may_use(model):
            err = PermissionDenied(f"this API key (tenant '{principal.tenant}') may not use model '{model}'")
            if self.metrics is not None:
                self.metrics.forbidden_request(principal.tenant)
            self.record_rejection(principal, transport, action, model, err)
            raise err

    def authorize(self, principal: Principal, model: str, *, transport: str, action: str = "infer") -> None:
        """Scope, then the tenant's rate limit and query budget (429)."""
        models = principal.models
        if self.blocked or (models is not None and model not in models):
            self.check_scope(principal, model, transport=transport, action=action)  # refuses, or lets through
        limiter = self.limiter
        if limiter is None:
            return
        limits = principal.limits
        if limits.rate_per_s is not None or limits.quota is not None or limiter.overridden(principal.tenant):
            try:
                limiter.admit(principal)
            except BastionError as err:
                # a 503 from an unreachable shared store is not a limit hit: the shared-state
                # metrics count it (bastion_shared_state_errors_total)
                if self.metrics is not None and not isinstance(err, ServiceUnavailable):
                    self.metrics.rate_limited(principal.tenant, "quota" if isinstance(err, QuotaExhausted) else "rate")
                self.record_rejection(principal, transport, action, model, err)
                raise

    def require_admin(self, principal: Principal, *, transport: str, action: str, model: str = "") -> None:
        if not principal.is_admin:
            err = PermissionDenied(f"'{action}' needs an API key with the admin role")
            if self.metrics is not None:
                self.metrics.forbidden_request(principal.tenant)
            self.record_rejection(principal, transport, action, model, err)
            raise err

    # ---- monitors -------------------------------------------------------------------------
    def watch_answer(
        self,
        principal: Principal,
        model: str,
        inputs: Iterable[np.ndarray],
        outputs: Mapping[str, np.ndarray],
        label_output: str | None,
        probabilities_output: str,
    ) -> None:
        """An answered query feeds the tenant's PRADA state for this model or zoo."""
        monitor = self.monitor
        if monitor is not None:
            alert = monitor.watch(f"{principal.tenant}/{model}", inputs, outputs, label_output, probabilities_output)
            if alert is not None:
                self.extraction_alert(principal, model, alert)

    def watch_targets(
        self, principal: Principal, zoo: str, accuracy: float | None, latency_ms: float | None, *, refused: bool
    ) -> None:
        """A zoo request's targets, and whether they were refused, feed the zoo-probing detector."""
        probes = self.probe_monitor
        if probes is not None:
            alert = probes.watch(f"{principal.tenant}/{zoo}", accuracy, latency_ms, refused)
            if alert is not None:
                self.extraction_alert(principal, zoo, alert)

    def extraction_alert(self, principal: Principal, model: str, alert: Any) -> None:
        """The monitor flagged ``principal``'s tenant on ``model``: count, audit, act."""
        tenant = principal.tenant
        log.warning("extraction suspected", extra={"tenant": tenant, "model": model, "action": alert.action,
                                                   "queries": alert.queries_seen,
                                                   "w": getattr(alert, "statistic", None)})
        if self.metrics is not None:
            self.metrics.extraction_alert(tenant, alert.action)
        reason = getattr(alert, "reason", None) or (
            f"PRADA: Shapiro-Wilk W={alert.statistic:.3f} < {alert.threshold} after {alert.queries_seen} queries"
        )
        self.record(AuditRecord.of(principal, "", "extraction_alert", model, decision=alert.action, status=0,
                                   reason=reason))
        if alert.action == "block":
            self.blocked.add(tenant)
        elif alert.action == "throttle" and self.limiter is not None:
            self.limiter.override(tenant, Limits(rate_per_s=1.0, burst=1))
        elif alert.action == "escalate":
            set_class = getattr(self.authenticator, "set_defense_class", None)
            if set_class is not None:
                try:
                    set_class(tenant, "suspect")  # every worker picks it up within a second
                except BastionError as err:
                    log.error("could not escalate tenant %s: %s", tenant, err.message)

    # ---- audit --------------------------------------------------------------------------
    def record(self, record: AuditRecord) -> None:
        """Write ``record`` now (admin actions, alerts: any thread)."""
        audit = self.audit
        if audit is not None:
            audit.append(record.fields())

    def record_batched(self, record: AuditRecord) -> asyncio.Future[None] | None:
        """Queue an answer's record for the write that ends this loop iteration (event-loop
        thread); the caller awaits the result before the answer leaves. None: no audit log."""
        audit = self.audit
        if audit is None:
            return None
        return audit.append_batched(record.fields())

    def record_rejection(
        self, principal: Principal | None, transport: str, action: str, model: str, err: BastionError
    ) -> None:
        if self.audit is not None:
            self.audit.append(AuditRecord.refusal(principal, transport, action, model, err).fields())

    def close(self) -> None:
        if self.limiter is not None:
            self.limiter.close()
        if self.audit is not None:
            self.audit.close()
