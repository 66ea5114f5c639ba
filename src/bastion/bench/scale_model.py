"""A calculation of how the shared-state design scales to many front replicas, from
figures measured on one machine (``benchmarks/scale_bench.py`` measures them and prints
this table). Nothing here is measured: it is arithmetic on stated assumptions, written
out so that each can be checked and changed.

The model, per fleet of ``n`` replicas each serving ``per_replica_rps`` requests a second,
spread evenly over ``tenants`` tenants that each have a rate limit and a query budget:

* **Rate limits** (``guard/redis_state.RedisRates``): each process leases a block of
  ``rate * 10 ms`` tokens (at least 1, at most 1000 and half the burst) and holds it at most
  0.1 s. A tenant's configured rate is what it actually sends (a limit that never binds
  costs the most round trips per request, so this is the conservative case). A process
  serving a tenant makes ``min(share, max(share / block, 10))`` round trips a second for
  it (``share``: its requests a second for that tenant): the lease expiry (10 a second)
  dominates when many replicas share one tenant's rate, and below 10 requests a second
  every request finds an expired lease.
* **Budgets**: one round trip per block of ``min(256, budget // 1000)`` queries.
* **Redis** is one single-threaded server: an M/M/1 queue with service rate
  ``redis_ops_per_s`` (measured: our Lua scripts from many clients). Its utilisation is
  the fleet's round trips over that; the sojourn time is ``1 / (mu - lambda)``, the p99
  ``ln(100)`` times it. Past utilisation 1 the design does not hold; ``redis_shards``
  models Redis Cluster or client-side sharding by tenant (the keys are per tenant), and
  ``tenant_spread`` a load balancer that sends each tenant to a few replicas only.
* **Added latency per request** is what a request waits for a round trip, times the share
  of requests that make one; p99 is a request that makes one at the p99 sojourn plus the
  loopback-to-network RTT (``network_rtt_ms``, an assumption: 0.2 ms in one zone).
* **Key store**: every replica keeps the whole key table in memory; a key change costs
  each replica one reload (``reload_ms`` for the measured table, proportional to keys),
  so PostgreSQL answers ``n`` snapshot reads per change. Token verification is a dict
  hit after the first request of a keep-alive client (``verified`` cache of 4096 tokens
  per process); the hit rate is ``1 - new_tokens_per_s / requests_per_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ScaleInputs", "ScaleRow", "scale_table"]


@dataclass(frozen=True)
class ScaleInputs:
    per_replica_rps: float  # measured: one replica's throughput with the shared limiter
    redis_ops_per_s: float  # measured: the Lua scripts' throughput on one Redis
    rtt_ms: float  # measured: one round trip on loopback (redis-py + Lua)
    reload_ms: float  # measured: one key-store snapshot reload of ``keys`` keys
    keys: int
    tenants: int = 1000
    workers_per_replica: int = 1
    budget_per_tenant: int = 10_000_000
    network_rtt_ms: float = 0.2  # assumption: replicas and Redis in one zone
    key_changes_per_s: float = 1.0  # assumption
    new_tokens_per_s_per_replica: float = 10.0  # assumption: clients that open a new connection with a new key
    # how many processes one tenant's traffic lands on: None = all (round robin); k = a load
    # balancer that hashes the tenant's key to k replicas (sticky routing)
    tenant_spread: int | None = None
    redis_shards: int = 1  # Redis Cluster / client-side sharding by tenant key


@dataclass(frozen=True)
class ScaleRow:
    replicas: int
    fleet_rps: float
    redis_ops_per_s: float
    redis_utilisation: float
    added_mean_us: float  # per request, averaged over all requests
    added_p99_ms: float | None  # a request that makes a round trip, at Redis's p99; None past saturation
    pg_reads_per_s: float  # snapshot reloads the key store answers
    reload_cpu_share: float  # of one replica's core, spent reloading
    key_cache_hit_rate: float


def _rate_round_trips(rate: float, processes_serving: int) -> float:
    """Round trips a second for one tenant, all processes together."""
    share = rate / processes_serving
    block = max(1, min(1000, int(rate * 0.01)))
    # a lease lasts 0.1 s: a process renews it ~10 times a second while busy, but never
    # more often than it gets requests (a request finding an expired lease makes one trip)
    return processes_serving * min(share, max(share / block, 10.0))


def scale_table(inputs: ScaleInputs, replicas: tuple[int, ...] = (1, 10, 100, 1000)) -> list[ScaleRow]:
    rows = []
    for n in replicas:
        fleet = n * inputs.per_replica_rps
        tenant_rate = fleet / inputs.tenants
        processes = n * inputs.workers_per_replica
        if inputs.tenant_spread is not None:
            processes = min(processes, inputs.tenant_spread)
        rate_ops = inputs.tenants * _rate_round_trips(tenant_rate, processes)
        quota_block = max(1, min(256, inputs.budget_per_tenant // 1000))
        quota_ops = fleet / quota_block
        ops = rate_ops + quota_ops
        capacity = inputs.redis_ops_per_s * inputs.redis_shards  # keys are per tenant: shards split them evenly
        util = ops / capacity
        if util < 1:
            sojourn_ms = 1000.0 * inputs.redis_shards / (capacity - ops)
            trip_ms = inputs.rtt_ms + inputs.network_rtt_ms + sojourn_ms
            added_mean_us = 1000.0 * trip_ms * ops / fleet
            added_p99: float | None = inputs.rtt_ms + inputs.network_rtt_ms + math.log(100) * sojourn_ms
        else:
            added_mean_us, added_p99 = math.inf, None
        reloads = n * inputs.key_changes_per_s
        rows.append(ScaleRow(
            replicas=n, fleet_rps=fleet, redis_ops_per_s=ops, redis_utilisation=util, added_mean_us=added_mean_us,
            added_p99_ms=added_p99, pg_reads_per_s=reloads,
            reload_cpu_share=inputs.key_changes_per_s * inputs.reload_ms / 1000.0,
            key_cache_hit_rate=max(0.0, 1.0 - inputs.new_tokens_per_s_per_replica / inputs.per_replica_rps),
        ))
    return rows
