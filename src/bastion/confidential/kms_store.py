"""The key-release service's store: master keys by key id and, per key id, a release policy.

Layout on disk, as the API key store (``guard/keystore.py``): ``<path>`` (SQLite, WAL,
mode 0600) and ``<path>.secret`` (0600), the store's own master secret. The master keys
are kept in the database only *sealed*: AES-256-GCM under ``derive_key(secret,
"kms-master-key-seal")`` with the key id as associated data, so a copy of the database
alone (a backup, a snapshot of the volume) yields no key, and a sealed key cannot be moved
to another key id's row. Whoever holds both files holds every master key: keep the
secret file off the database's backups.

A master key is 32 random bytes, generated here or imported from a key file in the format
``bastion bundle keygen --master-key`` writes (base64, or 32 raw bytes). Operators seal
bundles with that key file (``bastion bundle seal --key-provider file:KEYFILE``) and then
import it under the bundle's key id; the service never wraps new keys itself. A key id,
once added, is never overwritten: bundles sealed under it would be orphaned.

A *release policy* (:class:`ReleasePolicy`) says which workers may receive data keys
wrapped under a key id: a list of accepted measurements (a worker is accepted if its
attested measurement matches any one of them fully), whether self-signed ``dev`` evidence
is acceptable at all, and the oldest evidence accepted. A key id without a policy
releases nothing.

The service reads the policy and key at each release, so ``bastion kms policy`` changes
what a running service accepts at once, without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.confidential.attestation import DEFAULT_MAX_AGE_S, AttestationError, parse_expected_measurement
from bastion.core.errors import InvalidInput, NotFound
from bastion.guard.keyproviders import (
    KEY_BYTES,
    KeyProviderError,
    check_key_id,
    decode_master_key,
    generate_master_key,
)
from bastion.guard.secrets import derive_key, load_or_create_secret

__all__ = [
    "MAX_ACCEPTED",
    "MAX_POLICY_AGE_S",
    "SCHEMA_VERSION",
    "KeyExists",
    "KmsKey",
    "KmsStore",
    "KmsStoreError",
    "KmsStoreMissing",
    "ReleasePolicy",
    "check_policy",
    "key_check_value",
    "read_key_file",
]

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000
MAX_ACCEPTED = 64  # accepted measurements per key id: a policy is a short allow-list, not a database
MAX_POLICY_AGE_S = 24 * 3600.0
_MAX_KEY_FILE_BYTES = 4096
_SEAL_AAD = b"bastion-kms-master-key-v1\x00"
_SEAL_NONCE_BYTES = 12

# Each entry moves the schema from version i to i + 1 (the key store's convention).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS master_keys (
            key_id TEXT PRIMARY KEY,
            sealed BLOB NOT NULL,
            check_value TEXT NOT NULL,
            source TEXT NOT NULL CHECK (source IN ('generated', 'imported')),
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS policies (
            key_id TEXT PRIMARY KEY REFERENCES master_keys(key_id),
            accept TEXT NOT NULL,
            allow_dev INTEGER NOT NULL CHECK (allow_dev IN (0, 1)),
            max_age_s REAL NOT NULL,
            updated_at TEXT NOT NULL
        )""",
    ),
)


class KmsStoreError(Exception):
    """The store cannot be used as it is (newer schema, wrong secret, a sealed key that does not open)."""


class KmsStoreMissing(FileNotFoundError):
    """``create=False`` and there is no store (or no secret) at the path."""


class KeyExists(InvalidInput):
    """A key id that already holds a master key: never overwritten."""


def key_check_value(key: bytes) -> str:
    """A public fingerprint of a master key (16 hex): tells which key file was imported,
    and reveals nothing of the key (HMAC under the key itself)."""
    return hmac.digest(key, b"bastion-kms-key-check", "sha256")[:8].hex()


def read_key_file(path: Path) -> bytes:
    """A master key file as ``bastion bundle keygen --master-key`` writes it (base64), or 32 raw bytes."""
    try:
        with Path(path).open("rb") as f:
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"key file {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise InvalidInput(f"key file {path}: too large for a key file (expected a base64 32-byte key)")
    if len(data) == KEY_BYTES:
        return data  # raw (as keyproviders reads it): 32 characters of base64 could only hold 24 bytes
    try:
        return decode_master_key(data, f"key file {path}")
    except KeyProviderError as exc:
        raise InvalidInput(str(exc)) from None


@dataclass(frozen=True)
class ReleasePolicy:
    """Who may receive data keys wrapped under one key id.

    ``accept``: measurements as name -> lowercase hex (``{"measurement": ...}`` for dev
    evidence, ``{"pcr0": ..., "pcr1": ..., "pcr2": ...}`` for Nitro); a worker is accepted
    if it matches every value of any one of them. Build it with :func:`check_policy`,
    which validates and normalises.
    """

    accept: tuple[Mapping[str, str], ...]
    allow_dev: bool = False
    max_age_s: float = DEFAULT_MAX_AGE_S

    def as_dict(self) -> dict[str, Any]:
        return {
            "accept": [dict(sorted(m.items())) for m in self.accept],
            "allow_dev": self.allow_dev,
            "max_age_s": self.max_age_s,
        }

    def digest(self) -> str:
        """A short name for this exact policy (16 hex), written in every audit record of a
        decision taken under it: an auditor can tie each release to the policy that allowed it."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]


def _check_measurement(m: Any, where: str) -> dict[str, str]:
    if not isinstance(m, Mapping) or not m:
        raise InvalidInput(f"{where}: expected a non-empty mapping of name -> hex")
    for name, value in m.items():
        # names and values are validated by the one parser of expected measurements; a ',' or
        # '=' inside one would let it split a single entry into two, so those are refused first
        if not isinstance(name, str) or not isinstance(value, str) or any(c in name + value for c in ",="):
            raise InvalidInput(f"{where}: {name!r}={value!r} is not a name=hex pair")
    try:
        parsed = parse_expected_measurement(",".join(f"{n}={v}" for n, v in m.items()))
    except AttestationError as exc:
        raise InvalidInput(f"{where}: {exc}") from None
    if len(parsed) != len(m):
        raise InvalidInput(f"{where}: names repeat (compared lowercase)")
    return dict(sorted(parsed.items()))


def check_policy(
    accept: Iterable[Mapping[str, str]], *, allow_dev: bool = False, max_age_s: float = DEFAULT_MAX_AGE_S
) -> ReleasePolicy:
    """A validated :class:`ReleasePolicy`: at least one accepted measurement (a policy that
    accepts nobody is a mistake; a key id without a policy already releases nothing),
    names and hex checked and lowercased, duplicates dropped, ``0 < max_age_s <= 1 day``."""
    if isinstance(accept, (str, Mapping)):
        raise InvalidInput("accept: expected a list of measurements (mappings of name -> hex)")
    out: list[dict[str, str]] = []
    for i, m in enumerate(accept):
        checked = _check_measurement(m, f"accept[{i}]")
        if checked not in out:
            out.append(checked)
    if not out:
        raise InvalidInput("accept: at least one measurement is needed (name=hex, e.g. pcr0=...)")
    if len(out) > MAX_ACCEPTED:
        raise InvalidInput(f"accept: {len(out)} measurements, at most {MAX_ACCEPTED}")
    if not isinstance(allow_dev, bool):
        raise InvalidInput(f"allow_dev: expected true or false, got {allow_dev!r}")
    if (
        isinstance(max_age_s, bool)
        or not isinstance(max_age_s, (int, float))
        or not math.isfinite(max_age_s)
        or not 0 < max_age_s <= MAX_POLICY_AGE_S
    ):
        raise InvalidInput(f"max_age_s: expected seconds in (0, {MAX_POLICY_AGE_S:.0f}], got {max_age_s!r}")
    return ReleasePolicy(tuple(out), allow_dev, float(max_age_s))


@dataclass(frozen=True)
class KmsKey:
    """What may be shown about a key id: never the key, only its check value."""

    key_id: str
    check_value: str
    source: str  # generated | imported
    created_at: str
    policy: ReleasePolicy | None
    policy_updated_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "check_value": self.check_value,
            "source": self.source,
            "created_at": self.created_at,
            "policy": self.policy.as_dict() if self.policy is not None else None,
            "policy_digest": self.policy.digest() if self.policy is not None else None,
            "policy_updated_at": self.policy_updated_at,
        }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _key_id(key_id: str) -> str:
    try:
        return check_key_id(key_id)
    except KeyProviderError as exc:
        raise InvalidInput(str(exc)) from None


def _connect(path: Path) -> sqlite3.Connection:
    # autocommit: transactions are explicit BEGIN ... COMMIT (the key store's convention)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:  # switching to WAL needs a moment alone with the file (see keystore._connect)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.01)
    conn.execute("PRAGMA synchronous = FULL")  # a key added must survive a power loss: it is rare and precious
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class KmsStore:
    """Master keys and release policies in one SQLite file. Thread-safe (one lock); the
    ``bastion kms`` CLI and a running service may use the file at once (WAL)."""

    def __init__(self, path: Path | str, *, secret_file: Path | str | None = None, create: bool = True) -> None:
        self.path = Path(path)
        self.secret_file = Path(secret_file) if secret_file is not None else Path(str(self.path) + ".secret")
        self._lock = threading.RLock()
        self._closed = False
        if not self.path.exists():
            if not create:
                raise KmsStoreMissing(
                    f"KMS store {self.path} does not exist; "
                    f"create it with `bastion kms add-key --db {self.path} KEY_ID`"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # 0600 before SQLite touches it: its -wal and -shm files copy the mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._conn = _connect(self.path)
        try:
            self._migrate()
            self._seal_key = derive_key(self._load_secret(create), "kms-master-key-seal")
        except BaseException:
            self._conn.close()
            raise

    # -- opening

    def _migrate(self) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
                row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    raise KmsStoreError(
                        f"KMS store {self.path} has schema version {version}; this Bastion "
                        f"understands up to {SCHEMA_VERSION} (upgrade Bastion)"
                    )
                for statements in _MIGRATIONS[version:]:
                    for statement in statements:
                        self._conn.execute(statement)
                if version < SCHEMA_VERSION:
                    self._conn.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _load_secret(self, create: bool) -> bytes:
        """The store's secret, checked against the value recorded with the first one: a
        missing secret beside an existing store is never recreated (every sealed key would
        be lost), and a wrong ``--secret-file`` is named as such."""
        stored = self._conn.execute("SELECT value FROM meta WHERE key = 'secret_check'").fetchone()
        try:
            secret = load_or_create_secret(self.secret_file, create=create and stored is None)
        except FileNotFoundError:
            if stored is None:
                raise KmsStoreMissing(f"KMS secret {self.secret_file} does not exist") from None
            raise KmsStoreMissing(
                f"KMS secret {self.secret_file} of store {self.path} is missing; its master keys "
                "cannot be opened without it (restore the file, or pass --secret-file)"
            ) from None
        check = derive_key(secret, "kms-store-check", 16).hex()
        if stored is None:
            with self._lock:
                self._conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('secret_check', ?)", (check,))
            stored = self._conn.execute("SELECT value FROM meta WHERE key = 'secret_check'").fetchone()
        if not hmac.compare_digest(str(stored[0]), check):
            raise KmsStoreError(f"{self.secret_file} is not the secret of KMS store {self.path}")
        return secret

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> KmsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn_open(self) -> sqlite3.Connection:
        if self._closed:
            raise KmsStoreError(f"KMS store {self.path} is closed")
        return self._conn

    # -- master keys

    def _seal(self, key_id: str, key: bytes) -> bytes:
        nonce = os.urandom(_SEAL_NONCE_BYTES)
        return nonce + AESGCM(self._seal_key).encrypt(nonce, key, _SEAL_AAD + key_id.encode())

    def add_key(self, key_id: str, key: bytes | None = None) -> KmsKey:
        """Add master key ``key`` (32 bytes; generated when None) under ``key_id``.
        Raises :class:`KeyExists` when the key id is taken."""
        _key_id(key_id)
        source = "generated" if key is None else "imported"
        if key is None:
            key = generate_master_key()
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise InvalidInput(f"master key: expected {KEY_BYTES} bytes")
        with self._lock:
            conn = self._conn_open()
            try:
                conn.execute(
                    "INSERT INTO master_keys(key_id, sealed, check_value, source, created_at) VALUES (?, ?, ?, ?, ?)",
                    (key_id, self._seal(key_id, key), key_check_value(key), source, _now()),
                )
            except sqlite3.IntegrityError:
                raise KeyExists(
                    f"key id {key_id!r} already holds a master key; refusing to overwrite it "
                    "(bundles sealed under it would no longer open)"
                ) from None
        return self.key(key_id)

    def import_key_file(self, key_id: str, path: Path) -> KmsKey:
        """Add the master key in key file ``path`` under ``key_id``."""
        _key_id(key_id)
        return self.add_key(key_id, read_key_file(path))

    def master_key(self, key_id: str) -> bytes:
        """The master key of ``key_id``; :class:`NotFound` when there is none."""
        _key_id(key_id)
        with self._lock:
            row = self._conn_open().execute("SELECT sealed FROM master_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"unknown key id {key_id!r}")
        sealed = bytes(row["sealed"])
        try:
            return AESGCM(self._seal_key).decrypt(
                sealed[:_SEAL_NONCE_BYTES], sealed[_SEAL_NONCE_BYTES:], _SEAL_AAD + key_id.encode()
            )
        except InvalidTag:
            # the row was edited or moved from another key id: a store problem, not the client's
            raise KmsStoreError(f"the sealed master key of {key_id!r} in {self.path} does not open") from None

    def has_key(self, key_id: str) -> bool:
        with self._lock:
            return (
                self._conn_open().execute("SELECT 1 FROM master_keys WHERE key_id = ?", (key_id,)).fetchone()
                is not None
            )

    # -- policies

    def set_policy(self, key_id: str, policy: ReleasePolicy) -> KmsKey:
        """Replace ``key_id``'s release policy (validated again: it may be built by hand)."""
        _key_id(key_id)
        policy = check_policy(policy.accept, allow_dev=policy.allow_dev, max_age_s=policy.max_age_s)
        with self._lock:
            conn = self._conn_open()
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT 1 FROM master_keys WHERE key_id = ?", (key_id,)).fetchone() is None:
                    raise NotFound(f"unknown key id {key_id!r}: add its master key first (bastion kms add-key)")
                conn.execute(
                    "INSERT OR REPLACE INTO policies(key_id, accept, allow_dev, max_age_s, updated_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (key_id, json.dumps(policy.as_dict()["accept"]), int(policy.allow_dev), policy.max_age_s, _now()),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return self.key(key_id)

    def policy(self, key_id: str) -> ReleasePolicy | None:
        """``key_id``'s release policy; None when it has none (or the key id is unknown)."""
        with self._lock:
            row = (
                self._conn_open()
                .execute("SELECT accept, allow_dev, max_age_s FROM policies WHERE key_id = ?", (key_id,))
                .fetchone()
            )
        return _policy_of(row) if row is not None else None

    # -- listings

    def key(self, key_id: str) -> KmsKey:
        _key_id(key_id)
        with self._lock:
            row = self._conn_open().execute(_SELECT + " WHERE k.key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"unknown key id {key_id!r}")
        return _kms_key_of(row)

    def list_keys(self) -> list[KmsKey]:
        with self._lock:
            rows = self._conn_open().execute(_SELECT + " ORDER BY k.key_id").fetchall()
        return [_kms_key_of(r) for r in rows]


_SELECT = (
    "SELECT k.key_id, k.check_value, k.source, k.created_at, p.accept, p.allow_dev, p.max_age_s,"
    " p.updated_at AS policy_updated_at FROM master_keys k LEFT JOIN policies p ON p.key_id = k.key_id"
)


def _policy_of(row: sqlite3.Row) -> ReleasePolicy:
    accept = tuple(dict(m) for m in json.loads(row["accept"]))
    return ReleasePolicy(accept, bool(row["allow_dev"]), float(row["max_age_s"]))


def _kms_key_of(row: sqlite3.Row) -> KmsKey:
    policy = _policy_of(row) if row["accept"] is not None else None
    return KmsKey(row["key_id"], row["check_value"], row["source"], row["created_at"], policy, row["policy_updated_at"])
