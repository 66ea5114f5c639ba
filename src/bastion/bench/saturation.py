"""Closed-loop saturation runs with wrk: how many requests per second a server sustains.

wrk (Debian's package) keeps ``connections`` requests in flight on one thread and is far
cheaper per request than any Python client, which matters on a 2-core machine where the
load generator shares the CPU with the server. Its own summary has no JSON form, so a
small Lua script (:data:`LUA`) sets the request and, in ``done()``, prints one line
``BENCH_JSON {...}`` with the counts and latency percentiles from wrk's HdrHistogram;
:func:`parse_wrk_output` reads that line into :class:`~bastion.bench.stats.RunStats`.

Closed loop means latency here is *service* latency under that concurrency, not what a
user arriving at a fixed rate would see (the open-loop runs measure that).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bastion.bench.procstats import TreeMonitor
from bastion.bench.results import BenchResult, Mode
from bastion.bench.stats import RunStats, Summary

LUA = r"""
local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/json"
local extra = os.getenv("BENCH_HEADERS") or ""
for name, value in string.gmatch(extra, "([^:\n]+):%s*([^\n]*)") do
  wrk.headers[name] = value
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"max":%d,"mean":%.3f,' ..
    '"p25":%d,"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean,
    latency:percentile(25), latency:percentile(50), latency:percentile(75),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""


class WrkError(RuntimeError):
    pass


def parse_wrk_output(text: str) -> RunStats:
    """RunStats from the ``BENCH_JSON`` line :data:`LUA` makes wrk print."""
    match = re.search(r"^BENCH_JSON (\{.*\})\s*$", text, re.MULTILINE)
    if not match:
        raise WrkError(f"no BENCH_JSON line in wrk's output:\n{text[-2000:]}")
    d = orjson.loads(match.group(1))
    lat = d["latency_us"]
    errors = d["errors"]
    transport = {k: int(errors[k]) for k in ("connect", "read", "write", "timeout") if int(errors[k])}
    # wrk counts every response as a request and those with status > 399 as "status"
    # errors; a Lua response() hook could split by status, but it costs wrk a callback per
    # response, CPU taken from the server on this 2-core machine.
    completed = int(d["requests"])
    failed = int(errors["status"])
    ok = completed - failed
    status_counts = {k: n for k, n in (("2xx", ok), ("4xx/5xx", failed)) if n}
    ms = {k: float(v) / 1000.0 for k, v in lat.items()}
    keys = ("min", "p25", "p50", "p75", "p90", "p99", "p999", "max", "mean")
    summary = Summary(count=completed, **{k: (math.nan if completed == 0 else ms[k]) for k in keys})
    return RunStats(
        duration_s=int(d["duration_us"]) / 1e6,
        requests=completed + sum(transport.values()),
        ok=ok,
        status_counts=status_counts,
        transport_errors=transport,
        latency_ms=summary,
        response_bytes=int(d["bytes"]),
    )


@dataclass
class SaturationConfig:
    url: str
    body: bytes
    connections: int
    duration_s: float
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    threads: int = 1  # one wrk thread drives ~50k req/s here: more would only take CPU from the server
    timeout_s: float = 10.0


def wrk_available() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    """``wrk -v``'s first words ("wrk debian/4.1.0-3+b2"), or "?" (for the report)."""
    wrk = wrk_available()
    if wrk is None:
        return "?"
    try:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    # wrk -v prints "wrk <version> [epoll] Copyright ..." then its usage, and exits 1
    lines = (out.stdout + out.stderr).splitlines()
    return (lines[0].split("[")[0].strip() if lines else "") or "?"


def run_wrk(config: SaturationConfig) -> RunStats:
    """One wrk run; raises :class:`WrkError` when wrk is missing or fails."""
    wrk = wrk_available()
    if wrk is None:
        raise WrkError("wrk is not installed (Debian package `wrk`; `make test` installs it)")
    threads = max(1, min(config.threads, config.connections))
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(config.body)
        script = Path(tmp) / "post.lua"
        script.write_text(LUA, encoding="utf-8")
        env = {
            "BENCH_BODY_FILE": str(body_file),
            "BENCH_CONTENT_TYPE": config.content_type,
            "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in config.headers.items()),
            "PATH": "/usr/bin:/bin",
        }
        argv = [
            wrk,
            f"-t{threads}",
            f"-c{config.connections}",
            f"-d{max(1, round(config.duration_s))}s",
            f"--timeout={max(1, round(config.timeout_s))}s",
            "-s",
            str(script),
            config.url,
        ]
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=config.duration_s + 120)
    if out.returncode != 0:
        raise WrkError(f"wrk exited {out.returncode}: {out.stderr.strip()[-1000:]}")
    return parse_wrk_output(out.stdout)


def measure_saturation(
    pid: int,
    config: SaturationConfig,
    *,
    scenario: str,
    framework: str,
    mode: Mode,
    load: dict[str, Any],
    command: str,
    notes: str,
) -> BenchResult:
    """One wrk run while the server's process tree (rooted at ``pid``) is measured, as a
    result row; ``load`` adds to the connections and duration every such row records."""
    with TreeMonitor(pid) as monitor:
        stats = run_wrk(config)
    usage = monitor.usage
    assert usage is not None
    return BenchResult(
        scenario=scenario,
        framework=framework,
        mode=mode,
        payload_bytes=len(config.body),
        load={"connections": config.connections, "duration_s": config.duration_s, **load},
        stats=stats,
        generator="wrk",
        cpu_s=usage.cpu_s,
        peak_rss_mib=usage.peak_rss_mib,
        command=command,
        notes=notes,
    )
