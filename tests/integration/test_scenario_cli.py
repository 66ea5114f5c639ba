"""A reference scenario end to end: built and profiled by the CLI, served, and picked by targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow


def test_image_scenario_built_profiled_and_served(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    out = subprocess.run([sys.executable, "-m", "bastion.cli.main", "scenario", "build", "image", "--out", str(repo),
                          "--small"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    profile = json.loads((repo / "image" / "profile.json").read_text())
    quality = {v["variant"]: v["quality"] for v in profile["variants"]}
    assert len(quality) >= 4
    eval_set = np.load(repo / "image" / "eval.npz")
    x, y = eval_set["image"][:8], eval_set["y"][:8]
    with ServerProcess(repo, "--poll-interval", "0", "--grpc-port", "-1") as server:
        best = max(quality.values())
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
                "parameters": {"accuracy": best}}
        r = httpx.post(f"{server.url}/v2/models/image/infer", json=body)
        assert r.status_code == 200, r.text
        probs = np.array(r.json()["outputs"][0]["data"]).reshape(8, 10)
        assert (probs.argmax(axis=1) == y).mean() >= 0.75
        metrics = httpx.get(f"{server.url}/metrics").text
        top = max(quality, key=quality.get)  # type: ignore[arg-type]
        assert f'variant="{top}"' in metrics  # only the most accurate variant meets that target
        r = httpx.post(f"{server.url}/v2/models/image/infer", json={**body, "parameters": {"accuracy": 1.0}})
        assert r.status_code == (422 if best < 1.0 else 200)
