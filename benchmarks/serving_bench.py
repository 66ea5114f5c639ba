#!/usr/bin/env python
"""Serving benchmark: Bastion vs MLServer vs a minimal ASGI app, same model, same load.

What it measures. The digits classifier that ``bastion demo --build-only`` writes (an
ONNX logistic regression, ~µs per row) served three ways, one server at a time on the
same machine, each loaded by the same load generator with the same request body:

* **Bastion** — ``bastion serve REPO --grpc-port -1 --poll-interval 0 [--workers N]``;
* **MLServer** — pinned, installed by this script into ``benchmarks/.venvs/mlserver``,
  with a small custom runtime (``bastion/bench/frameworks/peer_code/mlserver_onnx_runtime.py``,
  the one ``bastion bench`` uses too) running the same ONNX
  file with the same ONNX Runtime threading;
* **minimal** — ``benchmarks/minimal_app.py``: uvicorn + a bare ASGI callable that
  decodes V2 JSON, calls ``session.run`` inline and encodes V2 JSON. The floor.

The model is tiny on purpose: what is left is the cost of serving (HTTP, parsing,
validation, scheduling, encoding), which is what differs between servers.

Per row it records throughput of successful responses, latency percentiles, errors,
the server's CPU time per request (its whole process tree, from /proc), its peak RSS,
the load generator's own CPU, and the machine's total CPU so that noise from other
processes shows. It writes ``benchmarks/results/serving-<date>.json`` and the Markdown
section between the ``serving-bench`` markers in ``BENCHMARKS.md``.

Run (from the repository root, in the project's venv)::

    .venv/bin/python benchmarks/serving_bench.py              # full: 20 s per row
    .venv/bin/python benchmarks/serving_bench.py --quick      # 5 s per row
    .venv/bin/python benchmarks/serving_bench.py --only bastion,minimal --duration 10

Every server binds 127.0.0.1 on a free port and is stopped (SIGTERM to its process
group, then SIGKILL) when its row ends, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# the /proc accounting is the bench package's
from bastion.bench.procstats import memory_kib, process_tree, tree_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
MLSERVER_VERSION = "1.7.1"  # latest on PyPI when this was written (`pip index versions mlserver`)
MLSERVER_UVLOOP_PIN = "uvloop==0.21.0"
MLSERVER_VENV = BENCH_DIR / ".venvs" / "mlserver"
# the same custom runtime `bastion bench` gives MLServer (one module for both benchmarks)
MLSERVER_RUNTIME_DIR = BENCH_DIR.parent / "src" / "bastion" / "bench" / "frameworks" / "peer_code"
RESULTS_DIR = BENCH_DIR / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
MD_START = "<!-- serving-bench:start (written by benchmarks/serving_bench.py; edits inside are overwritten) -->"
MD_END = "<!-- serving-bench:end -->"
MODEL = "digits"

# The targets, all on 1-row JSON requests with one worker each.
TARGET_VS_MLSERVER_RPS = 3.0  # Bastion throughput >= 3x MLServer's
TARGET_VS_MINIMAL_RPS = 0.9  # Bastion throughput >= 0.9x the minimal app's
TARGET_P99_VS_MLSERVER = 1 / 3  # Bastion p99 <= 1/3 of MLServer's

STARTUP_TIMEOUT_S = 180.0  # Bastion's workers and MLServer both take seconds to import and load
STOP_TIMEOUT_S = 15.0
INSTALL_TIMEOUT_S = 900.0


# --------------------------------------------------------------------------- request bodies


@dataclass(frozen=True)
class Body:
    """One request body on disk, as the load generators send it."""

    key: str  # "json1" | "json64" | "bin64"
    label: str
    path: Path
    content_type: str
    rows: int
    headers: dict[str, str] = field(default_factory=dict)


def sample_rows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` digits-like rows: 64 pixel intensities in 0..16, as the model was trained on.

    Deterministic so every server gets byte-identical bodies. The values don't change the
    cost of a logistic regression, so real digits (which need scikit-learn) add nothing.
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, size=(n, 64)).astype(np.float32)


def json_request(rows: np.ndarray, input_name: str = "input") -> bytes:
    """A V2 JSON inference request with the tensor's data as a flat list."""
    tensor = {
        "name": input_name,
        "shape": list(rows.shape),
        "datatype": "FP32",
        "data": [float(x) for x in rows.ravel()],
    }
    return json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()


def binary_request(
    rows: np.ndarray, input_name: str = "input", binary_outputs: tuple[str, ...] = ("label", "probabilities")
) -> tuple[bytes, int]:
    """A V2 request in the binary-tensor extension: JSON header, then the raw tensor bytes.

    Returns ``(body, header_length)``; ``header_length`` goes in the
    ``Inference-Header-Content-Length`` header. The outputs are asked for as binary too,
    as tritonclient does by default, so the whole round trip skips JSON numbers.
    """
    data = np.ascontiguousarray(rows, dtype="<f4").tobytes()  # the extension is little-endian, row-major
    header = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(rows.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(data)},
            }
        ],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in binary_outputs],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + data, len(head)


def write_bodies(directory: Path) -> dict[str, Body]:
    directory.mkdir(parents=True, exist_ok=True)
    one, batch = sample_rows(1), sample_rows(64, seed=1)
    bin_body, header_length = binary_request(batch)
    specs = [
        ("json1", "1 row, JSON", json_request(one), "application/json", 1, {}),
        ("json64", "64 rows, JSON", json_request(batch), "application/json", 64, {}),
        (
            "bin64",
            "64 rows, binary",
            bin_body,
            "application/octet-stream",
            64,
            {"Inference-Header-Content-Length": str(header_length)},
        ),
    ]
    bodies = {}
    for key, label, payload, content_type, rows, headers in specs:
        path = directory / f"{key}.body"
        path.write_bytes(payload)
        bodies[key] = Body(key, label, path, content_type, rows, headers)
    return bodies


# --------------------------------------------------------------------------- /proc accounting


def peak_rss_mib(pids: list[int], proc: str = "/proc") -> float:
    """Sum of each process's peak RSS (``VmHWM``). Shared pages count once per process,
    so for several workers this is an upper bound on the memory really used."""
    return sum(memory_kib(pid, proc)[1] for pid in pids) / 1024.0


@dataclass(frozen=True)
class MachineCpu:
    """The first line of /proc/stat: busy and steal time over all cores, in ticks."""

    busy: int
    total: int
    steal: int

    @classmethod
    def parse(cls, line: str) -> MachineCpu:
        values = [int(v) for v in line.split()[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is
        # already counted in user, so only the first eight add up to the total.
        user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
        busy = user + nice + system + irq + softirq
        return cls(busy=busy, total=busy + idle + iowait + steal, steal=steal)

    @classmethod
    def read(cls) -> MachineCpu:
        with open("/proc/stat", encoding="ascii") as f:
            return cls.parse(f.readline())


def cpu_per_request_us(cpu_s: float, requests: int) -> float | None:
    return cpu_s / requests * 1e6 if requests else None


# --------------------------------------------------------------------------- load generators


@dataclass
class LoadResult:
    """What one load-generator run measured, whichever generator it was."""

    generator: str
    duration_s: float
    responses: int  # every HTTP response, whatever its status
    ok: int  # successful responses (hey: 2xx; wrk: status < 400)
    status_counts: dict[str, int]
    transport_errors: dict[str, int]  # connect/read/write/timeout, or hey's error lines
    latency_ms: dict[str, float]  # p50, p90, p99 (+ mean, max, p99.9 where the generator gives them)
    bytes_read: int | None = None

    @property
    def errors(self) -> int:
        return self.responses - self.ok + sum(self.transport_errors.values())

    @property
    def rps(self) -> float:
        # Only successful responses count: hey's own "Requests/sec" includes failures.
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0


_HEY_TOTAL = re.compile(r"^\s*Total:\s+([\d.]+) secs", re.MULTILINE)
_HEY_PCT = re.compile(r"^\s*(\d+)% in ([\d.]+) secs", re.MULTILINE)
_HEY_AVG = re.compile(r"^\s*(Average|Slowest):\s+([\d.]+|NaN) secs", re.MULTILINE)
_HEY_BYTES = re.compile(r"^\s*Total data:\s+(\d+) bytes", re.MULTILINE)
_HEY_BRACKET = re.compile(r"^\s*\[(\d+)\]\s+(.*)$")


def parse_hey(text: str) -> LoadResult:
    """Parse hey's default summary output (hey 0.1.4)."""
    total = _HEY_TOTAL.search(text)
    if not total:
        raise ValueError("not hey output: no 'Total: … secs' line")
    latency = {f"p{p}": float(v) * 1e3 for p, v in _HEY_PCT.findall(text)}
    for name, value in _HEY_AVG.findall(text):
        if value != "NaN":
            latency["mean" if name == "Average" else "max"] = float(value) * 1e3
    status: dict[str, int] = {}
    errors: dict[str, int] = {}
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith(":") and not stripped.startswith("["):
            section = stripped[:-1]
            continue
        match = _HEY_BRACKET.match(line)
        if not match:
            continue
        if section == "Status code distribution":  # "[200]	10068 responses"
            status[match.group(1)] = status.get(match.group(1), 0) + int(match.group(2).split()[0])
        elif section == "Error distribution":  # "[67015]	Post "…": dial tcp …: connection refused"
            errors[match.group(2).strip()] = int(match.group(1))
    nbytes = _HEY_BYTES.search(text)
    return LoadResult(
        generator="hey",
        duration_s=float(total.group(1)),
        responses=sum(status.values()),
        ok=sum(n for code, n in status.items() if code.startswith("2")),
        status_counts=status,
        transport_errors=errors,
        latency_ms=latency,
        bytes_read=int(nbytes.group(1)) if nbytes else None,
    )


# wrk prints this from the Lua ``done`` hook: exact counts and HdrHistogram percentiles in
# µs, instead of its human summary ("1.46ms", "22.64k") that rounds to 3 digits.
WRK_MARKER = "BENCH_JSON "
_WRK_LUA = r"""-- written by benchmarks/serving_bench.py
local f = assert(io.open("@BODY@", "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
@HEADERS@
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '@MARKER@{"duration_us":%d,"requests":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"mean_us":%.1f,"max_us":%d,'
    .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""


def wrk_script(body: Body) -> str:
    headers = {"Content-Type": body.content_type, **body.headers}
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    return _WRK_LUA.replace("@BODY@", str(body.path)).replace("@HEADERS@", lines).replace("@MARKER@", WRK_MARKER)


def parse_wrk(text: str) -> LoadResult:
    """Parse wrk's output with the ``done`` hook's JSON line (see ``wrk_script``)."""
    line = next((ln for ln in text.splitlines() if ln.startswith(WRK_MARKER)), None)
    if line is None:
        raise ValueError(f"no {WRK_MARKER.strip()} line in wrk output (did the Lua script run?)")
    d = json.loads(line[len(WRK_MARKER) :])
    # wrk counts a response with status > 399 in errors.status and nowhere else.
    bad = d["status"]
    return LoadResult(
        generator="wrk",
        duration_s=d["duration_us"] / 1e6,
        responses=d["requests"],
        ok=d["requests"] - bad,
        status_counts={"<400": d["requests"] - bad, ">=400": bad},
        transport_errors={k: d[k] for k in ("connect", "read", "write", "timeout") if d[k]},
        latency_ms={
            "p50": d["p50_us"] / 1e3,
            "p90": d["p90_us"] / 1e3,
            "p99": d["p99_us"] / 1e3,
            "p99.9": d["p999_us"] / 1e3,
            "mean": d["mean_us"] / 1e3,
            "max": d["max_us"] / 1e3,
        },
        bytes_read=d["bytes"],
    )


def load_command(generator: str, url: str, body: Body, duration_s: float, connections: int, scratch: Path) -> list[str]:
    seconds = f"{max(1, round(duration_s))}s"
    if generator == "wrk":
        script = scratch / f"wrk-{body.key}.lua"
        script.write_text(wrk_script(body), encoding="utf-8")
        # One thread: wrk's event loop drives 16 connections on a fraction of a core, which
        # leaves the other core of a 2-core machine to the server. --timeout so a stalled
        # server shows as timeouts instead of silently shortening the tail.
        return ["wrk", "-t1", f"-c{connections}", f"-d{seconds}", "--timeout", "10s", "-s", str(script), url]
    argv = ["hey", "-z", seconds, "-c", str(connections), "-m", "POST", "-T", body.content_type, "-t", "10"]
    # Go's client asks for gzip by default; MLServer (GZipMiddleware) and Bastion would then
    # compress large responses. Nobody compresses in this comparison.
    argv.append("-disable-compression")
    for k, v in body.headers.items():
        argv += ["-H", f"{k}: {v}"]
    return [*argv, "-D", str(body.path), url]


def run_load(
    generator: str, url: str, body: Body, duration_s: float, connections: int, scratch: Path
) -> tuple[LoadResult, float, str]:
    """Run the generator once; return its result, its own CPU seconds and its raw output."""
    argv = load_command(generator, url, body, duration_s, connections, scratch)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The servers are children too, but they are still running (not reaped), so the only
    # child reaped in between is the generator: this delta is its CPU time.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}:\n{out[-2000:]}")
    parsed = parse_wrk(out) if generator == "wrk" else parse_hey(out)
    return parsed, cpu, out


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Row:
    """One measured configuration: a server, its parallelism, a request body."""

    server: str  # "bastion" | "mlserver" | "minimal"
    workers: int  # bastion/uvicorn --workers; MLServer's parallel_workers
    body: str  # Body.key

    @property
    def key(self) -> str:
        return f"{self.server}-w{self.workers}-{self.body}"

    @property
    def config(self) -> str:
        if self.server == "mlserver":
            return f"parallel_workers={self.workers}"
        return f"--workers {self.workers}"


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]
    port: int
    cwd: Path = ROOT


class Context:
    """What every launch needs: where the model is, scratch space, the interpreters."""

    def __init__(self, repository: Path, scratch: Path) -> None:
        self.repository = repository
        self.model_file = repository / MODEL / "1" / "model.onnx"
        self.scratch = scratch
        bindir = Path(sys.executable).parent
        self.bastion = str(bindir / "bastion") if (bindir / "bastion").exists() else shutil.which("bastion")

    def launch(self, row: Row) -> Launch:
        port = free_port()
        base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if row.server == "bastion":
            if not self.bastion:
                raise RuntimeError("no `bastion` executable next to this interpreter or on PATH")
            argv = [
                self.bastion,
                "serve",
                str(self.repository),
                "--host",
                "127.0.0.1",
                "--http-port",
                str(port),
                "--grpc-port",
                "-1",
                "--log-level",
                "warning",
                "--poll-interval",
                "0",
                "--workers",
                str(row.workers),
                "--insecure-no-auth",  # the serving core alone; benchmarks/security_bench.py prices the guard
                "--no-audit",
            ]
            return Launch(argv, base_env, port)
        if row.server == "minimal":
            argv = [
                sys.executable,
                "-m",
                "uvicorn",
                "minimal_app:app",
                "--app-dir",
                str(BENCH_DIR),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ]
            if row.workers > 1:
                argv += ["--workers", str(row.workers)]
            env = {**base_env, "MINIMAL_MODEL_PATH": str(self.model_file), "MINIMAL_MODEL_NAME": MODEL}
            return Launch(argv, env, port)
        if row.server == "mlserver":
            folder = self.scratch / f"mlserver-pw{row.workers}"
            write_mlserver_settings(folder, self.model_file, port, free_port(), free_port(), row.workers)
            env = {**base_env, "PYTHONPATH": str(MLSERVER_RUNTIME_DIR)}
            return Launch([str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(folder)], env, port, folder)
        raise ValueError(f"unknown server {row.server!r}")


def write_mlserver_settings(
    folder: Path, model_file: Path, http_port: int, grpc_port: int, metrics_port: int, parallel_workers: int
) -> None:
    """settings.json + <model>/model-settings.json for ``mlserver start folder``."""
    (folder / MODEL).mkdir(parents=True, exist_ok=True)
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,  # MLServer can't turn gRPC off; it idles on a free port
        "metrics_port": metrics_port,
        # debug (the default, True) turns on uvicorn's access log; Bastion runs at
        # log-level warning with no access log, so MLServer gets the same.
        "debug": False,
        # 0 runs inference inline in the HTTP process; >= 1 (the default is 1) sends each
        # request to a pool of worker processes over IPC. The benchmark runs both.
        "parallel_workers": parallel_workers,
        "environments_dir": str(folder / ".envs"),
        "metrics_dir": str(folder / ".metrics"),
    }
    model_settings = {
        "name": MODEL,
        "implementation": "mlserver_onnx_runtime.OnnxRuntime",
        "parameters": {"uri": str(model_file), "version": "1"},
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    (folder / MODEL / "model-settings.json").write_text(json.dumps(model_settings, indent=2), encoding="utf-8")


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


class Server:
    """A server subprocess in its own process group, always stopped on exit."""

    def __init__(self, row: Row, launch: Launch, log_path: Path) -> None:
        self.row, self.launch, self.log_path = row, launch, log_path
        self.base = f"http://127.0.0.1:{launch.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        log = self.log_path.open("wb")
        # A new session: SIGTERM/SIGKILL reach the workers through the group, and Ctrl-C in
        # the terminal reaches only this script, which then stops the servers in order.
        self.proc = subprocess.Popen(
            self.launch.argv,
            cwd=self.launch.cwd,
            env=self.launch.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> float:
        """Poll the model's readiness until every worker answers 200.

        With several workers one ready answer proves little: the next connection may land
        on a worker still loading (503). Each poll is a new connection, which the kernel
        hands to any worker, so a streak of 200s proportional to the worker count is
        needed. (The minimal app answers 200 to anything, and is ready once it listens.)
        """
        start = time.monotonic()
        # Both the server (every model loaded, nothing left loading in the background) and
        # the model must be ready.
        urls = [f"{self.base}/v2/health/ready", f"{self.base}/v2/models/{MODEL}/ready"]
        need, streak = 1 if self.row.workers <= 1 else 10 * self.row.workers, 0
        while time.monotonic() - start < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.row.key} exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                ok = all(http("GET", url, timeout=1.0)[0] == 200 for url in urls)
            except OSError:
                ok = False
            streak = streak + 1 if ok else 0
            if streak >= need:
                return time.monotonic() - start
            if not ok:
                time.sleep(0.2)
        raise RuntimeError(f"{self.row.key} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        # workers that outlived their supervisor are still in the group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def probe(server: Server, body: Body, timeout: float = 60.0) -> dict[str, Any]:
    """One request before the load, checked, so a wrong body fails loudly, not as 16 x N errors.

    A 503 (a worker still loading) is retried until ``timeout``; anything else but 200 fails.
    """
    headers = {"Content-Type": body.content_type, **body.headers}
    deadline = time.monotonic() + timeout
    while True:
        status, resp_headers, payload = http("POST", server.base + infer_path(), body.path.read_bytes(), headers, 30)
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if status != 200:
        raise RuntimeError(f"{server.row.key}: probe got HTTP {status}: {payload[:500]!r}")
    header_length = resp_headers.get("inference-header-content-length")
    head = json.loads(payload[: int(header_length)] if header_length else payload)
    names = sorted(o["name"] for o in head.get("outputs", []))
    if names != ["label", "probabilities"]:
        raise RuntimeError(f"{server.row.key}: probe response has outputs {names}: {payload[:300]!r}")
    return {"response_bytes": len(payload), "binary_response": header_length is not None}


def infer_path() -> str:
    return f"/v2/models/{MODEL}/infer"


# --------------------------------------------------------------------------- one row


@dataclass
class RowResult:
    row: Row
    body_label: str
    rows_per_request: int
    load: LoadResult
    server_cpu_s: float
    generator_cpu_s: float
    machine_busy_s: float  # all cores, all processes, during the measured run
    machine_steal_s: float
    peak_rss_mib: float
    processes: int
    startup_s: float
    probe: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)  # every repeat, when --repeat > 1

    @property
    def cpu_us_per_request(self) -> float | None:
        return cpu_per_request_us(self.server_cpu_s, self.load.ok)

    def to_json(self) -> dict[str, Any]:
        load = dataclasses.asdict(self.load)
        load.update(rps=self.load.rps, errors=self.load.errors)
        return {
            "key": self.row.key,
            "server": self.row.server,
            "config": self.row.config,
            "workers": self.row.workers,
            "body": self.row.body,
            "body_label": self.body_label,
            "rows_per_request": self.rows_per_request,
            "load": load,
            "server_cpu_s": self.server_cpu_s,
            "server_cpu_us_per_request": self.cpu_us_per_request,
            "generator_cpu_s": self.generator_cpu_s,
            "machine_busy_s": self.machine_busy_s,
            "machine_steal_s": self.machine_steal_s,
            "peak_rss_mib": self.peak_rss_mib,
            "processes": self.processes,
            "startup_s": self.startup_s,
            "probe": self.probe,
            "runs": self.runs,
        }


def measure_row(ctx: Context, row: Row, body: Body, args: argparse.Namespace) -> RowResult:
    runs: list[RowResult] = []
    for attempt in range(args.repeat):
        launch = ctx.launch(row)
        with Server(row, launch, ctx.scratch / f"{row.key}-{attempt}.log") as server:
            startup = server.wait_ready()
            checked = probe(server, body)
            url = server.base + infer_path()
            if args.warmup > 0:  # JIT-free Python still warms: allocator pools, ORT arenas, TCP
                run_load(args.generator, url, body, args.warmup, args.connections, ctx.scratch)
            tree_before = process_tree(server.pid)
            machine_before = MachineCpu.read()
            load, gen_cpu, _ = run_load(args.generator, url, body, args.duration, args.connections, ctx.scratch)
            machine_after = MachineCpu.read()
            tree_after = process_tree(server.pid)
            ticks = os.sysconf("SC_CLK_TCK")
            runs.append(
                RowResult(
                    row=row,
                    body_label=body.label,
                    rows_per_request=body.rows,
                    load=load,
                    server_cpu_s=tree_cpu_seconds(tree_after) - tree_cpu_seconds(tree_before),
                    generator_cpu_s=gen_cpu,
                    machine_busy_s=(machine_after.busy - machine_before.busy) / ticks,
                    machine_steal_s=(machine_after.steal - machine_before.steal) / ticks,
                    peak_rss_mib=peak_rss_mib(list(tree_after)),
                    processes=len(tree_after),
                    startup_s=startup,
                    probe=checked,
                )
            )
        r = runs[-1]
        print(
            f"  {row.key:<22} {r.load.rps:>9.0f} req/s  p50 {r.load.latency_ms.get('p50', 0):6.2f} ms"
            f"  p99 {r.load.latency_ms.get('p99', 0):6.2f} ms  errors {r.load.errors}"
            f"  cpu {r.cpu_us_per_request or 0:6.0f} µs/req  rss {r.peak_rss_mib:5.0f} MiB",
            flush=True,
        )
    # With repeats, report the run with the median throughput (not a mean of percentiles,
    # which is not a percentile of anything) and keep every run in the JSON.
    chosen = sorted(runs, key=lambda r: r.load.rps)[len(runs) // 2]
    if len(runs) > 1:
        chosen.runs = [{k: v for k, v in r.to_json().items() if k != "runs"} for r in runs]
    return chosen


# --------------------------------------------------------------------------- plan, ratios, report


def plan(servers: set[str], workers: list[int], mlserver_pw: list[int], batch: bool) -> list[Row]:
    rows = [Row("bastion", w, "json1") for w in workers if "bastion" in servers]
    rows += [Row("mlserver", pw, "json1") for pw in mlserver_pw if "mlserver" in servers]
    rows += [Row("minimal", w, "json1") for w in workers if "minimal" in servers]
    if batch:
        rows += [Row("bastion", 1, b) for b in ("bin64", "json64") if "bastion" in servers]
        rows += [Row("mlserver", pw, "json64") for pw in mlserver_pw if "mlserver" in servers]
        if "minimal" in servers:
            rows.append(Row("minimal", 1, "json64"))
    return rows


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float | None
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None or self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "met": self.met}


def _pick(results: list[RowResult], server: str, body: str, workers: int | None = None) -> list[RowResult]:
    return [
        r
        for r in results
        if r.row.server == server and r.row.body == body and (workers is None or r.row.workers == workers)
    ]


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(results: list[RowResult]) -> list[Ratio]:
    """The issue's three targets (workers=1, 1-row JSON) and the informative extras.

    MLServer is taken at its best per metric over the parallel_workers settings tried (the
    highest throughput, the lowest p99), so a "met" never rests on MLServer's worse setting.
    """
    out: list[Ratio] = []
    mls = _pick(results, "mlserver", "json1")
    mls_rps = max((r.load.rps for r in mls), default=None)
    mls_p99 = min((r.load.latency_ms["p99"] for r in mls), default=None)
    for w in sorted({r.row.workers for r in _pick(results, "bastion", "json1")} or {1}):
        b = _pick(results, "bastion", "json1", w)
        m = _pick(results, "minimal", "json1", w)
        b_rps = b[0].load.rps if b else None
        b_p99 = b[0].load.latency_ms["p99"] if b else None
        primary = w == 1  # the targets are stated for one worker against one worker
        suffix = "" if primary else f" (workers={w})"
        out += [
            Ratio(
                f"Bastion / MLServer throughput{suffix}",
                _div(b_rps, mls_rps),
                TARGET_VS_MLSERVER_RPS if primary else None,
            ),
            Ratio(
                f"Bastion / minimal app throughput{suffix}",
                _div(b_rps, m[0].load.rps if m else None),
                TARGET_VS_MINIMAL_RPS if primary else None,
                note=f"minimal app with --workers {w}",
            ),
            Ratio(
                f"Bastion p99 / MLServer p99{suffix}",
                _div(b_p99, mls_p99),
                TARGET_P99_VS_MLSERVER if primary else None,
                higher_is_better=False,
            ),
        ]
    # batch 64: rows per second, Bastion binary vs the others' JSON (MLServer's REST has no
    # binary-tensor extension)
    bb = _pick(results, "bastion", "bin64", 1)
    bj = _pick(results, "bastion", "json64", 1)
    mls64 = max((r.load.rps for r in _pick(results, "mlserver", "json64")), default=None)
    mls64_p99 = min((r.load.latency_ms["p99"] for r in _pick(results, "mlserver", "json64")), default=None)
    mn64 = _pick(results, "minimal", "json64", 1)
    if bb:
        out += [
            Ratio("batch 64: Bastion binary / MLServer JSON throughput", _div(bb[0].load.rps, mls64)),
            Ratio(
                "batch 64: Bastion binary p99 / MLServer JSON p99",
                _div(bb[0].load.latency_ms["p99"], mls64_p99),
                higher_is_better=False,
            ),
            Ratio(
                "batch 64: Bastion binary / Bastion JSON throughput",
                _div(bb[0].load.rps, bj[0].load.rps if bj else None),
            ),
            Ratio(
                "batch 64: Bastion binary / minimal app JSON throughput",
                _div(bb[0].load.rps, mn64[0].load.rps if mn64 else None),
            ),
        ]
    return out


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict[str, Any], results: list[RowResult], computed: list[Ratio]) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    repeat = report["repeat"]
    load = (
        f"`{report['generator']}`, {report['connections']} connections, {report['duration_s']:.0f} s per row "
        f"after a {report['warmup_s']:.0f} s warm-up, {repeat} run(s) per row"
        + (" (the run with the median throughput is shown)" if repeat > 1 else "")
        + "; load generator and servers on the same machine, one server at a time"
    )
    lines = [
        f"### Run of {report['date']}",
        "",
        f"- Command: `{report['command']}`",
        f"- Machine: {env['cpu_model']}, {env['cpus']} logical CPUs, {env['memory_gib']:.0f} GiB, "
        f"{env['kernel']}; before the run: load average {env['loadavg_before']}, "
        f"{env.get('busy_cores_before', 'n/a')} cores busy",
        f"- Versions: {versions}",
        f"- Load: {load}.",
        f"- Model: `{MODEL}` from `bastion demo --build-only` (ONNX, input FP32 [-1, 64]), alone in a "
        "one-model repository; the same file for all three servers; ONNX Runtime with 1 intra-op and "
        "1 inter-op thread everywhere.",
        "",
        "| server | config | request | req/s | rows/s | p50 ms | p90 ms | p99 ms | errors "
        "| server CPU µs/req | server cores busy | load-gen cores | machine busy (cores) | peak RSS MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        d = r.load.duration_s or 1.0
        lat = r.load.latency_ms
        cores = f"{r.server_cpu_s / d:.2f} | {r.generator_cpu_s / d:.2f} | {r.machine_busy_s / d:.2f}"
        lines.append(
            f"| {r.row.server} | {r.row.config} | {r.body_label} | {r.load.rps:,.0f} "
            f"| {r.load.rps * r.rows_per_request:,.0f} "
            f"| {_fmt(lat.get('p50'))} | {_fmt(lat.get('p90'))} | {_fmt(lat.get('p99'))} | {r.load.errors} "
            f"| {_fmt(r.cpu_us_per_request, ',.0f')} | {cores} | {r.peak_rss_mib:,.0f} |"
        )
    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|:---:|"]
    for q in computed:
        target = "" if q.target is None else f"{'≥' if q.higher_is_better else '≤'} {q.target:.2f}"
        met = {True: "yes", False: "**no**", None: ""}[q.met]
        lines.append(f"| {q.name} | {_fmt(q.value)} | {target} | {met} |")
    lines.append("")
    return "\n".join(lines)


def update_benchmarks_md(section: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between the markers (or append a marked section) in BENCHMARKS.md."""
    block = f"{MD_START}\n{section.rstrip()}\n{MD_END}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if MD_START in text and MD_END in text:
        head, rest = text.split(MD_START, 1)
        tail = rest.split(MD_END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- environment


def _version_in(python: Path, module: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return proc.stdout.strip() or "?"


def environment(generator: str) -> dict[str, Any]:
    cpu_model = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        if match := re.search(r"^Model name:\s+(.+)$", lscpu, re.MULTILINE):
            cpu_model = match.group(1).strip()
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    gen_version = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if generator == "wrk":
            gen_version = (
                subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10, check=False)
                .stdout.split("[")[0]
                .strip()
            )
        else:
            dpkg = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", "hey"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
            gen_version = f"hey {dpkg or '?'}"
    versions = {
        "bastion": _version_in(Path(sys.executable), "bastion-serve"),
        "mlserver": _version_in(MLSERVER_VENV / "bin" / "python", "mlserver")
        if (MLSERVER_VENV / "bin" / "python").exists()
        else "not installed",
        "onnxruntime": _version_in(Path(sys.executable), "onnxruntime"),
        "onnxruntime (MLServer venv)": _version_in(MLSERVER_VENV / "bin" / "python", "onnxruntime")
        if (MLSERVER_VENV / "bin" / "python").exists()
        else "not installed",
        "uvicorn": _version_in(Path(sys.executable), "uvicorn"),
        "python": platform.python_version(),
        "load generator": gen_version,
    }
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "memory_gib": int(mem.group(1)) / 2**20 if mem else 0.0,
        "kernel": f"{platform.system()} {platform.release()}",
        "loadavg_before": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": versions,
        "git_commit": commit or "none (no commit yet)",
    }


def ensure_mlserver(version: str) -> None:
    """Create benchmarks/.venvs/mlserver with MLServer pinned, and ONNX Runtime at our version."""
    python = MLSERVER_VENV / "bin" / "python"
    if (
        python.exists()
        and _version_in(python, "mlserver") == version
        and _version_in(python, "uvloop") == MLSERVER_UVLOOP_PIN.split("==")[1]
    ):
        return
    print(f"installing MLServer {version} into {MLSERVER_VENV} …", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True, timeout=120)
    ort = _version_in(Path(sys.executable), "onnxruntime")
    pins = [
        f"mlserver=={version}",
        f"onnxruntime=={ort}" if ort != "?" else "onnxruntime",
        # uvloop >= 0.22 breaks MLServer 1.7.1's parallel inference workers at start-up
        # ("There is no current event loop", SeldonIO/MLServer#2286, fix #2285 not released).
        MLSERVER_UVLOOP_PIN,
    ]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True, timeout=INSTALL_TIMEOUT_S)


def build_repository(scratch: Path) -> Path:
    """``bastion demo --build-only``: the digits classifier among the demo's models."""
    bindir = Path(sys.executable).parent
    bastion = str(bindir / "bastion") if (bindir / "bastion").exists() else shutil.which("bastion")
    if not bastion:
        raise RuntimeError("no `bastion` executable; install the project (pip install -e .)")
    out = scratch / "demo-repository"
    subprocess.run([bastion, "demo", "--build-only", "--out", str(out)], check=True, timeout=600)
    return out


def single_model_repository(source: Path, scratch: Path) -> Path:
    """A repository holding only ``digits`` (config and files copied from ``source``).

    MLServer and the minimal app load one model, so Bastion does too. Serving the whole demo
    repository also loads its other models, which bring scikit-learn, SciPy and PyTorch
    into the process: ~290 MiB more RSS, and Python's full garbage collections then take
    65-95 ms each. Those models also load in the background after ``digits`` is ready; a
    run that starts then measures the loading (p99 x10), hence ``wait_ready``'s health check.
    """
    out = scratch / "repository"
    shutil.copytree(source / MODEL, out / MODEL)
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=20.0, help="seconds of measured load per row (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load before each row")
    p.add_argument("--quick", action="store_true", help="5 s rows, 2 s warm-up (a smoke run, not for the record)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--only", default="bastion,mlserver,minimal", help="comma-separated servers to run")
    p.add_argument(
        "--generator",
        choices=["wrk", "hey"],
        default="wrk",
        help="load generator (default wrk: a quarter of hey's CPU per request, see BENCHMARKS.md)",
    )
    p.add_argument("--workers", default="1,2", help="--workers values for Bastion and the minimal app")
    p.add_argument(
        "--mlserver-parallel-workers",
        default="0,1",
        help="MLServer parallel_workers values (0: inline; 1: MLServer's default)",
    )
    p.add_argument("--mlserver-version", default=MLSERVER_VERSION)
    p.add_argument("--no-batch", action="store_true", help="skip the batch-64 rows")
    p.add_argument("--repeat", type=int, default=1, help="runs per row; the median-throughput run is reported")
    p.add_argument("--repository", type=Path, help="an already built repository (default: bastion demo --build-only)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-markdown", action="store_true", help="don't rewrite BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 5.0, 2.0
    args.servers = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.servers - {"bastion", "mlserver", "minimal"}
    if unknown:
        p.error(f"--only: unknown server(s) {', '.join(sorted(unknown))}")
    args.workers_list = [int(w) for w in args.workers.split(",")]
    args.mlserver_pw = [int(w) for w in args.mlserver_parallel_workers.split(",")]
    if args.connections < 1 or args.duration < 1 or args.repeat < 1:
        p.error("--connections, --duration and --repeat must be positive")
    return args


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so every `with Server` stops its server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if shutil.which(args.generator) is None:
        print(f"{args.generator} is not installed", file=sys.stderr)
        return 2
    if "mlserver" in args.servers:
        ensure_mlserver(args.mlserver_version)
    started = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        scratch = Path(tmp)
        repository = single_model_repository(args.repository or build_repository(scratch), scratch)
        ctx = Context(repository, scratch)
        if not ctx.model_file.exists():
            print(f"{ctx.model_file} not found", file=sys.stderr)
            return 2
        bodies = write_bodies(scratch / "bodies")
        env = environment(args.generator)
        # Other processes on the machine show up as noise in every figure: look before starting.
        before = MachineCpu.read()
        time.sleep(1.0)
        idle_busy = (MachineCpu.read().busy - before.busy) / os.sysconf("SC_CLK_TCK")
        env["busy_cores_before"] = round(idle_busy, 2)
        if idle_busy > 0.2:
            print(
                f"warning: {idle_busy:.2f} cores busy before the run: something else is using the CPU "
                "and will be measured as noise (see 'machine busy')",
                file=sys.stderr,
            )
        rows = plan(args.servers, args.workers_list, args.mlserver_pw, not args.no_batch)
        print(f"{len(rows)} rows x {args.duration:.0f} s ({args.generator}, {args.connections} connections)")
        results: list[RowResult] = []
        try:
            for row in rows:
                results.append(measure_row(ctx, row, bodies[row.body], args))
        except KeyboardInterrupt:
            print("interrupted; servers stopped; reporting the rows done so far", file=sys.stderr)
        config_path = repository / MODEL / "config.yaml"
        bastion_config = config_path.read_text(encoding="utf-8") if config_path.exists() else None
    computed = ratios(results)
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/serving_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "generator": args.generator,
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeat": args.repeat,
        "environment": env,
        "bastion_model_config": bastion_config,
        "rows": [r.to_json() for r in results],
        "ratios": [q.to_json() for q in computed],
    }
    section = markdown(report, results, computed)
    print("\n" + section)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"serving-{started.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(f"results: {out}")
    if not args.no_markdown and results:
        update_benchmarks_md(section)
        print(f"updated {BENCHMARKS_MD}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
