"""Admission: who is calling, and may they do this — decided before any body is decoded.

Transports hand over only the credentials they read off the headers or the gRPC metadata
(``Credentials``). For an inference, ``admit`` authenticates, checks the key's model
scope, the blocked list and the tenant's rate limit and query budget (401 / 403 / 429,
each counted and audited by the guard) and returns an ``Admission``: a single-use ticket
for that one request, which ``DataPlane.infer`` requires. A transport that forgets to
admit has nothing to pass, and one that reuses a ticket is refused, so no path serves
without limits. (gRPC, which learns the model only from the message, calls
``authenticate`` before it reads the message, then ``admit`` before it parses it.) Admin
routes get an ``AdminGrant`` the same way (admin role checked); the plane audits the
action itself when it runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bastion.core.errors import InternalError
from bastion.guard.gate import Gate
from bastion.guard.principal import ANONYMOUS, Principal

# only this module makes tickets: the constructor refuses any other caller
_MINT = object()


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presents: the ``Authorization`` value (header or gRPC metadata) and
    the SHA-256 fingerprint of a mutual-TLS client certificate."""

    authorization: str | bytes | None = None
    cert_fp: str | None = None


NO_CREDENTIALS = Credentials()


class Admission:
    """One admitted inference request: the caller, the model it may call, the transport."""

    __slots__ = ("_spent", "model", "principal", "transport")

    def __init__(self, principal: Principal, model: str, transport: str, mint: object) -> None:
        if mint is not _MINT:
            raise TypeError("an Admission comes from DataPlane.admit only")
        self.principal = principal
        self.model = model
        self.transport = transport
        self._spent = False

    def spend(self, model: str) -> Principal:
        """Use the ticket for a request to ``model``: once, and for the model it admits."""
        if self._spent:
            raise InternalError("an admission was used twice; each request must be admitted")
        if model != self.model:
            raise InternalError(f"admitted for model '{self.model[:200]}', not '{model[:200]}'")
        self._spent = True
        return self.principal


class AdminGrant:
    """An admin-role caller's permission for one named action (``load``, ``keys.create``, ...)."""

    __slots__ = ("action", "principal", "target", "transport")

    def __init__(self, principal: Principal, action: str, target: str, transport: str, mint: object) -> None:
        if mint is not _MINT:
            raise TypeError("an AdminGrant comes from DataPlane.admin only")
        self.principal = principal
        self.action = action
        self.target = target
        self.transport = transport

    def require(self, action: str) -> None:
        if self.action != action:
            raise InternalError(f"an admin grant for '{self.action}' was used for '{action}'")


def admit(gate: Gate, credentials: Credentials, model: str, transport: str) -> Admission:
    """Authenticate, then scope, block list, rate limit and query budget for ``model``."""
    if gate.authenticator is None:
        return Admission(ANONYMOUS, model, transport, _MINT)  # auth off: no scope and no limits
    principal = gate.authenticate(
        credentials.authorization, credentials.cert_fp, transport=transport, action="infer", model=model
    )
    gate.authorize(principal, model, transport=transport)
    return Admission(principal, model, transport, _MINT)


def caller(gate: Gate, credentials: Credentials, transport: str, action: str, model: str = "") -> Principal:
    """The caller of a read route (metadata, readiness, index), checked against the key's
    model scope when the route names a model."""
    principal = gate.authenticate(
        credentials.authorization, credentials.cert_fp, transport=transport, action=action, model=model
    )
    if model and principal.models is not None:
        gate.check_scope(principal, model, transport=transport, action=action)
    return principal


def grant(gate: Gate, credentials: Credentials, transport: str, action: str, target: str = "") -> AdminGrant:
    """An admin action's permission: authenticated, with the admin role (403 otherwise)."""
    principal = gate.authenticate(
        credentials.authorization, credentials.cert_fp, transport=transport, action=action, model=target
    )
    gate.require_admin(principal, transport=transport, action=action, model=target)
    return AdminGrant(principal, action, target, transport, _MINT)
