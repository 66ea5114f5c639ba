"""The dynamic batcher: merging, splitting, bounds and failures.

The runtime here is a real (tiny) numpy model implementing the Runtime protocol, with a
gate so a test can hold a batch "computing" while it queues more requests. The tests wait
for what they need (a batch inside the runtime, requests in the queue) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bastion.core.errors import Overloaded, Unprocessable
from bastion.core.metadata import BatchingConfig, TensorSpec
from bastion.engine.batcher import Batcher, BatchObserver
from tests.polling import async_wait_until


class AffineRuntime:
    """y = 2x + 1 row-wise; records the batch sizes it was called with."""

    platform = "test_numpy"

    def __init__(self, fail_on: float | None = None) -> None:
        self.calls: list[int] = []
        self.entered: list[int] = []  # batch sizes that reached predict, before the gate
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("x", "FP32", (-1, -1)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("y", "FP32", (-1, -1)),)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.append(inputs["x"].shape[0])
        self.gate.wait(5)
        x = inputs["x"]
        self.calls.append(x.shape[0])
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("boom")
        return {"y": 2 * x + 1}

    def close(self) -> None:
        pass


class Recorder(BatchObserver):
    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.depth = 0

    def queue_depth(self, depth: int) -> None:
        self.depth = depth

    def batch_done(self, rows: int, requests: int, queue_s: list[float], compute_s: float) -> None:
        self.batches.append((rows, requests))


def _x(rows: int, value: float, width: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, width), value, np.float32)}


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def computing(rt: AffineRuntime, batches: int = 1) -> None:
    """Until ``batches`` batches have reached the runtime (held there while the gate is shut)."""
    await async_wait_until(lambda: len(rt.entered) >= batches, 10, what=f"{batches} batch(es) in the runtime")


async def queued(rec: Recorder, depth: int) -> None:
    """Until the batcher reports ``depth`` requests waiting."""
    await async_wait_until(lambda: rec.depth == depth, 10, what=f"{depth} request(s) queued")


@pytest.fixture
def executor():  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(2) as ex:
        yield ex


def test_requests_queued_while_busy_are_merged_and_split_back(executor) -> None:  # type: ignore[no-untyped-def]
    rt = AffineRuntime()
    rec = Recorder()
    b = Batcher(rt, executor, max_batch_size=64, batching=BatchingConfig(), observer=rec)

    async def scenario() -> list[dict[str, np.ndarray]]:
        rt.gate.clear()
        first = asyncio.ensure_future(b.submit(_x(1, 0.0), 1))
        await computing(rt)  # the first batch is computing (held by the gate)
        rest = [asyncio.ensure_future(b.submit(_x(r, float(i)), r)) for i, r in enumerate([1, 2, 3], start=1)]
        await queued(rec, 3)
        rt.gate.set()
        return [await first, *[await f for f in rest]]

    results = run(scenario())
    assert rt.calls == [1, 6]
    assert rec.batches == [(1, 1), (6, 3)]
    for i, (res, rows) in enumerate(zip(results, [1, 1, 2, 3], strict=True)):
        np.testing.assert_array_equal(res["y"], np.full((rows, 4), 2 * i + 1, np.float32))


def test_max_batch_size_and_preferred_sizes_cut_batches(executor) -> None:  # type: ignore[no-untyped-def]
    rt = AffineRuntime()
    cfg = BatchingConfig(preferred_batch_sizes=(4,))
    b = Batcher(rt, executor, max_batch_size=6, batching=cfg)

    async def scenario() -> None:
        rt.gate.clear()
        futs = [asyncio.ensure_future(b.submit(_x(1, float(i)), 1)) for i in range(7)]
        await computing(rt)  # the first cut is in the runtime, the rest waits behind it
        rt.gate.set()
        await asyncio.gather(*futs)

    run(scenario())
    # all 7 arrive in one loop iteration: a preferred 4 (of at most 6), then the remaining 3
    assert rt.calls == [4, 3]


def test_requests_of_one_loop_iteration_share_a_batch(executor) -> None:  # type: ignore[no-untyped-def]
    rt = AffineRuntime()
    b = Batcher(rt, executor, max_batch_size=64, batching=BatchingConfig())

    async def scenario() -> None:
        await asyncio.gather(*(b.submit(_x(1, float(i)), 1) for i in range(10)))

    run(scenario())
    assert rt.calls == [10]


def test_incompatible_shapes_are_not_merged(executor) -> None:  # type: ignore[no-untyped-def]
    rt = AffineRuntime()
    rec = Recorder()
    b = Batcher(rt, executor, max_batch_size=64, batching=BatchingConfig(), observer=rec)

    async def scenario() -> list[dict[str, np.ndarray]]:
        rt.gate.clear()
        head = asyncio.ensure_future(b.submit(_x(1, 0.0), 1))
        await computing(rt)
        futs = [
            asyncio.ensure_future(b.submit(_x(1, 1.0, width=4), 1)),
            asyncio.ensure_future(b.submit(_x(1, 2.0, width=8), 1)),
            asyncio.ensure_future(b.submit(_x(1, 3.0, width=4), 1)),
        ]
        await queued(rec, 3)
        rt.gate.set()
        await head
        return [await f for f in futs]

    out = run(scenario())
    assert sorted(rt.calls) == [1, 1, 2]
    assert out[1]["y"].shape == (1, 8)
    assert out[2]["y"][0, 0] == 7


def test_queue_bound_rejects_at_once_with_retry_after(executor) -> None:  # type: ignore[no-untyped-def]
    rt = AffineRuntime()
    rec = Recorder()
    b = Batcher(rt, executor, max_batch_size=0, batching=BatchingConfig(max_queue_size=2), observer=rec)

    async def scenario() -> None:
        rt.gate.clear()
        running = asyncio.ensure_future(b.submit(_x(1, 0.0), 1))
        await computing(rt)
        waiting = [asyncio.ensure_future(b.submit(_x(1, 1.0), 1)) for _ in range(2)]
        await queued(rec, 2)
        with pytest.raises(Overloaded) as err:
            await b.submit(_x(1, 2.0), 1)
        assert err.value.retry_after is not None and err.value.retry_after >= 1
        rt.gate.set()
        await asyncio.gather(running, *waiting)
        # capacity is back once the queue drained
        await b.submit(_x(1, 3.0), 1)

    run(scenario())
    assert rt.calls == [1, 1, 1, 1]  # max_batch_size 0: never merged


def test_queue_delay_waits_for_more_requests(executor) -> None:  # type: ignore[no-untyped-def]
    rt = AffineRuntime()
    b = Batcher(rt, executor, max_batch_size=8, batching=BatchingConfig(max_queue_delay_us=50_000))

    async def scenario() -> None:
        futs = []
        for i in range(3):
            futs.append(asyncio.ensure_future(b.submit(_x(1, float(i)), 1)))
            await asyncio.sleep(0.005)
        await asyncio.gather(*futs)

    run(scenario())
    assert rt.calls == [3]


def test_a_failing_batch_fails_its_requests_only(executor) -> None:  # type: ignore[no-untyped-def]
    rt = AffineRuntime(fail_on=9.0)
    b = Batcher(rt, executor, max_batch_size=8, batching=BatchingConfig())

    async def scenario() -> None:
        with pytest.raises(Unprocessable) as err:
            await b.submit(_x(1, 9.0), 1)
        # the runtime's own text can name the model's internals: it goes to the log only
        assert "boom" not in str(err.value) and "could not compute on this input" in str(err.value)
        ok = await b.submit(_x(2, 1.0), 2)
        assert ok["y"].shape == (2, 4)

    run(scenario())


def test_a_bad_request_does_not_fail_the_requests_batched_with_it(executor) -> None:  # type: ignore[no-untyped-def]
    rt = AffineRuntime(fail_on=9.0)
    rec = Recorder()
    b = Batcher(rt, executor, max_batch_size=8, batching=BatchingConfig(), observer=rec)

    async def scenario() -> None:
        rt.gate.clear()  # hold the first batch so the next three queue and merge
        first = asyncio.ensure_future(b.submit(_x(1, 1.0), 1))
        await computing(rt)
        good1 = asyncio.ensure_future(b.submit(_x(1, 2.0), 1))
        bad = asyncio.ensure_future(b.submit(_x(1, 9.0), 1))
        good2 = asyncio.ensure_future(b.submit(_x(2, 3.0), 2))
        await queued(rec, 3)
        rt.gate.set()
        assert (await first)["y"].shape == (1, 4)
        assert (await good1)["y"][0, 0] == 5
        assert (await good2)["y"].shape == (2, 4)
        with pytest.raises(Unprocessable):
            await bad

    run(scenario())


def test_close_drains_then_refuses(executor) -> None:  # type: ignore[no-untyped-def]
    rt = AffineRuntime()
    b = Batcher(rt, executor, max_batch_size=8, batching=BatchingConfig())

    async def scenario() -> None:
        rt.gate.clear()
        fut = asyncio.ensure_future(b.submit(_x(1, 1.0), 1))
        await computing(rt)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0)  # one loop turn: close() has begun (it refuses, then waits for the batch)
        assert not closing.done()
        rt.gate.set()
        await closing
        assert (await fut)["y"][0, 0] == 3
        with pytest.raises(Overloaded):
            await b.submit(_x(1, 1.0), 1)

    run(scenario())


class ThreadRecorder(AffineRuntime):
    """AffineRuntime that notes the thread each batch ran on, optionally taking its time."""

    def __init__(self, cost_s: float = 0.0) -> None:
        super().__init__()
        self.threads: list[str] = []
        self.cost_s = cost_s

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.current_thread().name)
        if self.cost_s:
            threading.Event().wait(self.cost_s)
        return super().predict(inputs)


def test_cheap_batches_run_on_the_loop_thread_once_measured(executor) -> None:  # type: ignore[no-untyped-def]
    from bastion.engine.batcher import INLINE_AFTER

    rt = ThreadRecorder()
    b = Batcher(rt, executor, max_batch_size=8, batching=BatchingConfig())

    async def scenario() -> str:
        for i in range(INLINE_AFTER + 5):
            out = await b.submit(_x(1, float(i)), 1)
            assert out["y"][0, 0] == 2 * i + 1
        return threading.current_thread().name

    loop_thread = run(scenario())
    # the first batches are timed on a predict thread; then they cost microseconds and run inline
    assert loop_thread not in rt.threads[:INLINE_AFTER]
    assert set(rt.threads[INLINE_AFTER + 1 :]) == {loop_thread}


def test_costly_batches_stay_on_predict_threads(executor) -> None:  # type: ignore[no-untyped-def]
    from bastion.engine.batcher import INLINE_AFTER

    rt = ThreadRecorder(cost_s=0.002)  # 2 ms a batch: far above the inline bound

    b = Batcher(rt, executor, max_batch_size=8, batching=BatchingConfig())

    async def scenario() -> str:
        for i in range(INLINE_AFTER + 4):
            await b.submit(_x(1, float(i)), 1)
        return threading.current_thread().name

    loop_thread = run(scenario())
    assert loop_thread not in rt.threads


def test_inline_max_us_0_keeps_every_batch_on_predict_threads(executor) -> None:  # type: ignore[no-untyped-def]
    from bastion.engine.batcher import INLINE_AFTER

    rt = ThreadRecorder()
    b = Batcher(rt, executor, max_batch_size=8, batching=BatchingConfig(inline_max_us=0))

    async def scenario() -> str:
        for i in range(INLINE_AFTER + 4):
            await b.submit(_x(1, float(i)), 1)
        return threading.current_thread().name

    assert run(scenario()) not in rt.threads


def test_a_long_queue_of_inline_batches_is_served_without_recursion(executor) -> None:  # type: ignore[no-untyped-def]
    from bastion.engine.batcher import INLINE_AFTER

    rt = ThreadRecorder()
    # one row a batch: 3000 queued requests become 3000 inline batches in one dispatch pass
    b = Batcher(rt, executor, max_batch_size=1, batching=BatchingConfig(max_queue_size=5000))

    async def scenario() -> int:
        for _ in range(INLINE_AFTER + 1):
            await b.submit(_x(1, 0.0), 1)
        outs = await asyncio.gather(*(b.submit(_x(1, float(i)), 1) for i in range(3000)))
        assert [float(o["y"][0, 0]) for o in outs] == [2.0 * i + 1 for i in range(3000)]
        return len(outs)

    assert run(scenario()) == 3000
