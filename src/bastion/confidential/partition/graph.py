"""Model surgery for partitioned inference: cut points, FLOP shares, the split and its check.

A *cut point* is a tensor T of the graph that every path from the graph inputs to the graph
outputs passes through (T dominates the outputs). Cutting there gives a valid 2-way
partition: the *head* computes T from the graph inputs, the *tail* computes the graph
outputs from T alone (plus its own weights and constants). Tensors inside a residual block
are no cut points: the tail would also need the block's skip input. Neither are the graph
inputs (an empty head) nor tensors that are themselves graph outputs (the tail would only
pass them through). Cut points are numbered K = 1, 2, ... in topological order, so
``--after-layer K`` keeps the first K cut points' computation in the head.

Tree ensembles (``ai.onnx.ml.TreeEnsembleClassifier``) compute every output in one
operator: such a model has no cut point, and the list says so (it is empty).

FLOPs (``model_flops``, ``Cut.head_flops``) are an estimate from the shapes ONNX shape
inference gives at batch 1 (every symbolic input dimension set to 1):

- Conv: 2 x output elements x (input channels / groups) x kernel area (a multiply-add is 2
  FLOPs), plus one add per output element for the bias; depthwise convolutions are the
  ``groups == channels`` case of the same formula.
- ConvTranspose: 2 x input elements x (output channels / groups) x kernel area, plus bias.
- Gemm: 2 x M x N x K, plus M x N for the bias C; MatMul: 2 x output elements x K.
- MaxPool, AveragePool, LpPool: output elements x kernel area (one operation per window
  element); global pools, reductions and ArgMax/ArgMin: input elements.
- elementwise arithmetic, activations, Softmax and normalisations: one per output element.
- data movement (Reshape, Flatten, Transpose, Concat, Gather, Cast, ...), shape
  computations, constants, ``ai.onnx.ml`` operators (tree ensembles, ...) and operators
  not named here: 0.

It is meant for comparing cut points of one model (how much of its compute a head keeps),
not as a measurement; the risk advisor measures latency separately.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx.utils
from onnx import helper, shape_inference

__all__ = [
    "CompositionError",
    "CompositionReport",
    "Cut",
    "OutputDiff",
    "PartitionError",
    "Split",
    "candidate_cuts",
    "check_composition",
    "model_flops",
    "random_samples",
    "resolve_cut",
    "split_and_check",
    "split_model",
]

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4


class PartitionError(ValueError):
    """A model cannot be cut where asked (or at all); the message says why and what can be."""


class CompositionError(PartitionError):
    """tail(head(x)) differs from the model beyond the tolerance; ``report`` has the figures."""

    def __init__(self, message: str, report: CompositionReport) -> None:
        super().__init__(message)
        self.report = report


Shape = tuple[int | str, ...]


@dataclass(frozen=True)
class Cut:
    """One cut point: the head computes ``tensor`` (produced by node ``node``), the tail the rest."""

    index: int  # K: the cut point's number in topological order, from 1
    tensor: str
    node: str  # the producing node's name ("" when the model leaves it unnamed)
    op_type: str
    shape: Shape  # symbolic dimensions by name ("?" when inference named none)
    dtype: str  # numpy name, e.g. "float32"
    head_flops: int
    total_flops: int
    feature_bytes: int | None  # the cut tensor's size per row (at batch 1); None when its shape is unknown

    @property
    def flop_share(self) -> float:
        """The head's share of the model's FLOPs (0 when the model counts none)."""
        return self.head_flops / self.total_flops if self.total_flops else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "tensor": self.tensor, "node": self.node, "op_type": self.op_type,
            "shape": list(self.shape), "dtype": self.dtype, "head_flops": self.head_flops,
            "total_flops": self.total_flops, "flop_share": self.flop_share, "feature_bytes": self.feature_bytes,
        }


@dataclass(frozen=True)
class OutputDiff:
    """How one graph output of tail(head(x)) compares with the model's."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_diff: float
    within_tolerance: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "max_abs_diff": self.max_abs_diff, "within_tolerance": self.within_tolerance}


@dataclass(frozen=True)
class CompositionReport:
    """tail(head(x)) against the whole model on the same rows (ONNX Runtime, CPU)."""

    cut: str  # the tensor between head and tail
    rows: int
    atol: float
    rtol: float
    feature_shape: tuple[int, ...]  # the cut tensor as the head produced it for these rows
    outputs: tuple[OutputDiff, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(o.within_tolerance for o in self.outputs)

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    def describe(self) -> str:
        """One line per output: its max abs difference and whether it is within the tolerance."""
        return "; ".join(
            f"output {o.name!r}: max |diff| {o.max_abs_diff:.3g}"
            + ("" if o.within_tolerance else f" > atol {self.atol:g} + rtol {self.rtol:g} x |expected|")
            for o in self.outputs
        )

    def to_dict(self) -> dict[str, Any]:
        return {"cut": self.cut, "rows": self.rows, "atol": self.atol, "rtol": self.rtol, "ok": self.ok,
                "max_abs_diff": self.max_abs_diff, "feature_shape": list(self.feature_shape),
                "outputs": [o.to_dict() for o in self.outputs]}


@dataclass(frozen=True)
class Split:
    """A checked split: ``tail(head(x))`` matched the model on the report's rows."""

    cut: Cut
    head: onnx.ModelProto
    tail: onnx.ModelProto
    report: CompositionReport


# ---- graph analysis -----------------------------------------------------------------------

def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the enclosing scope."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    refs: set[str] = set()
    for node in graph.node:
        refs.update(name for name in _node_inputs(node) if name not in defined)
        defined.update(node.output)
    return refs


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, including what its subgraphs (If, Loop, Scan) read from outside: a
    cut that leaves one of those in the head is no cut, although no edge shows it."""
    names = [name for name in node.input if name]
    for graph in _subgraphs(node):
        names.extend(sorted(_outer_refs(graph)))
    return names


def _dims(value: onnx.ValueInfoProto) -> Shape | None:
    t = value.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.tensor_type.shape.dim)


def _anonymous(dim: str) -> bool:
    # shape inference names the dimensions it cannot relate to a declared one unk__0, unk__1, ...
    return dim in ("", "?") or dim.startswith("unk__")


def _batch_name(model: onnx.ModelProto) -> str:
    """The name the model's inputs give their first dimension, or "batch"."""
    for value in model.graph.input:
        shape = _dims(value)
        if shape and isinstance(shape[0], str) and not _anonymous(shape[0]):
            return shape[0]
    return "batch"


def _fixed_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs have every symbolic dimension set to 1 (the FLOP count's batch 1)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            for d in value.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.dim_value = 1
    return fixed


def _infer(model: onnx.ModelProto, *, data_prop: bool = False) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, data_prop=data_prop)
    except Exception:  # a model inference cannot follow still has its declared shapes
        return model


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    g = model.graph
    weights = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    # before IR 4 initializers were also listed as graph inputs; they are weights, not inputs
    return [i.name for i in g.input if i.name not in weights]


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {v.name: v for v in (*g.input, *g.value_info, *g.output)}


class _Graph:
    """What cut finding needs: producers, which tensors depend on an input, shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.inputs = _graph_inputs(model)
        self.outputs = [o.name for o in g.output]
        self.nodes = list(g.node)
        self.node_inputs = [_node_inputs(n) for n in self.nodes]
        self.producer: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = i
        # tensors that depend on a graph input; the others (weights, Constant nodes, shapes
        # computed from weights) may be recomputed on either side of a cut
        self.live = set(self.inputs)
        for i, node in enumerate(self.nodes):
            if any(name in self.live for name in self.node_inputs[i]):
                self.live.update(name for name in node.output if name)

        self.inferred = _infer(model)
        self.values = _value_infos(self.inferred)
        # FLOPs and feature sizes at batch 1; data propagation resolves Reshape targets computed from shapes
        fixed = _infer(_fixed_batch(model), data_prop=True)
        self.fixed_shapes: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in g.initializer}
        for name, value in _value_infos(fixed).items():
            dims = _dims(value)
            if dims is not None and all(isinstance(d, int) and d > 0 for d in dims):
                self.fixed_shapes[name] = dims  # type: ignore[assignment]
        self.flops = [_node_flops(n, self.fixed_shapes.get) for n in self.nodes]

    def ancestors(self, targets: Iterable[str], stop: set[str]) -> tuple[set[int], set[str]]:
        """The nodes that compute ``targets``, walking back until ``stop`` or a graph input;
        and the graph inputs reached on the way."""
        nodes: set[int] = set()
        reached: set[str] = set()
        inputs = set(self.inputs)
        stack = list(targets)
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in stop:
                continue
            if name in inputs:
                reached.add(name)
                continue
            idx = self.producer.get(name)
            if idx is not None and idx not in nodes:
                nodes.add(idx)
                stack.extend(self.node_inputs[idx])
        return nodes, reached

    def is_cut(self, tensor: str) -> bool:
        if tensor not in self.live or tensor in self.inputs or tensor in self.outputs:
            return False
        tail_nodes, reached = self.ancestors(self.outputs, {tensor})
        # the tail must read the tensor (or it cuts nothing) and no graph input besides it
        return not reached and any(tensor in self.node_inputs[i] for i in tail_nodes)

    def dtype(self, tensor: str) -> str:
        value = self.values.get(tensor)
        if value is None or not value.type.HasField("tensor_type") or not value.type.tensor_type.elem_type:
            return "?"
        return np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name

    def cuts(self) -> list[Cut]:
        needed, _ = self.ancestors(self.outputs, set())
        total = sum(self.flops[i] for i in needed)
        found: list[Cut] = []
        for node in self.nodes:
            for tensor in node.output:
                if not tensor or not self.is_cut(tensor):
                    continue
                head, _ = self.ancestors([tensor], set())
                value = self.values.get(tensor)
                shape = _dims(value) if value is not None else None
                if shape and isinstance(shape[0], str) and _anonymous(shape[0]):
                    shape = (_batch_name(self.model), *shape[1:])  # as split_model declares it
                dtype = self.dtype(tensor)
                fixed = self.fixed_shapes.get(tensor)
                size = (math.prod(fixed) * np.dtype(dtype).itemsize
                        if fixed is not None and dtype != "?" else None)
                found.append(Cut(
                    index=len(found) + 1, tensor=tensor, node=node.name, op_type=node.op_type,
                    shape=shape if shape is not None else ("?",), dtype=dtype,
                    head_flops=sum(self.flops[j] for j in head), total_flops=total, feature_bytes=size,
                ))
        return found


# ---- FLOPs --------------------------------------------------------------------------------

_ELEMENTWISE = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "BatchNormalization", "BitShift",
    "Ceil", "Celu", "Clip", "Cos", "Cosh", "Div", "Elu", "Equal", "Erf", "Exp", "Floor", "Gelu", "Greater",
    "GreaterOrEqual", "HardSigmoid", "HardSwish", "Hardmax", "InstanceNormalization", "IsInf", "IsNaN", "LRN",
    "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Max", "Mean", "Min", "Mish",
    "Mod", "Mul", "Neg", "Not", "Or", "PRelu", "Pow", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid",
    "Sign", "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tan", "Tanh",
    "ThresholdedRelu", "Where", "Xor",
})
_WINDOWED = frozenset({"MaxPool", "AveragePool", "LpPool"})
_READ_ALL = frozenset({
    "ArgMax", "ArgMin", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare",
})


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _node_flops(node: onnx.NodeProto, shape: Callable[[str], tuple[int, ...] | None]) -> int:
    """Estimated FLOPs of one node at batch 1 (see the module docstring); 0 when a shape it needs is unknown."""
    if node.domain not in ("", "ai.onnx") or not node.output:
        return 0
    op = node.op_type
    out = shape(node.output[0])
    if out is None:
        return 0
    n_out = math.prod(out)
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if op == "Conv":
        w = shape(node.input[1])
        # weights are [C_out, C_in / groups, *kernel]: one multiply-add per weight per output pixel
        return 0 if w is None else 2 * n_out * math.prod(w[1:]) + (n_out if has_bias else 0)
    if op == "ConvTranspose":
        x, w = shape(node.input[0]), shape(node.input[1])
        # weights are [C_in, C_out / groups, *kernel]: each input pixel scatters into a window
        return 0 if x is None or w is None else 2 * math.prod(x) * math.prod(w[1:]) + (n_out if has_bias else 0)
    if op == "Gemm":
        a = shape(node.input[0])
        if a is None or len(a) != 2:
            return 0
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return 2 * n_out * k + (n_out if has_bias else 0)
    if op == "MatMul":
        a = shape(node.input[0])
        return 0 if not a else 2 * n_out * a[-1]
    if op in _WINDOWED:
        return n_out * math.prod(_attr(node, "kernel_shape", []) or [1])
    if op in _READ_ALL:
        x = shape(node.input[0])
        return 0 if x is None else math.prod(x)
    if op in _ELEMENTWISE:
        return n_out
    return 0


def model_flops(model: onnx.ModelProto) -> int:
    """The estimated FLOPs of one row through the model (see the module docstring)."""
    g = _Graph(model)
    needed, _ = g.ancestors(g.outputs, set())
    return sum(g.flops[i] for i in needed)


# ---- cuts and the split -------------------------------------------------------------------

def candidate_cuts(model: onnx.ModelProto) -> list[Cut]:
    """The model's single-tensor cut points in topological order (K = 1, 2, ...); empty when
    it has none (a tree ensemble, a model whose outputs come straight from its inputs' operator)."""
    return _Graph(model).cuts()


def _candidates_text(cuts: list[Cut], limit: int = 25) -> str:
    if not cuts:
        return "the model has no single-tensor cut point"
    shown = [f"K={c.index} {c.tensor!r} ({c.op_type})" for c in cuts[:limit]]
    more = f", ... and {len(cuts) - limit} more (bastion partition list)" if len(cuts) > limit else ""
    return "candidates: " + ", ".join(shown) + more


def resolve_cut(model: onnx.ModelProto, cut: str | int | Cut, cuts: list[Cut] | None = None) -> Cut:
    """The cut point named by ``cut``: a layer number K (int), a tensor name, or the name of the
    node that produces it; PartitionError, listing the candidates, when it is none."""
    cuts = candidate_cuts(model) if cuts is None else cuts
    if isinstance(cut, Cut):
        cut = cut.tensor
    if isinstance(cut, bool):  # a bool is an int to Python, never a layer number
        raise PartitionError(f"not a cut point: {cut!r}")
    if not cuts:
        raise PartitionError(
            "the model has no single-tensor cut point: no tensor lies on every path from its inputs to its "
            "outputs (a tree ensemble computes all its outputs in one operator), so it cannot be split in two"
        )
    if isinstance(cut, int):
        if 1 <= cut <= len(cuts):
            return cuts[cut - 1]
        raise PartitionError(f"no layer {cut}: the model has cut points K = 1..{len(cuts)}; {_candidates_text(cuts)}")
    by_tensor = {c.tensor: c for c in cuts}
    if cut in by_tensor:
        return by_tensor[cut]
    by_node = [c for c in cuts if c.node and c.node == cut]
    if len(by_node) == 1:
        return by_node[0]
    if len(by_node) > 1:
        raise PartitionError(f"node {cut!r} has several outputs that are cut points; name the tensor: "
                             + ", ".join(repr(c.tensor) for c in by_node))
    g = model.graph
    if any(o.name == cut for o in g.output):
        why = f"{cut!r} is a graph output: the tail would only pass it through"
    elif any(n.name == cut for n in g.node) or any(cut in n.output for n in g.node):
        why = (f"{cut!r} is in the graph but is not a cut point: the tail would need another tensor of the head "
               "too (a path from the inputs to the outputs bypasses it, as in a residual block)")
    elif any(t.name == cut for t in g.initializer):
        why = f"{cut!r} is a weight (initializer), not a tensor the model computes"
    elif any(i.name == cut for i in g.input):
        why = f"{cut!r} is a graph input: a cut there leaves the head empty"
    else:
        why = f"no tensor or node named {cut!r}"
    raise PartitionError(f"{why}; {_candidates_text(cuts)}")


def _symbolic_batch(inferred: onnx.ModelProto, tensor: str) -> None:
    """Name the cut tensor's first dimension after the batch when inference left it anonymous
    (or invented an ``unk__N``), so that head and tail declare a recognisable symbolic batch."""
    values = [v for v in inferred.graph.value_info if v.name == tensor]
    if not values or not values[0].type.tensor_type.HasField("shape"):
        return
    dims = values[0].type.tensor_type.shape.dim
    if dims and not dims[0].HasField("dim_value") and _anonymous(dims[0].dim_param):
        dims[0].dim_param = _batch_name(inferred)


def _finish(part: onnx.ModelProto, source: onnx.ModelProto, role: str, cut: Cut) -> onnx.ModelProto:
    g = part.graph
    io = {v.name for v in (*g.input, *g.output)}
    # the extractor copies the io's value_info in as well; an io tensor needs only its io entry
    keep = [v for v in g.value_info if v.name not in io]
    del g.value_info[:]
    g.value_info.extend(keep)
    g.name = f"{source.graph.name or 'model'}_{role}"
    part.producer_name = "bastion partition"
    part.doc_string = f"{role} of {source.graph.name or 'the model'} cut at {cut.tensor!r} (K={cut.index})"
    part.model_version = source.model_version
    for prop in source.metadata_props:
        # a part of a part (a tail split again) says only where its own cut is
        if not prop.key.startswith("bastion.partition."):
            part.metadata_props.add(key=prop.key, value=prop.value)
    part.metadata_props.add(key="bastion.partition.role", value=role)
    part.metadata_props.add(key="bastion.partition.cut", value=cut.tensor)
    part.metadata_props.add(key="bastion.partition.layer", value=str(cut.index))
    return part


def split_model(model: onnx.ModelProto, cut: str | int | Cut) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Cut ``model`` at a cut point (K, tensor name or node name) into (head, tail), with
    ``onnx.utils.Extractor``: the head maps the model's inputs to the cut tensor, the tail maps
    the cut tensor to the model's outputs; both keep the model's IR version, opsets and
    symbolic batch dimension, and carry only the initializers they use. Both pass
    ``onnx.checker``. The split is not checked numerically; see ``split_and_check``."""
    g = _Graph(model)
    return _split(g, resolve_cut(model, cut, g.cuts()))


def _split(g: _Graph, chosen: Cut) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    inferred = onnx.ModelProto()
    inferred.CopyFrom(g.inferred)
    if chosen.tensor not in {v.name for v in inferred.graph.value_info}:
        raise PartitionError(f"shape inference found no type for {chosen.tensor!r}: the head's output cannot be "
                             "declared (an operator ONNX cannot infer through?)")
    _symbolic_batch(inferred, chosen.tensor)
    extractor = onnx.utils.Extractor(inferred)
    head = _finish(extractor.extract_model(g.inputs, [chosen.tensor]), g.model, "head", chosen)
    tail = _finish(extractor.extract_model([chosen.tensor], g.outputs), g.model, "tail", chosen)
    for role, part in (("head", head), ("tail", tail)):
        try:
            onnx.checker.check_model(part, full_check=True)
        except onnx.checker.ValidationError as err:
            raise PartitionError(f"the {role} at {chosen.tensor!r} is not a valid ONNX model: {err}") from err
    return head, tail


# ---- the composition check ----------------------------------------------------------------

def _session(model: onnx.ModelProto) -> Any:
    from bastion.runtimes.onnx_runtime import ort  # telemetry off, as in the server

    opts = ort.SessionOptions()
    # one thread: the check runs a few rows, beside servers and tests on shared cores
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    if got.size == 0:
        return 0.0
    if got.dtype.kind in "fc" or want.dtype.kind in "fc":
        a, b = got.astype(np.float64), want.astype(np.float64)
        both_nan = np.isnan(a) & np.isnan(b)
        diff = np.where(both_nan, 0.0, np.abs(a - b))
        return float(np.nan_to_num(diff, nan=np.inf).max())
    if got.dtype.kind in "iub" and want.dtype.kind in "iub":
        return float(np.abs(got.astype(np.int64) - want.astype(np.int64)).max())
    return 0.0 if np.array_equal(got, want) else math.inf


def check_composition(
    model: onnx.ModelProto,
    head: onnx.ModelProto,
    tail: onnx.ModelProto,
    samples: Mapping[str, np.ndarray],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> CompositionReport:
    """Run the model and tail(head(x)) on ``samples`` (arrays named after the model's inputs;
    others are ignored) with ONNX Runtime on the CPU, and compare every output: within the
    tolerance when ``|got - expected| <= atol + rtol * |expected|`` everywhere (numpy's
    ``allclose``, NaN equal to NaN)."""
    inputs = _graph_inputs(model)
    missing = [name for name in inputs if name not in samples]
    if missing:
        raise PartitionError(f"samples lack the model's input(s) {missing} (they have {sorted(samples)})")
    feed = {name: np.asarray(samples[name]) for name in inputs}
    rows = int(next(iter(feed.values())).shape[0]) if feed and next(iter(feed.values())).ndim else 1
    whole = _session(model)
    out_names = [o.name for o in whole.get_outputs()]
    want = dict(zip(out_names, whole.run(out_names, feed), strict=True))
    h = _session(head)
    h_feed = {i.name: feed[i.name] for i in h.get_inputs()}
    (feature,) = h.run(None, h_feed)
    t = _session(tail)
    (t_input,) = t.get_inputs()
    got = dict(zip(out_names, t.run(out_names, {t_input.name: feature}), strict=True))

    diffs = []
    for name in out_names:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        if a.shape != b.shape:
            diffs.append(OutputDiff(name, tuple(a.shape), a.dtype.name, math.inf, False))
            continue
        diff = _max_abs_diff(a, b)
        if a.dtype.kind in "fc" or b.dtype.kind in "fc":
            within = bool(np.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True))
        else:
            within = diff <= atol  # integers and labels: equal (for any tolerance below 1)
        diffs.append(OutputDiff(name, tuple(b.shape), b.dtype.name, diff, within))
    return CompositionReport(cut=t_input.name, rows=rows, atol=atol, rtol=rtol,
                             feature_shape=tuple(feature.shape), outputs=tuple(diffs))


def split_and_check(
    model: onnx.ModelProto,
    cut: str | int | Cut,
    samples: Mapping[str, np.ndarray],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> Split:
    """``split_model`` then ``check_composition``; CompositionError (with the report) when any
    output of tail(head(x)) differs from the model's beyond the tolerance."""
    chosen = resolve_cut(model, cut)
    head, tail = split_model(model, chosen)
    report = check_composition(model, head, tail, samples, atol=atol, rtol=rtol)
    if not report.ok:
        raise CompositionError(
            f"refusing the split at {chosen.tensor!r} (K={chosen.index}): tail(head(x)) differs from the model on "
            f"{report.rows} row(s): {report.describe()}",
            report,
        )
    return Split(chosen, head, tail, report)


def random_samples(model: onnx.ModelProto, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``rows`` random rows for every model input, of its declared shape and dtype: floats from
    N(0, 1), integers from [0, 10), booleans fair. The first dimension is the batch; any other
    symbolic dimension has no size to draw, and is refused (pass sample data instead)."""
    rng = np.random.default_rng(seed)
    values = {v.name: v for v in model.graph.input}
    out: dict[str, np.ndarray] = {}
    for name in _graph_inputs(model):
        value = values[name]
        shape = _dims(value)
        if shape is None or not value.type.tensor_type.elem_type:
            raise PartitionError(f"input {name!r} declares no tensor shape or type: pass sample data")
        first, rest = (shape[0], shape[1:]) if shape else (None, ())
        if any(not isinstance(d, int) for d in rest):
            raise PartitionError(f"input {name!r} has the shape {list(shape)}: only its first (batch) dimension may "
                                 "be symbolic to draw random rows; pass sample data")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        # a fixed first dimension (a model exported for batch 1) is kept; a symbolic one is the rows
        size = ((first if isinstance(first, int) and first > 0 else rows), *rest) if shape else ()
        if dtype.kind == "f":
            out[name] = rng.standard_normal(size).astype(dtype)
        elif dtype.kind in "iu":
            out[name] = rng.integers(0, 10, size).astype(dtype)
        elif dtype.kind == "b":
            out[name] = rng.random(size) < 0.5
        else:
            raise PartitionError(f"input {name!r} is {dtype}: no random data for it; pass sample data")
    return out
