"""The threads that run batches: a fire-and-forget pool for the batcher's hand-off.

``ThreadPoolExecutor.submit`` builds a ``Future`` (with its ``Condition``), a work item,
takes the executor's shutdown lock and probes its idle semaphore on every call: about
10 µs of the event loop's time per batch on this project's 2-core VMs, for a future the
batcher never reads (the batch reports back itself, with one ``call_soon_threadsafe``).
Here a hand-off is one ``SimpleQueue.put`` (C, ~0.1 µs); the threads block in ``get``,
which releases the interpreter lock.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("bastion.engine")

_STOP = None


class PredictPool:
    """``threads`` daemon threads taking ``(fn, args)`` from one queue, in order."""

    def __init__(self, threads: int, *, name: str = "bastion-predict") -> None:
        if threads < 1:
            raise ValueError("threads: expected at least 1")
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> None:
        """Run ``fn(*args)`` on a pool thread. Nothing is returned: ``fn`` reports its own
        outcome (an exception it lets escape is logged, as a bug)."""
        if self._closed:
            raise RuntimeError("the predict pool is shut down")
        self._queue.put((fn, args))

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # the batcher catches its own failures: this is a bug
                log.exception("a predict task raised")

    def shutdown(self, wait: bool = True) -> None:
        """Let queued work finish, then stop the threads (``wait``: join them)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        if wait:
            for thread in self._threads:
                thread.join()
