"""What the key stores hold and the rules on it, whatever the backend (SQLite, PostgreSQL).

Tokens look like ``bst_<key_id>_<secret>``: ``key_id`` is 12 lowercase hex characters, a
public name for the key (listings, logs, audit, revocation); ``secret`` is 32 random bytes,
base64url without padding. A token is shown once, when created, and never stored or logged.

Here: the public records (``KeyInfo``, ``TenantInfo``), the errors, the validation of
names, roles, scopes and limits, certificate fingerprints, and the conversion of database
rows (anything indexable by column name) into records. One definition, so the SQLite store,
the PostgreSQL store and the admin API refuse exactly the same things.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bastion.core.errors import InvalidInput
from bastion.guard.principal import ROLES, Limits, Role
from bastion.guard.tls import fingerprint_der, fingerprint_pem

TOKEN_PREFIX = "bst_"
KEY_ID_HEX = 12
SECRET_BYTES = 32
# a real token is 60 characters; anything far longer is not worth hashing
MAX_TOKEN_CHARS = 256

_TENANT_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# model and zoo names become URL path segments (same alphabet as zoo.yaml variants)
_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
KEY_ID_RE = re.compile(r"[0-9a-f]{12}")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
MAX_DESCRIPTION = 500

MISSING_KEY_MESSAGE = "missing API key: send the header 'Authorization: Bearer <key>'"
INVALID_KEY_MESSAGE = "invalid API key"

# A row as both backends return it: sqlite3.Row and psycopg's dict_row are indexable by name.
Row = Mapping[str, Any]


class KeyStoreError(Exception):
    """The key store cannot be used as it is (newer schema, wrong master secret, database
    unreachable for a change)."""


class KeyStoreMissing(FileNotFoundError):
    """``create=False`` and there is no key store (or no master secret) at the path."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be shown about a key: never the token, never its hash."""

    key_id: str
    tenant: str
    role: Role
    models: tuple[str, ...] | None  # None: every model and zoo
    limits: Limits  # the tenant's
    bearer: bool  # a bearer token exists for this key
    cert_fingerprint: str | None
    description: str
    created_at: str  # ISO 8601 UTC
    revoked_at: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "tenant": self.tenant,
            "role": self.role,
            "models": list(self.models) if self.models is not None else None,
            "limits": limits_as_dict(self.limits),
            "bearer": self.bearer,
            "cert_fingerprint": self.cert_fingerprint,
            "description": self.description,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True, slots=True)
class TenantInfo:
    name: str
    limits: Limits
    created_at: str
    active_keys: int
    revoked_keys: int
    defense_class: str = "default"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "limits": limits_as_dict(self.limits),
            "defense_class": self.defense_class,
            "created_at": self.created_at,
            "active_keys": self.active_keys,
            "revoked_keys": self.revoked_keys,
        }


def limits_as_dict(limits: Limits) -> dict[str, Any]:
    return {
        "rate_per_s": limits.rate_per_s,
        "burst": limits.burst,
        "quota": limits.quota,
        "quota_period": limits.quota_period,
    }


# one definition of a certificate's identity, shared with the TLS layer that computes it
# for each connection
cert_fingerprint_of_der = fingerprint_der


def cert_fingerprint_of_pem(data: bytes) -> str:
    """Fingerprint of the first certificate in PEM ``data`` (DER accepted too)."""
    try:
        return fingerprint_pem(data)
    except ValueError:
        pass
    from cryptography import x509

    try:
        x509.load_der_x509_certificate(data)
    except ValueError:
        raise InvalidInput("not a PEM or DER X.509 certificate") from None
    return fingerprint_der(data)


def normalize_fingerprint(fingerprint: str) -> str:
    """Accept ``AB:CD:...`` as openssl prints it as well as plain hex."""
    fp = fingerprint.strip().replace(":", "").lower()
    if not _FINGERPRINT_RE.fullmatch(fp):
        raise InvalidInput(f"certificate fingerprint: expected 64 hex characters (SHA-256), got {fingerprint!r}")
    return fp


def cert_key_id(fingerprint: str) -> str:
    """The public name of a certificate credential in principals, logs and audit."""
    return "cert:" + fingerprint[:16]


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not _TENANT_RE.fullmatch(name):
        raise InvalidInput(f"tenant name: expected 1-64 characters of A-Z a-z 0-9 _ . -, got {name!r}")
    return name


_DEFENSE_CLASS_RE = re.compile(r"[a-z0-9_-]{1,32}")


def check_defense_class(name: str) -> str:
    if not isinstance(name, str) or not _DEFENSE_CLASS_RE.fullmatch(name):
        raise InvalidInput(f"defense class: expected 1-32 characters of a-z 0-9 _ -, got {name!r}")
    return name


def check_limits(limits: Limits) -> Limits:
    rate, burst, quota = limits.rate_per_s, limits.burst, limits.quota
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                             or not math.isfinite(rate) or rate <= 0):
        raise InvalidInput(f"rate: expected a positive number of requests per second, got {rate!r}")
    if burst is not None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise InvalidInput(f"burst: expected a whole number >= 1, got {burst!r}")
        if rate is None:
            raise InvalidInput("burst: needs a rate (the burst is the size of the rate's token bucket)")
    if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 1):
        raise InvalidInput(f"quota: expected a whole number of requests >= 1, got {quota!r}")
    if limits.quota_period not in ("day", "total"):
        raise InvalidInput(f"quota period: expected 'day' or 'total', got {limits.quota_period!r}")
    return Limits(float(rate) if rate is not None else None, burst, quota, limits.quota_period)


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise InvalidInput(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    return role  # type: ignore[return-value]


def check_models(models: Sequence[str] | None) -> tuple[str, ...] | None:
    if models is None:
        return None
    if isinstance(models, str):
        raise InvalidInput("models: expected a list of model names, got a single string")
    names = []
    for m in models:
        if not isinstance(m, str) or not _MODEL_RE.fullmatch(m):
            raise InvalidInput(f"models: {m!r} is not a model name (letters, digits, _ . -; at most 128)")
        names.append(m)
    if not names:
        # an empty scope would be a key that can call nothing: almost surely a mistake
        raise InvalidInput("models: empty list; leave it out to allow every model")
    return tuple(sorted(set(names)))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def limits_of(row: Row) -> Limits:
    return Limits(row["rate_per_s"], row["burst"], row["quota"], row["quota_period"])


def key_info_of(r: Row) -> KeyInfo:
    return KeyInfo(
        key_id=r["key_id"],
        tenant=r["tenant"],
        role=r["role"],
        models=tuple(json.loads(r["models"])) if r["models"] is not None else None,
        limits=limits_of(r),
        bearer=bool(r["bearer"]),
        cert_fingerprint=r["cert_fingerprint"],
        description=r["description"],
        created_at=r["created_at"],
        revoked_at=r["revoked_at"],
    )


def tenant_info_of(r: Row) -> TenantInfo:
    return TenantInfo(r["name"], limits_of(r), r["created_at"], r["active"], r["revoked"], r["defense_class"])
