"""Per-tenant rate limits (token bucket) and query budgets (quotas).

Rates are enforced in process: a token bucket per tenant on the event-loop thread,
so concurrent requests are counted exactly (the loop serialises them). With
``--workers N`` each worker holds ``rate/N`` and ``burst/N`` (the kernel spreads
connections evenly over the workers). Several replicas share one bucket per tenant
through a ``RateStore`` (``guard.redis_state``: Redis); ``admit`` then takes a separate
path, so the embedded one below costs exactly what it did.

Budgets must hold across workers and restarts, because model extraction is paid in
queries: they are counted in a ``UsageLedger`` (SQLite by default, beside the key
store). A worker *leases* a block of queries from the ledger in one transaction and
spends it locally, so the ledger sees one write per block, not per request; two
workers can never spend the same query, and the ledger can never grant more than
the budget. Unspent leases go back on a clean stop; a killed worker's unspent lease
is lost, which errs on the side of refusing (never of over-serving).
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NoReturn, Protocol

from bastion.core.errors import RateLimited
from bastion.guard.principal import Limits, Principal


class QuotaExhausted(RateLimited):
    """The tenant's query budget for the period is spent (429, like a rate limit)."""


class UsageLedger(Protocol):
    """Shared query counts per (tenant, period). Must be atomic across processes."""

    def reserve(self, tenant: str, period: str, wanted: int, budget: int) -> int:
        """Add up to ``wanted`` to the count without passing ``budget``; return how many."""
        ...

    def release(self, tenant: str, period: str, unused: int) -> None:
        """Give back the unspent part of a reservation."""
        ...

    def used(self, tenant: str, period: str) -> int: ...


class RateStore(Protocol):
    """Token buckets shared by several processes (``guard.redis_state.RedisRates``)."""

    # when the store is unreachable and fails open, each process keeps rate / (replicas *
    # workers) locally
    replicas: int

    def take(self, tenant: str, limits: Limits) -> float | None:
        """Spend one token of ``tenant``'s shared bucket: 0.0 when spent, the seconds until
        one may be when refused, None when the store is unreachable and the caller must
        decide locally (fail open); raises ``ServiceUnavailable`` (503) when it fails closed."""
        ...


class MemoryLedger:
    """A ledger for one process (tests, or serving without a key store)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def reserve(self, tenant: str, period: str, wanted: int, budget: int) -> int:
        with self._lock:
            used = self._counts.get((tenant, period), 0)
            granted = max(0, min(wanted, budget - used))
            self._counts[tenant, period] = used + granted
            return granted

    def release(self, tenant: str, period: str, unused: int) -> None:
        with self._lock:
            key = (tenant, period)
            self._counts[key] = max(0, self._counts.get(key, 0) - unused)

    def used(self, tenant: str, period: str) -> int:
        return self._counts.get((tenant, period), 0)


class SqliteLedger:
    """Query counts in a table of the key store's SQLite file, shared by every worker."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._db = connect()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS usage (tenant TEXT NOT NULL, period TEXT NOT NULL, "
            "used INTEGER NOT NULL, PRIMARY KEY (tenant, period))"
        )
        self._db.commit()
        self._lock = threading.Lock()

    def reserve(self, tenant: str, period: str, wanted: int, budget: int) -> int:
        with self._lock:
            db = self._db
            # IMMEDIATE takes the write lock before reading, so two workers cannot both
            # read the same count and both grant from it
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT used FROM usage WHERE tenant = ? AND period = ?", (tenant, period)).fetchone()
                used = row[0] if row else 0
                granted = max(0, min(wanted, budget - used))
                if granted:
                    db.execute(
                        "INSERT INTO usage (tenant, period, used) VALUES (?, ?, ?) "
                        "ON CONFLICT (tenant, period) DO UPDATE SET used = used + excluded.used",
                        (tenant, period, granted),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return granted

    def release(self, tenant: str, period: str, unused: int) -> None:
        if unused <= 0:
            return
        with self._lock:
            self._db.execute(
                "UPDATE usage SET used = MAX(0, used - ?) WHERE tenant = ? AND period = ?", (unused, tenant, period)
            )
            self._db.commit()

    def used(self, tenant: str, period: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT used FROM usage WHERE tenant = ? AND period = ?", (tenant, period)
            ).fetchone()
        return row[0] if row else 0

    def close(self) -> None:
        self._db.close()


def period_key(limits: Limits, now: float) -> str:
    if limits.quota_period == "total":
        return "total"
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def seconds_to_next_period(limits: Limits, now: float) -> float | None:
    if limits.quota_period == "total":
        return None
    t = datetime.fromtimestamp(now, UTC)
    midnight = datetime(t.year, t.month, t.day, tzinfo=UTC) + timedelta(days=1)
    return (midnight - t).total_seconds()


@dataclass(slots=True)
class _Bucket:
    rate: float
    capacity: float
    tokens: float
    stamp: float
    # the Limits that rate and capacity were derived from: while a tenant's Limits object
    # is the same (until the key store reloads), they are not derived again per request
    limits: Limits | None = None


@dataclass(slots=True)
class _Lease:
    period: str
    left: int  # queries reserved in the ledger and not yet spent
    exhausted: bool = False


class Limiter:
    """Admits or refuses one request of a principal (event-loop thread)."""

    def __init__(
        self,
        ledger: UsageLedger | None = None,
        *,
        workers: int = 1,
        lease_block: int = 256,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rates: RateStore | None = None,
    ) -> None:
        self._ledger: UsageLedger = ledger if ledger is not None else MemoryLedger()
        self._share = 1.0 / max(1, workers)
        self._lease_block = lease_block
        self._clock = clock
        self._wall = wall
        self._buckets: dict[str, _Bucket] = {}
        self._leases: dict[str, _Lease] = {}
        self._overrides: dict[str, Limits] = {}
        # the current UTC day and when it ends: formatting a date per request costs ~1.5 µs
        self._day = ""
        self._day_ends = 0.0
        self._rates = rates
        if rates is not None:
            # a method of its own, bound per instance, so that the embedded ``admit`` (no
            # shared store) keeps its hand-inlined path without even a branch more
            self.admit = self._admit_shared  # type: ignore[method-assign]
            self._fallback_buckets: dict[str, _Bucket] = {}
            self._fallback_share = self._share / max(1, rates.replicas)

    def override(self, tenant: str, limits: Limits) -> None:
        """Replace ``tenant``'s rate (e.g. throttled by the extraction monitor) in this process."""
        self._overrides[tenant] = limits

    def overridden(self, tenant: str) -> bool:
        return bool(self._overrides) and tenant in self._overrides

    def admit(self, principal: Principal) -> None:
        """Spend one token and one query of the principal's tenant, or raise 429.

        Runs on every admitted request: the common case (a bucket with tokens, a lease with
        queries left) is written out here rather than in helper calls."""
        limits = principal.limits
        tenant = principal.tenant
        if self._overrides:
            over = self._overrides.get(tenant)
            if over is not None:
                limits = Limits(over.rate_per_s, over.burst, limits.quota, limits.quota_period)
        if limits.rate_per_s is not None:
            bucket = self._buckets.get(tenant)
            if bucket is None or bucket.limits is not limits:
                bucket = self._bucket(tenant, limits)
            now = self._clock()
            tokens = bucket.tokens + (now - bucket.stamp) * bucket.rate
            if tokens > bucket.capacity:
                tokens = bucket.capacity
            bucket.stamp = now
            if tokens < 1.0:
                bucket.tokens = tokens
                self._refuse_rate(tenant, limits, bucket, tokens)
            bucket.tokens = tokens - 1.0
        if limits.quota is not None:
            if limits.quota_period == "total":
                period = "total"
            else:
                now = self._wall()
                if now >= self._day_ends:
                    self._new_day(limits, now)
                period = self._day
            lease = self._leases.get(tenant)
            if lease is None or lease.period != period or lease.left <= 0:
                lease = self._lease(tenant, limits, period)
            lease.left -= 1

    def _admit_shared(self, principal: Principal) -> None:
        """``admit`` with a shared ``RateStore``: the tenant's bucket is the store's; an
        override (the monitor's throttle) stays in this process, as without a store; when
        the store fails open the rate is ``rate / (replicas * workers)`` here."""
        limits = principal.limits
        tenant = principal.tenant
        over = self._overrides.get(tenant) if self._overrides else None
        if over is not None:
            limits = Limits(over.rate_per_s, over.burst, limits.quota, limits.quota_period)
            if limits.rate_per_s is not None:
                self._take_local(tenant, limits, self._buckets, self._share)
        elif limits.rate_per_s is not None:
            wait = self._rates.take(tenant, limits)  # type: ignore[union-attr]
            if wait is None:
                self._take_local(tenant, limits, self._fallback_buckets, self._fallback_share)
            elif wait > 0.0:
                raise RateLimited(
                    f"rate limit exceeded for tenant '{tenant}' ({_fmt_rate(limits)}); retry after {wait:.3g} s",
                    retry_after=wait,
                )
        if limits.quota is not None:
            self._spend_query(tenant, limits)

    def _spend_query(self, tenant: str, limits: Limits) -> None:
        """One query of the tenant's budget from this process's lease (what ``admit``
        writes out inline: the shared path pays a round trip now and then anyway)."""
        if limits.quota_period == "total":
            period = "total"
        else:
            now = self._wall()
            if now >= self._day_ends:
                self._new_day(limits, now)
            period = self._day
        lease = self._leases.get(tenant)
        if lease is None or lease.period != period or lease.left <= 0:
            lease = self._lease(tenant, limits, period)
        lease.left -= 1

    def _take_local(self, tenant: str, limits: Limits, buckets: dict[str, _Bucket], share: float) -> None:
        """One token of a bucket of this process (what ``admit`` does inline)."""
        bucket = buckets.get(tenant)
        if bucket is None or bucket.limits is not limits:
            bucket = self._bucket(tenant, limits, buckets, share)
        now = self._clock()
        tokens = min(bucket.capacity, bucket.tokens + (now - bucket.stamp) * bucket.rate)
        bucket.stamp = now
        if tokens < 1.0:
            bucket.tokens = tokens
            self._refuse_rate(tenant, limits, bucket, tokens)
        bucket.tokens = tokens - 1.0

    def _bucket(
        self, tenant: str, limits: Limits, buckets: dict[str, _Bucket] | None = None, share: float | None = None
    ) -> _Bucket:
        """The tenant's bucket for ``limits``: created full, or resized when the operator
        changed the limits (the tokens clamped to the new capacity)."""
        if buckets is None:
            buckets = self._buckets
        if share is None:
            share = self._share
        rate = limits.rate_per_s * share  # type: ignore[operator]
        burst = limits.burst if limits.burst is not None else max(1, math.ceil(limits.rate_per_s))  # type: ignore[arg-type]
        capacity = max(1.0, burst * share)
        bucket = buckets.get(tenant)
        if bucket is None:
            bucket = buckets[tenant] = _Bucket(rate, capacity, capacity, self._clock())
        elif bucket.rate != rate or bucket.capacity != capacity:
            bucket.rate, bucket.capacity = rate, capacity
            bucket.tokens = min(bucket.tokens, capacity)
        bucket.limits = limits
        return bucket

    @staticmethod
    def _refuse_rate(tenant: str, limits: Limits, bucket: _Bucket, tokens: float) -> NoReturn:
        wait = (1.0 - tokens) / bucket.rate if bucket.rate > 0 else 3600.0
        raise RateLimited(
            f"rate limit exceeded for tenant '{tenant}' ({_fmt_rate(limits)}); retry after {wait:.3g} s",
            retry_after=wait,
        )

    def _new_day(self, limits: Limits, now: float) -> None:
        self._day = period_key(limits, now)
        self._day_ends = now + (seconds_to_next_period(limits, now) or 0.0)

    def _lease(self, tenant: str, limits: Limits, period: str) -> _Lease:
        """A lease with a query left for ``period``: the old period's unspent queries go
        back, an empty lease is refilled from the ledger; 429 when the budget is spent."""
        lease = self._leases.get(tenant)
        if lease is None or lease.period != period:
            if lease is not None:
                self._ledger.release(tenant, lease.period, lease.left)
            lease = self._leases[tenant] = _Lease(period, 0)
        if lease.left <= 0:
            budget: int = limits.quota  # type: ignore[assignment]
            # small budgets are leased one query at a time so that none is stranded in a worker
            block = max(1, min(self._lease_block, budget // 1000))
            lease.left = self._ledger.reserve(tenant, period, block, budget)
            if lease.left <= 0:
                reset = seconds_to_next_period(limits, self._wall())
                when = "it resets at 00:00 UTC" if reset is not None else "it does not reset"
                raise QuotaExhausted(
                    f"query quota exhausted for tenant '{tenant}': {limits.quota} per "
                    f"{limits.quota_period}; {when}",
                    retry_after=reset,
                )
        return lease

    def close(self) -> None:
        """Return unspent leases to the ledger (clean shutdown)."""
        for tenant, lease in self._leases.items():
            if lease.left > 0:
                self._ledger.release(tenant, lease.period, lease.left)
                lease.left = 0
        if self._rates is not None:
            self._rates.close()


def _fmt_rate(limits: Limits) -> str:
    burst = f", burst {limits.burst}" if limits.burst is not None else ""
    return f"{limits.rate_per_s:g} requests/s{burst}"
