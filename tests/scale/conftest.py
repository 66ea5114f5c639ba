"""Real Redis and PostgreSQL servers for the shared-state tests, one of each per test module
(the tests of a module share it; each test uses keys or tenants of its own). A service that
cannot be started here skips its tests with the reason printed, never silently."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bastion.bench.services import PostgresServer, RedisServer, postgres_unavailable, redis_unavailable


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    reason = redis_unavailable()
    if reason:
        pytest.skip(reason)
    with RedisServer.running() as server:
        yield server


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    with PostgresServer.running() as server:
        yield server
