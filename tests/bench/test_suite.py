"""The study's own logic: wrk's output, the in-process limit, the targets' verdicts, the
framework registry, and one real run of the suite with Bastion (tiny durations)."""

from __future__ import annotations

import http.server
import json
import math
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from click.testing import CliRunner

from bastion.bench import frameworks
from bastion.bench.frameworks.base import ModelSpec
from bastion.bench.inprocess import measure
from bastion.bench.models import PAYLOAD_ROWS, payload
from bastion.bench.report import render, verdicts
from bastion.bench.results import BenchResult
from bastion.bench.saturation import SaturationConfig, WrkError, parse_wrk_output, run_wrk
from bastion.bench.stats import RunStats, Summary
from bastion.bench.suite import StudyResults
from bastion.bench.venvs import installed_version

if TYPE_CHECKING:
    from tests.conftest import BuiltScenario

WRK_LINE = (
    'Running 4s test @ http://127.0.0.1:9/x\n  1 threads and 16 connections\n'
    'BENCH_JSON {"requests":1000,"duration_us":4000000,"bytes":250000,'
    '"errors":{"connect":0,"read":2,"write":0,"status":10,"timeout":1},'
    '"latency_us":{"min":150,"max":9000,"mean":800.500,'
    '"p25":500,"p50":700,"p75":900,"p90":1200,"p99":4000,"p999":8000}}\n'
)


def test_wrk_json_line_becomes_run_stats() -> None:
    stats = parse_wrk_output(WRK_LINE)
    assert stats.duration_s == 4.0
    assert stats.ok == 990 and stats.status_counts == {"2xx": 990, "4xx/5xx": 10}
    assert stats.transport_errors == {"read": 2, "timeout": 1}
    assert stats.requests == 1003 and stats.errors == 13
    assert stats.throughput == pytest.approx(247.5)
    lat = stats.latency_ms
    assert (lat.min, lat.p50, lat.p99, lat.p999, lat.max) == (0.15, 0.7, 4.0, 8.0, 9.0)
    with pytest.raises(WrkError, match="no BENCH_JSON"):
        parse_wrk_output("Running 1s test\nunable to connect to 127.0.0.1:9 Connection refused\n")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = self.path == "/ok" and self.headers.get("X-Token") == "t" and body == b'{"rows": [1]}'
        reply = b"yes" if ok else b"no"
        self.send_response(200 if ok else 400)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tiny_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is installed by `make test`")
def test_wrk_posts_the_body_and_headers_and_counts_refusals(tiny_server: str) -> None:
    good = run_wrk(SaturationConfig(f"{tiny_server}/ok", b'{"rows": [1]}', 2, 1, headers={"X-Token": "t"}))
    assert good.ok > 10 and good.errors == 0 and good.latency_ms.p50 > 0
    bad = run_wrk(SaturationConfig(f"{tiny_server}/ok", b'{"rows": [2]}', 2, 1, headers={"X-Token": "t"}))
    assert bad.ok == 0 and bad.status_counts.get("4xx/5xx", 0) > 10


def _tiny_model(tmp_path: Path) -> ModelSpec:
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], np.arange(8, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Softmax", ["y"], ["p"], axis=1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 2])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return ModelSpec("image", "tiny", path, "x", "FP32", (4,), "p", (2,))


def test_in_process_limit_times_every_batch_size(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path)
    rows = np.random.default_rng(0).random((10, 4), dtype=np.float32)
    limit = measure(model, rows, batch_sizes=(1, 4, 16), budget_s=0.05, cores=2)
    assert [t.batch for t in limit.timings] == [1, 4, 16]
    assert all(t.calls >= 5 and 0 < t.p50_ms <= t.p99_ms and t.rows_per_s > 0 for t in limit.timings)
    assert limit.best.rows_per_s == max(t.rows_per_s for t in limit.timings)
    # a request of 4 rows: the model's rows/s at batch 4, on 2 cores, per 4 rows
    at4 = next(t for t in limit.timings if t.batch == 4)
    assert limit.requests_per_s(4) == pytest.approx(at4.rows_per_s / 4 * 2)
    doc = limit.to_dict()
    assert doc["batch1"]["batch"] == 1 and doc["cores"] == 2


def test_payloads_are_seeded_and_sized() -> None:
    rows = np.arange(100, dtype=np.float32).reshape(50, 2)
    for size, n in PAYLOAD_ROWS.items():
        a, b = payload(rows, size, seed=3), payload(rows, size, seed=3)
        assert a.shape == (n, 2) and np.array_equal(a, b)
    assert not np.array_equal(payload(rows, "large", 1), payload(rows, "large", 2))


def _result(framework: str, mode: str, p99: float, throughput_ok: int, *, payload_size: str = "small",
            errors: int = 0, connections: int = 16) -> BenchResult:
    lat = Summary(100, 0.1, 0.2, 0.3, 0.4, 0.5, p99, p99, p99 * 2, 0.3)
    stats = RunStats(duration_s=10.0, requests=throughput_ok + errors, ok=throughput_ok,
                     status_counts={"200": throughput_ok, **({"500": errors} if errors else {})}, latency_ms=lat)
    load = {"payload": payload_size, "rows": PAYLOAD_ROWS[payload_size]}
    load.update({"rate": 200.0} if mode == "open-loop" else {"connections": connections})
    return BenchResult("image", framework, mode, 100, load, stats)  # type: ignore[arg-type]


def _study(results: list[BenchResult]) -> StudyResults:
    limit = {"scenario": "image", "model": "image_cnn", "cores": 2,
             "batch1": {"batch": 1, "p50_ms": 0.05, "rows_per_s": 20000.0},
             "best": {"batch": 16, "p50_ms": 0.3, "rows_per_s": 50000.0}, "timings": []}
    return StudyResults(config={"rate": 200.0, "duration_s": 60.0, "warmup_s": 5.0, "connections": [16],
                                "saturation_s": 15.0, "saturation_payloads": ["small", "large"], "workers": 2},
                        results=results, limits=[limit])


def test_verdicts_judge_bastion_against_the_best_usable_peer() -> None:
    study = _study([
        _result("bastion", "open-loop", 2.0, 2000),
        _result("mlserver", "open-loop", 9.0, 2000),
        _result("litserve", "open-loop", 1.0, 1000, errors=1000),  # fast only because it failed half
        _result("bastion", "saturation", 5.0, 60000),
        _result("mlserver", "saturation", 30.0, 9000),
        _result("bastion", "saturation", 9.0, 6000, payload_size="large"),
        _result("triton", "saturation", 9.0, 7000, payload_size="large"),
    ])
    found = {(v.target, v.scenario): v for v in verdicts(study)}
    p99 = found[("lowest p99 at 200 req/s, small", "image")]
    assert p99.met is True and "mlserver 9.00 ms (4.50x)" in p99.detail
    assert found[("highest saturation throughput, small", "image")].met is True
    large = found[("highest saturation throughput, large", "image")]
    assert large.met is False and "triton 700 req/s (0.86x)" in large.detail
    share = found[(">= 90% of the in-process limit (JSON, the study's payloads)", "image")]
    # judged at the largest payload: 600 req/s x 16 rows of 100,000 rows/s
    assert share.met is False and "JSON large: 9,600 of 100,000 rows/s = 9.6%" in share.detail
    assert "JSON small: 6,000 of 100,000" in share.detail
    # no limit probe in this study: no binary verdict
    assert not [t for t, _ in found if "binary" in t]
    md = render(study)
    assert "| image | lowest p99 at 200 req/s, small | yes |" in md
    assert "| image | highest saturation throughput, large | **no** |" in md


def _probe(rows: int, ok: int, connections: int = 16, errors: int = 0) -> BenchResult:
    result = _result("bastion", "saturation", 3.0, ok, errors=errors, connections=connections)
    result.mode = "limit-probe"
    result.load = {"payload": f"binary-{rows}", "rows": rows, "connections": connections, "encoding": "binary"}
    return result


def test_limit_probe_is_judged_on_its_own_row_by_its_best_run() -> None:
    study = _study([
        _result("bastion", "saturation", 9.0, 6000, payload_size="large"),
        _result("triton", "saturation", 9.0, 5000, payload_size="large"),
        _probe(16, 5000), _probe(16, 5500, connections=64),  # 550 req/s x 16 = 8,800 rows/s
        _probe(64, 1500),  # 150 req/s x 64 = 9,600 rows/s
        _probe(64, 9000, errors=1000),  # a run with 10 % errors is not a throughput
    ])
    # the study's limit says 100,000 rows/s; the probe measured its own ceiling, 10,000
    for r in study.results[3:]:
        r.load["ceiling_rows_per_s"] = 10000.0
    study.results[2].load["ceiling_rows_per_s"] = 20000.0  # a slower run's ceiling is not used
    found = {v.target: v for v in verdicts(study)}
    binary = found[">= 90% of the in-process limit (binary tensors, Bastion alone)"]
    assert binary.met is True
    assert binary.detail == (
        "binary 16 rows: 8,800 of 10,000 rows/s = 88.0%; binary 64 rows: 9,600 of 10,000 rows/s = 96.0%"
    )
    json_row = found[">= 90% of the in-process limit (JSON, the study's payloads)"]
    assert json_row.met is False and "JSON large: 9,600 of 100,000 rows/s = 9.6%" in json_row.detail
    # the probe is Bastion alone: it is no saturation cell, so it does not enter "highest throughput"
    assert [t for t in found if t.startswith("highest")] == ["highest saturation throughput, large"]
    md = render(study)
    assert "Limit probe: Bastion alone, binary-tensor requests" in md and "| bastion | binary-64 | 16 |" in md


def test_summary_has_a_row_per_cell_with_its_day_and_no_latency_for_failed_runs() -> None:
    from bastion.bench.report import summary_table

    study = _study([
        _result("mlserver", "open-loop", 9.0, 2000),
        _result("bastion", "open-loop", 2.0, 2000),
        _result("bastion", "saturation", 5.0, 60000),
        _result("rayserve", "open-loop", 10000.0, 100, errors=900),
        _probe(16, 500),  # Bastion's limit probe has its own table
    ])
    study.config.update(payloads=["small"], saturation_payloads=["small"], connections=[16],
                        scenarios=["image"], frameworks=["bastion", "mlserver", "rayserve"])
    for r in study.results:
        r.date = "2026-12-02T10:00:00+00:00"
    study.results[-1].date = "2026-12-03T10:00:00+00:00"  # the probe's day is not the cell's
    lines = summary_table(study)
    assert lines[0] == "| scenario | framework | measured | small | sat. small 16 |"
    assert lines[2:] == [
        "| image | **bastion** | 2026-12-02 | 0.30 / 2.00 / 4.0 | 6,000 |",
        "| image | mlserver | 2026-12-02 | 0.30 / 9.00 / 18.0 | n/a |",
        "| image | rayserve | 2026-12-02 | 90 % errors | n/a |",
    ]


def test_probe_sizes_follow_the_limit_and_the_model_config() -> None:
    from bastion.bench.limitprobe import probe_batches, probe_connections

    limit = {"best": {"batch": 16}, "timings": [{"batch": b} for b in (1, 4, 16, 128)]}
    assert probe_batches(limit, 64) == [16, 64]
    assert probe_batches(limit, None) == [16, 128]
    assert probe_batches(limit, 8) == [8]
    assert probe_connections((1, 16, 64)) == [16, 64]
    assert probe_connections((1,)) == [1]


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_binary_request_decodes_on_the_server_as_the_rows(datatype: str) -> None:
    from bastion.bench.frameworks.v2json import encode_v2_binary
    from bastion.protocol import v2_rest

    if datatype == "BYTES":
        model = ModelSpec("sentiment", "m", Path("m.onnx"), "text", "BYTES", (), "p", (2,))
        rows = np.array(["good film", "élan, bad"], dtype=object)
    else:
        model = ModelSpec("malware", "m", Path("m.onnx"), "x", "FP32", (3,), "p", (2,))
        rows = np.random.default_rng(0).random((5, 3), dtype=np.float32)
    body, headers = encode_v2_binary(model, rows)
    request = v2_rest.decode_infer_request(body, "m", None, int(headers["Inference-Header-Content-Length"]))
    (tensor,) = request.inputs
    assert tensor.name == model.input_name and tensor.datatype == datatype and tensor.shape == rows.shape
    if datatype == "BYTES":
        assert [b.decode() for b in tensor.data] == list(rows)
    else:
        assert np.array_equal(tensor.data, rows)
    assert request.outputs is not None and request.outputs[0].parameters == {"binary_data": True}


def test_verdicts_without_peers_are_not_judged() -> None:
    study = _study([_result("bastion", "open-loop", 2.0, 2000)])
    (v,) = [v for v in verdicts(study) if v.target.startswith("lowest")]
    assert v.met is None


def test_study_results_round_trip_through_json(tmp_path: Path) -> None:
    study = _study([_result("bastion", "open-loop", 2.0, 2000)])
    study.versions = {"bastion": {"onnxruntime": "1"}}
    path = tmp_path / "results.json"
    study.save(path)
    back = StudyResults.load(path)
    assert back.results[0].stats.latency_ms.p99 == 2.0 and back.limits == study.limits
    assert back.versions == study.versions


def test_every_framework_loads_and_pins_its_requirements_exactly() -> None:
    for name in frameworks.NAMES:
        fw = frameworks.load(name)
        assert fw.name == name
        for requirement in fw.requirements():
            assert "==" in requirement, f"{name}: {requirement!r} is not pinned"
    with pytest.raises(KeyError, match="unknown framework"):
        frameworks.load("nope")


def test_installed_version_reads_another_interpreter() -> None:
    import numpy

    assert installed_version(Path(sys.executable), "numpy") == numpy.__version__
    assert installed_version(Path(sys.executable), "no-such-distribution-x") == "?"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is installed by `make test`")
def test_bench_cli_runs_bastion_end_to_end(image_scenario: BuiltScenario, tmp_path: Path) -> None:
    """The whole pipeline once, with Bastion only and tiny durations: build cache, limit,
    serve, verify answers, open loop, wrk, results.json, report and charts."""
    from bastion.cli.bench import bench

    cache = tmp_path / "cache"
    repo = cache / "scenarios" / "image"
    # the session's `bastion scenario build image --small`, copied: the cache is the bench's to write
    shutil.copytree(image_scenario.repo, repo)
    (repo / ".built").write_text("ok\n")
    # --quick: a 1 s warm-up and a short in-process limit; the options after it set the rest
    run = CliRunner().invoke(bench, [
        "--quick", "--frameworks", "bastion", "--scenarios", "image", "--payloads", "small", "--duration", "1",
        "--saturation-duration", "1", "--connections", "4", "--rate", "50", "--workers", "1",
        "--out", str(tmp_path / "out"), "--cache", str(cache),
    ], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    modes = [(r["framework"], r["mode"], r["load"]["payload"]) for r in doc["results"]]
    # then the limit probe: binary at the best batch of the in-process limit it measured
    # again just before, and at the model's max_batch_size (64)
    probes = [r for r in doc["results"] if r["mode"] == "limit-probe"]
    best = probes[0]["load"]["limit_best_batch"]
    assert all(r["load"]["limit_best_batch"] == best and r["load"]["ceiling_rows_per_s"] > 0 for r in probes)
    probe = [("bastion", "limit-probe", f"binary-{n}") for n in sorted({min(best, 64), 64})]
    assert modes == [("bastion", "open-loop", "small"), ("bastion", "saturation", "small"),
                     ("bastion", "saturation", "large"), *probe]
    for r in doc["results"]:
        assert r["stats"]["ok"] > 0 and r["stats"]["errors"] == 0
        assert r["cpu_s"] is not None and r["peak_rss_mib"] > 10
    assert doc["limits"][0]["model"] == "image_cnn" and not doc["skipped"]
    assert math.isclose(doc["results"][0]["stats"]["offered_rate"], 50.0)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## image" in report and "bastion" in report
    assert "in-process limit (binary tensors, Bastion alone)" in report
    assert (tmp_path / "out" / "charts" / "image-latency.png").stat().st_size > 5000
    assert (tmp_path / "out" / "charts" / "image-throughput.png").stat().st_size > 5000


def test_resume_keeps_complete_cells_and_refuses_another_load(tmp_path: Path) -> None:
    from bastion.bench.suite import SuiteConfig, _resumable

    config = SuiteConfig(out=tmp_path, cache=tmp_path, payloads=("small",), connections=(16,),
                         saturation_payloads=("small",))
    complete = [_result("bastion", "open-loop", 2.0, 2000), _result("bastion", "saturation", 5.0, 9000)]
    partial = [_result("triton", "open-loop", 2.0, 2000)]  # its saturation run never happened
    study = _study([*complete, *partial, _probe(16, 500)])  # a probe is kept and counts for no cell
    study.config = config.to_dict()
    kept = _resumable(study, config)
    assert [(r.framework, r.mode) for r in kept.results] == [
        ("bastion", "open-loop"), ("bastion", "saturation"), ("bastion", "limit-probe")]
    assert kept.config["resumed"] is True
    other = SuiteConfig(out=tmp_path, cache=tmp_path, payloads=("small",), connections=(16,),
                        saturation_payloads=("small",), duration_s=5.0)
    earlier = _study(complete)
    earlier.config = config.to_dict()
    with pytest.raises(ValueError, match="cannot resume: duration_s differ"):
        _resumable(earlier, other)
