"""Bastion itself, as the benchmark runs it: the scenario repository, one model loaded."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec
from bastion.bench.frameworks.v2json import decode_v2, encode_v2


class BastionFramework(Framework):
    """``bastion serve REPO --model NAME`` with the model's config as the scenario wrote it
    (dynamic batching included), REST only, no authentication: the peers have none, so
    this compares the serving paths like for like (the guard's own cost is measured in
    BENCHMARKS.md's security section)."""

    name = "bastion"
    package = "bastion-serve"

    def requirements(self) -> list[str]:
        return []  # Bastion's own venv: the interpreter running the suite

    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        repo = model.onnx_path.parent.parent.parent
        argv = [
            str(python),
            "-m",
            "bastion.cli.main",
            "serve",
            str(repo),
            "--model",
            model.name,
            "--host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--grpc-port",
            "-1",
            "--workers",
            str(workers),
            "--insecure-no-auth",
            "--log-level",
            "warning",
        ]
        base = f"http://127.0.0.1:{port}"
        return Launch(
            argv=argv,
            port=port,
            ready_url=f"{base}/v2/models/{model.name}/ready",
            infer_url=f"{base}/v2/models/{model.name}/infer",
            cwd=workdir,
            notes=f"--workers {workers}, no auth (like the peers), model config as built by the scenario",
        )

    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        return encode_v2(model, rows)

    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        return decode_v2(model, body)


def bastion_python() -> Path:
    return Path(sys.executable)
