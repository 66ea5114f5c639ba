"""Unit tests for benchmarks/serving_bench.py: parsing, accounting, bodies, ratios. No servers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bastion.bench import procstats

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "serving_bench.py"
_spec = importlib.util.spec_from_file_location("serving_bench", _PATH)
assert _spec and _spec.loader
sb = importlib.util.module_from_spec(_spec)
sys.modules["serving_bench"] = sb  # dataclasses look their module up while the class is built
_spec.loader.exec_module(sb)

# --------------------------------------------------------------------------- real generator output

# hey 0.1.4 against MLServer (parallel_workers=0), 1-row JSON, `hey -z 5s -c 16 …`
HEY_OK = """
Summary:
  Total:\t5.0076 secs
  Slowest:\t0.0709 secs
  Fastest:\t0.0013 secs
  Average:\t0.0079 secs
  Requests/sec:\t2010.5262
\x20\x20
  Total data:\t5215224 bytes
  Size/request:\t518 bytes

Response time histogram:
  0.001 [1]\t|
  0.008 [9836]\t|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■
  0.015 [217]\t|■
  0.022 [8]\t|
  0.029 [1]\t|
  0.036 [1]\t|
  0.043 [0]\t|
  0.050 [1]\t|
  0.057 [1]\t|
  0.064 [1]\t|
  0.071 [1]\t|


Latency distribution:
  10% in 0.0078 secs
  25% in 0.0078 secs
  50% in 0.0079 secs
  75% in 0.0080 secs
  90% in 0.0081 secs
  95% in 0.0081 secs
  99% in 0.0091 secs

Details (average, fastest, slowest):
  DNS+dialup:\t0.0000 secs, 0.0013 secs, 0.0709 secs
  DNS-lookup:\t0.0000 secs, 0.0000 secs, 0.0000 secs
  req write:\t0.0000 secs, 0.0000 secs, 0.0023 secs
  resp wait:\t0.0079 secs, 0.0013 secs, 0.0691 secs
  resp read:\t0.0000 secs, 0.0000 secs, 0.0047 secs

Status code distribution:
  [200]\t10068 responses



"""

# hey against a closed port: no responses at all, every request an error; hey still prints
# a large "Requests/sec" that counts the failures.
HEY_REFUSED = """
Summary:
  Total:\t1.0003 secs
  Slowest:\t0.0000 secs
  Fastest:\t0.0000 secs
  Average:\t NaN secs
  Requests/sec:\t66991.8954
\x20\x20

Response time histogram:


Latency distribution:

Details (average, fastest, slowest):
  DNS+dialup:\t NaN secs, 0.0000 secs, 0.0000 secs
  DNS-lookup:\t NaN secs, 0.0000 secs, 0.0000 secs
  req write:\t NaN secs, 0.0000 secs, 0.0000 secs
  resp wait:\t NaN secs, 0.0000 secs, 0.0000 secs
  resp read:\t NaN secs, 0.0000 secs, 0.0000 secs

Status code distribution:

Error distribution:
  [67015]\tPost "http://127.0.0.1:18999/x": dial tcp 127.0.0.1:18999: connect: connection refused

"""

# hey against the minimal app with a body it rejects (`{}`): 200 responses, all HTTP 400.
HEY_400 = """
Summary:
  Total:\t0.0256 secs
  Slowest:\t0.0050 secs
  Fastest:\t0.0000 secs
  Average:\t0.0004 secs
  Requests/sec:\t7801.8404
\x20\x20

Response time histogram:
  0.000 [1]\t|
  0.001 [180]\t|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■
  0.001 [5]\t|■
  0.002 [0]\t|
  0.002 [4]\t|■
  0.003 [0]\t|
  0.003 [5]\t|■
  0.003 [0]\t|
  0.004 [0]\t|
  0.004 [1]\t|
  0.005 [4]\t|■


Latency distribution:
  10% in 0.0001 secs
  25% in 0.0001 secs
  50% in 0.0001 secs
  75% in 0.0003 secs
  90% in 0.0005 secs
  95% in 0.0025 secs
  99% in 0.0046 secs

Details (average, fastest, slowest):
  DNS+dialup:\t0.0000 secs, 0.0000 secs, 0.0050 secs
  DNS-lookup:\t0.0000 secs, 0.0000 secs, 0.0000 secs
  req write:\t0.0000 secs, 0.0000 secs, 0.0001 secs
  resp wait:\t0.0003 secs, 0.0000 secs, 0.0049 secs
  resp read:\t0.0000 secs, 0.0000 secs, 0.0023 secs

Status code distribution:
  [400]\t200 responses



"""

# wrk 4.1.0 with the script from `wrk_script` (the done hook prints the BENCH_JSON line)
WRK_OK = (
    "Running 2s test @ http://127.0.0.1:18091/v2/models/digits/infer\n"
    "  1 threads and 16 connections\n"
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev\n"
    "    Latency   702.43us  154.91us   3.41ms   92.63%\n"
    "    Req/Sec    22.95k   374.44    23.36k    80.00%\n"
    "  45670 requests in 2.00s, 18.95MB read\n"
    "Requests/sec:  22820.70\n"
    "Transfer/sec:      9.47MB\n"
    'BENCH_JSON {"duration_us":2001253,"requests":45670,"bytes":19866450,"connect":0,"read":0,'
    '"write":0,"status":0,"timeout":0,"mean_us":702.4,"max_us":3414,"p50_us":672,"p90_us":770,'
    '"p99_us":1240,"p999_us":2680}\n'
)
WRK_400 = (
    "Running 1s test @ http://127.0.0.1:18091/v2/models/digits/infer\n"
    "  1 threads and 4 connections\n"
    "  30562 requests in 1.10s, 5.04MB read\n"
    "  Non-2xx or 3xx responses: 30562\n"
    "Requests/sec:  27790.26\n"
    'BENCH_JSON {"duration_us":1099738,"requests":30562,"bytes":5287226,"connect":0,"read":0,'
    '"write":0,"status":30562,"timeout":0,"mean_us":219.8,"max_us":4602,"p50_us":113,"p90_us":284,'
    '"p99_us":2382,"p999_us":3936}\n'
)


def test_parse_hey_success() -> None:
    r = sb.parse_hey(HEY_OK)
    assert r.generator == "hey"
    assert r.duration_s == pytest.approx(5.0076)
    assert r.status_counts == {"200": 10068}
    assert (r.responses, r.ok, r.errors) == (10068, 10068, 0)
    assert r.rps == pytest.approx(10068 / 5.0076)
    assert r.latency_ms["p50"] == pytest.approx(7.9)
    assert r.latency_ms["p90"] == pytest.approx(8.1)
    assert r.latency_ms["p99"] == pytest.approx(9.1)
    assert r.latency_ms["mean"] == pytest.approx(7.9)
    assert r.latency_ms["max"] == pytest.approx(70.9)
    assert r.bytes_read == 5215224


def test_parse_hey_histogram_brackets_are_not_status_codes() -> None:
    # "0.008 [9836]" in the histogram looks like "[200] 10068 responses"; only the status
    # section may count.
    assert sum(sb.parse_hey(HEY_OK).status_counts.values()) == 10068


def test_parse_hey_transport_errors_are_not_throughput() -> None:
    r = sb.parse_hey(HEY_REFUSED)
    assert r.responses == 0 and r.ok == 0
    assert r.rps == 0.0  # not hey's 66991 "Requests/sec"
    assert r.errors == 67015
    [(message, count)] = r.transport_errors.items()
    assert count == 67015 and "connection refused" in message
    assert r.latency_ms == {"max": 0.0}  # NaN average dropped, no percentiles


def test_parse_hey_http_errors() -> None:
    r = sb.parse_hey(HEY_400)
    assert r.status_counts == {"400": 200}
    assert (r.responses, r.ok, r.errors) == (200, 0, 200)
    assert r.latency_ms["p99"] == pytest.approx(4.6)


def test_parse_hey_rejects_other_text() -> None:
    with pytest.raises(ValueError, match="not hey output"):
        sb.parse_hey(WRK_OK)


def test_parse_wrk_uses_the_done_hook_line() -> None:
    r = sb.parse_wrk(WRK_OK)
    assert r.generator == "wrk"
    assert r.duration_s == pytest.approx(2.001253)
    assert (r.responses, r.ok, r.errors) == (45670, 45670, 0)
    assert r.rps == pytest.approx(45670 / 2.001253)
    assert r.latency_ms["p50"] == pytest.approx(0.672)
    assert r.latency_ms["p90"] == pytest.approx(0.770)
    assert r.latency_ms["p99"] == pytest.approx(1.240)
    assert r.latency_ms["p99.9"] == pytest.approx(2.680)
    assert r.transport_errors == {}


def test_parse_wrk_http_errors() -> None:
    r = sb.parse_wrk(WRK_400)
    assert r.status_counts == {"<400": 0, ">=400": 30562}
    assert (r.ok, r.errors, r.rps) == (0, 30562, 0.0)


def test_parse_wrk_without_hook_line() -> None:
    with pytest.raises(ValueError, match="BENCH_JSON"):
        sb.parse_wrk(WRK_OK.split("BENCH_JSON")[0])


def test_wrk_script_sends_body_and_headers(tmp_path: Path) -> None:
    bodies = sb.write_bodies(tmp_path)
    script = sb.wrk_script(bodies["bin64"])
    assert f'io.open("{bodies["bin64"].path}", "rb")' in script
    assert 'wrk.method = "POST"' in script
    assert 'wrk.headers["Content-Type"] = "application/octet-stream"' in script
    header_length = bodies["bin64"].headers["Inference-Header-Content-Length"]
    assert f'wrk.headers["Inference-Header-Content-Length"] = "{header_length}"' in script
    assert sb.WRK_MARKER in script and "latency:percentile(99)" in script


def test_hey_command_disables_compression_and_passes_headers(tmp_path: Path) -> None:
    body = sb.write_bodies(tmp_path)["bin64"]
    argv = sb.load_command("hey", "http://127.0.0.1:1/x", body, 20, 16, tmp_path)
    assert argv[:3] == ["hey", "-z", "20s"]
    assert "-disable-compression" in argv
    assert argv[argv.index("-c") + 1] == "16"
    assert (
        argv[argv.index("-H") + 1]
        == f"Inference-Header-Content-Length: {body.headers['Inference-Header-Content-Length']}"
    )
    assert argv[-2:] == [str(body.path), "http://127.0.0.1:1/x"]


# --------------------------------------------------------------------------- request bodies


def test_binary_body_decodes_with_bastions_codec() -> None:
    v2_rest = pytest.importorskip("bastion.protocol.v2_rest")
    rows = sb.sample_rows(64, seed=1)
    body, header_length = sb.binary_request(rows)
    request = v2_rest.decode_infer_request(body, "digits", None, header_length)
    [tensor] = request.inputs
    assert (tensor.name, tensor.datatype, tuple(tensor.shape)) == ("input", "FP32", (64, 64))
    np.testing.assert_array_equal(tensor.data, rows)
    assert [(o.name, o.parameters) for o in request.outputs] == [
        ("label", {"binary_data": True}),
        ("probabilities", {"binary_data": True}),
    ]


def test_binary_body_matches_tritonclient() -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    rows = sb.sample_rows(64, seed=1)
    body, header_length = sb.binary_request(rows)
    inp = httpclient.InferInput("input", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows, binary_data=True)
    outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("label", "probabilities")]
    theirs, their_length = httpclient.InferenceServerClient.generate_request_body([inp], outputs=outs)
    # same JSON (key order aside) and byte-identical tensor data after it
    assert json.loads(body[:header_length]) == json.loads(theirs[:their_length])
    assert body[header_length:] == theirs[their_length:] == rows.astype("<f4").tobytes()


def test_json_body_decodes_with_bastions_codec() -> None:
    v2_rest = pytest.importorskip("bastion.protocol.v2_rest")
    rows = sb.sample_rows(1)
    request = v2_rest.decode_infer_request(sb.json_request(rows), "digits", None)
    np.testing.assert_array_equal(request.inputs[0].data, rows)
    assert request.inputs[0].data.dtype == np.float32


def test_bodies_on_disk(tmp_path: Path) -> None:
    bodies = sb.write_bodies(tmp_path)
    assert {k: (b.rows, b.content_type) for k, b in bodies.items()} == {
        "json1": (1, "application/json"),
        "json64": (64, "application/json"),
        "bin64": (64, "application/octet-stream"),
    }
    assert json.loads(bodies["json1"].path.read_bytes())["inputs"][0]["shape"] == [1, 64]
    # deterministic: every server and every run gets the same bytes
    again = sb.write_bodies(tmp_path / "again")
    assert all(again[k].path.read_bytes() == b.path.read_bytes() for k, b in bodies.items())


# --------------------------------------------------------------------------- /proc accounting


def _stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0) -> str:
    # the 52 fields of proc(5), as Linux 6.x writes them; the ones not used are plausible filler
    fields = ["S", ppid, pid, pid, 0, -1, 4194560, 3000, 0, 0, 0, utime, stime, cutime, cstime, 20, 0, 3, 0]
    fields += [123456, 612000000, 20000] + [0] * 30
    return f"{pid} ({comm}) " + " ".join(str(f) for f in fields[:50]) + "\n"


def test_parse_proc_stat_with_awkward_comm() -> None:
    line = _stat_line(4242, "py (worker) 1", 4000, utime=150, stime=30, cutime=7, cstime=3)
    s = procstats.parse_proc_stat(line)
    assert (s.pid, s.comm, s.ppid) == (4242, "py (worker) 1", 4000)
    assert (s.utime, s.stime, s.cutime, s.cstime) == (150, 30, 7, 3)
    assert s.ticks == 190


def test_parse_proc_stat_real_line() -> None:
    with open("/proc/self/stat", encoding="ascii") as f:
        s = procstats.parse_proc_stat(f.read())
    import os

    assert s.pid == os.getpid() and s.ppid == os.getppid()


def _fake_proc(root: Path, procs: list[tuple[int, int, int, int, int]]) -> None:
    for pid, ppid, utime, stime, hwm_kib in procs:
        d = root / str(pid)
        d.mkdir()
        (d / "stat").write_text(_stat_line(pid, f"p{pid}", ppid, utime, stime))
        (d / "status").write_text(f"Name:\tp{pid}\nVmHWM:\t  {hwm_kib} kB\nVmRSS:\t  1 kB\n")
    (root / "self").mkdir()  # non-numeric entries are skipped


def test_process_tree_cpu_and_rss(tmp_path: Path) -> None:
    # supervisor 100 -> workers 101, 102 -> 103 (a worker's child); 200 is someone else's
    _fake_proc(tmp_path, [(100, 1, 50, 10, 1024), (101, 100, 300, 100, 2048), (102, 100, 200, 40, 2048),
                          (103, 101, 5, 5, 512), (200, 1, 9999, 9999, 99999)])  # fmt: skip
    tree = procstats.process_tree(100, proc=str(tmp_path))
    assert sorted(tree) == [100, 101, 102, 103]
    assert procstats.tree_cpu_seconds(tree, clock_ticks=100) == pytest.approx((60 + 400 + 240 + 10) / 100)
    assert sb.peak_rss_mib(sorted(tree), proc=str(tmp_path)) == pytest.approx((1024 + 4096 + 512) / 1024)
    assert procstats.process_tree(999, proc=str(tmp_path)) == {}


def test_reaped_worker_moves_into_parent_cutime() -> None:
    # Before: worker alive with 400 ticks. After: it exited and the supervisor reaped it.
    before = {100: procstats.parse_proc_stat(_stat_line(100, "sup", 1, 60, 0)),
              101: procstats.parse_proc_stat(_stat_line(101, "w", 100, 400, 0))}  # fmt: skip
    after = {100: procstats.parse_proc_stat(_stat_line(100, "sup", 1, 70, 0, cutime=450))}
    assert procstats.tree_cpu_seconds(after, 100) - procstats.tree_cpu_seconds(before, 100) == pytest.approx(0.6)


def test_machine_cpu() -> None:
    m = sb.MachineCpu.parse("cpu  23737 0 3575 104090 540 0 470 11 0 0")
    assert m.busy == 23737 + 3575 + 470
    assert m.steal == 11
    assert m.total == m.busy + 104090 + 540 + 11


def test_cpu_per_request() -> None:
    assert sb.cpu_per_request_us(2.0, 40_000) == pytest.approx(50.0)
    assert sb.cpu_per_request_us(1.0, 0) is None


# --------------------------------------------------------------------------- plan, ratios, report


def _result(server: str, workers: int, body: str, rps: float, p99: float, cpu_s: float = 10.0) -> object:
    duration = 20.0
    ok = int(rps * duration)
    load = sb.LoadResult("wrk", duration, ok, ok, {"<400": ok, ">=400": 0}, {},
                         {"p50": p99 / 3, "p90": p99 / 2, "p99": p99})  # fmt: skip
    return sb.RowResult(row=sb.Row(server, workers, body), body_label=body, rows_per_request=64 if "64" in body else 1,
                        load=load, server_cpu_s=cpu_s, generator_cpu_s=2.0, machine_busy_s=30.0, machine_steal_s=0.0,
                        peak_rss_mib=80.0, processes=1, startup_s=1.0, probe={})  # fmt: skip


def _by_name(computed: list) -> dict:
    return {q.name: q for q in computed}


def test_ratios_targets_met_with_mlserver_at_its_best() -> None:
    results = [
        _result("bastion", 1, "json1", 6000, 2.0),
        _result("mlserver", 0, "json1", 2000, 9.0),
        _result("mlserver", 1, "json1", 800, 6.0),  # slower but a lower p99: p99 compares to this one
        _result("minimal", 1, "json1", 6500, 1.5),
    ]
    q = _by_name(sb.ratios(results))
    assert q["Bastion / MLServer throughput"].value == pytest.approx(3.0)
    assert q["Bastion / MLServer throughput"].met is True  # the bound itself meets the target
    assert q["Bastion / minimal app throughput"].value == pytest.approx(6000 / 6500)
    assert q["Bastion / minimal app throughput"].met is True
    assert q["Bastion p99 / MLServer p99"].value == pytest.approx(2.0 / 6.0)
    assert q["Bastion p99 / MLServer p99"].met is True


def test_ratios_misses_and_missing_rows() -> None:
    results = [
        _result("bastion", 1, "json1", 4000, 4.0),
        _result("bastion", 2, "json1", 5000, 4.0),
        _result("mlserver", 0, "json1", 2000, 9.0),
        _result("minimal", 1, "json1", 5000, 1.5),
    ]
    q = _by_name(sb.ratios(results))
    assert q["Bastion / MLServer throughput"].met is False
    assert q["Bastion / minimal app throughput"].met is False  # 0.8 < 0.9
    assert q["Bastion p99 / MLServer p99"].met is False  # 0.44 > 0.33
    # workers=2 rows are informative: a ratio, no target; no minimal --workers 2 row: no value
    w2 = q["Bastion / MLServer throughput (workers=2)"]
    assert (w2.value, w2.target, w2.met) == (pytest.approx(2.5), None, None)
    assert q["Bastion / minimal app throughput (workers=2)"].value is None


def test_batch_ratios() -> None:
    results = [
        _result("bastion", 1, "bin64", 3000, 5.0),
        _result("bastion", 1, "json64", 1500, 10.0),
        _result("mlserver", 0, "json64", 1000, 20.0),
        _result("minimal", 1, "json64", 2000, 8.0),
    ]
    q = _by_name(sb.ratios(results))
    assert q["batch 64: Bastion binary / MLServer JSON throughput"].value == pytest.approx(3.0)
    assert q["batch 64: Bastion binary / Bastion JSON throughput"].value == pytest.approx(2.0)
    assert q["batch 64: Bastion binary / minimal app JSON throughput"].value == pytest.approx(1.5)
    assert q["batch 64: Bastion binary p99 / MLServer JSON p99"].value == pytest.approx(0.25)


def test_plan_respects_only_and_workers() -> None:
    rows = sb.plan({"bastion", "minimal"}, [1, 2], [0, 1], batch=True)
    assert [r.key for r in rows] == [
        "bastion-w1-json1", "bastion-w2-json1", "minimal-w1-json1", "minimal-w2-json1",
        "bastion-w1-bin64", "bastion-w1-json64", "minimal-w1-json64",
    ]  # fmt: skip
    assert [r.key for r in sb.plan({"mlserver"}, [1], [0, 1], batch=False)] == [
        "mlserver-w0-json1", "mlserver-w1-json1"
    ]  # fmt: skip
    assert sb.Row("mlserver", 0, "json1").config == "parallel_workers=0"


def test_markdown_and_benchmarks_md_update(tmp_path: Path) -> None:
    results = [_result("bastion", 1, "json1", 4000, 4.0), _result("mlserver", 0, "json1", 2000, 9.0)]
    computed = sb.ratios(results)
    report = {
        "date": "2026-01-01 00:00 UTC", "command": "python benchmarks/serving_bench.py", "generator": "wrk",
        "connections": 16, "duration_s": 20.0, "warmup_s": 3.0, "repeat": 1,
        "environment": {"cpu_model": "Test CPU", "cpus": 2, "memory_gib": 24.0, "kernel": "Linux 6",
                        "loadavg_before": "0.00", "versions": {"bastion": "0.1.0"}},
    }  # fmt: skip
    section = sb.markdown(report, results, computed)
    assert "| bastion | --workers 1 | json1 | 4,000 | 4,000 | 1.33 | 2.00 | 4.00 | 0 | 125 |" in section
    assert "| Bastion / MLServer throughput | 2.00 | ≥ 3.00 | **no** |" in section
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nprose before\n")
    sb.update_benchmarks_md(section, md)
    sb.update_benchmarks_md(section.replace("4,000", "5,000"), md)  # a second run replaces the first
    text = md.read_text()
    assert text.count(sb.MD_START) == 1 and text.count(sb.MD_END) == 1
    assert "prose before" in text and "5,000" in text and "4,000" not in text
