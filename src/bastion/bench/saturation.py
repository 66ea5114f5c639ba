"""Closed-loop saturation runs with wrk or hey: how many requests per second a server sustains.

wrk (Debian's package) keeps ``connections`` requests in flight on one thread and is far
cheaper per request than any Python client, which matters on a 2-core machine where the
load generator shares the CPU with the server. Its own summary has no JSON form, so a
small Lua script (:data:`LUA`) sets the request and, in ``done()``, prints one line
``BENCH_JSON {...}`` with the counts and latency percentiles from wrk's HdrHistogram;
:func:`parse_wrk_output` reads that line into :class:`~bastion.bench.stats.RunStats`.

hey (Debian's package; Go's ``net/http``) is the second generator, because it behaves like
the clients servers meet: ``Accept-Encoding: gzip`` on every request and kept-alive
connections, as Go clients, browsers and ``requests`` do by default, where wrk sends no
``Accept-Encoding`` at all. A server that compresses every answer looks fine under wrk and
pays for it under hey (issue 14), so its defaults are kept (never ``-disable-compression``).
With ``-o csv`` hey prints one line per response; :func:`parse_hey_csv` turns those into
RunStats with :class:`~bastion.bench.stats.Summary`'s percentiles (see its caveats).

Closed loop means latency here is *service* latency under that concurrency, not what a
user arriving at a fixed rate would see (the open-loop runs measure that).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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


class LoadGeneratorError(RuntimeError):
    """A load generator is missing, failed, or printed something unreadable."""


class WrkError(LoadGeneratorError):
    pass


class HeyError(LoadGeneratorError):
    pass


GENERATORS: tuple[str, ...] = ("wrk", "hey")


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
    generator: str = "wrk"  # "wrk" | "hey" (GENERATORS)


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


# hey's CSV: the columns read, by name, so that a hey with another layout fails loudly
HEY_COLUMNS: tuple[str, ...] = ("response-time", "status-code", "offset")
# hey keeps at most this many responses for its report (its requester's maxRes): a CSV this
# long has lost the rest, and its count would understate the throughput
HEY_MAX_RESULTS = 1_000_000


def parse_hey_csv(text: str, duration_s: float) -> RunStats:
    """RunStats from ``hey -o csv``'s output for a ``-z duration_s`` run.

    One line per response: ``response-time`` (seconds, request written to body read, the
    connection's dial included on its first request), the ``status-code`` and the
    ``offset`` (seconds from hey's start to the request's start). Two limits of that CSV:

    * it has no line for a request that got no response (connection refused, reset,
      timeout): hey counts those only in its text summary. They show here as a lower
      throughput, not as errors; a run with no response at all raises :class:`HeyError`.
    * times are printed with 4 decimals: latency is in steps of 0.1 ms.

    Throughput is over the longer of ``-z`` and the span from the first request's start to
    the last response's end: hey lets the requests in flight at ``-z`` finish, and those
    are counted, so the window must include them.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("response-time,"):
        raise HeyError(f"no CSV header in hey's output:\n{text[-2000:]}")
    header = lines[0].split(",")
    missing = [c for c in HEY_COLUMNS if c not in header]
    if missing:
        raise HeyError(f"hey's CSV lacks column(s) {', '.join(missing)}: {lines[0]}")
    rows = lines[1:]
    if not rows:
        raise HeyError(
            "hey recorded no response (its CSV lists responses only: connection errors and timeouts are not in it)"
        )
    if len(rows) >= HEY_MAX_RESULTS:
        raise HeyError(f"hey kept only its first {HEY_MAX_RESULTS:,} responses: shorten the run")
    i_time, i_status, i_offset = (header.index(c) for c in HEY_COLUMNS)
    latency_s = np.empty(len(rows), dtype=np.float64)
    offsets = np.empty(len(rows), dtype=np.float64)
    status: dict[str, int] = {}
    for n, line in enumerate(rows):
        cells = line.split(",")
        try:
            latency_s[n] = float(cells[i_time])
            offsets[n] = float(cells[i_offset])
            code = str(int(cells[i_status]))
        except (IndexError, ValueError) as err:
            raise HeyError(f"unreadable line {n + 2} of hey's CSV: {line!r}") from err
        status[code] = status.get(code, 0) + 1
    ok = sum(k for code, k in status.items() if code.startswith("2") and len(code) == 3)
    span = float((offsets + latency_s).max() - offsets.min())
    latency_ms = latency_s * 1e3
    return RunStats(
        duration_s=max(duration_s, span),
        requests=len(rows),
        ok=ok,
        status_counts=dict(sorted(status.items())),
        latency_ms=Summary.of(latency_ms),
        latency_samples=latency_ms,
    )


def hey_available() -> str | None:
    return shutil.which("hey")


def hey_version() -> str:
    """hey's Debian version from dpkg ("debian/0.1.4-2+b4"; hey has no version flag), or "?"."""
    if hey_available() is None:
        return "?"
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "hey"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    version = out.stdout.strip() if out.returncode == 0 else ""
    return f"debian/{version}" if version else "?"


def run_hey(config: SaturationConfig) -> RunStats:
    """One hey run at its default headers (``Accept-Encoding: gzip``, keep-alive); raises
    :class:`HeyError` when hey is missing or fails. ``threads`` does not apply: hey runs one
    goroutine per connection on every core (its ``-cpus`` default)."""
    hey = hey_available()
    if hey is None:
        raise HeyError("hey is not installed (Debian package `hey`; `make bench` installs it)")
    with tempfile.TemporaryDirectory(prefix="bench-hey-") as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(config.body)
        argv = [
            hey,
            "-z",
            f"{config.duration_s:g}s",  # Go's time.ParseDuration: fractions are fine, unlike wrk's -d
            "-c",
            str(config.connections),
            "-t",
            str(max(1, round(config.timeout_s))),
            "-m",
            "POST",
            "-T",
            config.content_type,
            "-D",
            str(body_file),
        ]
        for name, value in config.headers.items():
            argv += ["-H", f"{name}: {value}"]
        argv += ["-o", "csv", config.url]
        out = subprocess.run(
            argv, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=config.duration_s + 120
        )
    if out.returncode != 0:
        raise HeyError(f"hey exited {out.returncode}: {(out.stderr or out.stdout).strip()[-1000:]}")
    return parse_hey_csv(out.stdout, config.duration_s)


def run_load(config: SaturationConfig) -> RunStats:
    """One run with ``config.generator``."""
    if config.generator == "wrk":
        return run_wrk(config)
    if config.generator == "hey":
        return run_hey(config)
    raise ValueError(f"unknown load generator {config.generator!r}; expected one of {', '.join(GENERATORS)}")


def generator_available(generator: str) -> str | None:
    """The generator's path, or None when it is not installed."""
    if generator not in GENERATORS:
        raise ValueError(f"unknown load generator {generator!r}; expected one of {', '.join(GENERATORS)}")
    return wrk_available() if generator == "wrk" else hey_available()


def require_generators(generators: Sequence[str]) -> None:
    """Raise the missing generator's error (WrkError, HeyError) before anything starts."""
    for generator in generators:
        if generator_available(generator) is None:
            error = {"wrk": WrkError, "hey": HeyError}[generator]
            raise error(f"{generator} is not installed (Debian package `{generator}`; `make bench` installs it)")


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
    """One run of ``config.generator`` while the server's process tree (rooted at ``pid``) is
    measured, as a result row; ``load`` adds to the connections and duration every such row
    records."""
    with TreeMonitor(pid) as monitor:
        stats = run_load(config)
    usage = monitor.usage
    assert usage is not None
    return BenchResult(
        scenario=scenario,
        framework=framework,
        mode=mode,
        payload_bytes=len(config.body),
        load={"connections": config.connections, "duration_s": config.duration_s, **load},
        stats=stats,
        generator=config.generator,
        cpu_s=usage.cpu_s,
        peak_rss_mib=usage.peak_rss_mib,
        command=command,
        notes=notes,
    )
