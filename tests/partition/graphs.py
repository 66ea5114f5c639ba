"""Small ONNX graphs for the partition tests, built with onnx.helper (deterministic weights)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


def _weights(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _model(graph: onnx.GraphProto, *opsets: tuple[str, int]) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in (("", OPSET), *opsets)],
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def chain() -> onnx.ModelProto:
    """x [N,1,4,4] -> Conv(2 ch, 3x3, pad 1) -> Relu -> Flatten -> Gemm(32 -> 3) -> y [N,3].

    FLOPs at batch 1: Conv 2*32*9 + 32 = 608, Relu 32, Flatten 0, Gemm 2*3*32 + 3 = 195."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu0"),
        helper.make_node("Flatten", ["relu"], ["flat"], name="flatten0"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[_weights(rng, "conv_w", 2, 1, 3, 3), _weights(rng, "conv_b", 2),
                     _weights(rng, "fc_w", 3, 32), _weights(rng, "fc_b", 3)],
    )
    return _model(graph)


def residual() -> onnx.ModelProto:
    """x [N,2,4,4] -> Conv a -> Relu r -> Conv b -> Add(r, b) -> Relu out: a residual block
    whose inside (b) is no cut point, with a depthwise Conv (groups = 2) for the FLOP count."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu_a"),
        helper.make_node("Conv", ["r", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1], group=2),
        helper.make_node("Add", ["r", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["out"], name="relu_out"),
    ]
    graph = helper.make_graph(
        nodes, "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2, 4, 4])],
        initializer=[_weights(rng, "wa", 2, 2, 3, 3), _weights(rng, "wb", 2, 1, 3, 3), _weights(rng, "bb", 2),
                     _weights(rng, "unused", 5)],
    )
    return _model(graph)


def two_inputs() -> onnx.ModelProto:
    """x1 [N,4] -> MatMul -> Relu h; Concat(h, x2 [N,3]) -> Gemm -> Softmax p, ArgMax label.

    Only the concatenation is a cut point: before it, x2 bypasses the head."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x1", "w1"], ["m"], name="matmul"),
        helper.make_node("Relu", ["m"], ["h"], name="relu"),
        helper.make_node("Concat", ["h", "x2"], ["cat"], name="concat", axis=1),
        helper.make_node("Gemm", ["cat", "w2", "b2"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["p"], name="softmax", axis=1),
        helper.make_node("ArgMax", ["p"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("x1", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
        initializer=[_weights(rng, "w1", 4, 5), _weights(rng, "w2", 8, 2), _weights(rng, "b2", 2)],
    )
    return _model(graph)


def tree_ensemble(*, cast: bool = False) -> onnx.ModelProto:
    """One ai.onnx.ml TreeEnsembleClassifier (a stump on feature 0): its outputs come out of
    one operator, as in the malware scenario's gradient-boosted variants, so the model has no
    cut point; with ``cast`` a Cast before it is one (a split with 0 FLOPs on either side)."""
    nodes = [
        helper.make_node("Cast", ["features"], ["cast"], name="cast", to=TensorProto.FLOAT),
        helper.make_node(
            "TreeEnsembleClassifier", ["cast" if cast else "features"], ["label", "probabilities"], name="trees",
            domain="ai.onnx.ml",
            nodes_treeids=[0, 0, 0], nodes_nodeids=[0, 1, 2], nodes_featureids=[0, 0, 0],
            nodes_values=[0.5, 0.0, 0.0], nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"],
            nodes_truenodeids=[1, 0, 0], nodes_falsenodeids=[2, 0, 0],
            class_treeids=[0, 0], class_nodeids=[1, 2], class_ids=[0, 1], class_weights=[1.0, 1.0],
            classlabels_int64s=[0, 1], post_transform="NONE",
        ),
    ]
    graph = helper.make_graph(
        nodes if cast else nodes[1:], "trees",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
    )
    return _model(graph, ("ai.onnx.ml", 3))
