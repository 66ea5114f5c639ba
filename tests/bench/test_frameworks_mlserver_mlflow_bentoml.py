"""The MLServer, MLflow and BentoML adapters.

Most tests are the adapters' pure logic (bodies, response reading, prepared files, argv)
and run in Bastion's venv with no peer framework. The ``slow`` ones serve two small real
ONNX models (a numeric one with two outputs, a text one) with each framework and check
the answers against ONNX Runtime in-process; they run only where the framework's venv
is already installed (``.bench/venvs/<name>``, as ``bastion bench`` leaves it, with the
adapter's current pins), and never install one themselves.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper

from bastion.bench.frameworks import load
from bastion.bench.frameworks.base import Framework, ModelSpec
from bastion.bench.frameworks.bentoml import BentoMLFramework
from bastion.bench.frameworks.mlflow import MLflowFramework
from bastion.bench.frameworks.mlserver import MLServerFramework
from bastion.bench.launcher import check_serves, free_port, serve
from bastion.bench.venvs import venv_python

ROOT = Path(__file__).resolve().parents[2]
PEER_CODE = ROOT / "src" / "bastion" / "bench" / "frameworks" / "peer_code"


def _ours(distribution: str) -> str:
    return f"{distribution}=={importlib.metadata.version(distribution)}"


ORT_PIN = _ours("onnxruntime")


def _spec(tmp_path: Path, datatype: str = "FP32") -> ModelSpec:
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"onnx-bytes")
    if datatype == "BYTES":
        return ModelSpec("sentiment", "sentiment_ngram", path, "text", "BYTES", (), "probabilities", (2,))
    return ModelSpec("image", "image_cnn", path, "image", "FP32", (1, 2, 2), "probabilities", (3,))


def _fake_venv(tmp_path: Path) -> Path:
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


# --------------------------------------------------------------------------- all three


@pytest.mark.parametrize(
    ("name", "cls", "package"),
    [
        ("mlserver", MLServerFramework, "mlserver"),
        ("mlflow", MLflowFramework, "mlflow"),
        ("bentoml", BentoMLFramework, "bentoml"),
    ],
)
def test_found_by_name_with_exact_pins(name: str, cls: type[Framework], package: str) -> None:
    fw = load(name)
    assert isinstance(fw, cls)
    assert fw.name == name and fw.package == package
    pins = fw.requirements()
    assert all(p.count("==") == 1 for p in pins), pins
    assert pins[0].startswith(f"{package}==")
    assert ORT_PIN in pins  # every server runs ONNX Runtime at Bastion's version
    assert not any(p.startswith("torch") for p in pins)
    # uvicorn's standard speed-ups, as Bastion's uvicorn has them (uvloop: MLServer pins its own)
    assert _ours("httptools") in pins
    assert any(p.startswith("uvloop==") for p in pins)
    if name != "mlserver":
        assert _ours("uvloop") in pins


def test_mlserver_pins_uvloop_below_0_22() -> None:
    pins = MLServerFramework().requirements()
    assert "mlserver==1.7.1" in pins
    (uvloop,) = [p for p in pins if p.startswith("uvloop")]
    major, minor, _ = (int(x) for x in uvloop.split("==")[1].split("."))
    assert (major, minor) < (0, 22)


def test_mlflow_pins_onnx_for_the_flavor() -> None:
    assert _ours("onnx") in MLflowFramework().requirements()


def test_peer_code_defines_what_the_adapters_name() -> None:
    """The peer modules can't be imported here (no MLServer, MLflow or BentoML): read them."""

    def top_level(path: Path) -> set[str]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        return {n.name for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)}

    assert "OnnxRuntime" in top_level(PEER_CODE / "mlserver_onnx_runtime.py")
    assert "OnnxService" in top_level(PEER_CODE / "bentoml_service.py")
    assert "main" in top_level(PEER_CODE / "mlflow_save_model.py")
    assert {"app", "infer_json"} <= top_level(PEER_CODE / "minimal_app.py")
    # `bastion bench serving` serves MLServer through the study's adapter (one runtime for both)
    from bastion.bench.serving import adapter

    assert type(adapter("mlserver")) is MLServerFramework


# --------------------------------------------------------------------------- MLServer


def test_mlserver_encode_is_v2_json(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    rows = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2) / 4
    body = orjson.loads(MLServerFramework().encode(model, rows))
    assert body["inputs"] == [
        {
            "name": "image",
            "datatype": "FP32",
            "shape": [2, 1, 2, 2],
            "data": [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
        }
    ]


def test_mlserver_encode_bytes_as_a_list_of_strings(tmp_path: Path) -> None:
    model = _spec(tmp_path, "BYTES")
    body = orjson.loads(MLServerFramework().encode(model, np.array(["good film", "bad, très"], dtype=object)))
    assert body["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["good film", "bad, très"]}]


def test_mlserver_decode_reads_the_named_output(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    response = (
        b'{"model_name":"image_cnn","outputs":[{"name":"label","datatype":"INT64","shape":[2],"data":[2,0]},'
        b'{"name":"probabilities","datatype":"FP32","shape":[2,3],"data":[0.1,0.2,0.7,0.5,0.25,0.25]}]}'
    )
    got = MLServerFramework().decode(model, response)
    np.testing.assert_allclose(got, [[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    assert got.dtype == np.float32


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_mlserver_prepare_writes_settings_and_runtime(tmp_path: Path, datatype: str) -> None:
    model = _spec(tmp_path, datatype)
    python = _fake_venv(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    launch = MLServerFramework().prepare(model, work, python, 8123, 3)

    settings = json.loads((work / "settings.json").read_text())
    assert settings["http_port"] == 8123 and settings["host"] == "127.0.0.1"
    assert settings["parallel_workers"] == 3
    assert settings["debug"] is False  # no access log
    assert len({settings["http_port"], settings["grpc_port"], settings["metrics_port"]}) == 3

    ms = json.loads((work / model.name / "model-settings.json").read_text())
    assert ms["name"] == model.name
    assert ms["implementation"] == "mlserver_onnx_runtime.OnnxRuntime"
    assert ms["parameters"]["uri"] == str(model.onnx_path.resolve())
    (inp,) = ms["inputs"]
    assert inp["name"] == model.input_name and inp["datatype"] == datatype
    assert inp["shape"] == [-1, *model.row_shape]
    assert inp["parameters"]["content_type"] == ("str" if datatype == "BYTES" else "np")

    assert (work / "mlserver_onnx_runtime.py").read_text() == (PEER_CODE / "mlserver_onnx_runtime.py").read_text()
    assert launch.argv == [str(python.with_name("mlserver")), "start", str(work)]
    assert launch.env["PYTHONPATH"] == str(work)
    assert launch.ready_url == f"http://127.0.0.1:8123/v2/models/{model.name}/ready"
    assert launch.infer_url == f"http://127.0.0.1:8123/v2/models/{model.name}/infer"
    assert "parallel_workers=3" in launch.notes


def test_mlserver_accepts_inline_inference_and_rejects_negative_workers(tmp_path: Path) -> None:
    model, python = _spec(tmp_path), _fake_venv(tmp_path)
    (tmp_path / "a").mkdir()
    MLServerFramework().prepare(model, tmp_path / "a", python, 8123, 0)
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["parallel_workers"] == 0
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="workers"):
        MLServerFramework().prepare(model, tmp_path / "b", python, 8123, -1)


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server starts with cwd=workdir, so nothing it is given may be relative to elsewhere."""
    model = _spec(tmp_path)
    _fake_venv(tmp_path)
    monkeypatch.chdir(tmp_path)
    for fw in (MLServerFramework(), BentoMLFramework()):
        work = Path("w") / fw.name
        work.mkdir(parents=True)
        launch = fw.prepare(model, work, Path("venv/bin/python"), 8123, 1)
        assert Path(launch.argv[0]).is_absolute() and launch.cwd.is_absolute()
        assert launch.argv[0] == str(tmp_path / "venv" / "bin" / fw.name)  # not resolved through links
    settings = json.loads((tmp_path / "w" / "mlserver" / "settings.json").read_text())
    assert Path(settings["environments_dir"]).is_absolute()


# --------------------------------------------------------------------------- MLflow


def test_mlflow_encode_is_the_inputs_protocol(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    rows = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    assert orjson.loads(MLflowFramework().encode(model, rows)) == {"inputs": {"image": rows.tolist()}}
    text = _spec(tmp_path, "BYTES")
    body = MLflowFramework().encode(text, np.array(["good", "très bad"], dtype=object))
    assert orjson.loads(body) == {"inputs": {"text": ["good", "très bad"]}}


def test_mlflow_decode_picks_the_output_from_the_predictions(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    both = b'{"predictions":{"label":[2,0],"probabilities":[[0.1,0.2,0.7],[0.5,0.25,0.25]]}}'
    got = MLflowFramework().decode(model, both)
    np.testing.assert_allclose(got, [[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    assert got.dtype == np.float32
    # a model with one output may answer a bare list
    np.testing.assert_allclose(MLflowFramework().decode(model, b'{"predictions":[[0,0,1]]}'), [[0, 0, 1]])
    with pytest.raises(ValueError, match="probabilities"):
        MLflowFramework().decode(model, b'{"predictions":{"label":[1]}}')


def _recording_python(tmp_path: Path, *, fail: bool = False) -> Path:
    """A stand-in for the venv's python that records its argv and writes OUT/MLmodel."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    record = tmp_path / "argv.json"
    body = (
        'echo "boom: no mlflow here" >&2; exit 3\n'
        if fail
        else f'printf \'%s\\n\' "$@" > {record}\nmkdir -p "$3" && echo \'flavors: {{}}\' > "$3/MLmodel"\n'
    )
    python.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


def test_mlflow_prepare_saves_the_model_then_serves_it(tmp_path: Path) -> None:
    model = _spec(tmp_path, "BYTES")
    python = _recording_python(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    launch = MLflowFramework().prepare(model, work, python, 8124, 2)

    script, spec_path, out = (tmp_path / "argv.json").read_text().split()
    assert script == "mlflow_save_model.py" and (work / script).exists()
    assert Path(out) == work / "model"
    spec = json.loads(Path(spec_path).read_text())
    assert spec["onnx_path"] == str(model.onnx_path.resolve())
    assert spec["input_name"] == "text" and spec["datatype"] == "BYTES" and spec["row_shape"] == []
    assert spec["pip_requirements"] == MLflowFramework().requirements()

    assert launch.argv == [
        str(python.with_name("mlflow")), "models", "serve", "--model-uri", str(work / "model"),
        "--env-manager", "local", "--host", "127.0.0.1", "--port", "8124", "--workers", "2",
    ]  # fmt: skip
    assert launch.ready_url == "http://127.0.0.1:8124/ping"
    assert launch.infer_url == "http://127.0.0.1:8124/invocations"
    assert launch.env["PATH"].split(os.pathsep)[0] == str(python.parent)  # mlflow execs `uvicorn` by name
    assert launch.env["UVICORN_ACCESS_LOG"] == "false"
    assert "--workers 2" in launch.notes


def test_mlflow_prepare_reports_a_failed_save(tmp_path: Path) -> None:
    python = _recording_python(tmp_path, fail=True)
    (tmp_path / "work").mkdir()
    with pytest.raises(RuntimeError, match="boom: no mlflow here"):
        MLflowFramework().prepare(_spec(tmp_path), tmp_path / "work", python, 8124, 1)
    with pytest.raises(ValueError, match="workers"):
        MLflowFramework().prepare(_spec(tmp_path), tmp_path / "work", python, 8124, 0)


# --------------------------------------------------------------------------- BentoML


def test_bentoml_encode_is_a_field_of_the_json_body(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    rows = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    assert orjson.loads(BentoMLFramework().encode(model, rows)) == {"inputs": rows.tolist()}
    text = _spec(tmp_path, "BYTES")
    assert orjson.loads(BentoMLFramework().encode(text, np.array(["a", "é"], dtype=object))) == {"texts": ["a", "é"]}


def test_bentoml_decode_is_the_returned_array(tmp_path: Path) -> None:
    got = BentoMLFramework().decode(_spec(tmp_path), b"[[0.1,0.2,0.7],[0.5,0.25,0.25]]")
    np.testing.assert_allclose(got, [[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    assert got.dtype == np.float32 and got.shape == (2, 3)


def test_bentoml_prepare_writes_the_service(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    python = _fake_venv(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    launch = BentoMLFramework().prepare(model, work, python, 8125, 4)
    assert (work / "service.py").read_text() == (PEER_CODE / "bentoml_service.py").read_text()
    spec = json.loads((work / "bench_model.json").read_text())
    assert spec["workers"] == 4 and spec["row_shape"] == [1, 2, 2] and spec["output_name"] == "probabilities"
    assert launch.argv == [
        str(python.with_name("bentoml")), "serve", "service:OnnxService", "--working-dir", str(work),
        "--host", "127.0.0.1", "--port", "8125",
    ]  # fmt: skip
    assert launch.ready_url == "http://127.0.0.1:8125/readyz"
    assert launch.infer_url == "http://127.0.0.1:8125/predict"
    assert launch.env["BENTOML_HOME"] == str(work / ".bentoml")
    assert launch.env["BENTOML_DO_NOT_TRACK"] == "true"
    assert "workers=4" in launch.notes


# --------------------------------------------------------------------------- real servers


def _numeric_model(path: Path) -> None:
    """image [N, 1, 2, 2] -> label [N] (INT64), probabilities [N, 3]: a softmax layer."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "numeric",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def _text_model(path: Path) -> None:
    """text [N] (string) -> probabilities [N, 2]: "good" -> [0, 1], "bad" -> [0.5, 0.5], else [1, 0]."""
    inits = [
        numpy_helper.from_array(np.array([2.0], np.float32), "two"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node(
            "CategoryMapper",
            ["text"],
            ["cat"],
            domain="ai.onnx.ml",
            cats_strings=["good", "bad"],
            cats_int64s=[0, 1],
            default_int64=2,
        ),
        helper.make_node("Cast", ["cat"], ["catf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["catf", "two"], ["neg1"]),
        helper.make_node("Unsqueeze", ["neg1", "axis1"], ["neg"]),
        helper.make_node("Sub", ["one", "neg"], ["pos"]),
        helper.make_node("Concat", ["neg", "pos"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "text",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def _installed_python(fw: Framework) -> Path | None:
    """The framework's venv as ``bastion bench`` installs it, if it is there with these pins."""
    root = ROOT / ".bench" / "venvs"
    python = venv_python(root, fw.name)
    stamp = root / fw.name / "bench-requirements.txt"
    if python.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == "\n".join(fw.requirements()) + "\n":
        return python
    return None


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["mlserver", "mlflow", "bentoml"])
def test_serves_the_same_answers_as_onnx_runtime(tmp_path: Path, name: str) -> None:
    fw = load(name)
    python = _installed_python(fw)
    if python is None:
        pytest.skip(f"{name}'s venv is not installed (run `bastion bench` once, or ensure_venv)")
    numeric = ModelSpec("image", "tiny_numeric", tmp_path / "models" / "numeric.onnx", "image", "FP32",
                        (1, 2, 2), "probabilities", (3,))  # fmt: skip
    text = ModelSpec("sentiment", "tiny_text", tmp_path / "models" / "text.onnx", "text", "BYTES",
                     (), "probabilities", (2,))  # fmt: skip
    _numeric_model(numeric.onnx_path)
    _text_model(text.onnx_path)
    samples = {
        numeric.name: np.random.default_rng(1).standard_normal((5, 1, 2, 2)).astype(np.float32),
        text.name: np.array(["good", "bad", "très good, honestly", "good"], dtype=object),
    }
    for model in (numeric, text):
        work = tmp_path / "work" / model.name
        work.mkdir(parents=True)
        launch = fw.prepare(model, work, python, free_port(), 2)
        with serve(launch, work / "server.log"):
            check_serves(fw, model, launch, samples[model.name])  # raises unless the answers match
            check_serves(fw, model, launch, samples[model.name][:1])
