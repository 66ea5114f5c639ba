"""The four scenario models as the benchmark serves them, and their payloads.

Every framework serves the *same* ONNX file: one variant of each scenario's zoo, built
by ``bastion scenario build`` (deterministic for the seed) into a cache folder. The
variant is the zoo's most accurate model except for sentiment, where it is the word
n-gram model: the MiniLM variant needs ONNX Runtime Extensions' custom tokenizer ops in
every peer's venv and costs ~20x more per text, which would make the fixed 200 req/s
load of large payloads exceed this machine's two cores for every server alike.

Payload sizes are rows per request (the study's small / medium / large inputs); rows are
real held-out rows from the zoo's ``eval.npz``, so models do their normal work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from bastion.bench.frameworks.base import ModelSpec

# scenario -> (variant served, zoo name)
MODELS: dict[str, str] = {
    "malware": "malware_gbt_large",
    "crypto": "crypto_lstm",
    "image": "image_cnn",
    "sentiment": "sentiment_ngram",
}
SCENARIOS: tuple[str, ...] = tuple(MODELS)
PAYLOAD_ROWS: dict[str, int] = {"small": 1, "medium": 4, "large": 16}


# the serving comparison's model (``bastion bench serving``): the demo's digits classifier,
# which costs a few µs per row, so what is measured is the serving around it
DEMO_MODEL = "digits"
DEMO_OUTPUT = "probabilities"


def build_scenario(cache: Path, scenario: str, *, say: Callable[[str], None] = print) -> Path:
    """``cache/<scenario>``: the scenario's repository, built once (a few minutes each)."""
    return _build_once(cache / scenario, ["scenario", "build", scenario], f"scenario {scenario}", say)


def build_demo(cache: Path, *, say: Callable[[str], None] = print) -> Path:
    """``cache/demo``: ``bastion demo --build-only``, built once (seconds)."""
    return _build_once(cache / "demo", ["demo", "--build-only"], "the demo repository", say)


def _build_once(out: Path, args: list[str], what: str, say: Callable[[str], None]) -> Path:
    # a marker written last: an interrupted build is redone, not served half-written
    done = out / ".built"
    if done.exists():
        return out
    say(f"building {what} into {out} (once) ...")
    bastion = Path(sys.executable).with_name("bastion")
    argv = [str(bastion)] if bastion.exists() else [sys.executable, "-m", "bastion.cli.main"]
    subprocess.run([*argv, *args, "--out", str(out)], check=True, timeout=3600)
    done.write_text("ok\n", encoding="utf-8")
    return out


def demo_spec(repo: Path) -> ModelSpec:
    """The demo's ``digits`` model (input FP32 [-1, 64]; checked on its probabilities)."""
    return model_spec(repo, DEMO_MODEL, DEMO_MODEL, output=DEMO_OUTPUT)


def model_spec(repo: Path, scenario: str, variant: str | None = None, *, output: str | None = None) -> ModelSpec:
    """The spec of ``variant`` (default: :data:`MODELS`) from a built scenario repository;
    ``output`` names the output answers are checked on (default: the first)."""
    name = variant or MODELS[scenario]
    model_dir = repo / name
    config = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8"))
    (inp,) = config["inputs"]
    outputs = config["outputs"]
    out = next((o for o in outputs if o["name"] == output), None) if output else outputs[0]
    if out is None:
        raise ValueError(f"{name} has no output {output!r} (outputs: {[o['name'] for o in outputs]})")
    if config.get("parameters", {}).get("ort_extensions"):
        raise ValueError(f"{name} needs ONNX Runtime Extensions; the benchmark serves plain ONNX models only")
    return ModelSpec(
        scenario=scenario,
        name=name,
        onnx_path=(model_dir / "1" / "model.onnx").resolve(),
        input_name=str(inp["name"]),
        datatype=str(inp["datatype"]),
        row_shape=tuple(int(d) for d in inp["shape"][1:]),
        output_name=str(out["name"]),
        output_row_shape=tuple(int(d) for d in out["shape"][1:]),
        max_batch_size=int(config["max_batch_size"]) if config.get("max_batch_size") else None,
    )


def _zoo_dir(repo: Path) -> Path:
    for child in sorted(repo.iterdir()):
        if (child / "zoo.yaml").exists():
            return child
    raise FileNotFoundError(f"no zoo (zoo.yaml) in {repo}")


def eval_rows(repo: Path, model: ModelSpec) -> np.ndarray:
    """All held-out rows of the scenario, in the model's input form."""
    with np.load(_zoo_dir(repo) / "eval.npz") as data:
        rows = data[model.input_name]
    if model.datatype == "BYTES":
        return np.array([str(t) for t in rows], dtype=object)
    return np.ascontiguousarray(rows, dtype=np.float32).reshape((-1, *model.row_shape))


def payload(rows: np.ndarray, size: str, seed: int = 0) -> np.ndarray:
    """``PAYLOAD_ROWS[size]`` rows picked with a seed (the same for every framework)."""
    return pick_rows(rows, PAYLOAD_ROWS[size], seed)


def pick_rows(rows: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows picked with a seed (with replacement only when there are fewer than ``n``)."""
    pick = np.random.default_rng(seed).choice(len(rows), size=n, replace=len(rows) < n)
    return rows[pick]


def reference_output(model: ModelSpec, rows: np.ndarray) -> np.ndarray:
    """The model's output for ``rows`` from ONNX Runtime in this process: what every server must return."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # as the server does (bench/ stays client-side)
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    feed = rows if model.datatype == "BYTES" else rows.astype(np.float32)
    return np.asarray(session.run([model.output_name], {model.input_name: feed})[0])
