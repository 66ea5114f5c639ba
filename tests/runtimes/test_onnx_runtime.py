from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bastion.core.errors import InvalidInput, ModelNotReady
from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.runtimes import ModelLoadError, Runtime, UnsafeModelFormat, create_runtime
from tests.runtimes.onnx_models import affine_model, string_identity_model, unknown_rank_model


def _version_dir(tmp_path: Path, data: bytes, file: str = "model.onnx") -> Path:
    vdir = tmp_path / "m" / "1"
    vdir.mkdir(parents=True)
    (vdir / file).write_bytes(data)
    return vdir


def _config(**kwargs: object) -> ModelConfig:
    return ModelConfig(name="m", runtime=str(kwargs.pop("runtime", "onnx")), **kwargs)  # type: ignore[arg-type]


def test_predict_equals_onnxruntime(tmp_path: Path) -> None:
    vdir = _version_dir(tmp_path, affine_model(offset=0.5))
    runtime = create_runtime(_config(max_batch_size=8), vdir)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    direct = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    y, z = direct.run(["y", "z"], {"x": x})
    out = runtime.predict({"x": x})
    assert set(out) == {"y", "z"}
    np.testing.assert_array_equal(out["y"], y)
    np.testing.assert_array_equal(out["z"], z)
    assert runtime.platform == "onnxruntime_onnx"
    assert isinstance(runtime, Runtime)


def test_signature_is_derived_from_the_model(tmp_path: Path) -> None:
    runtime = create_runtime(_config(), _version_dir(tmp_path, affine_model()))
    assert runtime.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    assert runtime.outputs == (TensorSpec("y", "FP32", (-1, 4)), TensorSpec("z", "FP32", (-1,)))


def test_declared_output_subset_is_all_that_is_computed(tmp_path: Path) -> None:
    config = _config(
        inputs=(TensorSpec("x", "FP32", (-1, -1)),),
        outputs=(TensorSpec("z", "FP32", (-1,)),),
        max_batch_size=4,
    )
    runtime = create_runtime(config, _version_dir(tmp_path, affine_model()))
    # the declared -1 is refined by the model's fixed width
    assert runtime.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    out = runtime.predict({"x": np.ones((2, 4), np.float32)})
    assert list(out) == ["z"]
    np.testing.assert_array_equal(out["z"], [4.0, 4.0])


@pytest.mark.parametrize(
    ("inputs", "outputs", "expected"),
    [
        ((TensorSpec("x", "FP64", (-1, 4)),), (), "config says FP64, the model has FP32"),
        ((TensorSpec("input", "FP32", (-1, 4)),), (), "no input named 'input'"),
        ((TensorSpec("x", "FP32", (-1, 4, 1)),), (), "rank 3"),
        ((TensorSpec("x", "FP32", (-1, 5)),), (), "dim 1 is 5 in config but 4 in the model"),
        (
            (TensorSpec("x", "FP32", (-1, 4)),),
            (TensorSpec("scores", "FP32", (-1,)),),
            "no output named 'scores'",
        ),
    ],
)
def test_config_that_disagrees_with_the_model_is_refused(
    tmp_path: Path, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], expected: str
) -> None:
    with pytest.raises(ModelLoadError, match=expected):
        create_runtime(_config(inputs=inputs, outputs=outputs), _version_dir(tmp_path, affine_model()))


def test_batching_needs_a_variable_first_dim(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="must be variable"):
        create_runtime(_config(max_batch_size=8), _version_dir(tmp_path, affine_model(batch_dim=1)))
    # without batching a fixed first dim is fine
    create_runtime(_config(), _version_dir(tmp_path / "b", affine_model(batch_dim=1)))


def test_declared_shape_fills_in_an_unknown_rank(tmp_path: Path) -> None:
    vdir = _version_dir(tmp_path, unknown_rank_model())
    with pytest.raises(ModelLoadError, match=r"declare the tensor in config\.yaml"):
        create_runtime(_config(max_batch_size=8), vdir)
    x, y = TensorSpec("x", "FP32", (-1, 2, 2)), TensorSpec("y", "FP32", (-1, 2, 2))
    runtime = create_runtime(_config(max_batch_size=8, inputs=(x,), outputs=(y,)), vdir)
    assert runtime.inputs == (x,) and runtime.outputs == (y,)
    assert runtime.predict({"x": np.ones((3, 2, 2), np.float32)})["y"].shape == (3, 2, 2)


def test_bytes_round_trip_through_a_string_graph(tmp_path: Path) -> None:
    runtime = create_runtime(_config(max_batch_size=4), _version_dir(tmp_path, string_identity_model()))
    assert runtime.inputs == (TensorSpec("text", "BYTES", (-1, 2)),)
    text = np.array([[b"hello", "ünï".encode()], [b"", b"x y"]], dtype=object)
    out = runtime.predict({"text": text})["echo"]
    assert out.dtype == object and out.shape == (2, 2)
    assert out.tolist() == text.tolist()
    assert all(isinstance(v, bytes) for v in out.flat)
    with pytest.raises(InvalidInput, match="UTF-8"):
        runtime.predict({"text": np.array([[b"\xff", b"a"]], dtype=object)})


def test_session_options_come_from_parameters(tmp_path: Path) -> None:
    params = {
        "intra_op_threads": 2,
        "graph_optimization": "basic",
        "execution_mode": "parallel",
        "providers": ["NoSuchExecutionProvider", "CPUExecutionProvider"],
        "allow_spinning": False,
    }
    runtime = create_runtime(_config(parameters=params), _version_dir(tmp_path, affine_model()))
    assert runtime.predict({"x": np.zeros((1, 4), np.float32)})["y"].tolist() == [[1.0] * 4]


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"intra_op_thread": 1}, "unknown key.*'intra_op_thread'"),
        ({"graph_optimization": "max"}, "graph_optimization: expected one of disable, basic, extended, all"),
        ({"intra_op_threads": True}, "intra_op_threads: expected int"),
        ({"intra_op_threads": -1}, "expected >= 0"),
        ({"file": "../../outside.onnx"}, "outside the version directory"),
        ({"file": "/etc/passwd"}, "outside the version directory"),
        ({"file": "other.onnx"}, "'other.onnx' not found"),
    ],
)
def test_bad_parameters_are_refused(tmp_path: Path, parameters: dict[str, object], expected: str) -> None:
    with pytest.raises(ModelLoadError, match=expected):
        create_runtime(_config(parameters=parameters), _version_dir(tmp_path, affine_model()))


def test_wrong_feed_is_a_client_error(tmp_path: Path) -> None:
    runtime = create_runtime(_config(), _version_dir(tmp_path, affine_model()))
    with pytest.raises(InvalidInput):
        runtime.predict({"x": np.zeros((1, 3), np.float32)})


def test_not_an_onnx_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"ONNX Runtime cannot load model\.onnx"):
        create_runtime(_config(), _version_dir(tmp_path, b"definitely not protobuf"))


@pytest.mark.parametrize("runtime", ["onnx", "sklearn", "torch"])
def test_pickle_is_never_loaded(tmp_path: Path, runtime: str) -> None:
    # whatever the bytes, the file is refused for what it is, before anything reads it
    vdir = _version_dir(tmp_path, b"\x80\x04K\x01.", file="model.joblib")
    config = _config(
        runtime=runtime, inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1,)),)
    )
    with pytest.raises(UnsafeModelFormat, match=r"model\.joblib: pickle/joblib files run arbitrary code") as err:
        create_runtime(config, vdir)
    assert "skops" in str(err.value) and "ONNX" in str(err.value)
    with pytest.raises(UnsafeModelFormat):
        create_runtime(_config(parameters={"file": "model.pkl"}), vdir)


def test_unknown_runtime(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown runtime 'tensorflow'; expected one of"):
        create_runtime(_config(runtime="tensorflow"), tmp_path)


def test_closed_runtime_refuses_new_work(tmp_path: Path) -> None:
    runtime = create_runtime(_config(), _version_dir(tmp_path, affine_model()))
    runtime.close()
    with pytest.raises(ModelNotReady):
        runtime.predict({"x": np.zeros((1, 4), np.float32)})
