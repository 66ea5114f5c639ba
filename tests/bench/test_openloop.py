"""The open-loop generator against a tiny HTTP server in a thread (127.0.0.1 only).

The server runs its own event loop in a thread, so a "stall" can block that loop the way
a GC pause or a stuck worker does, while the generator's loop keeps its timetable.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from bastion.bench.openloop import (
    OpenLoopConfig,
    _read_response,
    build_request,
    parse_url,
    run_open_loop_sync,
    schedule,
)


@dataclass
class Behaviour:
    stall_at: int | None = None  # block the server's loop for stall_s when this request arrives
    stall_s: float = 0.3
    error_every: int = 0  # answer 500 to every n-th request
    truncate_every: int = 0  # send half a response, then close
    delay_s: float = 0.0  # non-blocking delay before each answer
    close_after_each: bool = False  # drop keep-alive silently (no Connection: close), like an idle timeout
    seen: list[tuple[bytes, bytes]] = field(default_factory=list)  # (head, body) of each request


class TinyServer:
    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour
        self.count = 0
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.b.seen.append((head, body))
                self.count += 1
                n = self.count
                if self.b.stall_at is not None and n == self.b.stall_at:
                    time.sleep(self.b.stall_s)  # blocks the whole server, on purpose
                if self.b.delay_s:
                    await asyncio.sleep(self.b.delay_s)
                if self.b.truncate_every and n % self.b.truncate_every == 0:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                    await writer.drain()
                    writer.close()
                    return
                if self.b.error_every and n % self.b.error_every == 0:
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 3\r\n\r\nerr")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                if self.b.close_after_each:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> TinyServer:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/models/m/infer"


@pytest.fixture
def behaviour() -> Behaviour:
    return Behaviour()


@pytest.fixture
def server(behaviour: Behaviour) -> Iterator[TinyServer]:
    with TinyServer(behaviour) as s:
        yield s


# --------------------------------------------------------------------------- pure parts


def test_fixed_schedule() -> None:
    offs = schedule(200, 2.0)
    assert len(offs) == 400
    np.testing.assert_allclose(np.diff(offs), 0.005)
    assert offs[0] == 0.0 and offs[-1] < 2.0
    assert len(schedule(3, 1.0)) == 3 and len(schedule(2.5, 1.0)) == 3  # t = 0, 0.4, 0.8


def test_poisson_schedule_is_seeded_and_has_the_rate() -> None:
    a, b = schedule(500, 20.0, "poisson", seed=1), schedule(500, 20.0, "poisson", seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, schedule(500, 20.0, "poisson", seed=2))
    assert a[0] == 0.0 and a[-1] < 20.0 and np.all(np.diff(a) > 0)
    # 10,000 expected: the count's sd is 100, the mean gap's relative sd 1 %
    assert abs(len(a) - 10_000) < 500
    gaps = np.diff(a)
    assert np.mean(gaps) == pytest.approx(1 / 500, rel=0.05)
    assert np.std(gaps) == pytest.approx(1 / 500, rel=0.05)  # exponential: sd == mean
    with pytest.raises(ValueError):
        schedule(0, 1.0)


def test_build_request_bytes() -> None:
    t = parse_url("http://127.0.0.1:8000/v2/models/m/infer?x=1")
    req = build_request(t, "POST", b'{"a":1}', "application/json", {"Authorization": "Bearer k"})
    assert req == (
        b"POST /v2/models/m/infer?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
        b'Content-Length: 7\r\nAuthorization: Bearer k\r\n\r\n{"a":1}'
    )
    get = build_request(parse_url("http://h/"), "GET", b"", None)
    assert get == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    with pytest.raises(ValueError):
        build_request(t, headers={"X": "a\r\nInjected: 1"})
    with pytest.raises(ValueError):
        parse_url("https://h/")


async def _parse(raw: bytes) -> tuple[int, int, bool]:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return await _read_response(reader)


def test_response_parsing() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert asyncio.run(_parse(ok)) == (200, len(ok), True)
    chunked = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\n\r\n"
    assert asyncio.run(_parse(chunked)) == (201, len(chunked), True)
    close = b"HTTP/1.1 503 Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    assert asyncio.run(_parse(close)) == (503, len(close), False)
    to_eof = b"HTTP/1.0 200 OK\r\n\r\nbody until the end"
    assert asyncio.run(_parse(to_eof)) == (200, len(to_eof), False)
    with pytest.raises(Exception, match="garbage"):
        asyncio.run(_parse(b"garbage\r\n\r\n"))


# --------------------------------------------------------------------------- against a server


def test_scheduling_accuracy_at_200_per_second(server: TinyServer) -> None:
    res = run_open_loop_sync(OpenLoopConfig(url=server.url, rate=200, duration_s=2.0, body=b"{}"))
    st = res.stats
    assert st.requests == 400 and st.ok == 400 and st.errors == 0
    assert st.send_rate is not None
    assert st.send_rate == pytest.approx(200, rel=0.02)
    # Measured ~0.01 ms p50, < 0.1 ms p99 on a quiet machine; the bounds leave room for a
    # shared 2-core one. Never early: a request may leave late, not before its slot.
    assert st.lag_ms.min >= 0.0
    assert st.lag_ms.p50 < 1.0
    assert st.lag_ms.p99 < 10.0
    assert st.throughput == pytest.approx(200, rel=0.05)
    # Each sent request left close to its slot: no drift over the run.
    sends = np.array([r.sent_at for r in res.records])
    assert abs(sends[-1] - res.records[-1].scheduled_at) < 0.05
    assert res.connections_opened <= 16  # keep-alive reuse, not a connection per request
    print(
        f"\nsend rate {st.send_rate:.2f}/s, lag p50 {st.lag_ms.p50:.3f} ms p99 {st.lag_ms.p99:.3f} ms "
        f"max {st.lag_ms.max:.3f} ms, latency p50 {st.latency_ms.p50:.3f} ms, conns {res.connections_opened}"
    )


def test_poisson_run_follows_its_timetable(server: TinyServer) -> None:
    cfg = OpenLoopConfig(url=server.url, rate=200, duration_s=1.0, arrival="poisson", seed=7, spin_s=0.0)
    res = run_open_loop_sync(cfg)
    expected = schedule(200, 1.0, "poisson", seed=7)
    np.testing.assert_allclose([r.scheduled_at for r in res.records], expected)
    assert res.stats.ok == len(expected)
    assert res.stats.lag_ms.min >= 0.0  # without the spin too: late by up to ~1 ms, never early
    assert res.stats.lag_ms.p50 < 2.0


@pytest.mark.parametrize("behaviour", [Behaviour(stall_at=100, stall_s=0.3)])
def test_stall_shows_in_the_tail_open_loop_but_not_closed_loop(server: TinyServer, behaviour: Behaviour) -> None:
    res = run_open_loop_sync(OpenLoopConfig(url=server.url, rate=200, duration_s=2.0, max_connections=128))
    st = res.stats
    assert st.ok == 400 and st.dropped == 0
    # ~60 requests were scheduled during the 300 ms stall; each waited out the rest of it.
    slow = [r for r in res.records if r.latency_s is not None and r.latency_s > 0.1]
    assert len(slow) >= 30
    assert st.latency_ms.max >= 280
    assert st.latency_ms.p99 >= 200  # the top 1 % (4 requests) all sat through most of the stall
    # The generator itself stayed on schedule while the server was stuck.
    assert st.lag_ms.p99 < 20.0

    # The same server stalling once under a closed loop on one connection: one slow request
    # out of many, and the p99 never sees it.
    behaviour.stall_at = server.count + 50

    async def closed_loop(seconds: float) -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        req = build_request(parse_url(server.url), body=b"{}")
        lat: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            writer.write(req)
            await _read_response(reader)
            lat.append((time.perf_counter() - t0) * 1e3)
        writer.close()
        return lat

    lat = asyncio.run(closed_loop(1.0))
    assert max(lat) >= 280  # it did see the stall once…
    assert np.percentile(lat, 99) < 50  # …but it weighs 1 request, not 60


@pytest.mark.parametrize("behaviour", [Behaviour(error_every=10, truncate_every=25)])
def test_errors_and_non_2xx_are_counted(server: TinyServer, behaviour: Behaviour) -> None:
    res = run_open_loop_sync(OpenLoopConfig(url=server.url, rate=200, duration_s=0.5))
    st = res.stats
    assert st.requests == 100
    by_status = st.status_counts
    assert by_status.get("500", 0) >= 5
    assert st.transport_errors.get("closed", 0) >= 2
    assert st.ok + by_status.get("500", 0) + sum(st.transport_errors.values()) == 100
    assert st.errors == 100 - st.ok
    assert st.error_rate == pytest.approx(st.errors / 100)
    assert st.latency_ms.count == st.responses  # latency over every HTTP response, 500s included


@pytest.mark.parametrize("behaviour", [Behaviour(close_after_each=True)])
def test_a_kept_alive_connection_closed_by_the_server_is_retried_once(server: TinyServer, behaviour: Behaviour) -> None:
    res = run_open_loop_sync(OpenLoopConfig(url=server.url, rate=100, duration_s=0.3))
    assert res.stats.ok == 30 and res.stats.errors == 0
    assert server.count == 30  # the failed writes never reached a handler: no double sends
    assert res.connections_opened >= 30


def test_connection_refused_counts_as_connect_errors() -> None:

    from bastion.bench.launcher import free_port

    port = free_port()  # a port nobody listens on (from this test worker's own range)
    res = run_open_loop_sync(OpenLoopConfig(url=f"http://127.0.0.1:{port}/", rate=50, duration_s=0.2))
    assert res.stats.requests == 10
    assert res.stats.transport_errors == {"connect": 10}
    assert res.stats.error_rate == 1.0 and res.stats.ok == 0


@pytest.mark.parametrize("behaviour", [Behaviour(delay_s=0.2)])
def test_beyond_max_connections_requests_are_dropped_not_delayed(server: TinyServer, behaviour: Behaviour) -> None:
    res = run_open_loop_sync(
        OpenLoopConfig(url=server.url, rate=100, duration_s=0.5, max_connections=2, initial_connections=0)
    )
    st = res.stats
    assert res.max_in_flight <= 2 and res.connections_opened <= 2
    # 2 connections x 200 ms each over 0.5 s: ~6 answered, the rest dropped at their slot
    assert st.dropped >= 35
    assert st.ok + st.dropped == 50
    assert all(r.error == "dropped" for r in res.records if r.sent_at is None)
    assert st.lag_ms.max < 20.0  # what was sent left on time; nothing was queued behind


@pytest.mark.parametrize("behaviour", [Behaviour(stall_at=5, stall_s=0.3)])
def test_warmup_is_excluded(server: TinyServer, behaviour: Behaviour) -> None:
    res = run_open_loop_sync(OpenLoopConfig(url=server.url, rate=100, duration_s=1.0, warmup_s=0.5))
    assert len(res.records) == 150
    assert sum(r.warmup for r in res.records) == 50
    assert all(r.warmup == (r.scheduled_at < 0.5) for r in res.records)
    assert res.stats.requests == 100 and res.stats.ok == 100
    # the stall hit warm-up requests only (it ended by 0.35 s)
    assert max(r.latency_s or 0 for r in res.records if r.warmup) > 0.2
    assert res.stats.latency_ms.max < 100


def test_headers_body_and_content_type_are_sent(server: TinyServer, behaviour: Behaviour) -> None:
    cfg = OpenLoopConfig(
        url=server.url,
        rate=50,
        duration_s=0.1,
        body=b"\x00\x01binary",
        content_type="application/octet-stream",
        headers={"Authorization": "Bearer secret-key", "Inference-Header-Content-Length": "0"},
    )
    res = run_open_loop_sync(cfg)
    assert res.stats.ok == 5
    head, body = behaviour.seen[0]
    assert body == b"\x00\x01binary"
    assert b"Authorization: Bearer secret-key\r\n" in head
    assert b"Content-Type: application/octet-stream\r\n" in head
    assert head.startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n")
