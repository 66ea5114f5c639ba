"""Tenants and API keys in one SQLite file, and the authenticator the server calls.

Layout on disk: ``<path>`` (SQLite, WAL) holds tenants and keys; ``<path>.secret`` (0600)
holds the master secret. The database stores only HMAC-SHA256(hash_key, token), where
``hash_key = derive_key(master, "api-key-hash")``: a copy of the database alone is worth
nothing to an attacker, neither to log in nor to brute-force (the keys are 256-bit random
anyway, the HMAC key makes even an offline guess impossible without the secret file).

Tokens look like ``bst_<key_id>_<secret>``: ``key_id`` is 12 lowercase hex characters, a
public name for the key (listings, logs, audit, revocation); ``secret`` is 32 random bytes,
base64url without padding. A token is shown once, when created, and never stored or logged.

Credentials. A key row can carry a bearer token, a client certificate (the lowercase hex
SHA-256 of its DER), or both:

- ``create_key(...)`` gives a bearer token; with ``cert_fingerprint`` the certificate
  authenticates as well, on its own.
- ``create_key(..., cert_fingerprint=fp, bearer=False)`` (the default when a fingerprint is
  given) registers a certificate-only credential: no token exists, ``create_key`` returns
  ``(None, info)``.
- When a request carries a token, the token decides (a wrong token is refused even when
  the connection presented a registered certificate: an explicit credential that fails
  must not silently fall back to an ambient one). Without a token, a registered certificate
  authenticates. A principal authenticated by certificate has ``key_id = "cert:" + fp[:16]``.

Limits belong to the tenant, shared by all its keys: every ``Principal`` of a tenant carries
the same ``Limits``, so rate limiters should key their buckets on ``principal.tenant``.

Several server workers and the ``bastion keys`` CLI use the file at once (WAL, busy
timeout). Every change bumps a generation counter in the ``meta`` table in the same
transaction; ``authenticate`` reads it at most once per ``refresh_interval_s`` and reloads
its in-memory maps when it moved, so a revocation reaches running servers within about
one interval, without a restart. Other tables in the same file (quota usage, see
``connect()``) do not bump the generation and so cause no reloads.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.core.errors import InvalidInput, NotFound, Unauthenticated
from bastion.guard.principal import ROLES, Limits, Principal, Role
from bastion.guard.secrets import derive_key, load_or_create_secret
from bastion.guard.tls import fingerprint_der, fingerprint_pem

log = logging.getLogger("bastion.guard.keystore")

SCHEMA_VERSION = 2
TOKEN_PREFIX = "bst_"
KEY_ID_HEX = 12
SECRET_BYTES = 32
BUSY_TIMEOUT_MS = 5000
# a real token is 60 characters; anything far longer is not worth hashing
_MAX_TOKEN_CHARS = 256

_TENANT_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# model and zoo names become URL path segments (same alphabet as zoo.yaml variants)
_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{12}")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_MAX_DESCRIPTION = 500

MISSING_KEY_MESSAGE = "missing API key: send the header 'Authorization: Bearer <key>'"
INVALID_KEY_MESSAGE = "invalid API key"

# Each entry moves the schema from version i to i + 1. Statements run one by one inside
# one BEGIN IMMEDIATE (executescript would commit on its own).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS tenants (
            name TEXT PRIMARY KEY,
            rate_per_s REAL,
            burst INTEGER,
            quota INTEGER,
            quota_period TEXT NOT NULL DEFAULT 'day' CHECK (quota_period IN ('day', 'total')),
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS keys (
            key_id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL REFERENCES tenants(name),
            role TEXT NOT NULL CHECK (role IN ('infer', 'admin')),
            models TEXT,
            hash BLOB UNIQUE,
            cert_fingerprint TEXT,
            description TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            revoked_at TEXT,
            CHECK (hash IS NOT NULL OR cert_fingerprint IS NOT NULL)
        )""",
        # unique among live credentials only: a revoked certificate may be registered again
        """CREATE UNIQUE INDEX IF NOT EXISTS keys_live_cert ON keys(cert_fingerprint)
            WHERE cert_fingerprint IS NOT NULL AND revoked_at IS NULL""",
        "CREATE INDEX IF NOT EXISTS keys_tenant ON keys(tenant)",
        "INSERT OR IGNORE INTO meta(key, value) VALUES ('generation', 0)",
    ),
    # 2: a tenant's defense class picks which of a zoo's defenses applies to it (zoo.yaml
    # `defenses`), so a tenant suspected of extraction can be moved to a stronger one
    ("ALTER TABLE tenants ADD COLUMN defense_class TEXT NOT NULL DEFAULT 'default'",),
)


class KeyStoreError(Exception):
    """The key store cannot be used as it is (newer schema, wrong master secret)."""


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


def _check_role(role: str) -> Role:
    if role not in ROLES:
        raise InvalidInput(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    return role  # type: ignore[return-value]


def _check_models(models: Sequence[str] | None) -> tuple[str, ...] | None:
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _limits_of(row: sqlite3.Row) -> Limits:
    return Limits(row["rate_per_s"], row["burst"], row["quota"], row["quota_period"])


def _connect(path: Path) -> sqlite3.Connection:
    # autocommit (isolation_level=None): transactions are explicit BEGIN ... COMMIT
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # Switching to WAL needs a moment alone with the file; another process opening the
    # store at the same instant can make it answer "locked" without waiting. It is
    # persistent, so retrying until one of them succeeded is enough.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.01)
    conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL, no fsync per commit
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@dataclass(frozen=True, slots=True)
class _Maps:
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


_EMPTY = _Maps({}, {}, {}, {})
_VERIFIED_MAX = 4096


class KeyStore:
    """Tenants and API keys; ``authenticate`` implements ``guard.principal.Authenticator``.

    Thread-safe. ``authenticate`` never waits on the database lock: when another thread
    holds it, the current snapshot serves and the check happens on a later call.
    """

    def __init__(self, path: Path | str, *, secret_file: Path | str | None = None, create: bool = True,
                 refresh_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.secret_file = Path(secret_file) if secret_file is not None else Path(str(self.path) + ".secret")
        self.refresh_interval_s = refresh_interval_s
        self._lock = threading.RLock()
        self._maps = _EMPTY
        self._generation: int | None = None
        self._next_check = 0.0
        self._closed = False
        if not self.path.exists():
            if not create:
                raise KeyStoreMissing(f"key store {self.path} does not exist; "
                                      f"create it with `bastion keys create --keys {self.path} --tenant NAME`")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # 0600 before SQLite touches it (its -wal and -shm files copy the mode); O_EXCL
            # not needed: a process that loses the race just opens the existing file
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._conn = _connect(self.path)
        try:
            self._migrate()
            self.master_secret = self._load_master_secret(create)
            self._hash_key = derive_key(self.master_secret, "api-key-hash")
            self._reload()
        except BaseException:
            self._conn.close()
            raise

    # -- opening ---------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
                row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    raise KeyStoreError(f"key store {self.path} has schema version {version}; this Bastion "
                                        f"understands up to {SCHEMA_VERSION} (upgrade Bastion)")
                for statements in _MIGRATIONS[version:]:
                    for statement in statements:
                        self._conn.execute(statement)
                if version < SCHEMA_VERSION:
                    self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                                       (SCHEMA_VERSION,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _load_master_secret(self, create: bool) -> bytes:
        """Load the secret and check it is the one this store's hashes were made with.

        A missing secret beside an existing store is never recreated: a fresh secret
        would silently invalidate every key. The check value (an HKDF output for its
        own purpose) tells a wrong ``--secret-file`` apart from a wrong key.
        """
        stored = self._conn.execute("SELECT value FROM meta WHERE key = 'secret_check'").fetchone()
        try:
            master = load_or_create_secret(self.secret_file, create=create and stored is None)
        except FileNotFoundError:
            if stored is None:
                raise KeyStoreMissing(f"master secret {self.secret_file} does not exist") from None
            raise KeyStoreMissing(f"master secret {self.secret_file} of key store {self.path} is missing; "
                                  "its keys cannot be verified without it (restore the file, or pass "
                                  "--secret-file)") from None
        check = derive_key(master, "keystore-check", 16).hex()
        if stored is None:
            with self._lock:
                self._conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('secret_check', ?)", (check,))
            stored = self._conn.execute("SELECT value FROM meta WHERE key = 'secret_check'").fetchone()
        if not hmac.compare_digest(str(stored[0]), check):
            raise KeyStoreError(f"{self.secret_file} is not the master secret of key store {self.path}")
        return master

    def connect(self) -> sqlite3.Connection:
        """A new connection to the same file with the same pragmas (WAL, busy timeout,
        foreign keys, autocommit: use explicit BEGIN/COMMIT), for other tables of the
        guard (quota usage). Writes there do not trigger key reloads."""
        return _connect(self.path)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
            if len(token) > _MAX_TOKEN_CHARS:
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

    def _maybe_refresh(self, now: float) -> None:
        if not self._lock.acquire(blocking=False):
            return  # a writer or another refresher holds it; the snapshot serves meanwhile
        try:
            self._next_check = now + self.refresh_interval_s
            if self._closed:
                return
            try:
                row = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
                if row is not None and row[0] != self._generation:
                    self._reload()
            except sqlite3.Error as err:
                # keep serving the last snapshot: refusing every request because the
                # file is briefly unreadable would be worse; the next interval retries
                log.warning("key store %s: reload failed, serving the previous keys: %s", self.path, err)
        finally:
            self._lock.release()

    def refresh(self) -> None:
        """Check for changes now instead of waiting for the interval."""
        self._next_check = 0.0
        self._maybe_refresh(time.monotonic())

    def _reload(self) -> None:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")  # one read snapshot: generation and rows agree
            try:
                generation = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
                rows = conn.execute(
                    "SELECT k.key_id, k.tenant, k.role, k.models, k.hash, k.cert_fingerprint, k.revoked_at,"
                    " t.rate_per_s, t.burst, t.quota, t.quota_period, t.defense_class"
                    " FROM keys k JOIN tenants t ON t.name = k.tenant ORDER BY k.rowid"
                ).fetchall()
            finally:
                conn.execute("COMMIT")
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
                    limits = limits_cache[r["tenant"]] = _limits_of(r)
                models = frozenset(json.loads(r["models"])) if r["models"] is not None else None
                dclass = r["defense_class"]
                if digest is not None:
                    by_hash[bytes(digest)] = Principal(r["tenant"], key_id, r["role"], models, limits, dclass)
                if fp is not None:
                    by_cert[fp] = Principal(r["tenant"], cert_key_id(fp), r["role"], models, limits, dclass)
            self._maps = _Maps(by_hash, revoked_hash, by_cert, revoked_cert)
            self._generation = generation
            log.debug("key store %s: loaded %d live keys (generation %s)", self.path,
                      len(by_hash) + len(by_cert), generation)

    # -- administration --------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that bumps the generation; the maps reload after it."""
        with self._lock:
            if self._closed:
                raise KeyStoreError(f"key store {self.path} is closed")
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            # our own commits do not show in data_version or a later generation read
            # as a change from elsewhere would; reload now so this instance is current
            self._reload()

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
        role = _check_role(role)
        scope = _check_models(models)
        if limits is not None:
            limits = check_limits(limits)
        fp = normalize_fingerprint(cert_fingerprint) if cert_fingerprint is not None else None
        if bearer is None:
            bearer = fp is None
        if not bearer and fp is None:
            raise InvalidInput("a key needs a bearer token or a client certificate")
        if not isinstance(description, str) or len(description) > _MAX_DESCRIPTION:
            raise InvalidInput(f"description: expected text of at most {_MAX_DESCRIPTION} characters")
        description = " ".join(description.split())  # no newlines or control spacing in listings
        now = _now()
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
            conn.execute("INSERT OR IGNORE INTO tenants(name, created_at) VALUES (?, ?)", (tenant, now))
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
        with self._lock:
            rows = self._conn.execute(_KEY_SELECT + clause + " ORDER BY k.rowid", args).fetchall()
        return [_key_info_of(r) for r in rows]

    def _key_info(self, key_id: str) -> KeyInfo:
        with self._lock:
            row = self._conn.execute(_KEY_SELECT + " WHERE k.key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"unknown key id {key_id!r}")
        return _key_info_of(row)

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
            elif not _KEY_ID_RE.fullmatch(key_id):
                # a pasted token must not end up in the error message or a log line
                shown = key_id if len(key_id) <= 16 and key_id.isprintable() else key_id[:16] + "..."
                if key_id.startswith(TOKEN_PREFIX):
                    raise InvalidInput("give the key id (the 12 hex characters after 'bst_'), not the key itself")
                raise NotFound(f"unknown key id {shown!r} (key ids are 12 hex characters)")
            row = conn.execute("SELECT revoked_at FROM keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"unknown key id {key_id!r}")
            if row["revoked_at"] is None:
                conn.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ?", (_now(), key_id))
        log.info("revoked key %s", key_id)
        return self._key_info(key_id)

    def set_limits(self, tenant: str, limits: Limits) -> TenantInfo:
        """Replace ``tenant``'s limits (every key of the tenant shares them)."""
        check_tenant_name(tenant)
        limits = check_limits(limits)
        with self._write() as conn:
            self._set_limits(conn, tenant, limits)
        return self.tenant(tenant)

    def _set_limits(self, conn: sqlite3.Connection, tenant: str, limits: Limits) -> None:
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
        with self._lock:
            rows = self._conn.execute(_TENANT_SELECT + " GROUP BY t.name ORDER BY t.rowid").fetchall()
        return [_tenant_info_of(r) for r in rows]

    def tenant(self, name: str) -> TenantInfo:
        """One tenant; ``NotFound`` when it does not exist."""
        check_tenant_name(name)
        with self._lock:
            row = self._conn.execute(_TENANT_SELECT + " WHERE t.name = ? GROUP BY t.name", (name,)).fetchone()
        if row is None:
            raise NotFound(f"unknown tenant {name!r}")
        return _tenant_info_of(row)


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


def _key_info_of(r: sqlite3.Row) -> KeyInfo:
    return KeyInfo(
        key_id=r["key_id"],
        tenant=r["tenant"],
        role=r["role"],
        models=tuple(json.loads(r["models"])) if r["models"] is not None else None,
        limits=_limits_of(r),
        bearer=bool(r["bearer"]),
        cert_fingerprint=r["cert_fingerprint"],
        description=r["description"],
        created_at=r["created_at"],
        revoked_at=r["revoked_at"],
    )


def _tenant_info_of(r: sqlite3.Row) -> TenantInfo:
    return TenantInfo(r["name"], _limits_of(r), r["created_at"], r["active"], r["revoked"], r["defense_class"])
