"""A reference scenario end to end: built and profiled by the CLI, served, and picked by targets."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest

from tests.serverproc import ServerProcess

if TYPE_CHECKING:
    from tests.conftest import BuiltScenario

pytestmark = pytest.mark.slow


def test_image_scenario_built_profiled_and_served(image_scenario: BuiltScenario) -> None:
    # the session's `bastion scenario build image --small` (tests/conftest.py), which exited 0
    repo = image_scenario.repo
    assert "built image" in image_scenario.stderr
    profile = json.loads((repo / "image" / "profile.json").read_text())
    quality = {v["variant"]: v["quality"] for v in profile["variants"]}
    assert len(quality) >= 4
    for variant, q in quality.items():  # the CLI printed the profile it measured
        assert variant in image_scenario.stdout and f"{q:.4f}" in image_scenario.stdout
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
