"""hey as the serving bench's second load generator (issue 14): its CSV, a real run against
a local server (which must see ``Accept-Encoding: gzip``), the hey rows of the plan, and
the per-generator Bastion / minimal app ratios in the report."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from bastion.bench import saturation, serving_report
from bastion.bench.procstats import HostUsage
from bastion.bench.results import BenchResult
from bastion.bench.saturation import HeyError, SaturationConfig, measure_saturation, parse_hey_csv, run_hey, run_load
from bastion.bench.serving import Row, ServingRun, plan
from bastion.bench.stats import RunStats, Summary

# Captured from hey 0.1.4 (Debian 0.1.4-2+b4): `hey -n 6 -c 2 -m POST -T application/json -D body -o csv URL`
# against a Python http.server answering 200 (the ~44 ms are its delayed ACKs, not hey's)
HEY_OK = """\
response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
0.0032,0.0017,0.0000,0.0001,0.0013,0.0001,200,0.0002
0.0027,0.0001,0.0000,0.0000,0.0023,0.0002,200,0.0020
0.0473,0.0000,0.0000,0.0000,0.0008,0.0465,200,0.0047
0.0495,0.0000,0.0000,0.0000,0.0058,0.0437,200,0.0034
0.0436,0.0000,0.0000,0.0000,0.0003,0.0433,200,0.0529
0.0446,0.0000,0.0000,0.0001,0.0007,0.0437,200,0.0520

"""
# the same against a path answering 400
HEY_400 = """\
response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
0.0012,0.0003,0.0000,0.0001,0.0007,0.0001,400,0.0003
0.0014,0.0001,0.0000,0.0001,0.0012,0.0001,400,0.0005

"""
# connection refused: hey's CSV lists responses only, so nothing follows the header
HEY_REFUSED = "response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset\n\n"

needs_hey = pytest.mark.skipif(shutil.which("hey") is None, reason="hey is not installed (Debian package `hey`)")


# --------------------------------------------------------------------------- hey's CSV


def test_parse_hey_csv_counts_statuses_and_latency() -> None:
    r = parse_hey_csv(HEY_OK, 1.0)
    assert (r.requests, r.ok, r.errors, r.status_counts) == (6, 6, 0, {"200": 6})
    assert r.duration_s == 1.0 and r.throughput == pytest.approx(6.0)
    lat = r.latency_ms
    assert (lat.count, lat.min, lat.max) == (6, pytest.approx(2.7), pytest.approx(49.5))
    assert lat.p50 == pytest.approx((43.6 + 44.6) / 2)  # Summary's linear interpolation
    assert r.latency_samples is not None and len(r.latency_samples) == 6  # kept: runs can be merged


def test_parse_hey_csv_window_covers_requests_finished_after_z() -> None:
    # first request starts at 0.0002 s, the last response ends at 0.0520 + 0.0446 s
    r = parse_hey_csv(HEY_OK, 0.05)
    assert r.duration_s == pytest.approx(0.0966 - 0.0002)


def test_parse_hey_csv_http_errors_are_not_throughput() -> None:
    r = parse_hey_csv(HEY_400, 1.0)
    assert (r.ok, r.errors, r.throughput, r.status_counts) == (0, 2, 0.0, {"400": 2})


def test_parse_hey_csv_refuses_what_it_cannot_read() -> None:
    with pytest.raises(HeyError, match="no response"):
        parse_hey_csv(HEY_REFUSED, 1.0)
    with pytest.raises(HeyError, match="no CSV header"):
        parse_hey_csv("Summary:\n  Total: 1.0 secs\n", 1.0)
    with pytest.raises(HeyError, match="lacks column"):
        parse_hey_csv("response-time,status-code\n0.1,200\n", 1.0)
    with pytest.raises(HeyError, match="unreadable line 3"):
        parse_hey_csv(HEY_OK.replace(",200,0.0020", ",xx,0.0020"), 1.0)


def test_missing_hey_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(saturation, "hey_available", lambda: None)
    with pytest.raises(HeyError, match="Debian package `hey`"):
        run_hey(SaturationConfig("http://127.0.0.1:9/x", b"{}", 1, 1.0, generator="hey"))
    with pytest.raises(HeyError, match="Debian package `hey`"):
        saturation.require_generators(["hey"])
    with pytest.raises(ValueError, match="unknown load generator"):
        run_load(SaturationConfig("http://127.0.0.1:9/x", b"{}", 1, 1.0, generator="ab"))


# --------------------------------------------------------------------------- a real hey run


@dataclass
class _Seen:
    """What the test server saw, request by request."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    accept_encoding: list[str | None] = field(default_factory=list)
    content_type: set[str | None] = field(default_factory=set)
    token: set[str | None] = field(default_factory=set)
    bodies: set[bytes] = field(default_factory=set)


@pytest.fixture
def json_server() -> Iterator[tuple[str, _Seen]]:
    seen = _Seen()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as hey expects

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with seen.lock:
                seen.accept_encoding.append(self.headers.get("Accept-Encoding"))
                seen.content_type.add(self.headers.get("Content-Type"))
                seen.token.add(self.headers.get("X-Token"))
                seen.bodies.add(body)
            reply = b'{"outputs": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/infer", seen
    finally:
        server.shutdown()
        server.server_close()


@needs_hey
def test_run_hey_posts_with_its_default_headers(json_server: tuple[str, _Seen]) -> None:
    url, seen = json_server
    config = SaturationConfig(url, b'{"rows": [1]}', 2, 1.0, headers={"X-Token": "t"}, generator="hey")
    stats = run_hey(config)
    assert stats.ok > 0 and stats.errors == 0 and stats.status_counts == {"200": stats.ok}
    assert stats.duration_s >= 1.0 and stats.latency_ms.p50 > 0
    with seen.lock:
        assert len(seen.accept_encoding) >= stats.ok
        # Go's net/http asks for gzip unless told not to: the point of the hey rows (issue 14)
        assert all(v is not None and "gzip" in v for v in seen.accept_encoding), set(seen.accept_encoding)
        assert seen.content_type == {"application/json"} and seen.token == {"t"}
        assert seen.bodies == {b'{"rows": [1]}'}


@needs_hey
def test_measure_saturation_records_hey_as_the_generator(json_server: tuple[str, _Seen]) -> None:
    url, _ = json_server
    config = SaturationConfig(url, b"{}", 2, 1.0, generator="hey")
    result = measure_saturation(
        os.getpid(), config, scenario="digits", framework="test", mode="saturation", load={}, command="", notes=""
    )
    assert result.generator == "hey" and result.to_dict()["generator"] == "hey"
    assert result.stats.ok > 0


# --------------------------------------------------------------------------- plan and report


def test_plan_adds_hey_rows_after_the_wrk_json1_rows() -> None:
    rows = plan(("bastion", "mlserver", "minimal"), [1, 2], [0], batch=True, generators=("wrk", "hey"))
    assert [r.key for r in rows] == [
        "bastion-w1-json1", "bastion-w2-json1", "mlserver-w0-json1", "minimal-w1-json1", "minimal-w2-json1",
        "bastion-w1-json1-hey", "bastion-w2-json1-hey", "minimal-w1-json1-hey", "minimal-w2-json1-hey",
        "bastion-w1-bin64", "bastion-w1-json64", "mlserver-w0-json64", "minimal-w1-json64",
    ]  # fmt: skip
    assert {r.generator for r in rows if r.key.endswith("-hey")} == {"hey"}
    # hey alone: its json1 rows, no batch rows (those compare bodies, with wrk), none for MLServer
    assert [r.key for r in plan(("bastion", "mlserver"), [1], [0], batch=True, generators=("hey",))] == [
        "bastion-w1-json1-hey"
    ]
    assert plan(("mlserver",), [1], [0], batch=True, generators=("hey",)) == []
    with pytest.raises(ValueError, match="unknown load generator ab"):
        plan(("bastion",), [1], [0], batch=False, generators=("ab",))


def _run(server: str, workers: int, rps: float, generator: str = "wrk") -> ServingRun:
    ok = int(rps * 10)
    lat = Summary(count=ok, min=0.1, p25=0.5, p50=1.0, p75=1.5, p90=2.0, p99=3.0, p999=4.0, max=5.0, mean=1.1)
    stats = RunStats(duration_s=10.0, requests=ok, ok=ok, status_counts={"200": ok}, latency_ms=lat)
    result = BenchResult("digits", server, "saturation", 100, {}, stats, generator=generator, cpu_s=5.0)
    host = HostUsage(machine_busy_s=15.0, machine_steal_s=0.0, children_cpu_s=2.0, wall_s=10.0)
    return ServingRun(Row(server, workers, "json1", generator), "1 row, JSON", 1, result, host, startup_s=1.0)


def test_ratios_per_generator_and_console_summary() -> None:
    runs = [
        _run("bastion", 1, 4500),
        _run("minimal", 1, 5000),
        _run("bastion", 1, 3300, "hey"),  # issue 14's figures: every small answer gzipped
        _run("minimal", 1, 4600, "hey"),
        _run("bastion", 2, 6000, "hey"),
        _run("minimal", 2, 6000, "hey"),
    ]
    q = {r.name: r for r in serving_report.ratios(runs)}
    wrk = q["Bastion / minimal app throughput"]  # the name it had before hey rows
    assert (wrk.value, wrk.met, wrk.generator) == (pytest.approx(0.9), True, "wrk")
    hey = q["Bastion / minimal app throughput (hey)"]
    assert (hey.value, hey.target, hey.met, hey.generator) == (pytest.approx(3300 / 4600), 0.9, False, "hey")
    hey2 = q["Bastion / minimal app throughput (hey, workers=2)"]
    assert (hey2.value, hey2.target) == (pytest.approx(1.0), None)
    # hey rows never enter wrk's ratios (the MLServer ones have no MLServer rows here)
    assert q["Bastion / MLServer throughput"].value is None
    summary = serving_report.console_summary(list(q.values()), 16)
    assert "1-row JSON, 16 connections" in summary
    assert "wrk  Bastion / minimal app throughput " in summary and "0.90x  target >= 0.90: met" in summary
    assert "hey  Bastion / minimal app throughput (hey)" in summary and "0.72x  target >= 0.90: NOT met" in summary


def test_markdown_marks_hey_rows_and_says_what_each_client_sends() -> None:
    runs = [_run("bastion", 1, 4500), _run("bastion", 1, 3300, "hey"), _run("minimal", 1, 4600, "hey")]
    report = {
        "date": "d", "command": "c", "repeat": 1, "load": {"connections": 16, "duration_s": 20.0, "warmup_s": 3.0},
        "environment": {"cpu": "C", "logical_cpus": 2, "memory_gib": 24.0, "system": "Linux", "python": "3.11",
                        "versions": {"hey": "hey debian/0.1.4-2+b4"}},
    }  # fmt: skip
    section = serving_report.markdown(report, runs, serving_report.ratios(runs))
    assert "| bastion | --workers 1 | 1 row, JSON | 4,500 |" in section  # wrk rows as before
    assert "| bastion | --workers 1 | 1 row, JSON (hey) | 3,300 |" in section
    assert "Accept-Encoding: gzip" in section and "no Accept-Encoding" in section
    assert "| Bastion / minimal app throughput (hey) | 0.72 | ≥ 0.90 | **no** |" in section


def test_cli_generators_option() -> None:
    from click.testing import CliRunner

    from bastion.cli.bench import bench

    runner = CliRunner()
    cases = {
        ("serving", "--generators", "ab"): "unknown load generator ab",
        ("serving", "--only", "mlserver", "--generators", "hey"): "no rows for --only mlserver with --generators hey",
        ("serving", "--baseline-ref", "HEAD", "--generators", "hey"): "--generators cannot be used with --baseline-ref",
    }
    for args, message in cases.items():
        run = runner.invoke(bench, list(args))
        assert run.exit_code == 2 and message in run.output, (args, run.output)
