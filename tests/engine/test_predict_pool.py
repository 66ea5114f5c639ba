"""The batcher's hand-off pool: every task runs, a task's exception does not stop the
pool, and shutdown lets queued work finish before the threads stop."""

from __future__ import annotations

import threading

import pytest

from bastion.engine.predict_pool import PredictPool


def test_tasks_run_on_pool_threads_and_shutdown_drains_the_queue() -> None:
    pool = PredictPool(2, name="t-pool")
    gate = threading.Event()
    done: list[int] = []
    names: set[str] = set()
    lock = threading.Lock()

    def task(i: int) -> None:
        gate.wait(5)
        with lock:
            done.append(i)
            names.add(threading.current_thread().name)

    for i in range(50):
        pool.submit(task, i)
    gate.set()
    pool.shutdown(wait=True)  # returns only after every queued task ran
    assert sorted(done) == list(range(50))
    assert names <= {"t-pool-0", "t-pool-1"} and names
    with pytest.raises(RuntimeError):
        pool.submit(task, 99)


def test_a_failing_task_is_logged_and_the_pool_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    pool = PredictPool(1)
    ran = threading.Event()

    def boom() -> None:
        raise ValueError("bug")

    pool.submit(boom)
    pool.submit(ran.set)
    assert ran.wait(5)
    pool.shutdown()
    assert any("a predict task raised" in r.message for r in caplog.records)
