"""Tiny ONNX graphs for runtime and repository tests (built in memory, milliseconds each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper


def affine_model(offset: float = 1.0, width: int = 4, batch_dim: str | int = "batch") -> bytes:
    """x FP32 [batch, width] -> y = 2x + offset, z = sum(x, axis=1) (FP32 [batch])."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["twice"]),
            helper.make_node("Add", ["twice", "offset"], ["y"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["z"], keepdims=0),
        ],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, width])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, width]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch_dim]),
        ],
        [
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.array(offset, np.float32), "offset"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    return _serialize(graph)


def string_identity_model() -> bytes:
    """text BYTES [batch, 2] -> same BYTES tensor (ONNX string tensors)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 2])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch", 2])],
    )
    return _serialize(graph)


def unknown_rank_model() -> bytes:
    """y = Identity(x), FP32, with no shapes in the graph: ORT reports both ranks as unknown ([])."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "unknown_rank",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return _serialize(graph, check=False)  # the checker insists on shapes; ORT does not


def _serialize(graph: onnx.GraphProto, *, check: bool = True) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if check:
        onnx.checker.check_model(model)
    return model.SerializeToString()


def write_model(
    root: Path,
    name: str,
    versions: dict[int, bytes],
    config: dict[str, Any] | None = None,
    *,
    file: str = "model.onnx",
) -> Path:
    """<root>/<name>/config.yaml and <root>/<name>/<v>/<file> for each version."""
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    for version, data in versions.items():
        (model_dir / str(version)).mkdir(exist_ok=True)
        (model_dir / str(version) / file).write_bytes(data)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config or {"runtime": "onnx"}))
    return model_dir
