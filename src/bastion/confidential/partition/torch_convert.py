"""ONNX -> torch for the gradient-shielding attacks (``shielding.py``): onnx2torch (with a
stand-in for its torchvision import), the whole model as a module from its input to
*logits*, the head and tail of a cut as modules, and the check of the conversion
against ONNX Runtime.

Logits. The scenario models end with ``Softmax -> probabilities`` and ``ArgMax ->
label`` (the image CNNs), or with ``Sigmoid -> [1 - p, p]`` and an ``ai.onnx.ml``
label lookup (the scikit-learn MLP). The attacks run on *logits*, taken from the graph:
the input of the ``Softmax`` that produces the probabilities output, or, for a sigmoid
binary classifier, its input ``z`` as the logits ``[0, z]`` (whose softmax is exactly
``[1 - sigmoid(z), sigmoid(z)]``). Not ``log(probabilities)``: that is the same
classifier mathematically, but in float32 a confident softmax saturates (p rounds to
1.0, the others underflow to 0), and the log then has zero or infinite gradients,
which would weaken every gradient attack and C&W's margin loss for reasons that are
numerical, not a property of the split. ``log(probabilities)`` (clamped at 1e-30) is
only the fallback for a model whose probabilities come from anything else, and for a
cut *after* the logits (a sigmoid classifier cut at the sigmoid's output), where the
tail sees no logits. The conversion is checked once per call: the softmax of the
torch logits must match ONNX Runtime's probabilities within 1e-4 on evaluation rows.
Scope: classifiers with one input tensor (every scenario model); onnx2torch must know
every operator of the head and of the tail up to the logits (the ``ai.onnx.ml`` label
lookup after them is never converted).
"""

from __future__ import annotations

import sys
import types
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from bastion.confidential.partition.graph import Cut, PartitionError, split_model

__all__ = ["CONVERSION_ATOL", "convert", "logits_model"]

CONVERSION_ATOL = 1e-4
_LOG_FLOOR = 1e-30  # log(probabilities) fallback: the floor keeps log(0) finite


def _onnx2torch() -> Any:
    """``onnx2torch.convert``. onnx2torch imports torchvision at import time, only for the NMS
    and RoIAlign converters (detection models, none of ours); installing torchvision would let
    pip replace the CPU build of torch, so where torchvision is missing a placeholder stands in
    for it during the import (those two converters then fail if ever used) and is removed after."""
    try:
        import onnx2torch
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            raise
        stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

        def _missing(*_args: Any, **_kwargs: Any) -> Any:
            raise NotImplementedError("torchvision is not installed: NMS and RoIAlign cannot be converted")

        ops.roi_align = ops.nms = ops.box_convert = _missing  # type: ignore[attr-defined]
        stub.ops = ops  # type: ignore[attr-defined]
        for name in [n for n in sys.modules if n == "onnx2torch" or n.startswith("onnx2torch.")]:
            del sys.modules[name]  # a half-imported package from the failed attempt
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
        try:
            import onnx2torch
        finally:
            del sys.modules["torchvision"], sys.modules["torchvision.ops"]
    return onnx2torch.convert


def convert(model: onnx.ModelProto) -> Any:
    """The ONNX model as a torch module (onnx2torch), in eval mode, with gradients off for its
    weights (attacks differentiate with respect to the input only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnx2torch warns about ops it converts approximately; the check catches them
        module = _onnx2torch()(model)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model)


def _probabilities_output(model: onnx.ModelProto) -> str:
    """The graph output that holds class probabilities: the one named ``probabilities``, else the
    first floating-point output of rank 2."""
    names = [o.name for o in model.graph.output]
    if "probabilities" in names:
        return "probabilities"
    for o in model.graph.output:
        t = o.type.tensor_type
        if t.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) and len(t.shape.dim) == 2:
            return o.name
    raise PartitionError(f"no probabilities output among {names}: the attacks need class scores")


@dataclass(frozen=True)
class _Logits:
    """Where the logits are and how to read them: ``tensor`` with ``mode`` "softmax" (the tensor
    is the logits), "sigmoid" (a [N, 1] logit z -> [0, z]) or "log" (``tensor`` holds
    probabilities)."""

    tensor: str
    mode: str
    probabilities: str


def _find_logits(model: onnx.ModelProto) -> _Logits:
    probs = _probabilities_output(model)
    producer = {out: n for n in model.graph.node for out in n.output}
    node = producer.get(probs)
    if node is not None and node.op_type == "Softmax":
        return _Logits(node.input[0], "softmax", probs)
    if node is not None and node.op_type == "Concat" and len(node.input) == 2:
        # scikit-learn / skl2onnx binary classifiers: Concat(1 - sigmoid(z), sigmoid(z))
        second = producer.get(node.input[1])
        first = producer.get(node.input[0])
        if (second is not None and second.op_type == "Sigmoid" and first is not None and first.op_type == "Sub"
                and second.output[0] in first.input):
            return _Logits(second.input[0], "sigmoid", probs)
    return _Logits(probs, "log", probs)


def _extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    return onnx.utils.Extractor(_infer(model)).extract_model(inputs, outputs)


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    weights = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in weights]


def _wrap(torch: Any, inner: Any, mode: str) -> Any:
    """``inner`` (a module) followed by the read-out that makes logits of its output."""
    nn = torch.nn

    class ToLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            out = self.inner(x)
            if mode == "sigmoid":
                z = out.reshape(len(out), -1)
                return torch.cat([torch.zeros_like(z), z], dim=1)
            if mode == "log":
                return torch.log(out.clamp_min(_LOG_FLOOR))
            return out

    return ToLogits().eval()


def logits_model(model: onnx.ModelProto) -> Any:
    """The whole model as a torch module from its inputs to logits (see the module docstring)."""
    import torch

    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise PartitionError(f"the attacks perturb one input tensor; the model has {len(inputs)}: {inputs}")
    spot = _find_logits(model)
    sub = _extract(model, inputs, [spot.tensor])
    return _wrap(torch, convert(sub), spot.mode)


def _ort_probabilities(model: onnx.ModelProto, x: np.ndarray, name: str) -> np.ndarray:
    from bastion.runtimes.onnx_runtime import ort  # telemetry off, as in the server

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (inp,) = _graph_inputs(model)
    return np.asarray(sess.run([name], {inp: x})[0], dtype=np.float64)


def _check_conversion(torch: Any, model: onnx.ModelProto, full: Any, x: np.ndarray) -> float:
    """Max |softmax(torch logits) - ONNX Runtime probabilities| on ``x``; PartitionError beyond 1e-4."""
    spot = _find_logits(model)
    want = _ort_probabilities(model, x, spot.probabilities)
    with torch.no_grad():
        got = torch.softmax(full(torch.from_numpy(x)), dim=1).double().numpy()
    if got.shape != want.shape:
        raise PartitionError(f"converted model gives {got.shape} probabilities, ONNX Runtime {want.shape}")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    if not diff <= CONVERSION_ATOL:
        raise PartitionError(f"the torch conversion differs from ONNX Runtime by {diff:.3g} > {CONVERSION_ATOL:g} "
                             f"on the probabilities ({spot.mode} read-out of {spot.tensor!r})")
    return diff


def _split_modules(torch: Any, model: onnx.ModelProto, cut: Cut) -> tuple[Any, Any]:
    """(head, tail_to_logits) as torch modules for ``cut``."""
    spot = _find_logits(model)
    head, tail = split_model(model, cut)
    tail_nodes = {out for n in tail.graph.node for out in n.output}
    if cut.tensor == spot.tensor:  # the head computes the logits itself: the tail is a read-out
        tail_mod: Any = torch.nn.Identity()
        mode = spot.mode
    elif spot.tensor in tail_nodes:
        tail_mod, mode = convert(_extract(tail, [cut.tensor], [spot.tensor])), spot.mode
    else:  # a cut after the logits (at a sigmoid's output): the tail only has probabilities
        tail_mod, mode = convert(_extract(tail, [cut.tensor], [spot.probabilities])), "log"
    return convert(head), _wrap(torch, tail_mod, mode)


def _predict(torch: Any, module: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """``module``'s outputs for the rows of ``x`` (numpy in, numpy out), in batches, without gradients."""
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])
