"""Per-model-version dynamic batcher: a bounded queue in front of ``runtime.predict``.

Requests are merged into one ``predict`` call when they are compatible (same non-batch
dims and dtypes), then the outputs are split back by rows. The queue is bounded: when it
is full a request is refused at once with ``Overloaded`` (503 + Retry-After) instead of
joining an unbounded backlog. ``predict`` runs on executor threads, never on the event
loop, so the loop keeps parsing requests while a batch computes; that overlap is where
batching wins throughput even with a queue delay of zero.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np

from bastion.core.errors import (
    BastionError,
    InternalError,
    ModelNotReady,
    Overloaded,
    RequestTimeout,
    Unprocessable,
)
from bastion.core.metadata import BatchingConfig
from bastion.runtimes.base import Runtime

log = logging.getLogger("bastion.engine")

Tensors = dict[str, np.ndarray]

# A batch whose predict is estimated (from the batches before it) to take at most
# ``BatchingConfig.inline_max_us`` runs on the event loop's thread instead of being handed
# to a predict thread; the estimate is trusted once this many batches were timed.
INLINE_AFTER = 8


class Submitter(Protocol):
    """Where batches run: ``engine.predict_pool.PredictPool`` (or any executor's ``submit``;
    the batcher never reads what it returns)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> object: ...

class BatchObserver:
    """Hooks the engine calls so metrics live outside it. The default does nothing."""

    def queue_depth(self, depth: int) -> None:
        pass

    def batch_done(self, rows: int, requests: int, queue_s: list[float], compute_s: float) -> None:
        pass


class _Pending:
    __slots__ = ("enqueued", "future", "inputs", "rows")

    def __init__(self, inputs: Tensors, rows: int, future: asyncio.Future[Tensors]) -> None:
        self.inputs = inputs
        self.rows = rows
        self.future = future
        self.enqueued = time.perf_counter()


def _compatible(a: Tensors, b: Tensors) -> bool:
    if a.keys() != b.keys():
        return False
    for name, arr in a.items():
        other = b[name]
        if arr.dtype != other.dtype or arr.shape[1:] != other.shape[1:]:
            return False
    return True


class Batcher:
    """Queues requests of one model version and runs them in batches.

    ``max_batch_size == 0`` means the model does not batch: each request runs alone,
    still through the same bounded queue.
    """

    def __init__(
        self,
        runtime: Runtime,
        executor: Submitter,
        *,
        max_batch_size: int,
        batching: BatchingConfig,
        instance_count: int = 1,
        observer: BatchObserver | None = None,
        uniform_inputs: bool = False,
        timeout_s: float | None = None,
    ) -> None:
        """``uniform_inputs``: the caller guarantees every request has the same input names,
        dtypes and non-batch dims (a signature without variable dims beyond the batch dim),
        so the per-request compatibility check can be skipped."""
        self._runtime = runtime
        self._name = getattr(runtime, "name", "") or "model"
        self._predict: Callable[[Tensors], Tensors] = runtime.predict
        # a runtime that waits on another process offers a coroutine: awaited on the loop
        self._apredict: Callable[[Tensors], Awaitable[Tensors]] | None = getattr(runtime, "apredict", None)
        self._executor = executor
        self._max_rows = max_batch_size if batching.enabled and max_batch_size > 0 else 0
        self._delay_s = batching.max_queue_delay_us / 1e6 if self._max_rows else 0.0
        # a runtime that waits on another process (the trusted worker) never runs on the loop
        self._inline_max_s = 0.0 if getattr(runtime, "remote", False) else batching.inline_max_us / 1e6
        self._preferred = tuple(sorted(s for s in batching.preferred_batch_sizes if 0 < s <= self._max_rows))
        self._max_queue = max(1, batching.max_queue_size)
        self._slots = max(1, instance_count)
        self._observer = observer or BatchObserver()
        self._uniform = uniform_inputs
        # request timeout: every request joins _inflight in arrival order and one sweep timer
        # (not a timer per request, which costs ~6 µs a request) fails the overdue ones
        self._timeout_s = timeout_s
        self._inflight: deque[_Pending] = deque()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._running = 0
        self._running_rows = 0
        self._delay_handle: asyncio.TimerHandle | None = None
        self._tick_pending = False
        self._closed = False
        # exponentially weighted compute time per row (predict alone, without the hand-off),
        # for an honest Retry-After and to choose where a batch runs
        self._row_cost_s = 1e-4
        self._measured = 0  # batches timed so far: the estimate is trusted from INLINE_AFTER on
        self._inline = False  # a batch is running on the loop's thread right now
        self._tasks: set[asyncio.Task[None]] = set()  # apredict batches in flight

    async def submit(self, inputs: Tensors, rows: int) -> Tensors:
        """Run ``inputs`` (``rows`` along the batch dim) and return all outputs."""
        if self._closed:
            raise Overloaded("model version is being unloaded; retry", retry_after=1)
        if len(self._queue) >= self._max_queue:
            raise Overloaded(
                f"queue full ({self._max_queue} requests waiting); retry later",
                retry_after=self._retry_after(),
            )
        loop = asyncio.get_running_loop()
        item = _Pending(inputs, rows, loop.create_future())
        self._queue.append(item)
        if self._timeout_s is not None:
            self._inflight.append(item)
            if self._sweep_handle is None:
                self._sweep_handle = loop.call_later(self._sweep_interval(), self._sweep, loop)
        self._queued_rows += rows
        self._observer.queue_depth(len(self._queue))
        if not self._tick_pending:
            # dispatch at the end of this loop iteration, not now: the requests that arrived
            # in the same read burst are still being decoded and join the batch, so one
            # thread hand-off serves them all
            self._tick_pending = True
            loop.call_soon(self._on_tick, loop)
        try:
            return await item.future
        except asyncio.CancelledError:
            # a timed-out or abandoned request must not cost a model run: drop it if still queued
            try:
                self._queue.remove(item)
            except ValueError:
                pass  # already in a running batch; its result is discarded
            else:
                self._queued_rows -= item.rows
                self._observer.queue_depth(len(self._queue))
            raise

    def _sweep_interval(self) -> float:
        # overdue requests are failed within a quarter of the timeout (at most 0.25 s late)
        return min(0.25, max(0.001, self._timeout_s / 4))  # type: ignore[operator]

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep_handle = None
        inflight = self._inflight
        deadline = time.perf_counter() - self._timeout_s  # type: ignore[operator]
        while inflight:
            p = inflight[0]
            if p.future.done():
                inflight.popleft()
            elif p.enqueued <= deadline:
                inflight.popleft()
                # still queued: it will be skipped at dispatch; running: its result is dropped
                p.future.set_exception(
                    RequestTimeout(
                        f"model '{self._name}' did not answer within the request timeout of {self._timeout_s:g} s"
                    )
                )
            else:
                break
        if inflight:
            self._sweep_handle = loop.call_later(self._sweep_interval(), self._sweep, loop)

    def _on_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._tick_pending = False
        self._schedule(loop)

    def estimated_wait_ms(self) -> float:
        """How long a request arriving now would wait before its batch starts: the queued
        and running rows at the recently measured cost per row (zoo selection uses it to
        keep a busy variant out of a tight latency target)."""
        return (self._queued_rows + self._running_rows) * self._row_cost_s * 1000.0 / self._slots

    def _retry_after(self) -> int:
        backlog_s = self._queued_rows * self._row_cost_s / self._slots
        return max(1, math.ceil(backlog_s))

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._queue and self._running < self._slots:
            if self._delay_s and self._queued_rows < self._dispatch_rows():
                wait = self._queue[0].enqueued + self._delay_s - time.perf_counter()
                if wait > 0:
                    if self._delay_handle is None:
                        self._delay_handle = loop.call_later(wait, self._delay_expired, loop)
                    return
            self._dispatch(loop)

    def _dispatch_rows(self) -> int:
        """Rows at which a batch goes without waiting out the queue delay."""
        return self._preferred[-1] if self._preferred else self._max_rows

    def _delay_expired(self, loop: asyncio.AbstractEventLoop) -> None:
        self._delay_handle = None
        if self._queue and self._running < self._slots:
            self._dispatch(loop)
            self._schedule(loop)

    def _take_batch(self) -> list[_Pending]:
        queue = self._queue
        while len(queue) > 1 and queue[0].future.done():  # timed out while queued
            self._queued_rows -= queue.popleft().rows
        first = queue.popleft()
        batch = [first]
        rows = first.rows
        if self._max_rows and self._queue:
            limit = self._max_rows
            if self._preferred:
                # cut at the largest preferred size the queue can fill, else take all that fits
                fill = min(self._queued_rows, self._max_rows)
                fitting = [p for p in self._preferred if p <= fill]
                if fitting:
                    limit = fitting[-1]
            skipped: list[_Pending] = []
            while self._queue and rows < limit:
                nxt = self._queue[0]
                if rows + nxt.rows > limit:
                    break
                self._queue.popleft()
                if self._uniform or _compatible(first.inputs, nxt.inputs):
                    batch.append(nxt)
                    rows += nxt.rows
                else:
                    skipped.append(nxt)
            # incompatible requests keep their place at the head of the queue
            self._queue.extendleft(reversed(skipped))
        self._queued_rows -= rows
        return batch

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._delay_handle is not None:
            self._delay_handle.cancel()
            self._delay_handle = None
        batch = self._take_batch()
        rows = sum(p.rows for p in batch)
        self._running += 1
        self._running_rows += rows
        self._observer.queue_depth(len(self._queue))
        started = time.perf_counter()
        if len(batch) == 1:
            merged = batch[0].inputs
        else:
            names = batch[0].inputs.keys()
            merged = {n: np.concatenate([p.inputs[n] for p in batch]) for n in names}
        if self._apredict is not None:
            self._tasks.add(task := loop.create_task(self._run_async(loop, batch, started, merged)))
            task.add_done_callback(self._tasks.discard)
        elif self._measured >= INLINE_AFTER and self._row_cost_s * rows <= self._inline_max_s:
            # cheaper to run here than to hand over: waking a predict thread, the GIL passed
            # back and forth while it runs the runtime's Python wrapper, and the wake-up of
            # this loop cost more than a batch this small computes (measured on the 2-core VM:
            # digits, 64-row JSON requests, 1.0 ms bound: +35 % throughput against handing
            # every batch over). The loop is held at most about this long.
            self._run_inline(loop, batch, started, merged)
        else:
            self._executor.submit(self._run, loop, batch, started, merged)

    def _run_inline(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], started: float,
                    merged: Tensors) -> None:
        # called from _schedule's loop, which goes on with the queue: completing must not
        # schedule again (recursion as deep as the queue is long)
        self._inline = True
        try:
            self._predict_inline(loop, batch, started, merged)
        finally:
            self._inline = False

    def _predict_inline(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], started: float,
                        merged: Tensors) -> None:
        try:
            outputs = self._predict(merged)
        except BaseException as err:
            if len(batch) > 1 and not isinstance(err, ModelNotReady):
                self._complete_each(loop, batch, started, self._one_by_one(batch), time.perf_counter() - started)
                return
            self._complete(loop, batch, started, None, err, time.perf_counter() - started)
            return
        self._complete(loop, batch, started, outputs, None, time.perf_counter() - started)

    async def _run_async(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], started: float,
                         merged: Tensors) -> None:
        assert self._apredict is not None
        t0 = time.perf_counter()
        try:
            outputs = await self._apredict(merged)
        except Exception as err:
            if len(batch) > 1 and not (isinstance(err, BastionError) and err.http_status == 503):
                results: list[tuple[Tensors | None, BaseException | None]] = []
                for p in batch:  # one client's input must not fail the others merged with it
                    try:
                        results.append((await self._apredict(p.inputs), None))
                    except Exception as one:
                        results.append((None, one))
                self._complete_each(loop, batch, started, results, time.perf_counter() - t0)
                return
            self._complete(loop, batch, started, None, err, time.perf_counter() - t0)
            return
        self._complete(loop, batch, started, outputs, None, time.perf_counter() - t0)

    def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], started: float, merged: Tensors) -> None:
        """On the executor thread: predict, then one wake-up of the loop with the outcome
        (cheaper than a concurrent future with a done callback)."""
        t0 = time.perf_counter()
        try:
            outputs, exc = self._predict(merged), None
        except BaseException as err:
            outputs, exc = None, err
            if len(batch) > 1 and not isinstance(err, ModelNotReady):
                # one client's input must not fail the others merged with it: run each alone
                results = self._one_by_one(batch)
                loop.call_soon_threadsafe(
                    self._complete_each, loop, batch, started, results, time.perf_counter() - t0
                )
                return
        loop.call_soon_threadsafe(self._complete, loop, batch, started, outputs, exc, time.perf_counter() - t0)

    def _one_by_one(self, batch: list[_Pending]) -> list[tuple[Tensors | None, BaseException | None]]:
        results: list[tuple[Tensors | None, BaseException | None]] = []
        for p in batch:
            try:
                results.append((self._predict(p.inputs), None))
            except BaseException as err:
                results.append((None, err))
        return results

    def _complete_each(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Pending],
        started: float,
        results: list[tuple[Tensors | None, BaseException | None]],
        compute_s: float,
    ) -> None:
        for p, (outputs, exc) in zip(batch, results, strict=True):
            self._finish([p], outputs, exc, p.rows)
        self._account(loop, batch, started, compute_s)

    def _failure(self, exc: BaseException) -> BastionError:
        if isinstance(exc, BastionError):
            return exc
        # the runtime raised on this input (a value it cannot convert, a value out of range
        # for the estimator...): the client's data, not a server bug, and the runtime's
        # text names the model's internals, so it stays in the log
        log.warning("predict failed on a request's input", exc_info=exc, extra={"model": self._name})
        return Unprocessable(
            f"model '{self._name}' could not compute on this input ({type(exc).__name__}); "
            "check the values against the model's expected range"
        )

    def _complete(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Pending],
        started: float,
        outputs: Tensors | None,
        exc: BaseException | None,
        compute_s: float,
    ) -> None:
        self._finish(batch, outputs, exc, sum(p.rows for p in batch))
        self._account(loop, batch, started, compute_s)

    def _finish(self, batch: list[_Pending], outputs: Tensors | None, exc: BaseException | None, rows: int) -> None:
        if exc is None:
            try:
                self._deliver(batch, outputs, rows)  # type: ignore[arg-type]
            except BastionError as err:
                exc = err
            except Exception as err:  # a runtime returning outputs that cannot be split is a bug
                log.exception("splitting batch outputs failed")
                exc = InternalError(f"model '{self._name}' returned outputs that cannot be split by request")
                exc.__cause__ = err
        if exc is not None:
            failure = self._failure(exc)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(failure)

    def _account(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], started: float,
                 compute_s: float) -> None:
        self._running -= 1
        self._measured += 1
        rows = sum(p.rows for p in batch)
        self._running_rows -= rows
        self._row_cost_s = 0.9 * self._row_cost_s + 0.1 * (compute_s / max(rows, 1))
        self._observer.batch_done(rows, len(batch), [started - p.enqueued for p in batch], compute_s)
        if self._queue and not self._inline:
            self._schedule(loop)

    @staticmethod
    def _deliver(batch: list[_Pending], outputs: Tensors, rows: int) -> None:
        if len(batch) == 1:
            p = batch[0]
            if not p.future.done():
                p.future.set_result(outputs)
            return
        for name, arr in outputs.items():
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise InternalError(
                    f"output '{name}' has shape {list(arr.shape)}; a batching model must return "
                    f"{rows} rows along the first dim (set max_batch_size: 0 if it does not batch)"
                )
        start = 0
        for p in batch:
            end = start + p.rows
            if not p.future.done():
                p.future.set_result({name: arr[start:end] for name, arr in outputs.items()})
            start = end

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, let queued and running batches finish (up to the timeout)."""
        self._closed = True
        deadline = time.perf_counter() + drain_timeout_s
        while (self._queue or self._running) and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(Overloaded("model version was unloaded; retry", retry_after=1))
        self._queue.clear()
