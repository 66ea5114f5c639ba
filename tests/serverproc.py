"""Start a real `bastion serve` process for tests, on loopback, and stop it."""

from __future__ import annotations

import functools
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

# one port finder: under pytest-xdist each worker takes ports from a range of its own
# (tests/conftest.py sets BASTION_PORT_RANGE), so two workers' servers never share a port
from bastion.bench.launcher import free_port


@functools.cache
def _default_ssl_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile, capath=capath)


def default_ssl_context(trust_env: bool = True) -> ssl.SSLContext:
    """The context ``httpx`` builds for ``verify=True`` (SSL_CERT_FILE, SSL_CERT_DIR, else
    certifi's bundle), built once: building it costs tens of milliseconds a client."""
    if trust_env and os.environ.get("SSL_CERT_FILE"):
        return _default_ssl_context(os.environ["SSL_CERT_FILE"], None)
    if trust_env and os.environ.get("SSL_CERT_DIR"):
        return _default_ssl_context(None, os.environ["SSL_CERT_DIR"])
    import certifi

    return _default_ssl_context(certifi.where(), None)


class ServerProcess:
    """`bastion serve REPO` in a subprocess; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(
        self, repo: Path, *args: str, ready_timeout: float = 90.0, wait_ready: bool = True,
        tls_ca: Path | None = None, tls_client_cert: tuple[Path, Path] | None = None,
    ) -> None:
        """``tls_ca``: the server speaks TLS (pass the --tls-* flags in ``args``); the
        readiness probe and ``self.verify`` trust this CA and, with ``tls_client_cert``
        (cert, key), present that client certificate."""
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.verify: ssl.SSLContext = default_ssl_context()  # for httpx's ``verify=``
        if tls_ca is not None:
            self.verify = ssl.create_default_context(cafile=str(tls_ca))
            if tls_client_cert is not None:
                self.verify.load_cert_chain(str(tls_client_cert[0]), str(tls_client_cert[1]))
        self.url = f"{'https' if tls_ca is not None else 'http'}://127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = repo.parent / f"server-{self.http_port}.log"
        cmd = [
            sys.executable, "-m", "bastion.cli.main", "serve", str(repo),
            "--host", "127.0.0.1", "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--log-format", "text", *args,
        ]
        if "--keys" not in args and "--insecure-no-auth" not in args:
            cmd.append("--insecure-no-auth")  # the tests of features other than auth run open, on loopback
        self._log = self.log_path.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if wait_ready:
            self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        # a new connection each probe: with --workers, a kept-alive one would ask one worker only
        fresh = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=1.0, verify=self.verify, limits=fresh) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
                try:
                    if client.get(f"{self.url}/v2/health/ready").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        if not self._log.closed:  # still running; after stop() the file is complete
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
