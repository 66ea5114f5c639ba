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
    extraction_monitor: dict[str, Any] | None = None  # PRADA settings (guard/monitor.py); None = off
    probe_monitor: dict[str, Any] | None = None  # zoo-probing detector (guard/probes.py); None = off
    # ---- request limits (core/limits.py) ----
    max_elements: int = 1 << 26
    max_batch_size: int | None = None
    max_string_bytes: int = 1 << 20
    max_json_depth: int = 32
    request_timeout_s: float | None = 30.0
    control_dir: str | None = field(default=None, repr=False)  # set by the supervisor
    worker_index: int = field(default=0, repr=False)  # set by the supervisor

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "config") -> ServeOptions:
        known = {f.name for f in fields(cls)} - {"control_dir", "worker_index"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def check_security(self) -> None:
        """Refuse settings that would serve unprotected by accident (ValueError says why)."""
        if self.keys_db is None and not self.insecure_no_auth:
            raise ValueError(
                "refusing to serve without authentication: pass --keys PATH (a key store made with "
                "`bastion keys create --keys PATH --tenant NAME`), or --insecure-no-auth on a loopback address"
            )
        if self.keys_db is not None and self.insecure_no_auth:
            raise ValueError("--keys and --insecure-no-auth contradict each other; pass one")
        if self.insecure_no_auth and not _is_loopback(self.host):
            raise ValueError(
                f"--insecure-no-auth is allowed on loopback addresses only (127.0.0.1, ::1, localhost), "
                f"not {self.host!r}"
            )
        from bastion.guard.tls import server_ssl_context, tls_files

        tls = tls_files(self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_client_auth)
        if tls is not None:
            server_ssl_context(*tls)  # loads the files: a bad one stops the start, not the first handshake
        if self.extraction_monitor is not None:
            from bastion.guard.monitor import parse_monitor

            parse_monitor(self.extraction_monitor, "extraction_monitor")
        if self.probe_monitor is not None:
            from bastion.guard.probes import parse_probe_monitor

            parse_probe_monitor(self.probe_monitor, "probe_monitor")
        if not 4 <= self.max_json_depth <= 250:
            # every V2 JSON body is 4 deep; orjson parses 1024 levels but writes only ~254
            raise ValueError(f"max_json_depth must be between 4 and 250, got {self.max_json_depth}")
        if self.bundle_key_provider:
            from bastion.guard.keyproviders import load_key_provider

            load_key_provider(self.bundle_key_provider)

    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_body_bytes=self.max_body_bytes,
            max_elements=self.max_elements,
            max_batch_size=self.max_batch_size,
            max_string_bytes=self.max_string_bytes,
            max_json_depth=self.max_json_depth,
            request_timeout_s=self.request_timeout_s or None,
        )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_gate(opts: ServeOptions, metrics: Any) -> Any:
    """The guard for this process: key store, limiter and audit log, as the options say."""
    from bastion.guard.gate import Gate
    from bastion.guard.limits import Limiter, SqliteLedger

    authenticator = None
    limiter = None
    master: bytes | None = None
    if opts.keys_db is not None:
        from bastion.guard.keystore import KeyStore

        store = KeyStore(
            Path(opts.keys_db),
            secret_file=Path(opts.secret_file) if opts.secret_file else None,
            create=False,
        )
        authenticator = store
        master = store.master_secret
        limiter = Limiter(SqliteLedger(store.connect), workers=opts.workers)
    audit = None
    if opts.audit and (opts.keys_db is not None or opts.audit_dir is not None):
        from bastion.guard.audit import AuditLog
        from bastion.guard.secrets import derive_key, load_or_create_secret

        audit_dir = Path(opts.audit_dir) if opts.audit_dir else Path(opts.keys_db).parent / "audit"  # type: ignore[arg-type]
        if master is None:  # no key store: the secret lives beside the audit directory
            default_secret = audit_dir.with_name(audit_dir.name + ".secret")
            secret_path = Path(opts.secret_file) if opts.secret_file else default_secret
            master = load_or_create_secret(secret_path)
        audit = AuditLog(
            audit_dir,
            derive_key(master, "audit-chain"),
            writer_id=str(opts.worker_index),
            fsync_interval_s=opts.audit_fsync_interval_s,
        )
    monitor = None
    if opts.extraction_monitor is not None:
        from bastion.guard.monitor import ExtractionMonitor, parse_monitor

        monitor = ExtractionMonitor(parse_monitor(opts.extraction_monitor, "extraction_monitor"))
    probes = None
    if opts.probe_monitor is not None:
        from bastion.guard.probes import ProbeMonitor, parse_probe_monitor

        probes = ProbeMonitor(parse_probe_monitor(opts.probe_monitor, "probe_monitor"))
    if (monitor is not None or probes is not None) and limiter is None:
        limiter = Limiter()  # for the monitors' "throttle" action
    return Gate(authenticator=authenticator, limiter=limiter, audit=audit, metrics=metrics,
                open_metrics=opts.open_metrics, monitor=monitor, probe_monitor=probes)


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
        from bastion.guard.tls import server_ssl_context, tls_files
        from bastion.transport.http_server import HttpServer

        o = self._opts
        tls = tls_files(o.tls_cert, o.tls_key, o.tls_client_ca, o.tls_client_auth)
        self._server = HttpServer(self._app, max_body_bytes=o.max_body_bytes)
        await self._server.start([self._sock], ssl=server_ssl_context(*tls) if tls is not None else None)

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

        import ssl

        from bastion.guard.tls import CIPHERS, CLIENT_CERT_FP_SCOPE_KEY, fingerprint_der, server_ssl_context, tls_files

        def _client_cert_protocol() -> type:
            """uvicorn's httptools protocol, plus the client certificate's fingerprint in
            every scope of the connection, under the key Bastion's own HTTP server uses."""
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

            class ClientCertProtocol(HttpToolsProtocol):  # type: ignore[misc]
                _bastion_fp: str | None = None

                def connection_made(self, transport: Any) -> None:
                    super().connection_made(transport)
                    ssl_object = transport.get_extra_info("ssl_object")
                    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
                    self._bastion_fp = fingerprint_der(der) if der else None

                def on_message_begin(self) -> None:
                    super().on_message_begin()
                    if self._bastion_fp is not None:
                        self.scope[CLIENT_CERT_FP_SCOPE_KEY] = self._bastion_fp  # type: ignore[literal-required]

            return ClientCertProtocol

        tls = tls_files(opts.tls_cert, opts.tls_key, opts.tls_client_ca, opts.tls_client_auth)
        http: Any = "httptools"
        ssl_config: dict[str, Any] = {}
        if tls is not None:
            # uvicorn loads the files itself when it starts serving, in a task nobody awaits
            # until shutdown: loading them here first turns a bad file into a startup error
            server_ssl_context(*tls)
            ssl_config = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key), "ssl_ciphers": CIPHERS}
            if tls.client_auth != "none":
                ssl_config["ssl_ca_certs"] = str(tls.client_ca)
                ssl_config["ssl_cert_reqs"] = ssl.CERT_REQUIRED if tls.client_auth == "required" else ssl.CERT_OPTIONAL
                http = _client_cert_protocol()

        config = uvicorn.Config(
            app,
            http=http,
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
            **ssl_config,
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
        trusted_signers=[Path(p) for p in opts.trusted_signers or []],
        key_provider=opts.bundle_key_provider,
    )
    from bastion.observability.metrics import Metrics

    metrics = Metrics()
    dataplane = DataPlane(
        repo,
        metrics=metrics,
        executor_threads=opts.executor_threads,
        strict_readiness=opts.strict_readiness,
        gate=build_gate(opts, metrics),
        limits=opts.request_limits(),
    )
    grpc_server = None
    if opts.grpc_port is not None:
        from bastion.guard.tls import grpc_server_credentials, tls_files

        tls = tls_files(opts.tls_cert, opts.tls_key, opts.tls_client_ca, opts.tls_client_auth)
        grpc_server = create_grpc_server(
            dataplane, opts.host, opts.grpc_port, max_message_bytes=opts.max_body_bytes, reuse_port=reuse_port,
            credentials=grpc_server_credentials(*tls) if tls is not None else None,
            limits=opts.request_limits(),
            # gRPC only sees client certificates when it requires them (see guard/tls.py)
            client_certs=tls is not None and opts.tls_client_auth == "required",
        )
        await grpc_server.start()
    app = RestApp(dataplane, limits=opts.request_limits())
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
    from bastion.core.errors import BastionError

    try:
        opts.check_security()
    except (ValueError, OSError, BastionError) as err:
        log.error("cannot serve: %s", err)
        print(f"bastion serve: {err}", file=sys.stderr)
        return 2
    if opts.workers > 1:
        from bastion.cli.workers import supervise

        return supervise(opts)
    _install_uvloop()
    try:
        asyncio.run(serve_async(opts, progress=progress))
    except (OSError, ValueError, BastionError) as err:
        # a port in use, an unreadable key store or secret, a bad signer key: the operator's
        # setup, so a message and exit 2 rather than a traceback
        log.debug("cannot serve", exc_info=True)
        log.error("cannot serve: %s", err)
        print(f"bastion serve: {err}", file=sys.stderr)
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
