"""Tenants and API keys in one SQLite file, and the authenticator the server calls.

The hot path, the administration and the rules on names and limits are shared with the
PostgreSQL store (``keystore_base``, ``keystore_model``); this module holds what is SQLite.

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

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bastion.guard.keystore_base import EMPTY_MAPS, RELOAD_SELECT, KeyStoreBase, build_maps
from bastion.guard.keystore_model import (
    KeyStoreError,
    KeyStoreMissing,
    Row,
)
from bastion.guard.secrets import derive_key

log = logging.getLogger("bastion.guard.keystore")

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000

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




class KeyStore(KeyStoreBase):
    """Tenants and API keys in SQLite; ``authenticate`` implements ``guard.principal.Authenticator``.

    Thread-safe. ``authenticate`` never waits on the database lock: when another thread
    holds it, the current snapshot serves and the check happens on a later call.
    """

    def __init__(self, path: Path | str, *, secret_file: Path | str | None = None, create: bool = True,
                 refresh_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self._name = str(self.path)
        self.secret_file = Path(secret_file) if secret_file is not None else Path(str(self.path) + ".secret")
        self.refresh_interval_s = refresh_interval_s
        self._lock = threading.RLock()
        self._maps = EMPTY_MAPS
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

    def _meta_get(self, key: str) -> Any:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row is not None else None

    def _meta_put_if_absent(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))

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

    # -- reading ---------------------------------------------------------------------

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
                rows = conn.execute(RELOAD_SELECT.format(order=self._order)).fetchall()
            finally:
                conn.execute("COMMIT")
            maps = build_maps(rows)
            self._maps = maps
            self._generation = generation
            log.debug("key store %s: loaded %d live keys (generation %s)", self.path,
                      len(maps.by_hash) + len(maps.by_cert), generation)

    def _fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        with self._lock:
            return self._conn.execute(sql, args).fetchone()  # type: ignore[no-any-return]

    def _fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- administration (the operations themselves: keystore_base) -------------------

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
            self._reload()
