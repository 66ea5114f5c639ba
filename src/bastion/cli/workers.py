"""Several worker processes sharing the ports, and what keeps them consistent.

The supervisor spawns fresh interpreters (``spawn``, not ``fork``: the parent may
hold threads), restarts a worker that dies unexpectedly, and on SIGTERM forwards it
to every worker, waits for them to drain, and exits 0.

Hot reload needs no coordination (each worker polls the repository itself). An
operator's explicit load/unload reaches one worker over HTTP or gRPC; it appends the
action to a shared control log that every other worker tails, so all of them converge
within ``ControlLog.POLL_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from bastion.cli.serve import ServeOptions
    from bastion.dataplane import DataPlane

log = logging.getLogger("bastion.workers")


class ControlLog:
    """An append-only JSON-lines file of operator actions shared by the workers."""

    POLL_S = 0.25

    def __init__(self, directory: Path, dataplane: DataPlane) -> None:
        self.path = directory / "control.jsonl"
        self.path.touch(exist_ok=True)
        self._dataplane = dataplane
        self._offset = self.path.stat().st_size  # actions before this worker started are already on disk
        self._task: asyncio.Task[None] | None = None
        self._pid = os.getpid()

    async def publish(self, model: str, action: str) -> None:
        line = orjson.dumps({"pid": self._pid, "model": model, "action": action, "ts": time.time()}) + b"\n"
        # one write() of a short line with O_APPEND is atomic between processes
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tail())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _tail(self) -> None:
        while True:
            await asyncio.sleep(self.POLL_S)
            try:
                await self._apply_new()
            except Exception:
                log.exception("applying control log failed")

    async def _apply_new(self) -> None:
        size = self.path.stat().st_size
        if size <= self._offset:
            return
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read(size - self._offset)
        complete = data.rpartition(b"\n")[0]
        if not complete:
            return
        self._offset += len(complete) + 1
        for raw in complete.split(b"\n"):
            entry = orjson.loads(raw)
            if entry["pid"] == self._pid:
                continue
            repo = self._dataplane.repository
            try:
                if entry["action"] == "load":
                    await repo.load(entry["model"])
                else:
                    await repo.unload(entry["model"])
            except Exception as err:
                log.warning("control action failed", extra={"entry": entry, "error": str(err)})


def _worker_main(opts: ServeOptions, index: int) -> None:
    from bastion.cli.serve import _install_uvloop, serve_async
    from bastion.observability.logs import configure_logging

    configure_logging(opts.log_level, opts.log_format)
    # the supervisor owns Ctrl-C; a worker drains on the SIGTERM the supervisor forwards
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _install_uvloop()
    from dataclasses import replace

    asyncio.run(serve_async(replace(opts, worker_index=index)))


def supervise(opts: ServeOptions) -> int:
    """Run ``opts.workers`` worker processes until SIGTERM/SIGINT; return the exit code."""
    from dataclasses import replace

    from bastion.cli.serve import _http_socket

    # fail fast on a taken port, before spawning anything
    probe = _http_socket(opts.host, opts.http_port, reuse_port=True)
    probe.close()

    run_dir = Path(tempfile.mkdtemp(prefix="bastion-"))
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    # prometheus-client reads this at import: the spawned workers inherit it
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    worker_opts = replace(opts, control_dir=str(run_dir))
    ctx = mp.get_context("spawn")
    procs: dict[int, mp.process.BaseProcess] = {}
    stopping = False

    def start(i: int) -> None:
        p = ctx.Process(target=_worker_main, args=(worker_opts, i), name=f"bastion-worker-{i}", daemon=False)
        p.start()
        procs[i] = p
        log.info("worker started", extra={"worker": i, "pid": p.pid})

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(opts.workers):
        start(i)
    restarts: list[float] = []
    try:
        while not stopping:
            time.sleep(0.2)
            for i, p in list(procs.items()):
                if p.is_alive() or stopping:
                    continue
                from prometheus_client import multiprocess as prom_mp

                prom_mp.mark_process_dead(p.pid)
                log.error("worker died; restarting", extra={"worker": i, "exitcode": p.exitcode})
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 5 * opts.workers:
                    log.error("workers keep dying; giving up")
                    stopping = True
                    break
                start(i)
        for p in procs.values():
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + opts.drain_timeout_s + 10
        for p in procs.values():
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        codes = [p.exitcode for p in procs.values()]
        log.info("all workers stopped", extra={"exitcodes": codes})
        return 0 if all(c == 0 for c in codes) else 1
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
