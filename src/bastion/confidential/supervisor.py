"""Start the local trusted worker and start it again whenever it dies.

Here the worker is an ordinary child process (no TEE). In production the enclave or
confidential VM is started by its own tooling (nitro-cli, the VM's orchestrator) and the
front only connects (``--worker-socket`` without ``--worker-config``). Restarts back off
up to a few seconds so a worker that cannot start does not spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("bastion.confidential")

__all__ = ["WorkerSupervisor"]


class WorkerSupervisor:
    def __init__(self, config: Path, socket_path: Path, *, log_level: str = "warning") -> None:
        self.config = Path(config)
        self.socket_path = Path(socket_path)
        self.log_level = log_level
        self.restarts = 0
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def command(self) -> list[str]:
        return [sys.executable, "-c", "from bastion.cli.main import main; main()", "worker", "serve",
                "--config", str(self.config), "--socket", str(self.socket_path), "--log-level", self.log_level]

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _spawn(self) -> None:
        self.process = await asyncio.create_subprocess_exec(*self.command(), stdin=asyncio.subprocess.DEVNULL)
        log.info("trusted worker started", extra={"pid": self.process.pid, "socket": str(self.socket_path)})

    async def _watch(self) -> None:
        backoff = 0.1
        while not self._stopping:
            assert self.process is not None
            started = time.monotonic()
            code = await self.process.wait()
            if self._stopping:
                return
            log.error("trusted worker exited; restarting it", extra={"code": code, "restarts": self.restarts + 1})
            # a worker that lived a while restarts at once; one that dies at start backs off
            backoff = 0.1 if time.monotonic() - started > 10 else min(backoff * 2, 5.0)
            await asyncio.sleep(backoff)
            self.restarts += 1
            with contextlib.suppress(OSError):
                await self._spawn()

    async def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
