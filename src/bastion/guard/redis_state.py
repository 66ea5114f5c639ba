"""Rate limits and query budgets shared by several server replicas through Redis.

``shared_limits_from_url(url, fail=..., replicas=..., workers=...)`` returns a
``RedisLedger`` (the ``UsageLedger`` of ``guard.limits``: query budgets) and a
``RedisRates`` (its ``RateStore``: token buckets) over one connection pool, to be given to
``Limiter(ledger, workers=..., rates=rates)`` in every worker of every replica.

Budgets: ``reserve`` / ``release`` are one Lua script each, so the count is checked and
raised atomically on the server: however many processes reserve at once, the grants
never add up to more than the budget. The ``Limiter`` leases blocks of queries as it does
from SQLite, so a budget costs one round trip per block. Keys:
``{prefix}:quota:{tenant}:{period}``; a daily key expires one day after its day ends.

Rates: one token bucket per tenant in Redis (``{prefix}:rate:{tenant}``), refilled by a
Lua script from the Redis server's clock (``TIME``), so the replicas' clocks do not
matter. A round trip per request would cost the event loop ~170 µs, so each process
*leases* a block of tokens (``rate * block_s`` of them, 10 ms worth by default, at most
half the burst) and spends it locally; a lease is good for ``lease_ttl_s`` (0.1 s), after
which its unspent tokens go back to the bucket with the next request's round trip. A
refusal is cached locally until the bucket can have a block again, so a flood of refused
requests does not become a flood of round trips. Tokens are only ever taken from the
shared bucket, so the replicas together never admit more than ``rate * t + burst`` in
``t`` seconds; what a lease strands (at most one block per process) errs on refusing.
Round trips per tenant and process: at most ~1/``block_s`` per second under saturation.

Measured cost per admitted request (``Limiter.admit`` in a loop in one process, rate and
burst 1e9 so nothing is refused, the block forced to the size shown; redis-server 7.0 on
loopback; 2 slow, shared cores, so ±30 %):

- embedded limiter (no store): 0.3-0.5 µs;
- shared store, block 1000 (the lease almost always has tokens): 0.5-0.6 µs;
- one ``take`` script round trip (redis-py + Lua): 160-180 µs; so per request about
  0.5 µs + RTT / block: 2-3 µs at a block of 100 (rate 10 000/s), 17-27 µs at a block
  of 10 (1 000/s), the whole round trip (~170 µs) at a block of 1 (below 100/s, where
  it is at most ~100 round trips a second: ~2 % of a core);
- a request refused while the shared bucket is known empty: local, no round trip.

Failure: every call has short socket timeouts (50 ms by default) and no client retries;
after a failure a circuit breaker keeps the process away from Redis for a backoff (0.25 s
doubling to 5 s) and then tries again with the next request; the first success closes it,
leases are taken afresh and the budget spent meanwhile is written back with the next
reservation. What a request gets while Redis is unreachable is the operator's choice:

- ``fail="closed"``: every request that needs a limit is refused with
  ``ServiceUnavailable`` (503, ``Retry-After`` the breaker's backoff, at least 1 s) once
  its lease is spent. Guarantees stay exact: nothing is admitted that Redis did not grant.
- ``fail="open"``: each process decides alone. Rates: a local bucket of
  ``rate / (replicas * workers)`` (and that share of the burst), so the fleet keeps about
  the configured rate if the traffic is spread evenly, more when it is not (no process
  knows what the others admit). Budgets: a process grants at most
  ``(budget - c) / (replicas * workers)`` queries per tenant and period during the outage,
  ``c`` being the count it last read from Redis (0 if none). Had every process read the
  same ``c``, the fleet would still grant at most the budget; a process that read earlier
  may overspend by what the others spent after its read (the whole ``c`` if it never read
  the key). Nothing of it is forgotten: the locally granted queries are added to the
  shared count once Redis answers again (which may then exceed the budget: the tenant is
  refused until the period ends).

Errors and fallbacks are counted in ``SharedState.errors`` (by operation) and
``SharedState.fallbacks`` (``rate``: requests decided locally, ``quota``: blocks reserved
locally); ``Metrics.watch_shared_state`` exports them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.retry import Retry

from bastion.core.errors import ServiceUnavailable
from bastion.guard.principal import Limits

__all__ = ["RedisLedger", "RedisRates", "SharedState", "parse_redis_url", "shared_limits_from_url"]

log = logging.getLogger("bastion.guard.shared")

FailMode = Literal["closed", "open"]
_MAX_URL = 1024

# KEYS[1] the count; ARGV: wanted, budget, expire-at (unix s, 0: never). Returns {granted, count}.
_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local granted = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - used)
if granted > 0 then
  used = redis.call('INCRBY', KEYS[1], granted)
  if tonumber(ARGV[3]) > 0 then redis.call('EXPIREAT', KEYS[1], ARGV[3]) end
else
  granted = 0
end
return {granted, used}
"""

# KEYS[1] the count; ARGV: unused. Never below zero. Returns the count.
_RELEASE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local back = math.min(used, tonumber(ARGV[1]))
if back > 0 then return redis.call('DECRBY', KEYS[1], back) end
return used
"""

# KEYS[1] the count; ARGV: spent, expire-at. Queries granted locally while Redis was away:
# added without a cap, since they were served. Returns the count.
_ADD = """
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIREAT', KEYS[1], ARGV[2]) end
return used
"""

# KEYS[1] the bucket (hash: tokens, stamp in µs of the server's clock); ARGV: rate per s,
# capacity, block wanted, tokens given back. All or nothing: a block or, when the bucket
# has less, the µs until it will have one. A missing bucket is full, so the key expires
# once a bucket left alone would have refilled. Returns {granted, wait_us}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(b[1])
local stamp = tonumber(b[2])
if tokens == nil or stamp == nil then
  tokens = cap
elseif now > stamp then
  tokens = tokens + (now - stamp) * rate / 1000000
end
tokens = math.min(cap, tokens + tonumber(ARGV[4]))
local granted = 0
local wait = 0
if tokens >= want then
  granted = want
  tokens = tokens - want
elseif rate > 0 then
  wait = math.ceil((want - tokens) * 1000000 / rate)
else
  wait = 3600000000
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.0f', now))
local ttl = 86400000
if rate > 0 then ttl = math.min(ttl, math.ceil(cap * 1000 / rate) + 1000) end
redis.call('PEXPIRE', KEYS[1], ttl)
return {granted, wait}
"""


def parse_redis_url(url: str, setting: str = "--redis") -> dict[str, Any]:
    """The connection settings in ``redis[s]://[[user]:password@]host[:port][/db]``, or a
    ``ValueError`` naming ``setting`` (the password never appears in the message)."""

    def bad(why: str) -> ValueError:
        return ValueError(f"{setting}: {why}; expected redis://[[user]:password@]host[:port][/db] or rediss://...")

    if not isinstance(url, str) or not url:
        raise bad("empty URL")
    if len(url) > _MAX_URL:
        raise bad(f"URL longer than {_MAX_URL} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise bad("URL contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        # urlsplit's messages quote no credentials ("Port out of range 0-65535", ...)
        raise bad(f"malformed URL ({exc})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise bad(f"scheme {parts.scheme or '(none)'!r} is not redis or rediss")
    if not parts.hostname:
        raise bad("no host")
    if parts.query or parts.fragment:
        raise bad("query options and fragments are not accepted")
    db = 0
    path = parts.path.strip("/")
    if path:
        if not path.isdigit() or int(path) > 65535:
            raise bad(f"database {path!r} is not a number")
        db = int(path)
    return {
        "host": parts.hostname,
        "port": port if port is not None else 6379,
        "db": db,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "ssl": parts.scheme == "rediss",
    }


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


class _Breaker:
    """Keeps a process away from an unreachable Redis: after a failure no call is tried
    until the backoff has passed (doubling per failure up to ``max_s``); a success resets it."""

    __slots__ = ("base_s", "failures", "max_s", "open_until")

    def __init__(self, base_s: float, max_s: float) -> None:
        self.base_s, self.max_s = base_s, max_s
        self.failures = 0
        self.open_until = 0.0

    def failed(self, now: float) -> None:
        self.open_until = now + min(self.max_s, self.base_s * 2.0 ** min(self.failures, 30))
        self.failures += 1

    def succeeded(self) -> None:
        self.failures = 0
        self.open_until = 0.0


class SharedState:
    """The Redis client, circuit breaker and counters shared by a ``RedisLedger`` and a
    ``RedisRates`` (one per process). Thread-safe."""

    backend = "redis"

    def __init__(
        self,
        client: redis.Redis,
        *,
        fail: FailMode,
        replicas: int,
        workers: int = 1,
        prefix: str = "bastion",
        backoff_s: float = 0.25,
        max_backoff_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fail not in ("closed", "open"):
            raise ValueError(f"--shared-state-fail: expected 'closed' or 'open', got {fail!r}")
        if replicas < 1 or workers < 1:
            raise ValueError(f"replicas and workers must be at least 1, got {replicas} and {workers}")
        self.client = client
        self.fail: FailMode = fail
        self.replicas = replicas
        # processes that share the limits: what each keeps when failing open
        self.processes = replicas * workers
        self.prefix = prefix
        self.clock = clock
        self.breaker = _Breaker(backoff_s, max_backoff_s)
        self.errors: dict[str, int] = {}
        self.fallbacks: dict[str, int] = {"rate": 0, "quota": 0}
        self.refused: int = 0  # requests refused with 503 (fail closed)
        self.lock = threading.Lock()
        self.reserve = client.register_script(_RESERVE)
        self.release = client.register_script(_RELEASE)
        self.add = client.register_script(_ADD)
        self.take = client.register_script(_TAKE)

    def available(self) -> bool:
        """Whether a call may be tried now (the breaker is closed, or its backoff passed)."""
        return self.clock() >= self.breaker.open_until

    def call(self, op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run ``script``; on any Redis or socket error count it, open the breaker and
        raise ``_Down``."""
        try:
            result = script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self.failed(op, exc)
            raise _Down from exc
        if self.breaker.failures:
            with self.lock:
                self.breaker.succeeded()
            log.warning("shared limit store reachable again")
        return result

    def failed(self, op: str, exc: BaseException) -> None:
        with self.lock:
            self.errors[op] = self.errors.get(op, 0) + 1
            first = self.breaker.failures == 0
            self.breaker.failed(self.clock())
        if first:
            log.error("shared limit store unreachable (%s: %s); failing %s", op, type(exc).__name__, self.fail)

    def unavailable(self) -> ServiceUnavailable:
        with self.lock:
            self.refused += 1
        wait = max(1.0, self.breaker.open_until - self.clock())
        return ServiceUnavailable(
            "the rate limits and query budgets shared by the replicas are unavailable; retry later",
            retry_after=wait,
        )

    def key(self, kind: str, tenant: str, period: str | None = None) -> str:
        return f"{self.prefix}:{kind}:{tenant}" if period is None else f"{self.prefix}:{kind}:{tenant}:{period}"

    def close(self) -> None:
        self.client.close()


class _Down(Exception):
    """Redis could not be used for this call (counted; the breaker is open)."""


def _expire_at(period: str) -> int:
    """A daily count expires one day after its day ends; a total one never (0)."""
    if period == "total":
        return 0
    day = datetime.strptime(period, "%Y-%m-%d").replace(tzinfo=UTC)
    return int((day + timedelta(days=2)).timestamp())


class RedisLedger:
    """A ``UsageLedger`` in Redis: exact across every process that uses the same keys
    (see the module docstring for the outage behaviour). Thread-safe."""

    def __init__(self, state: SharedState) -> None:
        self.state = state
        # the count each (tenant, period) had at the last answer from Redis
        self._seen: dict[tuple[str, str], int] = {}
        # queries granted here while Redis was unreachable (fail open), not yet written back
        self._local: dict[tuple[str, str], int] = {}

    def reserve(self, tenant: str, period: str, wanted: int, budget: int) -> int:
        state = self.state
        if state.available():
            try:
                if self._local:  # Redis is back: first the queries served without it
                    self._write_back()
                granted, used = state.call(
                    "reserve", state.reserve, [state.key("quota", tenant, period)], [wanted, budget, _expire_at(period)]
                )
            except _Down:
                pass
            else:
                self._seen[tenant, period] = int(used)
                return int(granted)
        if state.fail == "closed":
            raise state.unavailable()
        with state.lock:
            state.fallbacks["quota"] += 1
            key = (tenant, period)
            share = max(0, budget - self._seen.get(key, 0)) // state.processes
            local = self._local.get(key, 0)
            granted = max(0, min(wanted, share - local))
            self._local[key] = local + granted
        return granted

    def release(self, tenant: str, period: str, unused: int) -> None:
        """Give back unspent queries; what cannot reach Redis is dropped (counted), which
        errs on refusing, like a killed worker's lease."""
        if unused <= 0:
            return
        state = self.state
        key = (tenant, period)
        with state.lock:
            local = self._local.get(key, 0)
            if local:  # granted locally: given back locally first
                back = min(local, unused)
                self._local[key] = local - back
                unused -= back
        if unused <= 0 or not state.available():
            return
        try:
            used = state.call("release", state.release, [state.key("quota", tenant, period)], [unused])
        except _Down:
            return
        self._seen[key] = int(used)

    def used(self, tenant: str, period: str) -> int:
        """The shared count; when Redis is unreachable, fail closed raises 503 and fail
        open answers the last count read plus what was granted here since."""
        state = self.state
        if state.available():
            try:
                raw = state.client.get(state.key("quota", tenant, period))
            except (RedisError, OSError) as exc:
                state.failed("used", exc)
            else:
                return int(raw or 0) + self._local.get((tenant, period), 0)
        if state.fail == "closed":
            raise state.unavailable()
        return self._seen.get((tenant, period), 0) + self._local.get((tenant, period), 0)

    def _write_back(self) -> None:
        """Add the queries granted during the outage to the shared counts. Raises ``_Down``
        keeping what is not written yet; a write whose answer was lost may count twice
        (errs on refusing)."""
        state = self.state
        with state.lock:  # taken out first, so that two threads cannot both write them
            pending = {k: n for k, n in self._local.items() if n > 0}
            self._local.clear()
        try:
            for (tenant, period), n in list(pending.items()):
                key = state.key("quota", tenant, period)
                used = state.call("write_back", state.add, [key], [n, _expire_at(period)])
                self._seen[tenant, period] = int(used)
                del pending[tenant, period]
        finally:
            if pending:
                with state.lock:
                    for key, n in pending.items():
                        self._local[key] = self._local.get(key, 0) + n


@dataclass(slots=True)
class _RateLease:
    limits: Limits
    rate: float
    capacity: float
    block: int
    left: int = 0  # tokens taken from the shared bucket and not spent yet
    expires: float = 0.0  # after this (local clock) the unspent tokens go back
    empty_until: float = 0.0  # the shared bucket cannot have a block before this


class RedisRates:
    """A ``RateStore`` in Redis: the tenant's bucket shared by every process, leased in
    small blocks (see the module docstring). One per process, used from the event-loop
    thread only."""

    def __init__(self, state: SharedState, *, block_s: float = 0.01, max_block: int = 1000,
                 lease_ttl_s: float = 0.1) -> None:
        self.state = state
        self.replicas = state.replicas
        self.block_s = block_s
        self.max_block = max_block
        self.lease_ttl_s = lease_ttl_s
        self._clock = state.clock
        self._leases: dict[str, _RateLease] = {}

    def take(self, tenant: str, limits: Limits) -> float | None:
        lease = self._leases.get(tenant)
        if lease is None or lease.limits is not limits:
            lease = self._lease(tenant, limits)
        now = self._clock()
        if lease.left > 0 and now < lease.expires:
            lease.left -= 1
            return 0.0
        if now < lease.empty_until:
            return lease.empty_until - now
        return self._refill(tenant, lease, now)

    def _lease(self, tenant: str, limits: Limits) -> _RateLease:
        """The tenant's lease for ``limits`` (kept, tokens and all, when they change)."""
        rate = float(limits.rate_per_s)  # type: ignore[arg-type]
        capacity = float(limits.burst if limits.burst is not None else max(1, math.ceil(rate)))
        # a block is block_s of the rate, and at most half the burst so that two
        # processes can each hold one without emptying the bucket
        block = max(1, min(self.max_block, int(rate * self.block_s), int(capacity // 2)))
        old = self._leases.get(tenant)
        lease = self._leases[tenant] = _RateLease(limits, rate, capacity, block)
        if old is not None:
            lease.left, lease.expires = old.left, old.expires
        return lease

    def _refill(self, tenant: str, lease: _RateLease, now: float) -> float | None:
        """A round trip: give back the expired lease's tokens, take a block."""
        state = self.state
        back, lease.left = lease.left, 0
        if state.available():
            try:
                granted, wait_us = state.call(
                    "rate", state.take, [state.key("rate", tenant)], [lease.rate, lease.capacity, lease.block, back]
                )
            except _Down:
                pass  # the tokens given back are lost: errs on refusing
            else:
                if granted > 0:
                    lease.left = int(granted) - 1
                    lease.expires = now + self.lease_ttl_s
                    return 0.0
                wait = wait_us / 1e6
                lease.empty_until = now + wait
                return wait
        if state.fail == "closed":
            raise state.unavailable()
        state.fallbacks["rate"] += 1
        return None

    def close(self) -> None:
        """Give unspent tokens back (clean shutdown; nothing when Redis is unreachable)."""
        state = self.state
        for tenant, lease in self._leases.items():
            if lease.left > 0 and state.available():
                # a block of 0 takes nothing: the call only gives back
                with contextlib.suppress(_Down):
                    state.call("rate", state.take, [state.key("rate", tenant)],
                               [lease.rate, lease.capacity, 0, lease.left])
            lease.left = 0
        # last user of the connection pool: Limiter.close gives the quota leases back first
        state.close()


def shared_limits_from_url(
    url: str,
    *,
    fail: FailMode,
    replicas: int,
    workers: int = 1,
    prefix: str = "bastion",
    timeout_s: float = 0.05,
    backoff_s: float = 0.25,
    max_backoff_s: float = 5.0,
    check: bool = True,
) -> tuple[RedisLedger, RedisRates]:
    """The ledger and rate store of one process, shared through the Redis at ``url``
    (``--redis``) with every process using the same ``prefix``.

    ``replicas`` (server replicas) and ``workers`` (worker processes per replica) divide
    the limits when failing open. A malformed URL is a ``ValueError`` naming ``--redis``;
    with ``check``, one ``PING`` (with a longer, 1 s timeout) makes wrong credentials or
    database a ``ValueError`` too, while an unreachable server only logs and opens the
    breaker: the process starts and serves as ``fail`` says until Redis answers.
    """
    settings = parse_redis_url(url)
    if not prefix or any(c in prefix for c in " {}\n"):
        raise ValueError(f"shared state prefix {prefix!r}: expected a non-empty name without spaces or braces")
    client = redis.Redis(
        **settings,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # a retry would hold the event loop for another timeout: the breaker decides instead
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        client_name=f"bastion-{prefix}",
    )
    state = SharedState(client, fail=fail, replicas=replicas, workers=workers, prefix=prefix,
                        backoff_s=backoff_s, max_backoff_s=max_backoff_s)
    ledger, rates = RedisLedger(state), RedisRates(state)
    if check:
        probe = redis.Redis(**settings, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
        try:
            probe.ping()
        except (AuthenticationError, ResponseError) as exc:
            # the server answered: wrong password, user or database is a setting to fix
            raise ValueError(f"--redis: {_redacted(url)} refused the connection: {exc}") from None
        except (RedisError, OSError) as exc:
            log.error("--redis %s is unreachable (%s); serving with limits failing %s until it answers",
                      _redacted(url), exc, fail)
            state.failed("connect", exc)
        finally:
            probe.close()
    return ledger, rates
