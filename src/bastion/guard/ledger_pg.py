"""Query budgets (``limits.UsageLedger``) in PostgreSQL, for deployments that run
PostgreSQL for the key store and no Redis: one table ``usage`` in the key store's schema.

``reserve`` is one statement: an upsert whose update applies only while the count is under
the budget and grants ``min(wanted, budget - used)``. The row lock of the upsert orders
concurrent replicas, so the sum of grants never passes the budget. ``last_grant`` exists
only so that RETURNING can say how much this statement granted (RETURNING sees the new
row, not the old count).

A replica that cannot reach the database refuses the quota-limited request (an error, not
a grant): quotas exist to bound model extraction, so the ledger errs on the side of
refusing. After a failure it does not try again for a short backoff, so that the event
loop calling it does not wait a connection timeout on every request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bastion.core.errors import Overloaded
from bastion.guard.pg_url import one_line

_BACKOFF_S = 1.0

_CREATE = ("CREATE TABLE IF NOT EXISTS usage (tenant text NOT NULL, period text NOT NULL, "
           "used bigint NOT NULL, last_grant bigint NOT NULL DEFAULT 0, PRIMARY KEY (tenant, period))")
_RESERVE = (
    "INSERT INTO usage AS u (tenant, period, used, last_grant) VALUES (%(t)s, %(p)s, LEAST(%(w)s, %(b)s),"
    " LEAST(%(w)s, %(b)s))"
    " ON CONFLICT (tenant, period) DO UPDATE SET used = u.used + LEAST(%(w)s, %(b)s - u.used),"
    " last_grant = LEAST(%(w)s, %(b)s - u.used)"
    " WHERE u.used < %(b)s"
    " RETURNING u.last_grant"
)


class LedgerUnavailable(Overloaded):
    """The ledger's database is unreachable: the request is refused (503), not granted."""


class PgLedger:
    """``UsageLedger`` over a connection from ``connect`` (e.g. ``PgKeyStore.connect``)."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._retry_at = 0.0
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                # replicas starting together: CREATE TABLE IF NOT EXISTS alone can still
                # collide in the catalog, the advisory lock orders them
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('bastion-ledger:' || current_schema()))")
                conn.execute(_CREATE)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if time.monotonic() < self._retry_at:
            raise LedgerUnavailable("quota ledger unreachable (PostgreSQL); retrying shortly")
        try:
            self._conn = self._connect()
        except psycopg.Error as err:
            self._retry_at = time.monotonic() + _BACKOFF_S
            raise LedgerUnavailable(f"quota ledger unreachable (PostgreSQL): {one_line(err)}") from None
        return self._conn

    def _run(self, query: str, args: dict[str, Any] | tuple[Any, ...]) -> Any:
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    return conn.execute(query, args).fetchone()  # type: ignore[call-overload]
                except psycopg.OperationalError as err:
                    # a connection left from before a server restart: once more on a new one
                    if attempt == 1 and conn.closed:
                        continue
                    self._retry_at = time.monotonic() + _BACKOFF_S
                    raise LedgerUnavailable(f"quota ledger unreachable (PostgreSQL): {one_line(err)}") from None
        raise AssertionError("unreachable")

    def reserve(self, tenant: str, period: str, wanted: int, budget: int) -> int:
        if wanted <= 0 or budget <= 0:
            return 0
        row = self._run(_RESERVE, {"t": tenant, "p": period, "w": wanted, "b": budget})
        return int(row[0]) if row is not None else 0

    def release(self, tenant: str, period: str, unused: int) -> None:
        if unused <= 0:
            return
        self._run("UPDATE usage SET used = GREATEST(0, used - %s) WHERE tenant = %s AND period = %s"
                  " RETURNING used", (unused, tenant, period))

    def used(self, tenant: str, period: str) -> int:
        row = self._run("SELECT used FROM usage WHERE tenant = %s AND period = %s", (tenant, period))
        return int(row[0]) if row is not None else 0

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
