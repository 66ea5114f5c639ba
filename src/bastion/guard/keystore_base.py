"""What every key store does the same way, whatever holds its rows: the snapshot, the hot
path and the administration written once against a small backend interface.

The hot path. ``authenticate`` reads one immutable snapshot (``Maps``) that a reload
replaces whole: HMAC-SHA256 of the token under a key derived from the master secret, then
one dict lookup by digest. Nothing on it waits for a database or a lock, and nothing about
other tenants' keys leaks through its timing (the lookup is keyed by a hash only the holder
of the token can produce).

The backend (``keystore.KeyStore`` for SQLite, ``keystore_pg.PgKeyStore``) provides:
``_write()`` (one transaction that bumps the generation; yields something with
``execute(sql, args)`` taking ``?`` placeholders), ``_fetchone``/``_fetchall`` for reads
outside it, ``_meta_get``/``_meta_put_if_absent`` for the secret check, ``_maybe_refresh``
(called by ``authenticate`` once per ``_next_check``) and ``refresh``. The SQL here is the
dialect both understand; ``_order`` names the column that keeps creation order.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bastion.core.errors import InvalidInput, NotFound, Unauthenticated
from bastion.guard.keystore_model import (
    INVALID_KEY_MESSAGE,
    KEY_ID_HEX,
    KEY_ID_RE,
    MAX_DESCRIPTION,
    MAX_TOKEN_CHARS,
    MISSING_KEY_MESSAGE,
    SECRET_BYTES,
    TOKEN_PREFIX,
    KeyInfo,
    KeyStoreError,
    KeyStoreMissing,
    Row,
    TenantInfo,
    cert_key_id,
    check_defense_class,
    check_limits,
    check_models,
    check_role,
    check_tenant_name,
    key_info_of,
    limits_of,
    normalize_fingerprint,
    now_iso,
    tenant_info_of,
)
from bastion.guard.principal import Limits, Principal, Role
from bastion.guard.secrets import derive_key, load_or_create_secret

log = logging.getLogger("bastion.guard.keystore")


@dataclass(frozen=True, slots=True)
class Maps:
    """One consistent snapshot for the hot path; replaced whole, never mutated."""

    by_hash: dict[bytes, Principal]
    revoked_hash: dict[bytes, str]  # hash -> key_id
    by_cert: dict[str, Principal]
    revoked_cert: dict[str, str]  # fingerprint -> key_id
    # tokens already verified against this snapshot: a keep-alive client sends the same
    # key on every request, and a dict hit (~50 ns) spares the keyed hash (~1.3 µs). The
    # lookup compares with other clients' tokens only on a full SipHash match, so it leaks
    # no timing about them; the cache dies with the snapshot on any key-store change.
    verified: dict[str, Principal] = field(default_factory=dict)


EMPTY_MAPS = Maps({}, {}, {}, {})
_VERIFIED_MAX = 4096

# Every key with its tenant's limits, in creation order ({order}: the backend's column).
RELOAD_SELECT = (
    "SELECT k.key_id, k.tenant, k.role, k.models, k.hash, k.cert_fingerprint, k.revoked_at,"
    " t.rate_per_s, t.burst, t.quota, t.quota_period, t.defense_class"
    " FROM keys k JOIN tenants t ON t.name = k.tenant ORDER BY k.{order}"
)
_KEY_SELECT = (
    "SELECT k.key_id, k.tenant, k.role, k.models, k.hash IS NOT NULL AS bearer, k.cert_fingerprint,"
    " k.description, k.created_at, k.revoked_at, t.rate_per_s, t.burst, t.quota, t.quota_period"
    " FROM keys k JOIN tenants t ON t.name = k.tenant"
)
_TENANT_SELECT = (
    "SELECT t.name, t.rate_per_s, t.burst, t.quota, t.quota_period, t.created_at, t.defense_class,"
    " count(k.key_id) - count(k.revoked_at) AS active, count(k.revoked_at) AS revoked"
    " FROM tenants t LEFT JOIN keys k ON k.tenant = t.name"
)


def build_maps(rows: Iterable[Row]) -> Maps:
    """The snapshot of ``RELOAD_SELECT``'s rows."""
    limits_cache: dict[str, Limits] = {}
    by_hash: dict[bytes, Principal] = {}
    revoked_hash: dict[bytes, str] = {}
    by_cert: dict[str, Principal] = {}
    revoked_cert: dict[str, str] = {}
    for r in rows:
        key_id, digest, fp = r["key_id"], r["hash"], r["cert_fingerprint"]
        if r["revoked_at"] is not None:
            if digest is not None:
                revoked_hash[bytes(digest)] = key_id
            if fp is not None:
                revoked_cert[fp] = key_id
            continue
        limits = limits_cache.get(r["tenant"])
        if limits is None:
            limits = limits_cache[r["tenant"]] = limits_of(r)
        models = frozenset(json.loads(r["models"])) if r["models"] is not None else None
        dclass = r["defense_class"]
        if digest is not None:
            by_hash[bytes(digest)] = Principal(r["tenant"], key_id, r["role"], models, limits, dclass)
        if fp is not None:
            by_cert[fp] = Principal(r["tenant"], cert_key_id(fp), r["role"], models, limits, dclass)
    return Maps(by_hash, revoked_hash, by_cert, revoked_cert)


class Executor(Protocol):
    """What ``_write`` yields: ``execute`` with ``?`` placeholders, returning a cursor."""

    def execute(self, sql: str, args: Sequence[Any] = ...) -> Any: ...


class KeyStoreBase:
    """Tenants and API keys; ``authenticate`` implements ``guard.principal.Authenticator``.

    Subclasses set ``master_secret``, ``_hash_key``, ``secret_file``, ``refresh_interval_s``
    and ``_name`` (how errors and logs name the store; never a password) before use.
    """

    master_secret: bytes
    secret_file: Path
    refresh_interval_s: float
    _hash_key: bytes
    _name: str
    _order = "rowid"
    _maps: Maps = EMPTY_MAPS
    _next_check: float = 0.0

    # -- the backend's part ----------------------------------------------------------

    def _write(self) -> AbstractContextManager[Executor]:
        raise NotImplementedError

    def _fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        raise NotImplementedError

    def _fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    def _meta_get(self, key: str) -> Any:
        """The meta value of ``key``, None when absent."""
        raise NotImplementedError

    def _meta_put_if_absent(self, key: str, value: str) -> None:
        raise NotImplementedError

    def _maybe_refresh(self, now: float) -> None:
        raise NotImplementedError

    def refresh(self) -> None:
        """Check for changes now instead of waiting for the interval."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> KeyStoreBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening ---------------------------------------------------------------------

    def _load_master_secret(self, create: bool) -> bytes:
        """Load the secret and check it is the one this store's hashes were made with.

        A missing secret beside an existing store is never recreated: a fresh secret
        would silently invalidate every key. The check value (an HKDF output for its
        own purpose) tells a wrong ``--secret-file`` apart from a wrong key.
        """
        stored = self._meta_get("secret_check")
        try:
            master = load_or_create_secret(self.secret_file, create=create and stored is None)
        except FileNotFoundError:
            if stored is None:
                raise KeyStoreMissing(f"master secret {self.secret_file} does not exist") from None
            raise KeyStoreMissing(f"master secret {self.secret_file} of key store {self._name} is missing; "
                                  "its keys cannot be verified without it (restore the file, or pass "
                                  "--secret-file)") from None
        check = derive_key(master, "keystore-check", 16).hex()
        if stored is None:
            # two processes creating the store at once: the first check value stays
            self._meta_put_if_absent("secret_check", check)
            stored = self._meta_get("secret_check")
        if not hmac.compare_digest(str(stored), check):
            raise KeyStoreError(f"{self.secret_file} is not the master secret of key store {self._name}")
        return master

    # -- the hot path ----------------------------------------------------------------

    def authenticate(self, token: str | None, cert_fingerprint: str | None = None) -> Principal:
        """See ``guard.principal.Authenticator``. A token, when present, decides; a
        registered certificate authenticates alone. Messages never contain the token."""
        now = time.monotonic()
        if now >= self._next_check:
            self._maybe_refresh(now)
        maps = self._maps
        if token:
            principal = maps.verified.get(token)
            if principal is not None:
                return principal
            if len(token) > MAX_TOKEN_CHARS:
                raise Unauthenticated(INVALID_KEY_MESSAGE)
            try:
                msg = token.encode()
            except UnicodeEncodeError:  # lone surrogates: cannot be one of ours
                raise Unauthenticated(INVALID_KEY_MESSAGE) from None
            digest = hmac.digest(self._hash_key, msg, "sha256")
            principal = maps.by_hash.get(digest)
            if principal is not None:
                if len(maps.verified) < _VERIFIED_MAX:
                    maps.verified[token] = principal
                return principal
            # Only the holder of the full secret can produce this hash, so naming the
            # revoked key tells nothing to anyone who did not already have it.
            revoked = maps.revoked_hash.get(digest)
            if revoked is not None:
                raise Unauthenticated(f"API key {revoked} has been revoked")
            raise Unauthenticated(INVALID_KEY_MESSAGE)
        if cert_fingerprint:
            principal = maps.by_cert.get(cert_fingerprint)
            if principal is None:
                fp = cert_fingerprint.replace(":", "").lower()
                principal = maps.by_cert.get(fp)
                if principal is None:
                    # the TLS handshake proved the client holds this certificate: its own
                    # fingerprint is no secret to it
                    label = cert_key_id(fp)
                    if fp in maps.revoked_cert:
                        raise Unauthenticated(f"client certificate {label} has been revoked")
                    raise Unauthenticated(f"{MISSING_KEY_MESSAGE} (client certificate {label} is not registered)")
            return principal
        raise Unauthenticated(MISSING_KEY_MESSAGE)

    # -- administration --------------------------------------------------------------

    def create_key(self, tenant: str, *, role: Role = "infer", models: Sequence[str] | None = None,
                   limits: Limits | None = None, cert_fingerprint: str | None = None, description: str = "",
                   bearer: bool | None = None) -> tuple[str | None, KeyInfo]:
        """Create a key for ``tenant`` (created when new, unlimited unless ``limits``).

        ``limits`` given: they become the tenant's limits (all its keys). ``bearer``
        defaults to True without ``cert_fingerprint`` and False with it (a certificate-only
        credential, returned token None); pass ``bearer=True`` for both. The token is
        returned once and cannot be recovered later.
        """
        check_tenant_name(tenant)
        role = check_role(role)
        scope = check_models(models)
        if limits is not None:
            limits = check_limits(limits)
        fp = normalize_fingerprint(cert_fingerprint) if cert_fingerprint is not None else None
        if bearer is None:
            bearer = fp is None
        if not bearer and fp is None:
            raise InvalidInput("a key needs a bearer token or a client certificate")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            raise InvalidInput(f"description: expected text of at most {MAX_DESCRIPTION} characters")
        description = " ".join(description.split())  # no newlines or control spacing in listings
        now = now_iso()
        token: str | None = None
        with self._write() as conn:
            if fp is not None:
                taken = conn.execute("SELECT key_id, tenant FROM keys WHERE cert_fingerprint = ?"
                                     " AND revoked_at IS NULL", (fp,)).fetchone()
                if taken is not None:
                    raise InvalidInput(f"client certificate {cert_key_id(fp)} is already registered to key "
                                       f"{taken['key_id']} of tenant {taken['tenant']}; revoke that key first")
            while True:
                key_id = secrets.token_hex(KEY_ID_HEX // 2)
                if conn.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone() is None:
                    break
            digest: bytes | None = None
            if bearer:
                token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
                digest = hmac.digest(self._hash_key, token.encode(), "sha256")
            conn.execute("INSERT INTO tenants(name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                         (tenant, now))
            if limits is not None:
                self._set_limits(conn, tenant, limits)
            conn.execute(
                "INSERT INTO keys(key_id, tenant, role, models, hash, cert_fingerprint, description, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, tenant, role, json.dumps(list(scope)) if scope is not None else None, digest, fp,
                 description, now),
            )
        log.info("created key %s for tenant %s (role %s)", key_id, tenant, role)
        return token, self._key_info(key_id)

    def list_keys(self, tenant: str | None = None, include_revoked: bool = False) -> list[KeyInfo]:
        where, args = [], []
        if tenant is not None:
            where.append("k.tenant = ?")
            args.append(check_tenant_name(tenant))
        if not include_revoked:
            where.append("k.revoked_at IS NULL")
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        rows = self._fetchall(_KEY_SELECT + clause + f" ORDER BY k.{self._order}", args)
        return [key_info_of(r) for r in rows]

    def _key_info(self, key_id: str) -> KeyInfo:
        row = self._fetchone(_KEY_SELECT + " WHERE k.key_id = ?", (key_id,))
        if row is None:
            raise NotFound(f"unknown key id {key_id!r}")
        return key_info_of(row)

    def revoke(self, key_id: str) -> KeyInfo:
        """Revoke a key by its id (or ``cert:<fingerprint prefix>`` as principals name
        certificate credentials). Revoking twice keeps the first time. Running servers
        refuse it within about ``refresh_interval_s``."""
        key_id = key_id.strip()
        with self._write() as conn:
            if key_id.startswith("cert:"):
                prefix = key_id[5:].lower()
                rows = conn.execute(
                    "SELECT key_id FROM keys WHERE substr(cert_fingerprint, 1, ?) = ? AND revoked_at IS NULL",
                    (len(prefix), prefix),
                ).fetchall() if len(prefix) >= 16 and re.fullmatch(r"[0-9a-f]+", prefix) else []
                if len(rows) != 1:
                    raise NotFound(f"unknown key id {key_id!r}" if not rows else
                                   f"{key_id!r} matches {len(rows)} certificates; give the key id")
                key_id = rows[0]["key_id"]
            elif not KEY_ID_RE.fullmatch(key_id):
                # a pasted token must not end up in the error message or a log line
                shown = key_id if len(key_id) <= 16 and key_id.isprintable() else key_id[:16] + "..."
                if key_id.startswith(TOKEN_PREFIX):
                    raise InvalidInput("give the key id (the 12 hex characters after 'bst_'), not the key itself")
                raise NotFound(f"unknown key id {shown!r} (key ids are 12 hex characters)")
            row = conn.execute("SELECT revoked_at FROM keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"unknown key id {key_id!r}")
            if row["revoked_at"] is None:
                # "AND revoked_at IS NULL": two admins revoking at once keep the first time
                conn.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                             (now_iso(), key_id))
        log.info("revoked key %s", key_id)
        return self._key_info(key_id)

    def set_limits(self, tenant: str, limits: Limits) -> TenantInfo:
        """Replace ``tenant``'s limits (every key of the tenant shares them)."""
        check_tenant_name(tenant)
        limits = check_limits(limits)
        with self._write() as conn:
            self._set_limits(conn, tenant, limits)
        return self.tenant(tenant)

    @staticmethod
    def _set_limits(conn: Executor, tenant: str, limits: Limits) -> None:
        cur = conn.execute("UPDATE tenants SET rate_per_s = ?, burst = ?, quota = ?, quota_period = ?"
                           " WHERE name = ?",
                           (limits.rate_per_s, limits.burst, limits.quota, limits.quota_period, tenant))
        if cur.rowcount == 0:
            raise NotFound(f"unknown tenant {tenant!r}; a tenant is created with its first key")

    def set_defense_class(self, tenant: str, defense_class: str) -> TenantInfo:
        """Move ``tenant`` to another defense class (zoo.yaml ``defenses``); every worker
        applies it within the refresh interval."""
        check_tenant_name(tenant)
        check_defense_class(defense_class)
        with self._write() as conn:
            cur = conn.execute("UPDATE tenants SET defense_class = ? WHERE name = ?", (defense_class, tenant))
            if cur.rowcount == 0:
                raise NotFound(f"unknown tenant {tenant!r}; a tenant is created with its first key")
        return self.tenant(tenant)

    def tenants(self) -> list[TenantInfo]:
        rows = self._fetchall(_TENANT_SELECT + f" GROUP BY t.name ORDER BY t.{self._order}")
        return [tenant_info_of(r) for r in rows]

    def tenant(self, name: str) -> TenantInfo:
        """One tenant; ``NotFound`` when it does not exist."""
        check_tenant_name(name)
        row = self._fetchone(_TENANT_SELECT + " WHERE t.name = ? GROUP BY t.name", (name,))
        if row is None:
            raise NotFound(f"unknown tenant {name!r}")
        return tenant_info_of(row)
