"""The demo model repository: small, real models that need no download.

* ``simple``: Triton's "simple" model (OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 -
  INPUT1 on INT32 [batch, 16]), so tritonclient's examples run against Bastion as is.
* ``simple_string``: Triton's "simple_string": the same on numbers written as strings.
* ``digits``: a classifier of scikit-learn's bundled 8x8 digits, exported to ONNX.
* ``digits_skops``: the same fitted model saved with skops, the second safe format.

Everything is deterministic for a seed: building twice gives identical files (that
is what lets a repository be checked into a build cache or signed).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bastion.runtimes.export import sklearn_to_onnx, sklearn_to_skops, write_bytes_atomic, write_model_config
from bastion.scenarios.zoo_files import npz_bytes

__all__ = ["DEMO_MODELS", "build_demo_repository"]

DEMO_MODELS = ("simple", "simple_string", "digits", "digits_skops")

_SIMPLE_SHAPE = [-1, 16]
_DIGITS_FEATURES = 64
_DIGITS_CLASSES = 10
# no queue delay: under load the queue fills while a batch computes, so batches form on
# their own; a delay would only add latency to a lone request
_BATCHING = {"max_queue_delay_us": 0, "max_queue_size": 256}


def build_demo_repository(out: Path, *, progress: Callable[[str], None] | None = None, seed: int = 0) -> list[str]:
    """Write the demo models under ``out`` (created if needed) and return their names."""
    out = Path(out)
    say = progress or (lambda _message: None)

    say("simple: building the ONNX graph")
    _write_model(out, "simple", _simple_graph(string=False), _simple_config("INT32"))
    say("simple_string: building the ONNX graph")
    _write_model(out, "simple_string", _simple_graph(string=True), _simple_config("BYTES"))

    say("digits: training on scikit-learn's digits")
    model, x_test, y_test = _train_digits(seed)
    say("digits: exporting to ONNX")
    onnx_bytes = sklearn_to_onnx(model, _DIGITS_FEATURES, name="input")
    metrics = _metrics(model, onnx_bytes, x_test, y_test, seed)
    _write_model(out, "digits", onnx_bytes, _digits_config("onnx"), file="model.onnx")
    write_bytes_atomic(out / "digits" / "metrics.json", _json(metrics))
    write_bytes_atomic(out / "digits" / "test_data.npz", npz_bytes(X=x_test, y=y_test))
    # a few rows to send from the command line (bastion infer digits --input .../sample.npy)
    write_bytes_atomic(out / "digits" / "sample.npy", _npy(x_test[:8]))

    say("digits_skops: saving with skops")
    _write_model(out, "digits_skops", sklearn_to_skops(model), _digits_config("skops"), file="model.skops")
    write_bytes_atomic(out / "digits_skops" / "metrics.json", _json(metrics))
    say(f"done: digits held-out accuracy {metrics['accuracy']:.4f}")
    return list(DEMO_MODELS)


def _write_model(out: Path, name: str, model: bytes, config: dict[str, Any], *, file: str = "model.onnx") -> None:
    model_dir = out / name
    write_bytes_atomic(model_dir / "1" / file, model)
    write_model_config(model_dir, config)


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def _simple_config(datatype: str) -> dict[str, Any]:
    return {
        "runtime": "onnx",
        "max_batch_size": 64,
        "inputs": [_tensor("INPUT0", datatype, _SIMPLE_SHAPE), _tensor("INPUT1", datatype, _SIMPLE_SHAPE)],
        "outputs": [_tensor("OUTPUT0", datatype, _SIMPLE_SHAPE), _tensor("OUTPUT1", datatype, _SIMPLE_SHAPE)],
        "dynamic_batching": dict(_BATCHING),
        "parameters": {"intra_op_threads": 1, "graph_optimization": "all"},
    }


def _digits_config(runtime: str) -> dict[str, Any]:
    return {
        "runtime": runtime,
        "max_batch_size": 256,
        "inputs": [_tensor("input", "FP32", [-1, _DIGITS_FEATURES])],
        "outputs": [
            _tensor("label", "INT64", [-1]),
            _tensor("probabilities", "FP32", [-1, _DIGITS_CLASSES]),
        ],
        "dynamic_batching": dict(_BATCHING),
        "version_policy": {"latest": 1},
    }


def _simple_graph(*, string: bool) -> bytes:
    """Add and Sub of two [batch, 16] tensors; the string variant casts to INT32 and back."""
    import onnx
    from onnx import TensorProto, helper

    io_type = TensorProto.STRING if string else TensorProto.INT32
    nodes = []
    a, b = "INPUT0", "INPUT1"
    if string:
        nodes += [
            helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
            helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
        ]
        a, b = "a", "b"
    sum_, diff = ("sum", "diff") if string else ("OUTPUT0", "OUTPUT1")
    nodes += [helper.make_node("Add", [a, b], [sum_]), helper.make_node("Sub", [a, b], [diff])]
    if string:
        nodes += [
            helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
            helper.make_node("Cast", ["diff"], ["OUTPUT1"], to=TensorProto.STRING),
        ]
    dims = ["batch", 16]
    graph = helper.make_graph(
        nodes,
        "simple_string" if string else "simple",
        [helper.make_tensor_value_info(n, io_type, dims) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, io_type, dims) for n in ("OUTPUT0", "OUTPUT1")],
    )
    # IR 8 / opset 17: loadable by any onnxruntime >= 1.13, independent of the onnx installed here.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="bastion")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _train_digits(seed: int) -> tuple[Any, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)  # what the server is sent; train on the same values
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    model = Pipeline(
        [("scale", StandardScaler()), ("classify", LogisticRegression(max_iter=2000, random_state=seed))]
    ).fit(x_train, y_train)
    return model, x_test, y_test.astype(np.int64)


def _metrics(model: Any, onnx_bytes: bytes, x_test: np.ndarray, y_test: np.ndarray, seed: int) -> dict[str, Any]:
    """Held-out accuracy of the served ONNX model (and of scikit-learn, which should agree)."""
    from bastion.runtimes.onnx_runtime import ort  # with the server's onnxruntime settings (no telemetry)

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    labels = session.run(["label"], {"input": x_test})[0]
    return {
        "model": "StandardScaler + LogisticRegression",
        "dataset": "sklearn.datasets.load_digits, stratified 75/25 split",
        "seed": seed,
        "n_test": len(y_test),
        "accuracy": round(float(np.mean(labels == y_test)), 6),
        "accuracy_sklearn": round(float(np.mean(model.predict(x_test) == y_test)), 6),
        "test_data": "digits/test_data.npz (X float32 [n, 64], y int64 [n])",
    }


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()
