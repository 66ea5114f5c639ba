"""Tenants and API keys in PostgreSQL, shared by every replica of a deployment.

The same store as ``keystore.KeyStore`` (same API, same hot path, same rules: see
``keystore_base``), with rows in a PostgreSQL schema (default ``bastion``) instead of a
file. The master secret stays a file on each replica (``secret_file``, required): the
database holds only the HMACs and a check value, so a replica given the wrong secret
refuses to start, and a copy of the database alone is worth nothing.

Propagation. Every change bumps ``meta.generation`` and sends ``NOTIFY`` on the schema's
channel in the same transaction (PostgreSQL delivers it at commit). Each store runs a
daemon thread with a connection of its own that LISTENs: a notification, or every
``refresh_interval_s`` without one (the fallback, should a notification be lost),
it compares the generation and reloads the snapshot when it moved. ``authenticate``
never touches the database: it reads the snapshot only.

Outages. While the database is unreachable the last snapshot keeps serving; the watcher
reconnects with backoff (capped at ``_BACKOFF_MAX_S``) and reloads at once when back, so
changes made meanwhile by other replicas arrive. Administrative calls during an outage
raise ``KeyStoreError`` saying so; the first call after a restart reconnects by itself.

Migrations run under a transaction-level advisory lock, so replicas starting together
apply each version once (``schema_history`` records who did); a schema newer than this
Bastion is refused.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from bastion.core.errors import InvalidInput
from bastion.guard.keystore_base import EMPTY_MAPS, RELOAD_SELECT, KeyStoreBase, Maps, build_maps
from bastion.guard.keystore_model import KeyStoreError, KeyStoreMissing, Row
from bastion.guard.pg_url import check_pg_url, connect_params, one_line, redact_pg_url
from bastion.guard.secrets import derive_key

log = logging.getLogger("bastion.guard.keystore")

PG_SCHEMA_VERSION = 1
DEFAULT_SCHEMA = "bastion"
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,47}")
# the watcher wakes this often at most to notice close(); notifications wake it at once
_WAKE_S = 0.25
_BACKOFF_MIN_S = 0.1
# capped low: a replica that lost the database must be back on the channel about a second
# after the database is, or revocations made right then would wait for it
_BACKOFF_MAX_S = 1.0

T = TypeVar("T")

# Each entry moves the schema from version i to i + 1, in one transaction with the rows of
# schema_history and meta. ``seq`` keeps creation order, as SQLite's rowid does.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tenants (
            seq bigint GENERATED ALWAYS AS IDENTITY,
            name text PRIMARY KEY,
            rate_per_s double precision,
            burst bigint,
            quota bigint,
            quota_period text NOT NULL DEFAULT 'day' CHECK (quota_period IN ('day', 'total')),
            defense_class text NOT NULL DEFAULT 'default',
            created_at text NOT NULL
        )""",
        """CREATE TABLE keys (
            seq bigint GENERATED ALWAYS AS IDENTITY,
            key_id text PRIMARY KEY,
            tenant text NOT NULL REFERENCES tenants(name),
            role text NOT NULL CHECK (role IN ('infer', 'admin')),
            models text,
            hash bytea UNIQUE,
            cert_fingerprint text,
            description text NOT NULL DEFAULT '',
            created_at text NOT NULL,
            revoked_at text,
            CHECK (hash IS NOT NULL OR cert_fingerprint IS NOT NULL)
        )""",
        # unique among live credentials only: a revoked certificate may be registered again
        """CREATE UNIQUE INDEX keys_live_cert ON keys(cert_fingerprint)
            WHERE cert_fingerprint IS NOT NULL AND revoked_at IS NULL""",
        "CREATE INDEX keys_tenant ON keys(tenant)",
        "INSERT INTO meta(key, value) VALUES ('generation', '0')",
    ),
)

_GENERATION = "SELECT value::bigint AS generation FROM meta WHERE key = 'generation'"


class _Dialect:
    """What ``_write`` yields: the shared SQL's ``?`` placeholders as psycopg's ``%s``
    (the shared statements hold no other ``?`` or ``%``)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, query: str, args: Sequence[Any] = ()) -> Any:
        return self._conn.execute(query.replace("?", "%s"), args)  # type: ignore[call-overload]


class PgKeyStore(KeyStoreBase):
    """Tenants and API keys in PostgreSQL; ``authenticate`` implements
    ``guard.principal.Authenticator`` and never waits on the database.

    ``watch=False`` starts no listener (one-shot tools such as ``bastion keys``): the
    snapshot then changes only with this instance's own writes and ``refresh()``.
    """

    _order = "seq"

    def __init__(self, url: str, *, secret_file: Path | str | None, create: bool = True,
                 refresh_interval_s: float = 1.0, schema: str = DEFAULT_SCHEMA, watch: bool = True) -> None:
        self._url = check_pg_url(url)
        if not _SCHEMA_RE.fullmatch(schema):
            raise KeyStoreError(f"schema: expected 1-48 characters of a-z 0-9 _ (not starting with a digit), "
                                f"got {schema!r}")
        self.schema = schema
        self._name = redact_pg_url(self._url) + ("" if schema == DEFAULT_SCHEMA else f" (schema {schema})")
        if secret_file is None:
            raise KeyStoreError(f"key store {self._name} needs a master secret file (--secret-file): the secret "
                                "stays a file on each replica, never in the database")
        self.secret_file = Path(secret_file)
        self.refresh_interval_s = refresh_interval_s
        self._params = connect_params(self._url, f"bastion-keystore-{os.getpid()}")
        self._channel = f"bastion_keys_{schema}"
        self._lock = threading.RLock()  # the main connection (administration, reloads after writes)
        self._load_lock = threading.Lock()  # one reload at a time: a late, older read never wins
        self._maps = EMPTY_MAPS
        self._generation: int | None = None
        # the hot path never checks: the watcher thread keeps the snapshot current
        self._next_check = math.inf
        self._closed = False
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._conn: psycopg.Connection[Row] | None = None
        self._retry_at = 0.0
        self._backoff = _BACKOFF_MIN_S
        self._last_error = ""
        self._watcher: threading.Thread | None = None
        try:
            self._migrate(create)
            self.master_secret = self._load_master_secret(create)
            self._hash_key = derive_key(self.master_secret, "api-key-hash")
            self._run(self._load)
        except BaseException:
            self.close()
            raise
        if watch:
            self._watcher = threading.Thread(target=self._watch, name="bastion-keystore-listen", daemon=True)
            self._watcher.start()

    # -- connections -----------------------------------------------------------------

    def connect(self, *, row_factory: Any = None) -> psycopg.Connection[Any]:
        """A new autocommit connection to the store's database with ``search_path`` on its
        schema, for other tables of the guard (``ledger_pg.PgLedger``)."""
        kwargs: dict[str, Any] = {"autocommit": True, **self._params}
        if row_factory is not None:
            kwargs["row_factory"] = row_factory
        conn = psycopg.connect(self._url, **kwargs)
        try:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        except BaseException:
            conn.close()
            raise
        return conn

    def _main(self) -> psycopg.Connection[Row]:
        """The main connection, reconnected when lost (not more often than the backoff)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        now = time.monotonic()
        if now < self._retry_at:
            raise KeyStoreError(f"cannot connect to key store {self._name} ({self._last_error}); "
                                f"retrying in {self._retry_at - now:.1f} s; running servers keep "
                                "verifying keys from their last snapshot")
        try:
            self._conn = self.connect(row_factory=dict_row)
        except psycopg.Error as err:
            self._last_error = one_line(err)
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
            raise KeyStoreError(f"cannot connect to key store {self._name}: {self._last_error} (running "
                                "servers keep verifying keys from their last snapshot)") from None
        self._backoff = _BACKOFF_MIN_S
        return self._conn

    def _unreachable(self, err: BaseException) -> KeyStoreError:
        return KeyStoreError(f"key store {self._name} is unreachable: {one_line(err)} (running servers keep "
                             "verifying keys from their last snapshot; retry when the database is back)")

    def _run(self, fn: Callable[[psycopg.Connection[Row]], T]) -> T:
        """``fn(main connection)``; once more on a fresh connection when the first attempt
        finds it dead (the server restarted since its last use: nothing was done on it)."""
        with self._lock:
            if self._closed:
                raise KeyStoreError(f"key store {self._name} is closed")
            for attempt in (1, 2):
                conn = self._main()
                try:
                    return fn(conn)
                except psycopg.OperationalError as err:
                    if attempt == 1 and conn.closed:
                        continue
                    raise self._unreachable(err) from None
                except psycopg.Error as err:
                    _rollback(conn)
                    raise KeyStoreError(f"key store {self._name}: {one_line(err)}") from None
            raise AssertionError("unreachable")

    # -- opening ---------------------------------------------------------------------

    def _migrate(self, create: bool) -> None:
        self._run(lambda conn: self._migrate_on(conn, create))

    def _migrate_on(self, conn: psycopg.Connection[Row], create: bool) -> None:
        conn.execute("BEGIN")
        try:
            # every replica of this schema queues here; the lock ends with the transaction
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"bastion-keystore:{self.schema}",))
            found = conn.execute("SELECT to_regclass('meta') IS NOT NULL AS found").fetchone()
            if not found or not found["found"]:
                if not create:
                    raise KeyStoreMissing(
                        f"key store {self._name} has no Bastion tables; create it with `bastion keys create "
                        f"--keys URL --secret-file FILE --tenant NAME`")
                if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)).fetchone() is None:
                    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
                conn.execute("CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)")
                conn.execute("CREATE TABLE schema_history (version integer PRIMARY KEY, "
                             "applied_at timestamptz NOT NULL DEFAULT now(), applied_by text NOT NULL)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row["value"]) if row else 0
            if version > PG_SCHEMA_VERSION:
                raise KeyStoreError(f"key store {self._name} has schema version {version}; this Bastion "
                                    f"understands up to {PG_SCHEMA_VERSION} (upgrade Bastion)")
            for number, statements in enumerate(_MIGRATIONS[version:], start=version + 1):
                for statement in statements:
                    conn.execute(statement)  # type: ignore[call-overload]
                # a plain INSERT: a second migration of the same version fails loudly
                conn.execute("INSERT INTO schema_history(version, applied_by) VALUES (%s, %s)",
                             (number, str(self._params.get("application_name", ""))))
            if version < PG_SCHEMA_VERSION:
                conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', %s) ON CONFLICT (key) "
                             "DO UPDATE SET value = excluded.value", (str(PG_SCHEMA_VERSION),))
                log.info("key store %s: schema migrated from version %d to %d", self._name, version,
                         PG_SCHEMA_VERSION)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _meta_get(self, key: str) -> Any:
        row = self._run(lambda c: c.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone())
        return row["value"] if row is not None else None

    def _meta_put_if_absent(self, key: str, value: str) -> None:
        self._run(lambda c: c.execute("INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                                      (key, value)))

    def close(self) -> None:
        self._stop.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(_WAKE_S * 4 + 1)
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()

    def __enter__(self) -> PgKeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------

    @property
    def generation(self) -> int | None:
        """The generation of the snapshot being served."""
        return self._generation

    @property
    def listening(self) -> bool:
        """The watcher is connected and LISTENing (False during an outage)."""
        return self._listening.is_set()

    def _maybe_refresh(self, now: float) -> None:
        # the watcher thread refreshes; authenticate must never wait on the network
        self._next_check = math.inf

    def refresh(self) -> None:
        """Reload now from the database (not needed for correctness: the watcher does it);
        on failure the snapshot keeps serving."""
        try:
            self._run(self._load)
        except KeyStoreError as err:
            log.warning("key store %s: reload failed, serving the previous keys: %s", self._name, err)

    def _load(self, conn: psycopg.Connection[Row]) -> None:
        """Read generation and rows in one snapshot and serve them (one reload at a time,
        so that of two concurrent reloads the later read is installed last)."""
        with self._load_lock:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                row = conn.execute(_GENERATION).fetchone()
                rows = conn.execute(RELOAD_SELECT.format(order=self._order)).fetchall()  # type: ignore[call-overload]
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            generation = int(row["generation"]) if row else 0
            if generation == self._generation:
                return  # same rows: keep the snapshot and its cache of verified tokens
            maps: Maps = build_maps(rows)
            self._maps = maps
            self._generation = generation
            log.debug("key store %s: loaded %d live keys (generation %s)", self._name,
                      len(maps.by_hash) + len(maps.by_cert), generation)

    def _fetchone(self, query: str, args: Sequence[Any] = ()) -> Row | None:
        return self._run(lambda c: c.execute(query.replace("?", "%s"), args).fetchone())  # type: ignore[call-overload]

    def _fetchall(self, query: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._run(lambda c: c.execute(query.replace("?", "%s"), args).fetchall())  # type: ignore[call-overload]

    def _watch(self) -> None:
        """The listener: reconnect with backoff, LISTEN, reload, then wait for
        notifications and poll the generation every ``refresh_interval_s``."""
        delay = _BACKOFF_MIN_S
        lost_since: float | None = None
        while not self._stop.is_set():
            conn: psycopg.Connection[Row] | None = None
            try:
                conn = self.connect(row_factory=dict_row)
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                # LISTEN before the reload: a change committed in between is then both in
                # the rows read and in a notification, never in neither
                self._load(conn)
                self._listening.set()
                if lost_since is not None:
                    log.warning("key store %s: database reachable again after %.1f s; keys reloaded",
                                self._name, time.monotonic() - lost_since)
                    lost_since = None
                delay = _BACKOFF_MIN_S
                next_poll = time.monotonic() + self.refresh_interval_s
                while not self._stop.is_set():
                    notified = any(True for _ in conn.notifies(timeout=_WAKE_S, stop_after=1))
                    now = time.monotonic()
                    if notified or now >= next_poll:
                        next_poll = now + self.refresh_interval_s
                        row = conn.execute(_GENERATION).fetchone()
                        if row is not None and int(row["generation"]) != self._generation:
                            self._load(conn)
            except Exception as err:  # any error: the thread must outlive it
                if not self._stop.is_set() and lost_since is None:
                    lost_since = time.monotonic()
                    log.warning("key store %s: lost the database (%s); serving the last snapshot and "
                                "reconnecting", self._name, one_line(err))
            finally:
                self._listening.clear()
                if conn is not None:
                    conn.close()
            # jitter: replicas that lost the database together do not reconnect in lockstep
            self._stop.wait(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, _BACKOFF_MAX_S)

    # -- administration (the operations themselves: keystore_base) -------------------

    @contextmanager
    def _write(self) -> Iterator[_Dialect]:
        """One transaction that bumps the generation and notifies every replica at commit;
        this instance reloads right after it."""
        with self._lock:
            conn, generation = self._run(_begin_write)
            try:
                yield _Dialect(conn)
                conn.execute("SELECT pg_notify(%s, %s)", (self._channel, str(generation)))
                conn.execute("COMMIT")
            except BaseException as err:
                _rollback(conn)
                if isinstance(err, psycopg.errors.UniqueViolation):
                    # two admins registering the same certificate at once (the check in
                    # create_key ran before the other's commit)
                    raise InvalidInput("that client certificate is already registered to a live key; "
                                       "revoke that key first") from None
                if isinstance(err, psycopg.OperationalError):
                    raise self._unreachable(err) from None
                if isinstance(err, psycopg.Error):
                    raise KeyStoreError(f"key store {self._name}: {one_line(err)}") from None
                raise
            try:
                self._load(conn)
            except psycopg.Error as err:
                # committed; the watcher reloads when it can
                log.warning("key store %s: reload after a change failed: %s", self._name, one_line(err))


def _begin_write(conn: psycopg.Connection[Row]) -> tuple[psycopg.Connection[Row], int]:
    conn.execute("BEGIN")
    # first statement: the generation row's lock orders writers of every replica, as
    # SQLite's BEGIN IMMEDIATE does for processes sharing the file
    row = conn.execute("UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'generation'"
                       " RETURNING value::bigint AS generation").fetchone()
    if row is None:
        _rollback(conn)
        raise KeyStoreError("key store meta table has no generation row")
    return conn, int(row["generation"])


def _rollback(conn: psycopg.Connection[Any]) -> None:
    if conn.closed:
        return
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
    except psycopg.Error:
        pass  # the connection is gone: the server rolled back
