"""Who is calling: the principal an API key or client certificate resolves to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Role = Literal["infer", "admin"]
QuotaPeriod = Literal["day", "total"]
ROLES: tuple[str, ...] = ("infer", "admin")


@dataclass(frozen=True, slots=True)
class Limits:
    """A tenant's request budget. ``None`` everywhere means unlimited."""

    rate_per_s: float | None = None  # token-bucket refill rate
    burst: int | None = None  # bucket size; defaults to max(1, ceil(rate)) when a rate is set
    quota: int | None = None  # requests per ``quota_period``
    quota_period: QuotaPeriod = "day"

    @property
    def unlimited(self) -> bool:
        return self.rate_per_s is None and self.quota is None


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``models`` None means every model and zoo."""

    tenant: str
    key_id: str  # public key identifier (never the secret); "cert:<fp16>" for mTLS, "" when auth is off
    role: Role = "infer"
    models: frozenset[str] | None = None
    limits: Limits = field(default_factory=Limits)
    defense_class: str = "default"  # which of a zoo's defenses applies (zoo.yaml `defenses`)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


# auth disabled (--insecure-no-auth): everything allowed, nothing limited
ANONYMOUS = Principal(tenant="anonymous", key_id="", role="admin")


class Authenticator(Protocol):
    """Resolves credentials to a principal. Implemented by ``guard.keystore.KeyStore``."""

    def authenticate(self, token: str | None, cert_fingerprint: str | None = None) -> Principal:
        """``token``: the bearer secret (already stripped of "Bearer "), or None when the
        request carried none. ``cert_fingerprint``: lowercase hex SHA-256 of the client
        certificate's DER, when the connection is mutual TLS. Raises ``Unauthenticated``
        with a message that never contains the token."""
        ...
