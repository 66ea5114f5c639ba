"""Several worker processes sharing the ports: the supervisor.

The supervisor spawns fresh interpreters (``spawn``, not ``fork``: the parent may
hold threads), restarts a worker that dies unexpectedly, and on SIGTERM forwards it
to every worker, waits for them to drain, and exits 0. Each worker is one server process
(``serve.serve_async``); the workers keep explicit load/unload consistent through the
control log (``control_log.py``) in the run directory made here.

Imports go one way: this module uses ``serve``; ``serve`` never imports this one.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bastion.cli.process_setup import http_socket, install_uvloop
from bastion.cli.serve import serve_async

if TYPE_CHECKING:
    from bastion.cli.serve_options import ServeOptions

log = logging.getLogger("bastion.workers")


def _worker_main(opts: ServeOptions, index: int) -> None:
    from bastion.observability.logs import configure_logging

    configure_logging(opts.log_level, opts.log_format)
    # the supervisor owns Ctrl-C; a worker drains on the SIGTERM the supervisor forwards
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_uvloop()
    asyncio.run(serve_async(replace(opts, worker_index=index)))


def supervise(opts: ServeOptions) -> int:
    """Run ``opts.workers`` worker processes until SIGTERM/SIGINT; return the exit code."""
    # fail fast on a taken port, before spawning anything
    probe = http_socket(opts.host, opts.http_port, reuse_port=True)
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
        # the first worker started listens at once; the others, and any restarted one, once loaded
        late = replace(worker_opts, listen_when_ready=bool(procs) or i > 0)
        p = ctx.Process(target=_worker_main, args=(late, i), name=f"bastion-worker-{i}", daemon=False)
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
