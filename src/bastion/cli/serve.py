"""One server process: repository, data plane, REST (Bastion's HTTP server or uvicorn), gRPC.

With ``--workers N`` the supervisor (``workers.py``) runs N of these, bound to the same
ports with SO_REUSEPORT, so the kernel spreads connections over them and the Python parts
of the request path (HTTP parsing, codecs) use every core. Inference itself runs on
executor threads: ONNX Runtime releases the GIL.

Imports go one way: ``launch`` → ``workers`` → ``serve`` → ``serve_options``,
``process_setup``, ``control_log``; this module imports neither ``workers`` nor ``launch``.
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
from pathlib import Path
from typing import Any

from bastion.cli.process_setup import http_socket, install_uvloop
from bastion.cli.serve_options import ServeOptions

__all__ = ["ServeOptions", "build_gate", "run_server", "serve_async"]

log = logging.getLogger("bastion.serve")


def build_gate(opts: ServeOptions, metrics: Any) -> Any:
    """The guard for this process: key store, limiter and audit log, as the options say."""
    from bastion.guard.gate import Gate
    from bastion.guard.limits import Limiter

    authenticator = None
    limiter = None
    master: bytes | None = None
    if opts.keys_db is not None:
        from bastion.guard.keystores import open_keystore, open_ledger

        # opened here, in the worker process (after any fork): a PostgreSQL store holds
        # connections and a listener thread of its own
        store = open_keystore(opts.keys_db, secret_file=opts.secret_file, create=False)
        authenticator = store
        master = store.master_secret
        if opts.redis_url is not None:
            from bastion.guard.redis_state import shared_limits_from_url

            # rates and budgets shared by every replica; the ledger beside the key store is unused
            ledger, rates = shared_limits_from_url(opts.redis_url, fail=opts.shared_state_fail,
                                                   replicas=opts.replicas, workers=opts.workers)
            limiter = Limiter(ledger, workers=opts.workers, rates=rates)
            if metrics is not None:
                metrics.watch_shared_state(rates.state)
        else:
            limiter = Limiter(open_ledger(store), workers=opts.workers)
    audit = None
    if opts.audit and (opts.keys_db is not None or opts.audit_dir is not None):
        from bastion.guard.audit import AuditLog
        from bastion.guard.keystores import is_pg_url
        from bastion.guard.secrets import derive_key, load_or_create_secret

        if opts.audit_dir is None and opts.keys_db is not None and is_pg_url(opts.keys_db):
            raise ValueError("--keys is a database URL: pass --audit-dir (each replica writes its own chains)")
        audit_dir = Path(opts.audit_dir) if opts.audit_dir else Path(opts.keys_db).parent / "audit"  # type: ignore[arg-type]
        if master is None:  # no key store: the secret lives beside the audit directory
            default_secret = audit_dir.with_name(audit_dir.name + ".secret")
            secret_path = Path(opts.secret_file) if opts.secret_file else default_secret
            master = load_or_create_secret(secret_path)
        audit = AuditLog(
            audit_dir,
            derive_key(master, "audit-chain"),
            writer_id=f"{opts.replica_id}.{opts.worker_index}" if opts.replica_id else str(opts.worker_index),
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
        self._server = HttpServer(self._app, max_body_bytes=self._app.limits.max_body_bytes)
        self._app.dataplane.metrics.watch_http(self._server.stats)
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
    early = not opts.listen_when_ready  # see ServeOptions.listen_when_ready
    http_sock = http_socket(opts.host, opts.http_port, reuse_port, listen=early)
    worker_client, supervisor = await _start_trusted_worker(opts)
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
    if worker_client is not None:
        metrics.watch_worker(worker_client)
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
            dataplane, opts.host, opts.grpc_port, reuse_port=reuse_port,
            credentials=grpc_server_credentials(*tls) if tls is not None else None,
            # gRPC only sees client certificates when it requires them (see guard/tls.py)
            client_certs=tls is not None and opts.tls_client_auth == "required",
        )
        if early:
            await grpc_server.start()
    # the transports take the plane's request limits
    app = RestApp(dataplane, compress_min_bytes=opts.compress_min_bytes)
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
        from bastion.cli.control_log import ControlLog

        control = ControlLog(Path(opts.control_dir), dataplane)
        dataplane.control_hook = control.publish

    if early:
        await http.start()
    flusher: asyncio.Task[None] | None = None
    try:
        await dataplane.start(progress)
        if control is not None:
            await control.catch_up()  # a worker started after an operator's load/unload
        if not early:
            await http.start()
            if grpc_server is not None:
                await grpc_server.start()
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
        if worker_client is not None:
            from bastion.confidential.worker_client import set_current_worker

            set_current_worker(None)
            worker_client.close()
        if supervisor is not None:
            await supervisor.stop()
        log.info("stopped")


async def _start_trusted_worker(opts: ServeOptions) -> tuple[Any, Any]:
    """The channel to the trusted worker (and the worker itself, with --worker-config), before
    models load: confidential ones are loaded through it."""
    if not opts.worker_socket:
        return None, None
    from bastion.confidential.attestation import MeasurementPolicy, parse_expected_measurement
    from bastion.confidential.worker_client import WorkerClient, set_current_worker

    supervisor = None
    if opts.worker_config:
        from bastion.confidential.supervisor import WorkerSupervisor

        supervisor = WorkerSupervisor(Path(opts.worker_config), Path(opts.worker_socket), log_level=opts.log_level)
        await supervisor.start()
    policy = None
    if opts.worker_expect:
        policy = MeasurementPolicy(parse_expected_measurement(opts.worker_expect), allow_dev=True)
    client = WorkerClient(opts.worker_socket, policy=policy, loop=asyncio.get_running_loop())
    client.start()
    set_current_worker(client)
    return client, supervisor


def run_server(opts: ServeOptions, *, progress: Callable[[str, int, int], None] | None = None) -> int:
    """Serve in this process until SIGTERM/SIGINT; returns the process exit code."""
    from bastion.core.errors import BastionError

    install_uvloop()
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
