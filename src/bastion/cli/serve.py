"""Run the server: one process, or a supervisor with several worker processes.

Each worker is a whole server (repository, data plane, REST on uvicorn, gRPC) bound to
the same ports with SO_REUSEPORT, so the kernel spreads connections over the workers and
the Python parts of the request path (HTTP parsing, codecs) use every core. Inference
itself runs on executor threads: ONNX Runtime releases the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bastion.core.limits import RequestLimits

log = logging.getLogger("bastion.serve")


@dataclass
class ServeOptions:
    """Every knob of ``bastion serve``; also read from a YAML ``--config`` file."""

    repository: str = "."
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int | None = 8001  # None: no gRPC listener
    workers: int = 1
    poll_interval_s: float | None = 5.0  # None or 0: no hot reload
    explicit_models: list[str] | None = None  # Triton's explicit mode: only these load at start
    max_body_bytes: int = 64 << 20
    http_impl: str = "bastion"  # "bastion" (transport/http_server.py) or "uvicorn"
    executor_threads: int = 4
    strict_readiness: bool = True
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    log_format: str = "json"
    # ---- security (guard/) ----
    keys_db: str | None = None  # SQLite key store (tenants, API keys); required unless insecure_no_auth
    insecure_no_auth: bool = False  # serve without authentication; refused unless host is loopback
    secret_file: str | None = None  # master secret; default: KEYS_DB + ".secret"
    open_metrics: bool = False  # /metrics without a key (default: admin keys only)
    audit: bool = True  # the hash-chained audit log (needs a key store or audit_dir)
    audit_dir: str | None = None  # default: "audit" beside the key store
    audit_fsync_interval_s: float = 0.2
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, REST and gRPC speak TLS only
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle for client certificates (mutual TLS)
    tls_client_auth: str = "none"  # none | optional | required
    trusted_signers: list[str] | None = None  # Ed25519 public keys (PEM files) allowed to sign sealed bundles
    bundle_key_provider: str | None = None  # env:VAR | file:PATH | module:pkg.mod:factory
    # ---- request limits (core/limits.py) ----
    max_elements: int = 1 << 26
    max_batch_size: int | None = None
    max_string_bytes: int = 1 << 20
    max_json_depth: int = 32
    request_timeout_s: float | None = 30.0
    control_dir: str | None = field(default=None, repr=False)  # set by the supervisor

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "config") -> ServeOptions:
        known = {f.name for f in fields(cls)} - {"control_dir"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_body_bytes=self.max_body_bytes,
            max_elements=self.max_elements,
            max_batch_size=self.max_batch_size,
            max_string_bytes=self.max_string_bytes,
            max_json_depth=self.max_json_depth,
            request_timeout_s=self.request_timeout_s or None,
        )


def _http_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _BastionHttp:
    """The default HTTP layer: transport/http_server.py."""

    def __init__(self, app: Any, opts: ServeOptions, sock: socket.socket) -> None:
        self._app, self._opts, self._sock = app, opts, sock
        self._server: Any = None

    async def start(self) -> None:
        from bastion.transport.http_server import HttpServer

        self._server = HttpServer(self._app, max_body_bytes=self._opts.max_body_bytes)
        await self._server.start([self._sock])

    async def shutdown(self, timeout_s: float) -> None:
        await self._server.shutdown(timeout_s)

    def force_exit(self) -> None:
        for conn in list(self._server.connections):
            conn.transport.abort()


class _UvicornHttp:
    """uvicorn, without its own signal handling: the launcher drains gRPC and the batchers
    too, and must exit 0 after a SIGTERM rather than re-raise the signal."""

    def __init__(self, app: Any, opts: ServeOptions, sock: socket.socket) -> None:
        self._server = self.make(app, opts)
        self._sock = sock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))

    async def shutdown(self, timeout_s: float) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task

    def force_exit(self) -> None:
        self._server.force_exit = True

    @staticmethod
    def make(app: Any, opts: ServeOptions) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        config = uvicorn.Config(
            app,
            http="httptools",
            loop="none",
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=int(opts.drain_timeout_s),
            timeout_keep_alive=30,
            server_header=False,
            date_header=False,
            proxy_headers=False,  # a middleware per request; Bastion is not behind a trusted proxy by default
            ws="none",
        )
        return Server(config)


async def serve_async(
    opts: ServeOptions,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight requests and return."""
    from bastion.dataplane import DataPlane
    from bastion.repository.store import ModelRepository
    from bastion.transport.grpc_server import create_grpc_server
    from bastion.transport.rest import RestApp

    loop = asyncio.get_running_loop()
    reuse_port = opts.workers > 1
    # bind before loading models so a port clash fails fast, not after minutes of loading
    http_sock = _http_socket(opts.host, opts.http_port, reuse_port)
    repo = ModelRepository(
        Path(opts.repository),
        poll_interval_s=opts.poll_interval_s or None,
        explicit=opts.explicit_models is not None,
        initial_models=opts.explicit_models,
    )
    dataplane = DataPlane(repo, executor_threads=opts.executor_threads, strict_readiness=opts.strict_readiness)
    grpc_server = None
    if opts.grpc_port is not None:
        grpc_server = create_grpc_server(
            dataplane, opts.host, opts.grpc_port, max_message_bytes=opts.max_body_bytes, reuse_port=reuse_port
        )
        await grpc_server.start()
    app = RestApp(dataplane, max_body_bytes=opts.max_body_bytes)
    stopping = asyncio.Event()
    if opts.http_impl == "uvicorn":
        http = _UvicornHttp(app, opts, http_sock)
    elif opts.http_impl == "bastion":
        http = _BastionHttp(app, opts, http_sock)
    else:
        raise ValueError(f"http_impl: expected 'bastion' or 'uvicorn', got {opts.http_impl!r}")

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            http.force_exit()
            return
        log.info("shutting down: draining in-flight requests", extra={"signal": signal.Signals(signum).name})
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig)

    control = None
    if opts.control_dir:
        from bastion.cli.workers import ControlLog

        control = ControlLog(Path(opts.control_dir), dataplane)
        dataplane.control_hook = control.publish

    await http.start()
    flusher: asyncio.Task[None] | None = None
    try:
        await dataplane.start(progress)
        # the libraries and models loaded at start are long-lived: moving them out of the
        # collector's view keeps full collections (pauses of several ms) off the tail latency
        gc.collect()
        gc.freeze()
        flusher = loop.create_task(dataplane.metrics.flush_periodically())
        if control is not None:
            control.start()
        log.info(
            "serving",
            extra={
                "http": f"http://{opts.host}:{opts.http_port}",
                "grpc": f"{opts.host}:{opts.grpc_port}" if grpc_server else None,
                "pid": os.getpid(),
                "ready": dataplane.ready(),
            },
        )
        if on_ready is not None:
            on_ready()
        await stopping.wait()
    finally:
        stopping.set()
        if flusher is not None:
            flusher.cancel()
        if control is not None:
            await control.stop()
        # both transports drain at once: stop accepting, let in-flight requests finish
        drains = [http.shutdown(opts.drain_timeout_s)]
        if grpc_server is not None:
            drains.append(grpc_server.stop(grace=opts.drain_timeout_s))
        await asyncio.gather(*drains)
        await dataplane.stop()
        dataplane.metrics.flush()
        log.info("stopped")


def run(opts: ServeOptions, *, progress: Callable[[str, int, int], None] | None = None) -> int:
    """Blocking entry point of ``bastion serve``; returns the process exit code."""
    from bastion.observability.logs import configure_logging

    configure_logging(opts.log_level, opts.log_format)
    if opts.workers > 1:
        from bastion.cli.workers import supervise

        return supervise(opts)
    _install_uvloop()
    try:
        asyncio.run(serve_async(opts, progress=progress))
    except OSError as err:
        log.error("cannot serve: %s", err)
        return 2
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    if sys.version_info >= (3, 12):
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    else:
        uvloop.install()
