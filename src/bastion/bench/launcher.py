"""Start a prepared framework server, wait until it serves, prove it serves the model, stop it."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec
from bastion.bench.frameworks.v2json import decode_v2, decode_v2_binary
from bastion.bench.models import reference_output

PORT_RANGE_ENV = "BASTION_PORT_RANGE"
_cursor = itertools.count(random.randrange(1 << 16))


def free_port() -> int:
    """A loopback port nobody listens on now, for a server about to start.

    The port is free when this returns, not reserved: another process picking a port before
    the server binds it may get the same one, and a server that binds with SO_REUSEPORT
    (``bastion serve --workers N``) then shares it silently. Processes that start servers
    side by side (the test suite's parallel workers) each set ``BASTION_PORT_RANGE=LO-HI``
    to a range of their own, and ports are taken from it."""
    span = os.environ.get(PORT_RANGE_ENV)
    if span:
        lo, _, hi = span.partition("-")
        first, last = int(lo), int(hi)
        size = last - first + 1
        for _ in range(size):
            # a cursor through the range, from a random start: never the port just handed out
            # (the caller has not bound it yet) nor one a server here just left
            port = first + next(_cursor) % size
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:  # no SO_REUSEADDR: a port with connections still in TIME_WAIT is skipped too
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        raise OSError(f"{PORT_RANGE_ENV}={span}: no free port in the range")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    status, _, data = http_exchange(method, url, body, headers, timeout)
    return status, data


def http_exchange(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """One request; the status, the response headers (lower-cased names) and the body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@dataclass
class Running:
    launch: Launch
    proc: subprocess.Popen[bytes]
    log_path: Path
    startup_s: float

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def _wait_ready(proc: subprocess.Popen[bytes], launch: Launch, log_path: Path) -> float:
    start = time.monotonic()
    streak = 0
    while time.monotonic() - start < launch.ready_timeout_s:
        if proc.poll() is not None:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            ok = http_request("GET", launch.ready_url, timeout=2.0)[0] == 200
        except OSError:
            ok = False
        # a few answers in a row: with several workers one may be ready before the rest
        streak = streak + 1 if ok else 0
        if streak >= launch.ready_streak:
            return time.monotonic() - start
        time.sleep(0.05 if ok else 0.25)
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
    raise TimeoutError(f"not ready after {launch.ready_timeout_s:.0f} s ({launch.ready_url}):\n{tail}")


def _stop(proc: subprocess.Popen[bytes], launch: Launch) -> None:
    if launch.stop_argv:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                launch.stop_argv,
                cwd=launch.cwd,
                env=_env(launch),
                timeout=60,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    stop_process_group(proc, term_wait_s=15.0)


def stop_process_group(proc: subprocess.Popen[bytes], *, term_wait_s: float = 10.0) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it if it outlives ``term_wait_s``."""
    for sig, wait in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
    # children that outlived the leader (worker pools, a trusted worker) are still in its group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without its own venv's marks, plus ``extra``: what a
    server (or a helper run in a peer's venv) starts with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    # the peers run ONNX Runtime too: no telemetry from a benchmark either (Bastion's own
    # runtime sets the same default; an operator's explicit value is kept)
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    env.update(extra)
    return env


def _env(launch: Launch) -> dict[str, str]:
    return child_env(launch.env)


@contextlib.contextmanager
def serve(launch: Launch, log_path: Path) -> Iterator[Running]:
    """Run ``launch`` in its own process group until the block ends (then stop every process of it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            launch.argv,
            cwd=launch.cwd,
            env=_env(launch),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        startup = _wait_ready(proc, launch, log_path)
        yield Running(launch, proc, log_path, startup)
    finally:
        _stop(proc, launch)


def check_serves(framework: Framework, model: ModelSpec, launch: Launch, rows: np.ndarray, atol: float = 1e-4) -> None:
    """POST ``rows`` and compare the answer with ONNX Runtime in-process; raise if they differ."""
    headers = {"Content-Type": launch.content_type, **launch.headers}
    status, body = http_request("POST", launch.infer_url, framework.encode(model, rows), headers, timeout=60)
    if status != 200:
        raise RuntimeError(f"{framework.name}: {launch.infer_url} answered {status}: {body[:500]!r}")
    check_answer(framework.name, model, rows, framework.decode(model, body), atol)


def check_v2(
    server: str,
    model: ModelSpec,
    url: str,
    body: bytes,
    headers: dict[str, str],
    rows: np.ndarray,
    *,
    retry_503_s: float = 0.0,
    atol: float = 1e-4,
) -> int:
    """POST a V2 request (JSON or binary-tensor extension) for ``rows`` and compare the answer
    with ONNX Runtime in-process; raise if they differ. Returns the response's size in bytes.

    A 503 is retried for ``retry_503_s``: with several workers, the connection may land on
    one still loading although the readiness streak passed.
    """
    deadline = time.monotonic() + retry_503_s
    while True:
        status, resp_headers, data = http_exchange("POST", url, body, headers, timeout=60)
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if status != 200:
        raise RuntimeError(f"{server}: {url} answered {status}: {data[:500]!r}")
    length = resp_headers.get("inference-header-content-length")
    got = decode_v2_binary(model, data, int(length)) if length else decode_v2(model, data)
    check_answer(server, model, rows, got, atol)
    return len(data)


def check_answer(server: str, model: ModelSpec, rows: np.ndarray, got: np.ndarray, atol: float = 1e-4) -> None:
    """Raise unless ``got`` is ONNX Runtime's own output for ``rows`` (to ``atol``)."""
    want = reference_output(model, rows)
    if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=1e-4):
        raise RuntimeError(
            f"{server} does not serve {model.name} as ONNX Runtime does: "
            f"shape {got.shape} vs {want.shape}, max |diff| "
            f"{float(np.max(np.abs(got - want))) if got.shape == want.shape else 'n/a'}"
        )
