"""``bastion partition list`` and ``bastion partition split``, in process through the ``bastion`` group."""

from __future__ import annotations

import hashlib
import html
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import numpy_helper

from bastion.cli.main import cli
from bastion.confidential.partition import graph
from tests.conftest import BuiltScenario
from tests.partition import graphs


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["partition", *args])


@pytest.fixture
def chain_file(tmp_path: Path) -> Path:
    path = tmp_path / "chain.onnx"
    onnx.save(graphs.chain(), str(path))
    return path


def _run_split(folder: Path, x: np.ndarray) -> np.ndarray:
    from bastion.runtimes.onnx_runtime import ort

    head = ort.InferenceSession(str(folder / "head.onnx"), providers=["CPUExecutionProvider"])
    tail = ort.InferenceSession(str(folder / "tail.onnx"), providers=["CPUExecutionProvider"])
    (feature,) = head.run(None, {"x": x})
    return tail.run(None, {tail.get_inputs()[0].name: feature})[0]


def test_list_table_and_json(chain_file: Path) -> None:
    result = _run("list", str(chain_file))
    assert result.exit_code == 0, result.output
    assert "3 cut points, 835 FLOPs per row" in result.output
    lines = result.output.splitlines()
    row = next(line for line in lines if line.split()[:2] == ["2", "relu"])
    assert row.split() == ["2", "relu", "Relu", "[N,", "2,", "4,", "4]", f"{100 * 640 / 835:.2f}", "128"]

    result = _run("list", str(chain_file), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["total_flops"] == 835
    assert doc["cuts"] == [c.to_dict() for c in graph.candidate_cuts(graphs.chain())]


def test_list_a_model_without_cut_point(tmp_path: Path) -> None:
    path = tmp_path / "trees.onnx"
    onnx.save(graphs.tree_ensemble(), str(path))
    result = _run("list", str(path))
    assert result.exit_code == 0, result.output
    assert "has no single-tensor cut point" in result.output and "cannot be split" in result.output
    assert json.loads(_run("list", str(path), "--json").output)["cuts"] == []
    result = _run("split", str(path), "--after-layer", "1", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "no single-tensor cut point" in result.output


def test_split_writes_head_tail_and_record(chain_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    result = _run("split", str(chain_file), "--after-layer", "2", "--out", str(out), "--rows", "16")
    assert result.exit_code == 0, result.output
    assert "cut K=2 at 'relu' (Relu), shape [N, 2, 4, 4]" in result.output
    assert "composition on 16 random rows: max |diff| 0" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["head.onnx", "split.json", "tail.onnx"]

    record = json.loads((out / "split.json").read_text())
    assert record["source"]["sha256"] == hashlib.sha256(chain_file.read_bytes()).hexdigest()
    assert datetime.fromisoformat(record["created"].replace("Z", "+00:00")).tzinfo is not None
    assert record["cut"] == graph.candidate_cuts(graphs.chain())[1].to_dict()
    assert record["head"]["sha256"] == hashlib.sha256((out / "head.onnx").read_bytes()).hexdigest()
    assert record["head"]["outputs"] == [{"name": "relu", "dtype": "float32", "shape": ["N", 2, 4, 4]}]
    assert record["tail"]["inputs"] == record["head"]["outputs"]
    assert record["tail"]["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["N", 3]}]
    assert (record["head"]["flops"], record["tail"]["flops"]) == (640, 195)
    comp = record["composition"]
    assert comp["ok"] and comp["max_abs_diff"] == 0.0 and comp["rows"] == 16 and comp["samples"] == "random"
    assert (comp["atol"], comp["rtol"], comp["seed"]) == (1e-5, 1e-4, 0)
    assert comp["outputs"] == [{"name": "y", "shape": [16, 3], "dtype": "float32", "max_abs_diff": 0.0,
                                "within_tolerance": True}]

    # the files are the split the library makes, and they compose on rows of any batch size
    head, tail = graph.split_model(graphs.chain(), 2)
    assert (out / "head.onnx").read_bytes() == head.SerializeToString()
    assert (out / "tail.onnx").read_bytes() == tail.SerializeToString()
    x = np.random.default_rng(5).standard_normal((3, 1, 4, 4)).astype(np.float32)
    from bastion.runtimes.onnx_runtime import ort

    whole = ort.InferenceSession(str(chain_file), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(_run_split(out, x), whole.run(None, {"x": x})[0])


@pytest.mark.parametrize("at", ["relu", "relu0"])
def test_split_at_a_tensor_or_node_with_samples(chain_file: Path, tmp_path: Path, at: str) -> None:
    samples = tmp_path / "samples.npz"
    # float64 rows and a label array the check does not need: cast and ignored
    np.savez(samples, x=np.random.default_rng(1).standard_normal((50, 1, 4, 4)), y=np.zeros(50))
    out = tmp_path / "split"
    result = _run("split", str(chain_file), "--at", at, "--out", str(out), "--samples", str(samples), "--rows", "20")
    assert result.exit_code == 0, result.output
    comp = json.loads((out / "split.json").read_text())["composition"]
    assert (comp["rows"], comp["samples"], comp["seed"], comp["ok"]) == (20, str(samples), None, True)
    assert "composition on 20 rows" in result.output


def test_split_usage_errors(chain_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    both = _run("split", str(chain_file), "--at", "relu", "--after-layer", "1", "--out", str(out))
    neither = _run("split", str(chain_file), "--out", str(out))
    for result in (both, neither):
        assert result.exit_code == 2 and "exactly one of --at TENSOR_OR_NODE and --after-layer K" in result.output

    bad = _run("split", str(chain_file), "--at", "nope", "--out", str(out))
    assert bad.exit_code == 2
    assert "no tensor or node named 'nope'" in bad.output and "K=3 'flat' (Flatten)" in bad.output
    weight = _run("split", str(chain_file), "--at", "conv_w", "--out", str(out))
    assert weight.exit_code == 2 and "'conv_w' is a weight (initializer)" in weight.output
    high = _run("split", str(chain_file), "--after-layer", "9", "--out", str(out))
    assert high.exit_code == 2 and "no layer 9" in high.output

    samples = tmp_path / "wrong.npz"
    np.savez(samples, image=np.zeros((2, 1, 4, 4), np.float32))
    wrong = _run("split", str(chain_file), "--after-layer", "1", "--out", str(out), "--samples", str(samples))
    assert wrong.exit_code == 2 and "no array for the input(s) ['x']" in wrong.output

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert _run("list", str(junk)).exit_code == 1
    assert not out.exists()


def test_split_with_a_broken_tail_is_refused(chain_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = graph.split_model

    def tampered(model: onnx.ModelProto, cut: object) -> tuple[onnx.ModelProto, onnx.ModelProto]:
        head, tail = real(model, cut)  # type: ignore[arg-type]
        weight = tail.graph.initializer[0]
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.01), weight.name))
        return head, tail

    monkeypatch.setattr(graph, "split_model", tampered)
    out = tmp_path / "split"
    result = _run("split", str(chain_file), "--after-layer", "3", "--out", str(out))
    assert result.exit_code == 1
    assert "refusing the split at 'flat' (K=3)" in result.output
    assert "output 'y': max |diff|" in result.output and "> atol 1e-05 + rtol 0.0001" in result.output
    assert not out.exists()


def test_scenario_models(image_scenario: BuiltScenario, tmp_path: Path) -> None:
    repo = image_scenario.repo
    for variant, n_cuts in (("image_cnn", 12), ("image_mobilenet", 19)):
        result = _run("list", str(repo / variant / "1" / "model.onnx"))
        assert result.exit_code == 0, result.output
        assert f"{n_cuts} cut points" in result.output
        assert "/inner/inner.0/Conv_output_0" in result.output and "[batch, 10]" in result.output

    out = tmp_path / "mobilenet"
    result = _run("split", str(repo / "image_mobilenet" / "1" / "model.onnx"), "--at", "/inner/inner.3/Add",
                  "--out", str(out), "--samples", str(repo / "image" / "eval.npz"), "--rows", "64")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "split.json").read_text())
    assert record["cut"]["index"] == 3 and record["cut"]["shape"] == ["batch", 16, 8, 8]
    assert record["composition"]["rows"] == 64 and record["composition"]["max_abs_diff"] <= 1e-5
    assert [o["name"] for o in record["tail"]["outputs"]] == ["probabilities", "label"]


def test_package_seals_the_head_and_keeps_the_tail_plain(chain_file: Path, tmp_path: Path) -> None:
    """`bastion partition package`: a model directory in, the served layout out; the worker
    (in process here) loads the head and tail(head(x)) is the model's answer."""
    import asyncio

    import yaml

    from bastion.confidential.tensor_codec import decode_tensors, encode_tensors
    from bastion.confidential.worker import TrustedWorker, build_identity
    from bastion.confidential.worker_config import WorkerConfig
    from bastion.guard.bundles import generate_signing_key, write_private_key, write_public_key
    from bastion.guard.keyproviders import generate_master_key, load_key_provider, write_master_key
    from bastion.runtimes.onnx_runtime import ort

    plain = tmp_path / "plain" / "chain"
    (plain / "1").mkdir(parents=True)
    (plain / "1" / "model.onnx").write_bytes(chain_file.read_bytes())
    # a config that declares the whole model's signature: the head's sealed copy must not
    # claim the whole model's outputs (its outputs are the features), the public one keeps them
    (plain / "config.yaml").write_text(yaml.safe_dump({
        "runtime": "onnx", "max_batch_size": 16,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 4, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}))
    key, signer = tmp_path / "master.key", tmp_path / "signer.pem"
    write_master_key(key, generate_master_key())
    signing = generate_signing_key()
    write_private_key(signing, signer)
    write_public_key(signing.public_key(), tmp_path / "signer.pub")
    out = tmp_path / "repo" / "chain_part"
    result = _run("package", str(plain), "--after-layer", "2", "--out", str(out), "--key-id", "k",
                  "--signing-key", str(signer), "--key-provider", f"file:{key}", "--e2e", "optional")
    assert result.exit_code == 0, result.output
    assert "K=2" in result.output and "(sealed)" in result.output
    public = yaml.safe_load((out / "config.yaml").read_text())
    assert public["confidential"] == {"e2e": "optional", "tail": "tail.onnx"}
    assert public["outputs"][0]["name"] == "y"
    head_in_clear = graph.split_model(onnx.load(str(chain_file)), 2)[0].SerializeToString()
    assert head_in_clear not in (out / "1" / "model.bundle").read_bytes()
    tail = onnx.load(str(out / "1" / "tail.onnx"))
    assert tail.metadata_props  # bastion.partition.* metadata from the split

    config = WorkerConfig(attestation="dev", key_provider=f"file:{key}", trusted_signers=(tmp_path / "signer.pub",))
    worker = TrustedWorker(config, build_identity(config), load_key_provider(f"file:{key}"))
    x = np.random.default_rng(3).normal(size=(4, *chain_shape(chain_file))).astype(np.float32)

    async def run() -> dict[str, np.ndarray]:
        reply = await worker.dispatch({"op": "load", "model": "chain_part", "version": 1,
                                       "bundle": (out / "1" / "model.bundle").read_bytes()})
        assert reply["head"] is True
        answer = await worker.dispatch({"op": "infer", "model": "chain_part", "version": 1,
                                        "inputs": encode_tensors({"x": x})})
        return decode_tensors(answer["outputs"])

    features = asyncio.run(run())
    tail_session = ort.InferenceSession(str(out / "1" / "tail.onnx"), providers=["CPUExecutionProvider"])
    got = tail_session.run(None, {k: np.asarray(v) for k, v in features.items()})[0]
    whole = ort.InferenceSession(str(chain_file), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5)


def chain_shape(path: Path) -> tuple[int, ...]:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[1:]
    return tuple(d.dim_value for d in dims)


def test_advise_writes_a_report_with_a_recommendation(image_scenario: BuiltScenario, tmp_path: Path) -> None:
    """`bastion partition advise --quick` on the image CNN, two cuts: the report, the JSON and the
    plots are written, every cut is measured, and the recommendation follows the thresholds."""
    repo = image_scenario.repo
    model = repo / "image_cnn" / "1" / "model.onnx"
    data = repo / "image" / "eval.npz"
    out = tmp_path / "advice"
    base = ["advise", str(model), "--data", str(data), "--kind", "image", "--cuts", "2,12", "--quick",
            "--attacks", "pgd", "--rows", "240"]
    result = _run(*base, "--out", str(out), "--max-recon", "1", "--max-attack", "1")
    assert result.exit_code == 0, result.output
    advice = json.loads((out / "advice.json").read_text())
    assert [c["cut"]["index"] for c in advice["cuts"]] == [2, 12]
    assert advice["recommended"] == 2  # everything passes thresholds of 1: the shallowest cut
    early, late = advice["cuts"]
    assert early["flop_share"] < 0.05 < 0.95 < late["flop_share"]
    # the features of the first conv give the input back much better than the logits do
    assert early["reconstruction"]["decoder"]["ssim"] > late["reconstruction"]["decoder"]["ssim"]
    for name in ("report.md", "report.html", "risk.png", "reconstruction-K2.png"):
        assert (out / name).stat().st_size > 0
    page = (out / "report.html").read_text()
    assert '<tr class="rec"><td>2</td>' in page and 'src="reconstruction-K2.png"' in page
    # the HTML re-rendered from advice.json alone is the page the run wrote
    from bastion.confidential.partition.advice_report import load_advice, render_html

    pictures = [out / "reconstruction-K2.png", out / "reconstruction-K12.png"]
    command = page.split("Command: ", 1)[1].split("</p>", 1)[0]
    assert render_html(load_advice(out / "advice.json"), command=html.unescape(command), pictures=pictures) == page
    # the same measurements under stricter thresholds (recommend is what advise applies)
    from bastion.confidential.partition.advise import CutRisk, recommend

    risks = [CutRisk(**c) for c in advice["cuts"]]
    assert recommend(risks, 0.0, 0.0) is None
    assert recommend(risks, 1.0, min(r.attack_max for r in risks)) == min(
        (r for r in risks), key=lambda r: r.attack_max).cut["index"]


def test_the_html_report_escapes_what_the_model_file_names() -> None:
    """Tensor names come from an untrusted model file: the page shows them, never runs them."""
    from bastion.confidential.partition.advice_report import render_html
    from bastion.confidential.partition.advise import Advice, CutRisk

    cut = CutRisk(cut={"index": 3, "tensor": "<script>alert(1)</script>"}, flop_share=0.1, latency_share=0.2,
                  reconstruction={"decoder": {"ssim": 0.4}, "cgan": {"ssim": 0.5}}, recon_relative=0.1,
                  attacks={"pgd": 0.3}, attack_max=0.3)
    advice = Advice(model="m<&>.onnx", kind="image", budget="standard", seed=1,
                    thresholds={"max_recon_relative": 0.5, "max_attack_success": 0.5}, white_box={"pgd": 0.9},
                    baseline={"ssim": 0.3}, cuts=[cut], recommended=3, seconds=2.0)
    page = render_html(advice)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "m&lt;&amp;&gt;.onnx" in page and '<tr class="rec"><td>3</td>' in page
    assert "Recommended: K=3" in page and "quick budget" not in page
