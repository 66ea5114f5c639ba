"""``bastion bench serving``: wrk's figures, request bodies, the plan, ratios, the Markdown
section, the before/after check's pieces (export, origins, rounds), and one real run of
each mode with tiny durations."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bastion.bench import abcompare, serving_report
from bastion.bench.frameworks.base import ModelSpec
from bastion.bench.frameworks.bastion import PRELUDE, BastionFramework, served_from
from bastion.bench.launcher import child_env
from bastion.bench.procstats import HostUsage
from bastion.bench.results import BenchResult, write_marked_section
from bastion.bench.saturation import WrkError, parse_wrk_output
from bastion.bench.serving import Row, ServingRun, make_bodies, plan, sample_rows
from bastion.bench.stats import RunStats, Summary

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ModelSpec("digits", "digits", Path("/nonexistent/digits/1/model.onnx"), "input", "FP32", (64,),
                   "probabilities", (10,))  # fmt: skip

# --------------------------------------------------------------------------- wrk's figures

# wrk 4.1.0 with saturation.LUA against Bastion (the done hook prints the BENCH_JSON line)
WRK_OK = (
    "Running 2s test @ http://127.0.0.1:18091/v2/models/digits/infer\n"
    "  1 threads and 16 connections\n"
    "  45670 requests in 2.00s, 18.95MB read\n"
    'BENCH_JSON {"requests":45670,"duration_us":2001253,"bytes":19866450,'
    '"errors":{"connect":0,"read":0,"write":0,"status":0,"timeout":0},'
    '"latency_us":{"min":150,"max":3414,"mean":702.400,'
    '"p25":600,"p50":672,"p75":700,"p90":770,"p99":1240,"p999":2680}}\n'
)
# every response an HTTP 400 (a body the server rejects)
WRK_400 = (
    "Running 1s test @ http://127.0.0.1:18091/v2/models/digits/infer\n"
    "  30562 requests in 1.10s, 5.04MB read\n"
    "  Non-2xx or 3xx responses: 30562\n"
    'BENCH_JSON {"requests":30562,"duration_us":1099738,"bytes":5287226,'
    '"errors":{"connect":0,"read":0,"write":0,"status":30562,"timeout":0},'
    '"latency_us":{"min":50,"max":4602,"mean":219.800,'
    '"p25":90,"p50":113,"p75":200,"p90":284,"p99":2382,"p999":3936}}\n'
)


def test_parse_wrk_uses_the_done_hook_line() -> None:
    r = parse_wrk_output(WRK_OK)
    assert r.duration_s == pytest.approx(2.001253)
    assert (r.responses, r.ok, r.errors) == (45670, 45670, 0)
    assert r.throughput == pytest.approx(45670 / 2.001253)
    lat = r.latency_ms
    assert (lat.p50, lat.p90, lat.p99, lat.p999) == pytest.approx((0.672, 0.770, 1.240, 2.680))
    assert r.transport_errors == {}


def test_parse_wrk_http_errors_are_not_throughput() -> None:
    r = parse_wrk_output(WRK_400)
    assert r.status_counts == {"4xx/5xx": 30562}
    assert (r.ok, r.errors, r.throughput) == (0, 30562, 0.0)


def test_parse_wrk_without_hook_line() -> None:
    with pytest.raises(WrkError, match="BENCH_JSON"):
        parse_wrk_output(WRK_OK.split("BENCH_JSON")[0])


# --------------------------------------------------------------------------- request bodies


def test_bodies() -> None:
    bodies = make_bodies(DIGITS)
    assert {k: (len(b.rows), b.content_type) for k, b in bodies.items()} == {
        "json1": (1, "application/json"),
        "json64": (64, "application/json"),
        "bin64": (64, "application/octet-stream"),
    }
    doc = json.loads(bodies["json1"].payload)
    assert doc["inputs"][0]["shape"] == [1, 64] and "outputs" not in doc  # every output comes back
    assert bodies["bin64"].request_headers["Inference-Header-Content-Length"].isdigit()
    # deterministic: every server and every run get the same bytes
    again = make_bodies(DIGITS)
    assert all(again[k].payload == b.payload for k, b in bodies.items())


def test_binary_body_decodes_with_bastions_codec() -> None:
    from bastion.protocol import v2_rest

    body = make_bodies(DIGITS)["bin64"]
    header_length = int(body.headers["Inference-Header-Content-Length"])
    request = v2_rest.decode_infer_request(body.payload, "digits", None, header_length)
    [tensor] = request.inputs
    assert (tensor.name, tensor.datatype, tuple(tensor.shape)) == ("input", "FP32", (64, 64))
    np.testing.assert_array_equal(tensor.data, sample_rows(64, seed=1))
    assert [(o.name, o.parameters) for o in request.outputs] == [
        ("label", {"binary_data": True}),
        ("probabilities", {"binary_data": True}),
    ]


def test_binary_body_matches_tritonclient() -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    body = make_bodies(DIGITS)["bin64"]
    header_length = int(body.headers["Inference-Header-Content-Length"])
    rows = sample_rows(64, seed=1)
    inp = httpclient.InferInput("input", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows, binary_data=True)
    outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("label", "probabilities")]
    theirs, their_length = httpclient.InferenceServerClient.generate_request_body([inp], outputs=outs)
    # same JSON (key order aside) and byte-identical tensor data after it
    assert json.loads(body.payload[:header_length]) == json.loads(theirs[:their_length])
    assert body.payload[header_length:] == theirs[their_length:] == rows.astype("<f4").tobytes()


def test_json_body_decodes_with_bastions_codec() -> None:
    from bastion.protocol import v2_rest

    request = v2_rest.decode_infer_request(make_bodies(DIGITS)["json1"].payload, "digits", None)
    np.testing.assert_array_equal(request.inputs[0].data, sample_rows(1))
    assert request.inputs[0].data.dtype == np.float32


# --------------------------------------------------------------------------- plan, ratios, report


def _run(server: str, workers: int, body: str, rps: float, p99: float, cpu_s: float = 10.0) -> ServingRun:
    duration = 20.0
    ok = int(rps * duration)
    lat = Summary(count=ok, min=0.1, p25=p99 / 4, p50=p99 / 3, p75=p99 / 2.5, p90=p99 / 2, p99=p99, p999=p99 * 1.2,
                  max=p99 * 2, mean=p99 / 3)  # fmt: skip
    stats = RunStats(duration_s=duration, requests=ok, ok=ok, status_counts={"2xx": ok}, latency_ms=lat)
    result = BenchResult("digits", server, "saturation", 100, {}, stats, generator="wrk", cpu_s=cpu_s,
                         peak_rss_mib=80.0)  # fmt: skip
    host = HostUsage(machine_busy_s=30.0, machine_steal_s=0.0, children_cpu_s=2.0, wall_s=20.0)
    return ServingRun(Row(server, workers, body), body, 64 if "64" in body else 1, result, host, startup_s=1.0)


def _by_name(computed: list[serving_report.Ratio]) -> dict[str, serving_report.Ratio]:
    return {q.name: q for q in computed}


def test_ratios_targets_met_with_mlserver_at_its_best() -> None:
    runs = [
        _run("bastion", 1, "json1", 6000, 2.0),
        _run("mlserver", 0, "json1", 2000, 9.0),
        _run("mlserver", 1, "json1", 800, 6.0),  # slower but a lower p99: p99 compares to this one
        _run("minimal", 1, "json1", 6500, 1.5),
    ]
    q = _by_name(serving_report.ratios(runs))
    assert q["Bastion / MLServer throughput"].value == pytest.approx(3.0)
    assert q["Bastion / MLServer throughput"].met is True  # the bound itself meets the target
    assert q["Bastion / minimal app throughput"].value == pytest.approx(6000 / 6500)
    assert q["Bastion / minimal app throughput"].met is True
    assert q["Bastion p99 / MLServer p99"].value == pytest.approx(2.0 / 6.0)
    assert q["Bastion p99 / MLServer p99"].met is True


def test_ratios_misses_and_missing_rows() -> None:
    runs = [
        _run("bastion", 1, "json1", 4000, 4.0),
        _run("bastion", 2, "json1", 5000, 4.0),
        _run("mlserver", 0, "json1", 2000, 9.0),
        _run("minimal", 1, "json1", 5000, 1.5),
    ]
    q = _by_name(serving_report.ratios(runs))
    assert q["Bastion / MLServer throughput"].met is False
    assert q["Bastion / minimal app throughput"].met is False  # 0.8 < 0.9
    assert q["Bastion p99 / MLServer p99"].met is False  # 0.44 > 0.33
    # workers=2 rows are informative: a ratio, no target; no minimal --workers 2 row: no value
    w2 = q["Bastion / MLServer throughput (workers=2)"]
    assert (w2.value, w2.target, w2.met) == (pytest.approx(2.5), None, None)
    assert q["Bastion / minimal app throughput (workers=2)"].value is None


def test_batch_ratios() -> None:
    runs = [
        _run("bastion", 1, "bin64", 3000, 5.0),
        _run("bastion", 1, "json64", 1500, 10.0),
        _run("mlserver", 0, "json64", 1000, 20.0),
        _run("minimal", 1, "json64", 2000, 8.0),
    ]
    q = _by_name(serving_report.ratios(runs))
    assert q["batch 64: Bastion binary / MLServer JSON throughput"].value == pytest.approx(3.0)
    assert q["batch 64: Bastion binary / Bastion JSON throughput"].value == pytest.approx(2.0)
    assert q["batch 64: Bastion binary / minimal app JSON throughput"].value == pytest.approx(1.5)
    assert q["batch 64: Bastion binary p99 / MLServer JSON p99"].value == pytest.approx(0.25)


def test_plan_respects_servers_and_workers() -> None:
    rows = plan(("bastion", "minimal"), [1, 2], [0, 1], batch=True)
    assert [r.key for r in rows] == [
        "bastion-w1-json1", "bastion-w2-json1", "minimal-w1-json1", "minimal-w2-json1",
        "bastion-w1-bin64", "bastion-w1-json64", "minimal-w1-json64",
    ]  # fmt: skip
    assert [r.key for r in plan(("mlserver",), [1], [0, 1], batch=False)] == ["mlserver-w0-json1", "mlserver-w1-json1"]
    assert Row("mlserver", 0, "json1").config == "parallel_workers=0"
    assert Row("bastion", 2, "json1").config == "--workers 2"


def test_markdown_and_benchmarks_md_update(tmp_path: Path) -> None:
    runs = [_run("bastion", 1, "json1", 4000, 4.0), _run("mlserver", 0, "json1", 2000, 9.0)]
    computed = serving_report.ratios(runs)
    report = {
        "date": "2026-01-01 00:00 UTC", "command": "bastion bench serving", "repeat": 1,
        "load": {"connections": 16, "duration_s": 20.0, "warmup_s": 3.0},
        "environment": {"cpu": "Test CPU", "logical_cpus": 2, "memory_gib": 24.0, "system": "Linux 6",
                        "python": "3.11.7", "loadavg_before": [0.0, 0.0, 0.0], "busy_cores_before": 0.0,
                        "versions": {"bastion": "0.1.0"}, "git": "abc1234"},
    }  # fmt: skip
    section = serving_report.markdown(report, runs, computed)
    # cpu: 10 s / 80,000 requests = 125 µs; cores: 10 s server, 2 s wrk, 30 s machine over 20 s
    row = "| bastion | --workers 1 | json1 | 4,000 | 4,000 | 1.33 | 2.00 | 4.00 | 0 | 125 | 0.50 | 0.10 | 1.50 | 80 |"
    assert row in section
    assert "| Bastion / MLServer throughput | 2.00 | ≥ 3.00 | **no** |" in section
    md = tmp_path / "BENCHMARKS.md"
    # the section as the old script wrote it: another writer named in the start marker
    md.write_text(
        "# Benchmarks\n\nprose before\n\n<!-- serving-bench:start (written by benchmarks/serving_bench.py; edits "
        "inside are overwritten) -->\nold figures\n<!-- serving-bench:end -->\n\nprose after\n"
    )
    write_marked_section(md, serving_report.SECTION, section, serving_report.WRITER)
    write_marked_section(md, serving_report.SECTION, section.replace("4,000", "5,000"), serving_report.WRITER)
    text = md.read_text()
    assert text.count("<!-- serving-bench:start") == 1 and text.count("<!-- serving-bench:end -->") == 1
    assert "(written by bastion bench serving;" in text
    assert "prose before" in text and "prose after" in text and "5,000" in text
    assert "4,000" not in text and "old figures" not in text
    # a file without the section gets it appended; a missing file is created
    fresh = tmp_path / "NEW.md"
    write_marked_section(fresh, "x", "body", "me")
    marked = "<!-- x:start (written by me; edits inside are overwritten) -->\nbody\n<!-- x:end -->\n"
    assert fresh.read_text() == "# Benchmarks\n\n" + marked


# --------------------------------------------------------------------------- before/after


def test_rounds_alternate_and_summary_pairs_rounds() -> None:
    assert [abcompare.round_order(i) for i in range(3)] == [("before", "after"), ("after", "before"),
                                                             ("before", "after")]  # fmt: skip
    case = abcompare.CaseResult(abcompare.CASES["digits-json1"], "digits", "1 row, JSON", {})
    for before, after in ((1000.0, 1100.0), (900.0, 880.0), (1200.0, 1260.0)):
        case.rounds.append({
            side: {"rps": rps, "p50_ms": 1.0, "p99_ms": 2.0 if side == "before" else 3.0, "cpu_us": 50.0, "errors": 0}
            for side, rps in (("before", before), ("after", after))
        })  # fmt: skip
    s = case.summary()
    assert s["median"]["before"]["rps"] == 1000.0 and s["median"]["after"]["rps"] == 1100.0
    assert s["ratio"] == pytest.approx(1.1)  # of the medians
    assert s["p99_ratio"] == pytest.approx(1.5)
    assert s["round_ratios"] == pytest.approx([1.1, 880 / 900, 1.05])  # each round's pair
    assert s["errors"] == {"before": 0, "after": 0}
    report = {
        "date": "d", "command": "c", "baseline": {"ref": "HEAD~1", "sha": "0123456789abcdef", "src": "/x/src"},
        "current": {"git": "abc+changes"}, "load": {"connections": 16, "duration_s": 20.0, "warmup_s": 3.0},
        "rounds": 3, "workers": 1, "environment": {"cpu": "C", "logical_cpus": 2, "system": "Linux"},
        "cases": [case.to_dict()],
    }  # fmt: skip
    md = abcompare.markdown(report)
    assert "| digits-json1 | digits | 1 row, JSON | 1,000 | 1,100 | **1.100** | 1.100, 0.978, 1.050 |" in md


def test_check_origins(tmp_path: Path) -> None:
    import bastion

    src = tmp_path / "src"
    here = str(Path(bastion.__file__))
    abcompare.check_origins({"before": str(src / "bastion" / "__init__.py"), "after": here}, src)
    with pytest.raises(RuntimeError, match="baseline server imported bastion from"):
        abcompare.check_origins({"before": here, "after": here}, src)  # the editable install won
    with pytest.raises(RuntimeError, match="current server imported"):
        abcompare.check_origins({"before": str(src / "bastion" / "__init__.py"), "after": None}, src)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_export_ref_writes_the_commits_src_once(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "src" / "bastion").mkdir(parents=True)
    (repo / "src" / "bastion" / "__init__.py").write_text("VERSION = 'old'\n")
    (repo / "README").write_text("not exported\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "old")
    old = _git(repo, "rev-parse", "HEAD")
    (repo / "src" / "bastion" / "__init__.py").write_text("VERSION = 'new'\n")  # the working tree moved on
    sha, src = abcompare.export_ref("HEAD", tmp_path / "cache", repo)
    assert sha == old and src == (tmp_path / "cache" / "baseline" / old / "src").resolve()
    assert (src / "bastion" / "__init__.py").read_text() == "VERSION = 'old'\n"
    assert not (src.parent / "README").exists()
    (src / "bastion" / "marker").write_text("kept")  # exported once: a second call reuses it
    assert abcompare.export_ref(old[:8], tmp_path / "cache", repo) == (sha, src)
    assert (src / "bastion" / "marker").exists()
    with pytest.raises(ValueError, match="not a commit"):
        abcompare.export_ref("no-such-ref", tmp_path / "cache", repo)


def test_prelude_imports_bastion_from_pythonpath_before_the_editable_install(tmp_path: Path) -> None:
    """What --baseline-ref rests on: PYTHONPATH=<export>/src wins over the venv's .pth entry."""
    fake = tmp_path / "src" / "bastion"
    (fake / "cli").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cli" / "__init__.py").write_text("")
    (fake / "cli" / "main.py").write_text("import sys\nprint('fake cli', sys.argv[1:])\n")
    launch = BastionFramework(src=tmp_path / "src").prepare(DIGITS, tmp_path, Path(sys.executable), 9, 1)
    assert launch.argv[1:3] == ["-c", PRELUDE] and launch.env["PYTHONPATH"] == str((tmp_path / "src").resolve())
    out = subprocess.run([sys.executable, "-c", PRELUDE, "serve", "x"], env=child_env(launch.env), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert served_from(out.stderr) == fake / "__init__.py"
    assert "fake cli ['serve', 'x']" in out.stdout
    assert served_from("no such line\n") is None


def test_cli_refuses_options_that_do_not_apply() -> None:
    from bastion.cli.bench import bench

    runner = CliRunner()
    cases = {
        ("serving", "--baseline-ref", "HEAD", "--only", "bastion"): "--only cannot be used with --baseline-ref",
        ("serving", "--rounds", "2"): "--rounds cannot be used with the serving table",
        ("--quick", "serving"): "--quick cannot be used with serving",
        ("serving", "--only", "triton"): "unknown server triton",
        ("serving", "--baseline-ref", "HEAD", "--cases", "nope"): "unknown case nope",
    }
    for args, message in cases.items():
        run = runner.invoke(bench, list(args))
        assert run.exit_code == 2 and message in run.output, (args, run.output)


# --------------------------------------------------------------------------- real runs


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bastion.cli.main", "bench", "serving", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is installed by `make test`")
def test_serving_runs_bastion_and_the_minimal_app(demo_repo: Path, tmp_path: Path) -> None:
    md = tmp_path / "B.md"
    # hey's rows too where hey is installed (`make bench` installs it; `make test` may not)
    hey = shutil.which("hey") is not None
    out = _cli("--only", "bastion,minimal", "--no-batch", "--workers", "1", "--duration", "1", "--warmup", "0",
               "--generators", "wrk,hey" if hey else "wrk",
               "--repository", str(demo_repo), "--out", str(tmp_path / "out"), "--markdown", str(md))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    [path] = (tmp_path / "out").glob("serving-*.json")
    doc = json.loads(path.read_text())
    keys = ["bastion-w1-json1", "minimal-w1-json1"]
    assert [r["key"] for r in doc["rows"]] == keys + ([f"{k}-hey" for k in keys] if hey else [])
    assert [r["result"]["generator"] for r in doc["rows"]] == ["wrk"] * 2 + (["hey"] * 2 if hey else [])
    for r in doc["rows"]:
        stats = r["result"]["stats"]
        assert stats["ok"] > 0 and stats["errors"] == 0, r
        assert r["result"]["cpu_s"] > 0 and r["result"]["peak_rss_mib"] > 10 and r["host"]["machine_busy_s"] > 0
    import bastion

    assert doc["rows"][0]["served_from"] == str(Path(bastion.__file__))
    ratio = {q["name"]: q for q in doc["ratios"]}["Bastion / minimal app throughput"]
    assert ratio["value"] > 0
    assert "| bastion | --workers 1 | 1 row, JSON |" in md.read_text()
    if hey:
        assert {q["name"]: q for q in doc["ratios"]}["Bastion / minimal app throughput (hey)"]["value"] > 0
        assert "Bastion / minimal app throughput (hey)" in out.stdout  # the console summary


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is installed by `make test`")
@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the repository's git history")
def test_baseline_ref_serves_the_exported_build(demo_repo: Path, tmp_path: Path) -> None:
    out = _cli("--baseline-ref", "HEAD", "--cases", "digits-json1", "--rounds", "2", "--duration", "1",
               "--warmup", "0", "--repository", str(demo_repo), "--out", str(tmp_path / "out"),
               "--cache", str(tmp_path / "cache"))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    [path] = (tmp_path / "out").glob("ab-*.json")
    [case] = json.loads(path.read_text())["cases"]
    assert case["origins"]["before"].startswith(str((tmp_path / "cache" / "baseline").resolve()))
    assert len(case["rounds"]) == 2 and case["summary"]["ratio"] > 0
    assert case["summary"]["errors"] == {"before": 0, "after": 0}
    assert "**after/before**" in out.stdout
