"""The front process's side of the trusted worker: one attested channel, kept alive.

The channel runs on the server's event loop (``loop=``), so a sealed request or a batch
reaches the worker without a thread hop (each hop is a wake-up worth ~0.1 ms on a busy
2-core machine); without ``loop`` it runs on an event-loop thread of its own (tools and
tests that have no loop). Requests are multiplexed by id over one channel.

When the worker goes away every pending and new call fails at once with
:class:`WorkerUnavailable` (503 + Retry-After): a confidential model is never served
any other way. The client reconnects in the background and, before it counts as
connected again, reloads every version the front had loaded (a restarted worker holds
nothing), re-reading each sealed bundle from disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Awaitable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.confidential.attestation import Attestation, MeasurementPolicy
from bastion.confidential.channel import ChannelClosed, ChannelError, SecureChannel, connect_channel
from bastion.core.errors import BastionError

log = logging.getLogger("bastion.confidential")

__all__ = ["AnyMeasurement", "WorkerClient", "WorkerUnavailable", "current_worker", "set_current_worker"]

RETRY_AFTER_S = 1.0


class WorkerUnavailable(BastionError):
    """The trusted worker is down or restarting: confidential models cannot answer now."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class WorkerError(BastionError):
    """An error the worker answered, with its status (its messages never hold plaintext)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status if 400 <= status <= 599 else 502
        self.grpc_code = _GRPC.get(self.http_status, "INTERNAL")


_GRPC = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
         503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


@dataclass(frozen=True)
class AnyMeasurement(MeasurementPolicy):
    """The front's policy when no ``--worker-expect`` is given: the host is untrusted
    anyway, and clients check the measurement themselves; the front only needs the
    channel bound to the worker's attested key, so it accepts any and logs it."""

    def check(self, att: Attestation) -> None:
        log.info("trusted worker attested", extra={"kind": att.kind, "measurement": dict(att.measurement)})


@dataclass
class _Loaded:
    model: str
    version: int
    bundle_path: Path
    owner: object  # the runtime that loaded it: only its close unloads it


class WorkerClient:
    """``address``: a Unix socket path or ``vsock:CID:PORT``."""

    def __init__(self, address: str, *, policy: MeasurementPolicy | None = None,
                 max_frame_bytes: int = 256 * 1024 * 1024, call_timeout_s: float = 60.0,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.address = address
        self.policy = policy or AnyMeasurement(expected={}, allow_dev=True)
        self.max_frame_bytes = max_frame_bytes
        self.call_timeout_s = call_timeout_s
        self.attestation: Attestation | None = None
        self.connects = 0  # successful connections, for tests and metrics
        self.last_error = ""
        self._loaded: dict[tuple[str, int], _Loaded] = {}
        self._channel: SecureChannel | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._ready = threading.Event()
        self._stopping = False
        self._own_loop = loop is None
        self._loop = loop or asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="trusted-worker-channel", daemon=True)
        self._maintainer: asyncio.Task[None] | None = None

    # ---- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """With ``loop``: call from that loop's thread."""
        if self._own_loop:
            self._thread.start()
        else:
            self._maintainer = self._loop.create_task(self._maintain())

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def close(self) -> None:
        self._stopping = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        elif self._maintainer is not None:
            self._maintainer.cancel()
            if self._channel is not None:
                self._channel.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.create_task(self._maintain())
        self._loop.run_forever()
        if self._channel is not None:
            self._channel.close()
        # end the reader and the reconnect loop here, or asyncio reports them destroyed pending
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _maintain(self) -> None:
        delay = 0.05
        while not self._stopping:
            try:
                channel, att = await self._connect()
            except (OSError, BastionError, asyncio.TimeoutError, EOFError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.25)  # a local socket: retrying is cheap, waiting is not
                continue
            delay = 0.05
            self._channel, self.attestation = channel, att
            reader = self._loop.create_task(self._read(channel))
            try:
                await self._reload()
            except BastionError as exc:  # a version that no longer loads stays failed in the front
                log.error("reloading confidential models into the restarted worker failed: %s", exc)
            self.connects += 1
            self._ready.set()
            log.info("trusted worker channel up", extra={"address": self.address, "connects": self.connects})
            await reader
            self._ready.clear()
            self._channel = None
            self._fail_pending(WorkerUnavailable("the trusted worker went away; retry shortly",
                                                 retry_after=RETRY_AFTER_S))
            log.warning("trusted worker channel lost; reconnecting", extra={"address": self.address})

    async def _connect(self) -> tuple[SecureChannel, Attestation]:
        if self.address.startswith("vsock:"):
            _, cid, port = self.address.split(":")
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)  # type: ignore[attr-defined]
            sock.setblocking(False)
            await self._loop.sock_connect(sock, (int(cid), int(port)))
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        else:
            reader, writer = await asyncio.open_unix_connection(self.address, limit=1 << 20)
        try:
            return await connect_channel(reader, writer, policy=self.policy, max_frame_bytes=self.max_frame_bytes)
        except BaseException:
            writer.close()
            raise

    async def _read(self, channel: SecureChannel) -> None:
        try:
            while True:
                message = await channel.recv()
                future = self._pending.pop(message.get("id"), None) if isinstance(message, dict) else None
                if future is not None and not future.done():
                    future.set_result(message)
        except (ChannelClosed, ChannelError, OSError) as exc:
            self.last_error = str(exc) or type(exc).__name__
        finally:
            channel.close()

    def _fail_pending(self, err: BastionError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(err)

    async def _reload(self) -> None:
        # every version on its own: one that no longer loads must not keep the others out
        for item in list(self._loaded.values()):
            try:
                bundle = await asyncio.to_thread(item.bundle_path.read_bytes)
                await self._call({"op": "load", "model": item.model, "version": item.version, "bundle": bundle},
                                 require_ready=False)
            except (OSError, BastionError) as exc:
                log.error("a confidential version did not reload into the restarted worker; it answers errors "
                          "until its next load", extra={"model": item.model, "version": item.version,
                                                        "error": str(exc)})

    # ---- calls ------------------------------------------------------------------------
    async def _call(self, message: dict[str, Any], *, require_ready: bool = True) -> dict[str, Any]:
        channel = self._channel
        if channel is None or (require_ready and not self._ready.is_set()):
            raise WorkerUnavailable(f"the trusted worker is not connected ({self.last_error or 'starting'})",
                                    retry_after=RETRY_AFTER_S)
        ident = next(self._ids)
        message["id"] = ident
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[ident] = future
        try:
            await channel.send(message)
            reply = await asyncio.wait_for(future, self.call_timeout_s)
        except (ChannelClosed, ChannelError, OSError) as exc:
            raise WorkerUnavailable(f"the trusted worker went away: {exc}", retry_after=RETRY_AFTER_S) from None
        except asyncio.TimeoutError:
            raise WorkerUnavailable(f"the trusted worker did not answer in {self.call_timeout_s:.0f} s",
                                    retry_after=RETRY_AFTER_S) from None
        finally:
            self._pending.pop(ident, None)
        error = reply.get("error")
        if isinstance(error, dict):
            raise WorkerError(int(error.get("status", 502)), str(error.get("message", "trusted worker error"))[:2000])
        return reply

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Blocking, from any thread but the channel loop's (the repository's loaders)."""
        if self._on_loop():
            raise RuntimeError("WorkerClient.call on the channel's own loop would deadlock; await acall")
        return asyncio.run_coroutine_threadsafe(self._call(message), self._loop).result()

    def acall(self, message: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        """From any event loop; on the channel's own, without a thread hop."""
        if self._on_loop():
            return self._call(message)
        future: Future[dict[str, Any]] = asyncio.run_coroutine_threadsafe(self._call(message), self._loop)
        return asyncio.wrap_future(future)

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    # ---- model versions ---------------------------------------------------------------
    def load(self, model: str, version: int, bundle_path: Path, owner: object) -> dict[str, Any]:
        """Send the sealed bundle (ciphertext: the host never holds the weights in the clear)."""
        bundle = bundle_path.read_bytes()
        reply = self.call({"op": "load", "model": model, "version": version, "bundle": bundle})
        self._loaded[(model, version)] = _Loaded(model, version, bundle_path, owner)
        return reply

    def unload(self, model: str, version: int, owner: object) -> None:
        """Unload unless a newer load of the same version replaced ``owner``'s (a hot reload
        loads the new runtime before it closes the old one)."""
        item = self._loaded.get((model, version))
        if item is None or item.owner is not owner:
            return
        del self._loaded[(model, version)]
        if self._ready.is_set():  # not awaited: close() may run on the channel's loop
            asyncio.run_coroutine_threadsafe(self._unload(model, version), self._loop)

    async def _unload(self, model: str, version: int) -> None:
        with contextlib.suppress(BastionError):
            await self._call({"op": "unload", "model": model, "version": version})

    async def attest(self, nonce: bytes) -> tuple[str, bytes]:
        reply = await self.acall({"op": "attest", "nonce": nonce})
        return str(reply["kind"]), bytes(reply["evidence"])

    def wait_connected(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if time.monotonic() > deadline:
                raise WorkerUnavailable(f"the trusted worker at {self.address} did not come up in {timeout_s:.0f} s "
                                        f"({self.last_error or 'no answer'})", retry_after=RETRY_AFTER_S)


_current: WorkerClient | None = None


def set_current_worker(client: WorkerClient | None) -> None:
    global _current
    _current = client


def current_worker() -> WorkerClient | None:
    return _current

