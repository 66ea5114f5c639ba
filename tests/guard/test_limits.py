"""Rate limits and query budgets: exact counts, leases across processes, day rollover."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bastion.core.errors import RateLimited
from bastion.guard.limits import Limiter, MemoryLedger, QuotaExhausted, SqliteLedger, seconds_to_next_period
from bastion.guard.principal import Limits, Principal


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def who(tenant: str = "t", **limits: object) -> Principal:
    return Principal(tenant, "k", limits=Limits(**limits))  # type: ignore[arg-type]


def count_admitted(limiter: Limiter, principal: Principal, n: int) -> int:
    ok = 0
    for _ in range(n):
        try:
            limiter.admit(principal)
            ok += 1
        except RateLimited:
            pass
    return ok


def test_token_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = Limiter(clock=clock)
    p = who(rate_per_s=10.0, burst=5)
    assert count_admitted(limiter, p, 20) == 5
    with pytest.raises(RateLimited) as err:
        limiter.admit(p)
    assert err.value.retry_after == pytest.approx(0.1)
    assert "10 requests/s, burst 5" in err.value.message
    clock.t += 0.35  # 3.5 tokens
    assert count_admitted(limiter, p, 10) == 3
    clock.t += 100  # never more than the burst
    assert count_admitted(limiter, p, 10) == 5


def test_burst_defaults_to_the_rate_and_tenants_are_independent() -> None:
    clock = Clock()
    limiter = Limiter(clock=clock)
    assert count_admitted(limiter, who("a", rate_per_s=3.0), 10) == 3
    assert count_admitted(limiter, who("b", rate_per_s=3.0), 10) == 3


def test_changed_limits_apply_to_the_existing_bucket() -> None:
    clock = Clock()
    limiter = Limiter(clock=clock)
    assert count_admitted(limiter, who(rate_per_s=1.0, burst=10), 4) == 4
    # the operator lowers the burst: the bucket shrinks at once
    assert count_admitted(limiter, who(rate_per_s=1.0, burst=2), 10) == 2


def test_workers_share_the_rate() -> None:
    limiter = Limiter(workers=4, clock=Clock())
    assert count_admitted(limiter, who(rate_per_s=40.0, burst=40), 100) == 10


def test_quota_is_exact_and_says_when_it_resets() -> None:
    wall = Clock(datetime(2026, 11, 22, 23, 0, tzinfo=UTC).timestamp())
    limiter = Limiter(MemoryLedger(), wall=wall)
    p = who(quota=7, quota_period="day")
    assert count_admitted(limiter, p, 20) == 7
    with pytest.raises(QuotaExhausted) as err:
        limiter.admit(p)
    assert err.value.http_status == 429
    assert err.value.retry_after == pytest.approx(3600)
    assert "resets at 00:00 UTC" in err.value.message
    wall.t += 3600  # the next UTC day
    assert count_admitted(limiter, p, 20) == 7


def test_total_quota_never_resets() -> None:
    wall = Clock()
    limiter = Limiter(MemoryLedger(), wall=wall)
    p = who(quota=3, quota_period="total")
    assert count_admitted(limiter, p, 5) == 3
    wall.t += 10 * 86400
    with pytest.raises(QuotaExhausted) as err:
        limiter.admit(p)
    assert err.value.retry_after is None


def test_a_clean_stop_returns_the_unspent_lease(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    ledger = SqliteLedger(lambda: sqlite3.connect(db, isolation_level=None))
    limiter = Limiter(ledger)
    p = who(quota=100_000, quota_period="total")
    assert count_admitted(limiter, p, 5) == 5
    assert ledger.used("t", "total") == 100  # a lease of 100 is reserved ...
    limiter.close()
    assert ledger.used("t", "total") == 5  # ... and the unspent 95 go back


def _spend(db: str, n: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    ledger = SqliteLedger(lambda: sqlite3.connect(db, isolation_level=None, timeout=30))
    limiter = Limiter(ledger)
    out.put(count_admitted(limiter, Principal("shared", "k", limits=Limits(quota=500, quota_period="total")), n))


def test_workers_never_spend_more_than_the_budget_together(tmp_path: Path) -> None:
    """Four processes race for one budget of 500 through the SQLite ledger."""
    db = str(tmp_path / "usage.db")
    SqliteLedger(lambda: sqlite3.connect(db, isolation_level=None))  # create the table
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_spend, args=(db, 400, out)) for _ in range(4)]
    for p in procs:
        p.start()
    admitted = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert sum(admitted) == 500, admitted


def test_seconds_to_next_period() -> None:
    t = datetime(2026, 1, 1, 12, 0, tzinfo=UTC).timestamp()
    assert seconds_to_next_period(Limits(quota=1, quota_period="day"), t) == 12 * 3600
    assert seconds_to_next_period(Limits(quota=1, quota_period="total"), t) is None
