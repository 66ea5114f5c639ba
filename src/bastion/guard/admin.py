"""The key-management API behind ``/v2/admin/...`` (admin role only).

Operators without shell access to the key store's file manage tenants and keys through
the server: create a key (the token is in that one response and nowhere else), list keys
and tenants (never a secret), revoke a key, set a tenant's limits. Every call is audited
by the caller (the REST transport); the rules on names, roles and limits are the key
store's own, so the API and ``bastion keys`` refuse the same things.
"""

from __future__ import annotations

from typing import Any

from bastion.core.errors import InvalidInput, NotFound
from bastion.guard.keystore_base import KeyStoreBase
from bastion.guard.keystore_model import check_limits
from bastion.guard.principal import Limits

_CREATE_FIELDS = frozenset({"tenant", "role", "models", "limits", "description", "cert_fingerprint"})
_LIMIT_FIELDS = frozenset({"rate_per_s", "burst", "quota", "quota_period"})


def _object(doc: Any, where: str, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidInput(f"{where}: expected a JSON object")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise InvalidInput(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    return doc


def parse_limits(doc: Any, where: str = "limits") -> Limits:
    """``{"rate_per_s": 50, "burst": 100, "quota": 100000, "quota_period": "day"}``; every
    field optional (absent = unlimited)."""
    d = _object(doc, where, _LIMIT_FIELDS)
    return check_limits(
        Limits(
            rate_per_s=d.get("rate_per_s"),
            burst=d.get("burst"),
            quota=d.get("quota"),
            quota_period=d.get("quota_period", "day"),
        )
    )


class KeyAdmin:
    """The operations, over a key store the server already has open."""

    def __init__(self, store: KeyStoreBase) -> None:
        self.store = store

    def create(self, doc: Any) -> dict[str, Any]:
        d = _object(doc, "request body", _CREATE_FIELDS)
        if "tenant" not in d:
            raise InvalidInput("tenant: required")
        description = d.get("description", "")
        if not isinstance(description, str) or len(description) > 200:
            raise InvalidInput("description: expected a string of at most 200 characters")
        limits = parse_limits(d["limits"]) if d.get("limits") is not None else None
        token, info = self.store.create_key(
            d["tenant"],
            role=d.get("role", "infer"),
            models=d.get("models"),
            limits=limits,
            cert_fingerprint=d.get("cert_fingerprint"),
            description=description,
        )
        return {"key": token, **info.as_dict()}

    def list_keys(self, include_revoked: bool = False) -> list[dict[str, Any]]:
        return [k.as_dict() for k in self.store.list_keys(include_revoked=include_revoked)]

    def revoke(self, key_id: str) -> dict[str, Any]:
        return self.store.revoke(key_id).as_dict()

    def tenants(self) -> list[dict[str, Any]]:
        return [t.as_dict() for t in self.store.tenants()]

    def set_defense_class(self, tenant: str, doc: Any) -> dict[str, Any]:
        d = _object(doc, "request body", frozenset({"defense_class"}))
        if "defense_class" not in d:
            raise InvalidInput("defense_class: required")
        return self.store.set_defense_class(tenant, d["defense_class"]).as_dict()

    def set_limits(self, tenant: str, doc: Any) -> dict[str, Any]:
        return self.store.set_limits(tenant, parse_limits(doc, "request body")).as_dict()


def key_admin(authenticator: object) -> KeyAdmin:
    """The admin API of the server's key store; 404 when the server runs without one."""
    if not isinstance(authenticator, KeyStoreBase):
        raise NotFound("this server has no key store (it runs with --insecure-no-auth); nothing to manage")
    return KeyAdmin(authenticator)
