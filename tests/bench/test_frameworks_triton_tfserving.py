"""The Triton and TF Serving adapters' pure logic: bodies, response reading, prepared files, argv.

No server, no peer framework: these run in Bastion's venv.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import orjson
import pytest

from bastion.bench.frameworks import load
from bastion.bench.frameworks.base import ModelSpec
from bastion.bench.frameworks.tfserving import NOT_INSTALLABLE, TFServing
from bastion.bench.frameworks.triton import Triton, model_config

PEER_CODE = Path(__file__).resolve().parents[2] / "src" / "bastion" / "bench" / "frameworks" / "peer_code"


def _spec(tmp_path: Path, datatype: str = "FP32") -> ModelSpec:
    onnx = tmp_path / "src" / "model.onnx"
    onnx.parent.mkdir(parents=True, exist_ok=True)
    onnx.write_bytes(b"onnx-bytes")
    if datatype == "BYTES":
        return ModelSpec("sentiment", "sentiment_ngram", onnx, "text", "BYTES", (), "probabilities", (2,))
    return ModelSpec("image", "image_cnn", onnx, "image", "FP32", (1, 2, 2), "probabilities", (3,))


# --------------------------------------------------------------------------- Triton


def test_triton_is_found_by_name_and_pins_exact_versions() -> None:
    fw = load("triton")
    assert isinstance(fw, Triton)
    assert fw.requirements() == ["nvidia-pytriton==0.7.0", "onnxruntime==1.31.1", "numpy==1.26.4"]
    assert all("==" in r for r in fw.requirements())
    assert not any(r.startswith("torch") for r in fw.requirements())


def test_triton_encode_is_kserve_v2_json(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    rows = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2) / 4
    body = orjson.loads(Triton().encode(model, rows))
    assert body == {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [2, 1, 2, 2],
                "data": [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
            }
        ],
        "outputs": [{"name": "probabilities"}],
    }


def test_triton_encode_bytes_rows_as_strings(tmp_path: Path) -> None:
    model = _spec(tmp_path, "BYTES")
    rows = np.array(["good film", "bad, très"], dtype=object)
    body = orjson.loads(Triton().encode(model, rows))
    assert body["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["good film", "bad, très"]}]


def test_triton_decode_reads_the_named_output(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    response = (
        b'{"model_name":"image_cnn","model_version":"1","outputs":['
        b'{"name":"probabilities","datatype":"FP32","shape":[2,3],"data":[0.1,0.2,0.7,0.5,0.25,0.25]}]}'
    )
    got = Triton().decode(model, response)
    np.testing.assert_allclose(got, np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]], dtype=np.float32))
    assert got.dtype == np.float32
    with pytest.raises(ValueError, match="probabilities"):
        Triton().decode(model, b'{"outputs":[{"name":"label","datatype":"INT64","shape":[1],"data":[1]}]}')


def test_triton_model_config(tmp_path: Path) -> None:
    text = model_config(_spec(tmp_path), 2)
    assert 'name: "image_cnn"' in text
    assert 'backend: "python"' in text
    assert "max_batch_size: 0" in text
    assert 'input [ { name: "image" data_type: TYPE_FP32 dims: [ -1, 1, 2, 2 ] } ]' in text
    assert 'output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]' in text
    assert "instance_group [ { count: 2 kind: KIND_CPU } ]" in text
    assert 'parameters: { key: "input_name" value: { string_value: "image" } }' in text
    assert 'parameters: { key: "datatype" value: { string_value: "FP32" } }' in text
    text = model_config(_spec(tmp_path, "BYTES"), 1)
    assert 'input [ { name: "text" data_type: TYPE_STRING dims: [ -1 ] } ]' in text
    assert "count: 1 kind: KIND_CPU" in text


def test_triton_prepare_writes_a_model_repository_and_argv(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    python = Path("/venvs/triton/bin/python")
    launch = Triton().prepare(model, work, python, 8123, 2)

    version = work / "repository" / "image_cnn" / "1"
    assert (version / "model.onnx").read_bytes() == b"onnx-bytes"
    assert (version / "model.py").read_text() == (PEER_CODE / "triton_model.py").read_text()
    assert (work / "repository" / "image_cnn" / "config.pbtxt").read_text() == model_config(model, 2)
    assert (work / "triton_launch.py").read_text() == (PEER_CODE / "triton_launch.py").read_text()

    assert launch.argv[:3] == [str(python), str(work / "triton_launch.py"), str(work / "backends")]
    assert f"--model-repository={work / 'repository'}" in launch.argv
    assert "--http-address=127.0.0.1" in launch.argv
    assert "--http-port=8123" in launch.argv
    assert "--allow-grpc=false" in launch.argv
    assert "--allow-metrics=false" in launch.argv
    assert launch.port == 8123
    assert launch.ready_url == "http://127.0.0.1:8123/v2/models/image_cnn/ready"
    assert launch.infer_url == "http://127.0.0.1:8123/v2/models/image_cnn/infer"
    assert launch.cwd == work
    assert "python backend" in launch.notes and "2 x KIND_CPU" in launch.notes


def test_triton_peer_code_defines_the_python_backend_entry_points() -> None:
    # parsed, not imported: triton_python_backend_utils exists only inside Triton's stub
    tree = ast.parse((PEER_CODE / "triton_model.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert cls.name == "TritonPythonModel"
    assert {"initialize", "execute", "finalize"} <= {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    launcher = ast.parse((PEER_CODE / "triton_launch.py").read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in launcher.body)


# --------------------------------------------------------------------------- TF Serving


def test_tfserving_is_unavailable_with_the_reason_and_needs_no_venv() -> None:
    fw = load("tfserving")
    assert isinstance(fw, TFServing)
    assert fw.requirements() == []
    reason = fw.unavailable()
    assert reason
    assert reason == NOT_INSTALLABLE or "SavedModel" in reason
    assert "tensorflow_model_server" in NOT_INSTALLABLE


def test_tfserving_encode_is_the_rest_predict_row_form(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    rows = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2) / 2
    body = orjson.loads(TFServing().encode(model, rows))
    assert body == {
        "signature_name": "serving_default",
        "instances": [[[[0.0, 0.5], [1.0, 1.5]]], [[[2.0, 2.5], [3.0, 3.5]]]],
    }
    text = _spec(tmp_path, "BYTES")
    body = orjson.loads(TFServing().encode(text, np.array(["a b", "c"], dtype=object)))
    assert body == {"signature_name": "serving_default", "instances": ["a b", "c"]}


def test_tfserving_decode_row_and_columnar_forms(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    want = np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]], dtype=np.float32)
    single = b'{"predictions": [[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]]}'
    several = (
        b'{"predictions": [{"label": 2, "probabilities": [0.1, 0.2, 0.7]},'
        b' {"label": 0, "probabilities": [0.5, 0.25, 0.25]}]}'
    )
    columnar = b'{"outputs": {"label": [2, 0], "probabilities": [[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]]}}'
    for response in (single, several, columnar):
        got = TFServing().decode(model, response)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want)
    with pytest.raises(ValueError, match="predictions"):
        TFServing().decode(model, b'{"error": "Could not find any versions of model image_cnn"}')


def test_tfserving_prepare_writes_model_config_and_argv(tmp_path: Path) -> None:
    model = _spec(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    launch = TFServing().prepare(model, work, Path("/unused/python"), 8501, 2)
    config = (work / "models.config").read_text()
    assert 'name: "image_cnn"' in config
    assert f'base_path: "{work / "models" / "image_cnn"}"' in config
    assert 'model_platform: "tensorflow"' in config
    assert launch.argv[0] == "tensorflow_model_server"
    assert "--rest_api_port=8501" in launch.argv
    assert f"--model_config_file={work / 'models.config'}" in launch.argv
    assert "--tensorflow_intra_op_parallelism=1" in launch.argv
    assert "--tensorflow_inter_op_parallelism=1" in launch.argv
    assert launch.ready_url == "http://127.0.0.1:8501/v1/models/image_cnn"
    assert launch.infer_url == "http://127.0.0.1:8501/v1/models/image_cnn:predict"
    assert "no worker processes" in launch.notes
