"""Cut points, FLOP shares, the split and its composition check (bastion.confidential.partition.graph)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bastion.confidential.partition import graph
from bastion.confidential.partition.graph import (
    CompositionError,
    Cut,
    PartitionError,
    candidate_cuts,
    check_composition,
    model_flops,
    random_samples,
    resolve_cut,
    split_and_check,
    split_model,
)
from tests.conftest import BuiltScenario
from tests.partition import graphs

BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "chain": graphs.chain, "residual": graphs.residual, "two_inputs": graphs.two_inputs,
    "tree_with_cast": lambda: graphs.tree_ensemble(cast=True),
}
IMAGE_VARIANTS = ("image_cnn", "image_mobilenet", "image_cnn_small")


def _inputs(model: onnx.ModelProto) -> list[str]:
    weights = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in weights]


def _check_parts(model: onnx.ModelProto, cut: Cut, head: onnx.ModelProto, tail: onnx.ModelProto) -> None:
    """What every split must be: the right interface, the source's IR and opsets, a symbolic
    batch across the cut, only the weights each part uses, valid ONNX, FLOPs that add up."""
    assert [v.name for v in head.graph.input] == _inputs(model)
    assert [v.name for v in head.graph.output] == [cut.tensor]
    assert [v.name for v in tail.graph.input] == [cut.tensor]
    assert [v.name for v in tail.graph.output] == [v.name for v in model.graph.output]
    assert head.graph.output[0].type == tail.graph.input[0].type
    batch = tail.graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch.HasField("dim_value") and batch.dim_param, "the batch dimension must stay symbolic"
    source_weights = {t.name: t for t in model.graph.initializer}
    for part in (head, tail):
        onnx.checker.check_model(part, full_check=True)
        assert part.ir_version == model.ir_version
        assert list(part.opset_import) == list(model.opset_import)
        used = {name for node in part.graph.node for name in node.input}
        for weight in part.graph.initializer:
            assert weight.name in used, f"{weight.name} is carried but not used"
            assert weight == source_weights[weight.name]
    assert model_flops(head) == cut.head_flops
    assert model_flops(tail) == cut.total_flops - cut.head_flops


# ---- small graphs built here ----------------------------------------------------------------

def test_chain_cuts_shapes_and_flops() -> None:
    model = graphs.chain()
    cuts = candidate_cuts(model)
    assert [(c.index, c.tensor, c.node, c.op_type) for c in cuts] == [
        (1, "conv", "conv0", "Conv"), (2, "relu", "relu0", "Relu"), (3, "flat", "flatten0", "Flatten")]
    assert [c.shape for c in cuts] == [("N", 2, 4, 4), ("N", 2, 4, 4), ("N", 32)]
    assert {c.dtype for c in cuts} == {"float32"}
    # Conv 2*32*9 + 32 bias, Relu 32, Flatten 0, Gemm 2*3*32 + 3 bias (see tests/partition/graphs.py)
    assert [c.head_flops for c in cuts] == [608, 640, 640]
    assert {c.total_flops for c in cuts} == {835} and model_flops(model) == 835
    assert cuts[0].flop_share == pytest.approx(608 / 835)
    assert [c.feature_bytes for c in cuts] == [128, 128, 128]
    assert cuts[1].to_dict()["flop_share"] == pytest.approx(640 / 835)


def test_no_cut_inside_a_residual_block() -> None:
    model = graphs.residual()
    cuts = candidate_cuts(model)
    assert [c.tensor for c in cuts] == ["a", "r", "s"]  # not b: the Add also needs r
    # the depthwise conv (groups = 2): 2 * 32 outputs * 9 weights each + 32 bias; then the Add
    assert cuts[2].head_flops - cuts[1].head_flops == 2 * 32 * 9 + 32 + 32
    for name in ("b", "conv_b"):
        with pytest.raises(PartitionError, match=r"not a cut point.*residual") as err:
            split_model(model, name)
        assert "candidates: K=1 'a' (Conv), K=2 'r' (Relu), K=3 's' (Add)" in str(err.value)


def test_two_inputs_cut_only_where_both_joined() -> None:
    model = graphs.two_inputs()
    cuts = candidate_cuts(model)
    # before the Concat, x2 bypasses the head; 'p' is a graph output (label is computed from it)
    assert [c.tensor for c in cuts] == ["cat", "logits"]
    head, tail = split_model(model, "cat")
    assert [v.name for v in head.graph.input] == ["x1", "x2"]
    samples = random_samples(model, 16, seed=3)
    report = check_composition(model, head, tail, samples)
    assert report.ok and report.max_abs_diff == 0.0
    assert [o.name for o in report.outputs] == ["p", "label"]
    assert report.outputs[1].dtype == "int64"
    assert report.feature_shape == (16, 8)
    for name in ("h", "relu"):
        with pytest.raises(PartitionError, match="not a cut point"):
            resolve_cut(model, name)


def test_tree_ensemble_has_no_cut_point() -> None:
    model = graphs.tree_ensemble()
    assert candidate_cuts(model) == []
    assert model_flops(model) == 0  # ai.onnx.ml operators count 0
    with pytest.raises(PartitionError, match="no single-tensor cut point"):
        split_model(model, 1)
    # a Cast in front is a cut (0 FLOPs on either side, share 0), and composes exactly
    with_cast = graphs.tree_ensemble(cast=True)
    (cut,) = candidate_cuts(with_cast)
    assert (cut.tensor, cut.total_flops, cut.flop_share) == ("cast", 0, 0.0)
    result = split_and_check(with_cast, 1, random_samples(with_cast, 8))
    assert result.report.ok and result.report.max_abs_diff == 0.0


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_cut_of_the_small_graphs_splits_and_composes(name: str) -> None:
    model = BUILDERS[name]()
    samples = random_samples(model, 8, seed=1)
    cuts = candidate_cuts(model)
    assert cuts
    for cut in cuts:
        result = split_and_check(model, cut.index, samples)
        assert result.cut == cut
        assert result.report.ok and result.report.max_abs_diff <= 1e-5
        _check_parts(model, cut, result.head, result.tail)


def test_split_by_layer_tensor_or_node_is_the_same_split() -> None:
    model = graphs.chain()
    by_k = split_model(model, 2)
    for cut in ("relu", "relu0", candidate_cuts(model)[1]):
        head, tail = split_model(model, cut)
        assert head.SerializeToString() == by_k[0].SerializeToString()
        assert tail.SerializeToString() == by_k[1].SerializeToString()
    meta = {p.key: p.value for p in by_k[1].metadata_props}
    assert meta == {"bastion.partition.role": "tail", "bastion.partition.cut": "relu", "bastion.partition.layer": "2"}


def test_a_tail_splits_again() -> None:
    model = graphs.chain()
    _, tail = split_model(model, 1)
    cuts = candidate_cuts(tail)
    assert [c.tensor for c in cuts] == ["relu", "flat"]
    mid, rest = split_model(tail, "flat")
    assert {p.key: p.value for p in rest.metadata_props}["bastion.partition.cut"] == "flat"
    assert len(rest.metadata_props) == 3
    x = random_samples(model, 4)
    head = split_model(model, 1)[0]
    feature = {"conv": graph._session(head).run(None, x)[0]}
    assert check_composition(tail, mid, rest, feature).max_abs_diff == 0.0


@pytest.mark.parametrize(("cut", "message"), [
    ("nope", "no tensor or node named 'nope'"),
    ("x", "'x' is a graph input"),
    ("y", "'y' is a graph output"),
    (0, "no layer 0: the model has cut points K = 1..3"),
    (4, "no layer 4"),
])
def test_bad_cut_names_are_refused_with_the_candidates(cut: str | int, message: str) -> None:
    with pytest.raises(PartitionError) as err:
        split_model(graphs.chain(), cut)
    text = str(err.value)
    assert message in text
    assert "candidates: K=1 'conv' (Conv), K=2 'relu' (Relu), K=3 'flat' (Flatten)" in text


def _broken_tail(tail: onnx.ModelProto) -> onnx.ModelProto:
    """The tail with its first weight changed by +0.5: what a tampered or mis-cut tail looks like."""
    broken = onnx.ModelProto()
    broken.CopyFrom(tail)
    weight = broken.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + np.float32(0.5), weight.name))
    return broken


def test_a_broken_tail_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = graphs.chain()
    samples = random_samples(model, 8)
    head, tail = split_model(model, 2)
    report = check_composition(model, head, _broken_tail(tail), samples)
    assert not report.ok and report.max_abs_diff > 1e-3
    assert "output 'y': max |diff|" in report.describe() and "> atol 1e-05 + rtol 0.0001" in report.describe()

    real = graph.split_model
    monkeypatch.setattr(graph, "split_model", lambda m, c: (lambda h, t: (h, _broken_tail(t)))(*real(m, c)))
    with pytest.raises(CompositionError) as err:
        split_and_check(model, "relu", samples)
    assert "refusing the split at 'relu' (K=2)" in str(err.value)
    assert "on 8 row(s): output 'y': max |diff|" in str(err.value)
    assert not err.value.report.ok and err.value.report.to_dict()["ok"] is False


def test_composition_tolerance() -> None:
    model = graphs.chain()
    samples = random_samples(model, 8)
    head, tail = split_model(model, 3)
    nudged = onnx.ModelProto()
    nudged.CopyFrom(tail)
    bias = next(t for t in nudged.graph.initializer if t.name == "fc_b")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(2e-6), "fc_b"))
    loose = check_composition(model, head, nudged, samples)
    assert loose.ok and 0 < loose.max_abs_diff < 1e-5
    strict = check_composition(model, head, nudged, samples, atol=1e-9, rtol=0.0)
    assert not strict.ok and strict.max_abs_diff == loose.max_abs_diff


def test_samples_must_cover_the_inputs() -> None:
    model = graphs.two_inputs()
    head, tail = split_model(model, 1)
    with pytest.raises(PartitionError, match=r"lack the model's input\(s\) \['x2'\]"):
        check_composition(model, head, tail, {"x1": np.zeros((2, 4), np.float32)})


def test_random_samples() -> None:
    model = graphs.two_inputs()
    a, b = random_samples(model, 5, seed=7), random_samples(model, 5, seed=7)
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {"x1": ((5, 4), np.float32), "x2": ((5, 3), np.float32)}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["x1"], random_samples(model, 5, seed=8)["x1"])
    odd = graphs.chain()
    odd.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(PartitionError, match=r"only its first \(batch\) dimension may be symbolic"):
        random_samples(odd, 2)


# ---- the scenario models --------------------------------------------------------------------

@pytest.mark.parametrize("variant", IMAGE_VARIANTS)
def test_every_cut_of_the_image_scenario_composes_exactly(image_scenario: BuiltScenario, variant: str) -> None:
    repo = image_scenario.repo
    model = onnx.load(str(repo / variant / "1" / "model.onnx"))
    with np.load(repo / "image" / "eval.npz") as data:
        digits = data["image"][:32]
    noise = random_samples(model, 16, seed=0)["image"]
    samples = {"image": np.concatenate([digits, noise])}
    cuts = candidate_cuts(model)
    assert len(cuts) >= 5
    shares = [c.flop_share for c in cuts]
    assert shares == sorted(shares) and shares[0] > 0 and shares[-1] == pytest.approx(1.0, abs=1e-3)
    assert cuts[0].op_type == "Conv" and cuts[-1].op_type == "Gemm"
    assert all(c.shape[0] == "batch" for c in cuts)
    for cut in cuts:
        result = split_and_check(model, cut.index, samples, atol=1e-5, rtol=0.0)
        assert result.report.max_abs_diff <= 1e-5, (cut, result.report)
        assert result.report.rows == 48 and result.report.feature_shape == (48, *cut.shape[1:])
        _check_parts(model, cut, result.head, result.tail)


def test_no_cut_inside_the_mobilenet_residual_blocks(image_scenario: BuiltScenario) -> None:
    model = onnx.load(str(image_scenario.repo / "image_mobilenet" / "1" / "model.onnx"))
    cut_tensors = {c.tensor for c in candidate_cuts(model)}
    nodes = list(model.graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    adds = [i for i, n in enumerate(nodes) if n.op_type == "Add"]
    assert len(adds) == 2  # the two stride-1 blocks with as many channels in as out
    for i in adds:
        skip = min(producer[name] for name in nodes[i].input)
        inside = {out for n in nodes[skip + 1:i] for out in n.output}
        assert nodes[i].output[0] in cut_tensors and nodes[skip].output[0] in cut_tensors
        assert not inside & cut_tensors, f"cut inside the block ending at {nodes[i].name}"


@pytest.fixture(scope="module")
def malware_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The malware scenario at its TINY size (about 2 s): its MLP and tree ensembles are the real converters' graphs."""
    from bastion.scenarios import malware

    out = tmp_path_factory.mktemp("malware") / "repo"
    malware.build(out, sizes=malware.TINY)
    return out


def test_malware_scenario(malware_repo: Path) -> None:
    mlp = onnx.load(str(malware_repo / "malware_mlp" / "1" / "model.onnx"))
    cuts = candidate_cuts(mlp)
    assert [c.op_type for c in cuts][:4] == ["Cast", "MatMul", "Add", "Relu"]
    assert cuts[1].flop_share > 0.99  # the 1000 -> 32 layer is almost all of it
    assert all(c.shape[0] == "batch" for c in cuts)  # skl2onnx leaves the batch dimension unnamed
    with np.load(malware_repo / "malware" / "eval.npz") as data:
        samples = {"features": data["features"][:32]}
    for cut in cuts:
        result = split_and_check(mlp, cut.index, samples)
        assert result.report.max_abs_diff <= 1e-5, (cut, result.report)
        _check_parts(mlp, cut, result.head, result.tail)
    for trees in ("malware_gbt_small", "malware_gbt_large"):
        assert candidate_cuts(onnx.load(str(malware_repo / trees / "1" / "model.onnx"))) == []
