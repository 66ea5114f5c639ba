"""Backpressure and graceful shutdown on a genuinely slow model (~100 ms a call)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.models import write_slow_model
from tests.promtext import sample
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow

BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}]}


@pytest.fixture
def slow_repo(tmp_path: Path, demo_repo: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(demo_repo / "simple", repo / "simple")
    write_slow_model(repo, max_queue_size=2)
    return repo


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _burst(url: str, n: int) -> list[tuple[int, float, str | None]]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:

        async def one() -> tuple[int, float, str | None]:
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v2/models/slow/infer", json=BODY)
            return r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")

        return await asyncio.gather(*(one() for _ in range(n)))


def test_overload_rejects_fast_and_completes_accepted(slow_repo: Path) -> None:
    with ServerProcess(slow_repo, "--poll-interval", "0") as server:
        rss_before = _rss_kb(server.proc.pid)
        for _ in range(3):
            results = asyncio.run(_burst(server.url, 32))
            ok = [r for r in results if r[0] == 200]
            rejected = [r for r in results if r[0] == 503]
            assert len(ok) + len(rejected) == 32, results
            # one running + a queue of 2 → at most a handful accepted, the rest refused
            assert 1 <= len(ok) <= 6, results
            assert len(rejected) >= 26
            assert all(r[2] is not None and int(r[2]) >= 1 for r in rejected)
            # refusals are immediate, not after waiting behind the queue
            assert sorted(r[1] for r in rejected)[len(rejected) // 2] < 0.5
        # the fast model is unaffected by the slow model's queue
        r = httpx.post(f"{server.url}/v2/models/simple/infer", json={"inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}]})
        assert r.status_code == 200
        assert _rss_kb(server.proc.pid) - rss_before < 50_000  # bounded: no backlog kept in memory
        metrics = httpx.get(f"{server.url}/metrics").text
        rejected_total = sample(metrics, "bastion_inference_requests_total", model="slow", outcome="rejected")
        assert rejected_total is not None and rejected_total >= 78


def test_sigterm_drains_in_flight_then_exits_zero(slow_repo: Path) -> None:
    # room for all three whatever the order they arrive in: with a queue of 2, three
    # requests landing before the first is dispatched would turn the third into a 503
    write_slow_model(slow_repo, max_queue_size=16)
    server = ServerProcess(slow_repo, "--poll-interval", "0")

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [asyncio.create_task(client.post(f"{server.url}/v2/models/slow/infer", json=BODY))
                     for _ in range(3)]

            async def queued() -> float | None:
                text = (await client.get(f"{server.url}/metrics")).text
                return sample(text, "bastion_inference_queue_depth", model="slow")

            # SIGTERM once the requests are in flight: one computing (~100 ms), two queued behind it
            deadline = time.monotonic() + 30
            while await queued() != 2:
                assert not any(t.done() for t in tasks), "a request was answered before all three were in"
                assert time.monotonic() < deadline, f"the requests never were in flight:\n{server.logs()}"
                await asyncio.sleep(0.002)
            server.proc.send_signal(signal.SIGTERM)
            return [(await t).status_code for t in tasks]

    try:
        codes = asyncio.run(scenario())
        assert codes == [200, 200, 200]
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/v2/health/live", timeout=2)


def test_request_timeout_is_504_and_the_server_keeps_serving(slow_repo: Path) -> None:
    """--request-timeout bounds queue + compute: requests queued behind a ~100 ms call with a
    50 ms budget get 504 (gRPC DEADLINE_EXCEEDED), and the server goes on serving."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    write_slow_model(slow_repo, max_queue_size=16)
    with ServerProcess(slow_repo, "--poll-interval", "0", "--request-timeout", "0.05") as server:
        results = asyncio.run(_burst(server.url, 6))
        codes = [r[0] for r in results]
        assert codes.count(504) >= 4, results
        assert all(c in (200, 504) for c in codes), results
        r = httpx.post(f"{server.url}/v2/models/slow/infer", json=BODY)
        assert r.status_code == 504 and "request timeout of 0.05 s" in r.json()["error"]
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            x = grpcclient.InferInput("x", [1, 1], "FP32")
            x.set_data_from_numpy(np.array([[0.5]], dtype=np.float32))
            with pytest.raises(InferenceServerException) as err:
                client.infer("slow", [x])
            assert str(err.value.status()) == "StatusCode.DEADLINE_EXCEEDED"
        finally:
            client.close()
        # a fast model on the same server is unaffected
        body = {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
                           {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}]}
        assert httpx.post(f"{server.url}/v2/models/simple/infer", json=body).status_code == 200
