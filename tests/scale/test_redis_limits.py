"""Rate limits and query budgets shared by replicas through a real redis-server: exact
budgets and rates across processes, Redis stopped and restarted under each fail mode,
URL validation, key independence and expiry."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import redis

from bastion.bench.launcher import free_port
from bastion.bench.services import RedisServer
from bastion.core.errors import BastionError, RateLimited, ServiceUnavailable
from bastion.guard.gate import Gate
from bastion.guard.limits import Limiter, QuotaExhausted, period_key
from bastion.guard.principal import Limits, Principal
from bastion.guard.redis_state import parse_redis_url, shared_limits_from_url
from bastion.observability.metrics import Metrics
from tests.polling import wait_until

SPAWN = mp.get_context("spawn")


def who(tenant: str, **limits: Any) -> Principal:
    return Principal(tenant, "k", limits=Limits(**limits))


def _prefix(request: pytest.FixtureRequest) -> str:
    """Keys of their own per test: the module shares one server."""
    return "t-" + request.node.name.replace("[", "-").replace("]", "")


# -- budgets across processes ----------------------------------------------------------------


def _spend_budget(url: str, prefix: str, quota: int, period: str, clients: int, go: Any, out: Any) -> None:
    """One replica: ``clients`` threads, each an event loop's Limiter over this process's
    ledger, spending until the budget is refused."""
    ledger, _ = shared_limits_from_url(url, fail="closed", replicas=2, prefix=prefix)
    principal = who("shared", quota=quota, quota_period=period)
    counts = [0] * clients

    def client(i: int) -> None:
        limiter = Limiter(ledger)
        go.wait(30)
        while True:
            try:
                limiter.admit(principal)
            except QuotaExhausted:
                return
            counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    out.put(counts)


@pytest.mark.parametrize(("quota", "period"), [(500, "total"), (5000, "day")])
def test_budget_is_exact_across_processes(
    redis_server: RedisServer, request: pytest.FixtureRequest, quota: int, period: str
) -> None:
    """Two processes standing in for replicas, 8 clients in all, race for one budget:
    exactly the budget is granted (5000 is leased in blocks of 5, 500 one by one)."""
    prefix = _prefix(request)
    go, out = SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_spend_budget, args=(redis_server.url, prefix, quota, period, 4, go, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    go.set()
    counts = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(map(sum, counts)) == quota, counts
    assert sum(1 for per in counts for n in per if n > 0) >= 4, f"the clients did not really race: {counts}"
    ledger, _ = shared_limits_from_url(redis_server.url, fail="closed", replicas=1, prefix=prefix)
    day = period_key(Limits(quota=1, quota_period="day"), time.time())
    assert ledger.used("shared", "total" if period == "total" else day) == quota


# -- rates across processes -----------------------------------------------------------------


def _hammer_rate(url: str, prefix: str, rate: float, burst: int, ready: Any, start_at: Any, out: Any) -> None:
    """One replica sending as fast as it likes (with a breath between refusals) until the end."""
    ledger, rates = shared_limits_from_url(url, fail="closed", replicas=2, prefix=prefix)
    limiter = Limiter(ledger, rates=rates)
    principal = who("rated", rate_per_s=rate, burst=burst)
    ready.put(True)
    begin = start_at.get(timeout=30)
    end = begin + 3.0
    while time.time() < begin:
        time.sleep(0.001)
    admitted = refused = 0
    while time.time() < end:
        try:
            limiter.admit(principal)
            admitted += 1
        except RateLimited:
            refused += 1
            time.sleep(0.0005)
    out.put((admitted, refused, dict(rates.state.errors)))


def test_rate_is_shared_within_5_percent(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    """Two processes share 300/s (burst 30) for 3 s: together they get 300 * 3 + 30 within ±5 %."""
    rate, burst, seconds = 300.0, 30, 3.0
    ready, start_at, out = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_hammer_rate,
                           args=(redis_server.url, _prefix(request), rate, burst, ready, start_at, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    begin = time.time() + 0.3
    for _ in procs:
        start_at.put(begin)
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    admitted = sum(r[0] for r in results)
    expected = rate * seconds + burst
    assert abs(admitted - expected) <= 0.05 * rate * seconds, (admitted, expected, results)
    assert all(r[0] > 0 and r[1] > 0 for r in results), f"both replicas must be admitted and refused: {results}"
    assert all(not r[2] for r in results), results


# -- Redis stopped and restarted ------------------------------------------------------------


def _authorize(gate: Gate, principal: Principal) -> BastionError | None:
    """What the transports would answer: None (served) or the error; anything else escapes."""
    try:
        gate.authorize(principal, "m", transport="rest")
    except BastionError as err:
        return err
    return None


def _served(gate: Gate, principal: Principal) -> bool:
    return _authorize(gate, principal) is None


def test_closed_mode_refuses_with_503_while_redis_is_down_then_recovers(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    ledger, rates = shared_limits_from_url(redis_server.url, fail="closed", replicas=2, prefix=_prefix(request),
                                           backoff_s=0.3, max_backoff_s=0.6)
    state = rates.state
    gate = Gate(authenticator=None, limiter=Limiter(ledger, rates=rates))
    rated = who("closed-rate", rate_per_s=1000.0, burst=1000)
    budgeted = who("closed-quota", quota=10_000, quota_period="day")
    for p in (rated, budgeted):
        assert all(_served(gate, p) for _ in range(5))
    redis_server.stop()
    try:
        for p in (rated, budgeted):
            # the lease already held is spent first (at most a block of 10), then 503
            answers = [_authorize(gate, p) for _ in range(30)]
            refused = [a for a in answers if a is not None]
            assert refused, f"{p.tenant}: served every request with Redis down"
            assert all(isinstance(a, ServiceUnavailable) for a in refused), refused
            assert refused[0].http_status == 503 and refused[0].retry_after_s is not None
            assert refused[0].retry_after_s >= 1
        # the breaker: hundreds of requests while it is open cost no further attempt
        errors = sum(state.errors.values())
        assert errors >= 1
        t0 = time.perf_counter()
        answers = [_authorize(gate, rated) for _ in range(300)]
        elapsed = time.perf_counter() - t0
        assert all(isinstance(a, ServiceUnavailable) for a in answers)
        if elapsed < 0.3:  # within the first backoff: not one more try (else at most a few)
            assert sum(state.errors.values()) == errors, state.errors
        else:
            assert sum(state.errors.values()) <= errors + 3, state.errors
        assert state.refused >= 300
        assert state.fallbacks == {"rate": 0, "quota": 0}
    finally:
        redis_server.start()
    for p in (rated, budgeted):
        wait_until(lambda p=p: _served(gate, p), timeout=10, interval=0.05, what=f"{p.tenant} served again")
    assert state.breaker.failures == 0
    assert ledger.used("closed-quota", period_key(budgeted.limits, time.time())) >= 1


def test_open_mode_falls_back_to_local_limits_and_writes_the_spend_back(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    ledger, rates = shared_limits_from_url(redis_server.url, fail="open", replicas=2, prefix=_prefix(request),
                                           backoff_s=0.3, max_backoff_s=0.6)
    state = rates.state
    gate = Gate(authenticator=None, limiter=Limiter(ledger, rates=rates))
    # a block of 1 for both: no lease left over when Redis goes
    rated = who("open-rate", rate_per_s=10.0, burst=40)
    budgeted = who("open-quota", quota=1000, quota_period="total")
    assert all(_served(gate, rated) for _ in range(10))
    assert all(_served(gate, budgeted) for _ in range(10))
    redis_server.stop()
    try:
        # rate: this process keeps half the bucket (2 replicas): 20 tokens, 5/s
        answers = [_authorize(gate, rated) for _ in range(60)]
        served = sum(a is None for a in answers)
        assert 20 <= served <= 22, answers
        assert all(isinstance(a, RateLimited) and a.http_status == 429 for a in answers if a is not None)
        # budget: half of what Redis last said was left, (1000 - 10) // 2
        served_q = 0
        while (err := _authorize(gate, budgeted)) is None:
            served_q += 1
            assert served_q <= 1000
        assert isinstance(err, QuotaExhausted), err
        assert served_q == 495
        assert state.fallbacks["rate"] >= 40 and state.fallbacks["quota"] >= 1, state.fallbacks
        assert sum(state.errors.values()) >= 1
        assert ledger.used("open-quota", "total") == 10 + 495  # the last count read, plus the local spend
    finally:
        redis_server.start()

    def recovered() -> bool:
        # served is not enough here: failing open serves from the local bucket too
        _authorize(gate, rated)
        return state.breaker.failures == 0

    wait_until(recovered, timeout=10, interval=0.05, what="the shared bucket used again")
    fallbacks = dict(state.fallbacks)
    for _ in range(5):
        _authorize(gate, rated)
    assert state.fallbacks == fallbacks  # decided by Redis again, not locally
    # the restarted Redis kept nothing (no persistence): the next reservation first writes
    # back what was spent locally, then counts on from there
    assert ledger.used("open-quota", "total") == 495
    assert _served(gate, budgeted)
    assert redis.Redis.from_url(redis_server.url).get(f"{_prefix(request)}:quota:open-quota:total") == b"496"
    assert ledger.used("open-quota", "total") == 496


def test_unreachable_at_start(request: pytest.FixtureRequest) -> None:
    """Nothing listens: the process starts anyway and serves as its fail mode says."""
    url = f"redis://:pw@127.0.0.1:{free_port()}/0"
    p = who("nobody", rate_per_s=100.0, quota=100, quota_period="day")
    ledger, rates = shared_limits_from_url(url, fail="closed", replicas=2, prefix=_prefix(request))
    assert rates.state.errors == {"connect": 1}
    with pytest.raises(ServiceUnavailable) as err:
        Limiter(ledger, rates=rates).admit(p)
    assert err.value.http_status == 503 and err.value.retry_after_s == 1
    ledger, rates = shared_limits_from_url(url, fail="open", replicas=2, prefix=_prefix(request))
    limiter = Limiter(ledger, rates=rates)
    assert sum(_served(Gate(authenticator=None, limiter=limiter), p) for _ in range(100)) == 50  # quota 100 / 2
    assert rates.state.fallbacks["rate"] == 100 and rates.state.fallbacks["quota"] >= 1
    # what /metrics reports
    metrics = Metrics()
    metrics.watch_shared_state(rates.state)
    metrics.flush()
    metrics.flush()  # counted once, not once per flush
    sample = metrics.registry.get_sample_value
    assert sample("bastion_shared_state_errors_total", {"backend": "redis", "op": "connect"}) == 1
    assert sample("bastion_limiter_fallback_total", {"limit": "rate"}) == 100
    assert sample("bastion_limiter_fallback_total", {"limit": "quota"}) == rates.state.fallbacks["quota"]


def test_wrong_password_is_a_setting_error(redis_server: RedisServer) -> None:
    bad = redis_server.url.replace(redis_server.password, "not-the-password")
    with pytest.raises(ValueError, match="--redis") as err:
        shared_limits_from_url(bad, fail="closed", replicas=1)
    assert "not-the-password" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", "empty"),
        ("http://h:6379", "scheme"),
        ("redis://", "no host"),
        ("redis://:secret@h:99999/0", "malformed"),
        ("redis://:secret@h:port/0", "malformed"),
        ("redis://h/db1", "not a number"),
        ("redis://h/0?ssl_cert_reqs=none", "query"),
        ("unix:///tmp/redis.sock", "scheme"),
        ("redis://h /0", "spaces"),
        ("redis://h/" + "0" * 2000, "longer"),
    ],
)
def test_malformed_urls_name_the_setting(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as err:
        shared_limits_from_url(url, fail="closed", replicas=1)
    assert str(err.value).startswith("--redis: ")
    assert "secret" not in str(err.value)


def test_url_forms_and_settings() -> None:
    assert parse_redis_url("rediss://user:p%40ss@cache.example:6380/2") == {
        "host": "cache.example", "port": 6380, "db": 2, "username": "user", "password": "p@ss", "ssl": True,
    }
    assert parse_redis_url("redis://localhost")["port"] == 6379
    with pytest.raises(ValueError, match="--shared-state-fail"):
        shared_limits_from_url("redis://localhost", fail="maybe", replicas=1, check=False)  # type: ignore[arg-type]


# -- keys -------------------------------------------------------------------------------------


def test_tenants_and_periods_are_independent_and_daily_keys_expire(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    prefix = _prefix(request)
    ledger, rates = shared_limits_from_url(redis_server.url, fail="closed", replicas=1, prefix=prefix)
    now = time.time()
    today = period_key(Limits(quota=1), now)
    tomorrow = period_key(Limits(quota=1), now + 86400)
    assert ledger.reserve("a", today, 5, 5) == 5
    assert ledger.reserve("a", today, 1, 5) == 0
    assert ledger.reserve("a", tomorrow, 5, 5) == 5
    assert ledger.reserve("b", today, 7, 5) == 5
    assert ledger.reserve("a", "total", 3, 5) == 3
    ledger.release("a", today, 2)
    assert (ledger.used("a", today), ledger.used("b", today), ledger.used("a", "total")) == (3, 5, 3)
    client = redis.Redis.from_url(redis_server.url)
    # a day's count lives until one day after the day ends; a total never expires
    ttl = client.ttl(f"{prefix}:quota:a:{today}")
    assert 86400 < ttl <= 2 * 86400, ttl
    assert client.ttl(f"{prefix}:quota:a:total") == -1
    # buckets: one per tenant, expiring once a bucket left alone would be full again
    limiter = Limiter(ledger, rates=rates)
    for tenant in ("a", "b"):
        p = who(tenant, rate_per_s=1.0, burst=3)
        served = 0
        for _ in range(5):
            try:
                limiter.admit(p)
                served += 1
            except RateLimited as err:
                assert 0 < err.retry_after <= 1.0
        assert served == 3, tenant
        assert 0 < client.pttl(f"{prefix}:rate:{tenant}") <= 4000
