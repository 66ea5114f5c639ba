"""The control log: how an operator's load/unload on one worker reaches the others.

An explicit load or unload arrives at one worker over HTTP or gRPC; that worker appends
the action to a JSON-lines file in the supervisor's run directory, and every other worker
tails the file and applies it, so all of them converge within ``ControlLog.POLL_S``.
Hot reload needs no such coordination: each worker polls the repository itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from bastion.dataplane import DataPlane

log = logging.getLogger("bastion.workers")


class ControlLog:
    """An append-only JSON-lines file of operator actions shared by the workers."""

    POLL_S = 0.25

    def __init__(self, directory: Path, dataplane: DataPlane) -> None:
        self.path = directory / "control.jsonl"
        self.path.touch(exist_ok=True)
        self._dataplane = dataplane
        # from the start: a worker that starts (or restarts) after an operator's load/unload
        # loads the repository as it is on disk, and must then replay what was done since
        self._offset = 0
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

    async def catch_up(self) -> None:
        """Apply the actions published before now (call it once the models are loaded)."""
        await self._apply_new()

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
