"""Small real ONNX models built for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper


def slow_model_bytes(iterations: int = 30000, width: int = 256) -> bytes:
    """x [-1, 1] FP32 → y [-1, 1]: a dense tanh layer applied ``iterations`` times in an ONNX Loop.

    The Loop keeps the file small while the cost is real compute (about 3 µs an iteration
    on one core here), so tests get a genuinely slow model rather than a sleep.
    """
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", width]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", width]),
        ],
    )
    inits = [
        numpy_helper.from_array(np.ones((1, width), np.float32), "expand"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(iterations, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "cond"),
        numpy_helper.from_array(np.ones((width, 1), np.float32) / width, "reduce"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "expand"], ["h0"]),
        helper.make_node("Loop", ["trips", "cond", "h0"], ["h"], body=body),
        helper.make_node("MatMul", ["h", "reduce"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_slow_model(repo: Path, name: str = "slow", *, max_queue_size: int = 2, iterations: int = 30000,
                     max_batch_size: int = 0) -> Path:
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.onnx").write_bytes(slow_model_bytes(iterations))
    config = {
        "runtime": "onnx",
        "max_batch_size": max_batch_size,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
        "dynamic_batching": {"max_queue_size": max_queue_size},
    }
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return model_dir
