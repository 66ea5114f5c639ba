"""The scaling calculation's arithmetic, checked by hand on cases small enough to follow."""

from __future__ import annotations

import math

import pytest

from bastion.bench.scale_model import ScaleInputs, scale_table


def test_one_tenant_on_one_replica_renews_its_lease_ten_times_a_second() -> None:
    # 10,000 req/s, one tenant: block 100, 100 trips/s for the rate; budget block 256
    inputs = ScaleInputs(per_replica_rps=10_000, redis_ops_per_s=50_000, rtt_ms=0.1, reload_ms=5, keys=1000,
                         tenants=1, network_rtt_ms=0.0)
    (row,) = scale_table(inputs, (1,))
    assert row.redis_ops_per_s == pytest.approx(100 + 10_000 / 256)
    sojourn_ms = 1000 / (50_000 - row.redis_ops_per_s)
    assert row.added_p99_ms == pytest.approx(0.1 + math.log(100) * sojourn_ms)
    assert row.added_mean_us == pytest.approx(1000 * (0.1 + sojourn_ms) * row.redis_ops_per_s / 10_000)


def test_low_rate_tenants_pay_a_trip_per_request_and_saturate_one_redis() -> None:
    inputs = ScaleInputs(per_replica_rps=1000, redis_ops_per_s=20_000, rtt_ms=0.1, reload_ms=5, keys=1000,
                         tenants=1000)
    one, ten, hundred = scale_table(inputs, (1, 10, 100))
    # 1 req/s per tenant and process: every request finds its 0.1 s lease expired
    assert one.redis_ops_per_s == pytest.approx(1000 + 1000 / 256)
    assert hundred.added_p99_ms is None and hundred.redis_utilisation > 1
    # sticky routing and shards bring it back under one
    sharded = scale_table(ScaleInputs(**{**inputs.__dict__, "tenant_spread": 2, "redis_shards": 8}), (100,))[0]
    assert sharded.redis_utilisation < 1 and sharded.added_p99_ms is not None
    assert ten.pg_reads_per_s == 10 and ten.reload_cpu_share == pytest.approx(0.005)
