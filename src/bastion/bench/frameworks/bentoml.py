"""BentoML: a ``@bentoml.service`` that runs the ONNX model with ONNX Runtime.

BentoML has no ONNX runner in its 1.4 service API, so the service
(``peer_code/bentoml_service.py``) loads the model with ONNX Runtime itself, the way
BentoML's docs do it for any framework: an ONNX Runtime session (one intra-op, one
inter-op thread, as Bastion's) in the service's ``__init__``, a synchronous ``@bentoml.api``
method with typed parameters. ``bentoml serve service:OnnxService`` runs it from the
prepared folder.

Protocol: BentoML's JSON API, built from the method's parameters: ``POST /predict`` with
``{"inputs": [row, ...]}`` (nested lists; an ``np.ndarray`` parameter) or, for a text model,
``{"texts": ["...", ...]}`` (a ``list[str]`` parameter); the answer is the model's
``output_name`` as a JSON array. Readiness: ``GET /readyz``.

Parallelism: the service's ``workers`` (BentoML worker processes behind one listening
socket, each with its own session); BentoML's default of one thread per worker for a
synchronous API is kept.

HTTP stack: each BentoML worker runs uvicorn, which BentoML depends on without its
extras, so a bare install serves on asyncio with h11. The venv adds uvloop and httptools
(what ``uvicorn[standard]`` brings, at Bastion's versions: Bastion serves on the same
two), which uvicorn then picks by itself: the same rule as for the other uvicorn-based
peers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import orjson

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec, pin_as_here, venv_env

# The latest BentoML that installs from PyPI here: 1.4.40 needs a certifi release that
# the index does not have (yet).
BENTOML_VERSION = "1.4.39"
SERVICE_FILE = "bentoml_service.py"
PEER_CODE = Path(__file__).resolve().parent / "peer_code"




class BentoMLFramework(Framework):
    name = "bentoml"
    package = "bentoml"

    def requirements(self) -> list[str]:
        # onnxruntime: every server runs the same kernels. uvloop, httptools: see the module doc.
        return [f"bentoml=={BENTOML_VERSION}", *map(pin_as_here, ("onnxruntime", "uvloop", "httptools"))]

    def spec(self, model: ModelSpec, workers: int) -> dict[str, object]:
        """``bench_model.json``, read by the service when BentoML imports it."""
        return {
            "name": model.name,
            "onnx_path": str(model.onnx_path.resolve()),
            "input_name": model.input_name,
            "datatype": model.datatype,
            "row_shape": list(model.row_shape),
            "output_name": model.output_name,
            "workers": workers,
        }

    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        # absolute: the server runs with cwd=workdir (and a venv's python must not be resolved)
        workdir, python = workdir.resolve(), python.absolute()
        shutil.copyfile(PEER_CODE / SERVICE_FILE, workdir / "service.py")
        (workdir / "bench_model.json").write_text(json.dumps(self.spec(model, workers), indent=2), encoding="utf-8")
        argv = [
            str(python.with_name("bentoml")),
            "serve",
            "service:OnnxService",
            "--working-dir",
            str(workdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        return Launch.local(
            argv,
            port,
            "/readyz",
            "/predict",
            workdir,
            env={
                "BENTOML_HOME": str(workdir / ".bentoml"),  # its store and config, not ~/bentoml
                "BENTOML_DO_NOT_TRACK": "true",  # no usage reporting (this machine reaches no one)
                **venv_env(python),
            },
            notes=f"workers={workers} (BentoML worker processes, 1 thread each, its default), "
            "synchronous @bentoml.api, ONNX Runtime 1 intra-op / 1 inter-op thread, uvloop + httptools "
            "added to the venv, no access log",
        )

    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        if model.datatype == "BYTES":
            return orjson.dumps({"texts": [str(t) for t in rows]})
        return orjson.dumps({"inputs": np.asarray(rows, np.float32).tolist()})

    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        return np.asarray(orjson.loads(body), dtype=np.float32).reshape((-1, *model.output_row_shape))
