from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from bastion.repository.store import ModelRepository, ModelState
from bastion.scenarios.demo import build_demo_repository


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_repository_loads_and_digits_is_accurate(demo_repo: Path) -> None:
    for name in ("simple", "simple_string", "digits", "digits_skops"):
        assert (demo_repo / name / "config.yaml").is_file()
    metrics = json.loads((demo_repo / "digits" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.9
    data = np.load(demo_repo / "digits" / "test_data.npz")
    x, y = data["X"], data["y"]
    assert x.dtype == np.float32 and x.shape[1] == 64 and len(x) == len(y) == metrics["n_test"]

    async def main() -> None:
        repo = ModelRepository(demo_repo, poll_interval_s=None)
        await repo.start()
        try:
            assert {s.name: s.state for s in repo.index()} == dict.fromkeys(
                ("digits", "digits_skops", "simple", "simple_string"), ModelState.READY
            )
            digits = repo.get("digits").versions[1]
            assert digits.config.max_batch_size == 256
            assert [(t.name, t.datatype, t.shape) for t in digits.config.outputs] == [
                ("label", "INT64", (-1,)),
                ("probabilities", "FP32", (-1, 10)),
            ]
            out = digits.runtime.predict({"input": x})
            accuracy = float(np.mean(out["label"] == y))
            assert accuracy > 0.9 and abs(accuracy - metrics["accuracy"]) < 1e-6
            skops_out = repo.get("digits_skops").versions[1].runtime.predict({"input": x})
            np.testing.assert_array_equal(skops_out["label"], out["label"])
            np.testing.assert_allclose(skops_out["probabilities"], out["probabilities"], atol=1e-5)

            a = np.arange(32, dtype=np.int32).reshape(2, 16)
            simple = repo.get("simple").versions[1].runtime.predict({"INPUT0": a, "INPUT1": a})
            np.testing.assert_array_equal(simple["OUTPUT0"], a + a)
            np.testing.assert_array_equal(simple["OUTPUT1"], a - a)
            text = np.array([[str(v).encode() for v in row] for row in a], dtype=object)
            strings = repo.get("simple_string").versions[1].runtime.predict({"INPUT0": text, "INPUT1": text})
            assert strings["OUTPUT0"][1, 3] == b"38"
        finally:
            await repo.stop()

    asyncio.run(main())


def test_demo_repository_is_deterministic(demo_repo: Path, tmp_path: Path) -> None:
    messages: list[str] = []
    names = build_demo_repository(tmp_path / "again", progress=messages.append, seed=0)
    assert names == ["simple", "simple_string", "digits", "digits_skops"]
    assert messages and messages[-1].startswith("done")
    assert _files(tmp_path / "again") == _files(demo_repo)
