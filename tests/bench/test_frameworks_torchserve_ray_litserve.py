"""Adapters for TorchServe, Ray Serve and LitServe: bodies, files and command lines.

Pure logic only: nothing here needs the peer frameworks (or Java) installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bastion.bench.frameworks import litserve, load, rayserve, torchserve
from bastion.bench.frameworks.base import ModelSpec

FP32 = ModelSpec(
    scenario="crypto",
    name="crypto_lstm",
    onnx_path=Path("/models/crypto_lstm/1/model.onnx"),
    input_name="window",
    datatype="FP32",
    row_shape=(2, 2),
    output_name="forecast",
    output_row_shape=(1,),
)
TEXT = ModelSpec(
    scenario="sentiment",
    name="sentiment_ngram",
    onnx_path=Path("/models/sentiment_ngram/1/model.onnx"),
    input_name="text",
    datatype="BYTES",
    row_shape=(),
    output_name="probabilities",
    output_row_shape=(2,),
)
ROWS = np.array([[[0.5, 1.0], [-2.0, 0.25]], [[3.0, 0.0], [1.5, -0.125]]], dtype=np.float32)
TEXTS = np.array(["good movie", 'said "bad"'], dtype=object)
PYTHON = Path("/venvs/x/bin/python")


def test_registry_loads_each_adapter() -> None:
    assert isinstance(load("torchserve"), torchserve.TorchServe)
    assert isinstance(load("rayserve"), rayserve.RayServe)
    assert isinstance(load("litserve"), litserve.LitServe)


@pytest.mark.parametrize("fw", [torchserve.TorchServe(), rayserve.RayServe(), litserve.LitServe()])
def test_requirements_are_exact_pins(fw) -> None:
    reqs = fw.requirements()
    assert all("==" in r for r in reqs)
    assert "onnxruntime==1.31.1" in reqs and "numpy==2.4.6" in reqs
    assert not any(r.startswith("torch==") for r in reqs) or reqs[0] == "torch==2.13.0"


# --- LitServe -------------------------------------------------------------------------


def test_litserve_encode_decode() -> None:
    fw = litserve.LitServe()
    assert fw.encode(FP32, ROWS) == b'{"input":[[[0.5,1.0],[-2.0,0.25]],[[3.0,0.0],[1.5,-0.125]]]}'
    assert fw.encode(TEXT, TEXTS) == b'{"input":["good movie","said \\"bad\\""]}'
    got = fw.decode(FP32, b'{"output": [[0.25], [-1.5]]}')
    assert got.dtype == np.float32 and got.shape == (2, 1)
    np.testing.assert_array_equal(got, [[0.25], [-1.5]])
    np.testing.assert_array_equal(fw.decode(TEXT, b'{"output": [[0.1, 0.9], [0.75, 0.25]]}').shape, (2, 2))


def test_litserve_prepare(tmp_path: Path) -> None:
    launch = litserve.LitServe().prepare(FP32, tmp_path, PYTHON, 8123, 2)
    assert (tmp_path / "litserve_server.py").read_text() == (litserve.PEER_CODE / "litserve_server.py").read_text()
    spec = json.loads((tmp_path / "bench_model.json").read_text())
    assert spec == {
        "name": "crypto_lstm",
        "onnx_path": "/models/crypto_lstm/1/model.onnx",
        "input_name": "window",
        "datatype": "FP32",
        "row_shape": [2, 2],
        "output_name": "forecast",
    }
    assert launch.argv == [str(PYTHON), "litserve_server.py", "bench_model.json", "--port", "8123", "--workers", "2"]
    assert launch.cwd == tmp_path and launch.port == 8123
    assert launch.ready_url == "http://127.0.0.1:8123/health"
    assert launch.infer_url == "http://127.0.0.1:8123/predict"
    assert "workers_per_device=2" in launch.notes


# --- Ray Serve ------------------------------------------------------------------------


def test_rayserve_encode_decode() -> None:
    fw = rayserve.RayServe()
    assert fw.encode(FP32, ROWS[:1]) == b'{"instances":[[[0.5,1.0],[-2.0,0.25]]]}'
    assert fw.encode(TEXT, TEXTS[:1]) == b'{"instances":["good movie"]}'
    got = fw.decode(TEXT, b'{"predictions": [[0.1, 0.9]]}')
    assert got.shape == (1, 2)
    np.testing.assert_allclose(got, [[0.1, 0.9]])


def test_rayserve_prepare(tmp_path: Path) -> None:
    work = tmp_path / "w"  # pytest's tmp_path is long: Ray's temp dir moves under /tmp
    launch = rayserve.RayServe().prepare(TEXT, work, PYTHON, 9100, 2)
    for file in ("rayserve_app.py", "rayserve_stop.py", "bench_model.json"):
        assert (work / file).is_file()
    assert json.loads((work / "bench_model.json").read_text())["datatype"] == "BYTES"
    temp_dir = rayserve.ray_temp_dir(work)
    assert launch.argv == [
        str(PYTHON), "rayserve_app.py", "bench_model.json", "--port", "9100", "--replicas", "2",
        "--temp-dir", str(temp_dir), "--pid-file", "rayserve_driver.pid", "--ready-file", "rayserve.ready",
    ]  # fmt: skip
    assert launch.ready_url == launch.infer_url == "http://127.0.0.1:9100/"
    assert launch.stop_argv == [str(PYTHON), "rayserve_stop.py", "rayserve_driver.pid"]
    assert len(launch.env["BENCH_RAY_TAG"]) == 32
    assert launch.env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert launch.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    if temp_dir != work.resolve() / "ray":
        assert (work / "ray").resolve() == temp_dir.resolve()
        temp_dir.rmdir()
        (work / "ray").unlink()
    # every run gets its own tag, so a stop never reaches another run's Ray processes
    other = rayserve.RayServe().prepare(TEXT, tmp_path / "w2", PYTHON, 9101, 1)
    assert other.env["BENCH_RAY_TAG"] != launch.env["BENCH_RAY_TAG"]
    if (tmp_path / "w2" / "ray").is_symlink():
        rayserve.ray_temp_dir(tmp_path / "w2").rmdir()


def test_ray_temp_dir_stays_short() -> None:
    assert rayserve.ray_temp_dir(Path("/tmp/r")) == Path("/tmp/r/ray")
    long = rayserve.ray_temp_dir(Path("/work/main/.bench/runs/2026-11-22/rayserve/malware-w2"))
    assert long.parent == Path("/tmp") and len(str(long)) <= rayserve.MAX_TEMP_DIR_LEN
    assert long == rayserve.ray_temp_dir(Path("/work/main/.bench/runs/2026-11-22/rayserve/malware-w2"))


# --- TorchServe -----------------------------------------------------------------------


def test_torchserve_encode_decode() -> None:
    fw = torchserve.TorchServe()
    assert fw.encode(FP32, ROWS[1:]) == b'{"data":[[[3.0,0.0],[1.5,-0.125]]]}'
    assert fw.encode(TEXT, TEXTS) == b'{"data":["good movie","said \\"bad\\""]}'
    got = fw.decode(FP32, b"[[0.5], [2.0]]")
    assert got.shape == (2, 1)
    np.testing.assert_array_equal(got, [[0.5], [2.0]])


def test_torchserve_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archived: list[list[str]] = []
    monkeypatch.setattr(torchserve, "run_archiver", lambda argv, cwd: archived.append(argv))
    launch = torchserve.TorchServe().prepare(FP32, tmp_path, PYTHON, 8200, 2)

    assert (tmp_path / "torchserve_handler.py").is_file() and (tmp_path / "torchserve_launch.py").is_file()
    spec = json.loads((tmp_path / "bench_model.json").read_text())
    assert spec["output_name"] == "forecast" and spec["row_shape"] == [2, 2]
    assert archived == [
        [
            "/venvs/x/bin/torch-model-archiver",
            "--model-name", "crypto_lstm", "--version", "1.0",
            "--serialized-file", "/models/crypto_lstm/1/model.onnx",
            "--handler", str(tmp_path / "torchserve_handler.py"),
            "--extra-files", str(tmp_path / "bench_model.json"),
            "--export-path", str(tmp_path / "model-store"),
            "--force",
        ]
    ]  # fmt: skip

    props = dict(
        line.split("=", 1) for line in (tmp_path / "config.properties").read_text().splitlines() if line.strip()
    )
    assert props["inference_address"] == "http://127.0.0.1:8200"
    for key in ("management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["default_workers_per_model"] == "2"
    assert props["disable_token_authorization"] == "true"
    assert props["model_store"] == str(tmp_path / "model-store")

    ready_port = launch.argv[launch.argv.index("--ready-port") + 1]
    management_port = props["management_address"].rsplit(":", 1)[1]
    assert launch.argv[:2] == [str(PYTHON), "torchserve_launch.py"]
    assert launch.argv[launch.argv.index("--management-port") + 1] == management_port
    assert launch.argv[launch.argv.index("--workers") + 1] == "2"
    served = launch.argv[launch.argv.index("--") + 1 :]
    assert served[:4] == ["/venvs/x/bin/torchserve", "--start", "--foreground", "--ncs"]
    assert served[served.index("--models") + 1] == "crypto_lstm=crypto_lstm.mar"
    assert served[served.index("--ts-config") + 1] == str(tmp_path / "config.properties")
    assert launch.ready_url == f"http://127.0.0.1:{ready_port}/ready"
    assert launch.infer_url == "http://127.0.0.1:8200/predictions/crypto_lstm"
    assert launch.stop_argv == ["/venvs/x/bin/torchserve", "--stop", "--foreground"]
    # the pid file (Python's temp dir) and the worker sockets (Java's) stay in this run's workdir
    assert launch.env["TMPDIR"] == launch.env["TEMP"] == str(tmp_path / "tmp")
    assert (tmp_path / "tmp").is_dir() and (tmp_path / "model-store").is_dir()


def test_torchserve_needs_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchserve.shutil, "which", lambda name: None)
    assert "Java" in (torchserve.TorchServe().unavailable() or "")
    monkeypatch.setattr(torchserve.shutil, "which", lambda name: "/usr/bin/java")
    assert torchserve.TorchServe().unavailable() is None


@pytest.mark.parametrize(
    "name",
    ["litserve_server.py", "rayserve_app.py", "rayserve_stop.py", "torchserve_handler.py", "torchserve_launch.py"],
)
def test_peer_code_compiles(name: str) -> None:
    path = litserve.PEER_CODE / name
    compile(path.read_text(encoding="utf-8"), str(path), "exec")
