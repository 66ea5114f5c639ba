"""The GPU device-check script, run as a CPU dry run so it cannot rot between the sessions
that are lent a GPU; and the choice of execution providers for a served tail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort

from bastion.core.metadata import ModelConfig
from bastion.runtimes.worker_runtime import tail_providers
from tests.partition import graphs

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "partition_device_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_device_check_compares_the_split_with_the_whole_model(tmp_path: Path) -> None:
    model = tmp_path / "residual.onnx"
    onnx.save(graphs.residual(), model)
    out = tmp_path / "result.json"
    done = _run("--model", str(model), "--cut", "1", "--rows", "32", "--repeats", "3", "--allow-cpu",
                "--out", str(out))
    result = json.loads(out.read_text())
    assert done.returncode == 0, done.stderr
    assert result["ok"] and result["label_agreement"] == 1.0
    assert max(result["max_abs_diff"].values()) <= 1e-5
    assert result["tail_device"].startswith("CPU (--allow-cpu")
    for batch in ("batch1", "batch64"):
        assert set(result["latency_ms"][batch]) == {"head_in_worker_ms", "tail_ms", "whole_on_cpu_ms"}
    # without a GPU and without --allow-cpu it refuses to call a CPU run a device check
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        refused = _run("--model", str(model), "--cut", "1", "--rows", "8")
        assert refused.returncode == 2 and "no GPU path" in refused.stdout


def test_a_tail_uses_the_providers_the_config_names_else_cuda_where_present() -> None:
    named = ModelConfig(name="m", runtime="onnx", parameters={"providers": ["CPUExecutionProvider"]})
    assert tail_providers(named) == ["CPUExecutionProvider"]
    default = tail_providers(ModelConfig(name="m", runtime="onnx"))
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert default == (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"])
