"""MLflow's model server: ``mlflow models serve --env-manager local`` on an MLflow ONNX model.

``prepare`` saves the scenario's ONNX file in MLflow's own model format with MLflow's
``onnx`` flavor (``peer_code/mlflow_save_model.py``, run by the MLflow venv's interpreter:
saving needs MLflow itself), with a tensor signature and ONNX Runtime session options
for Bastion's threading (one intra-op, one inter-op thread); MLflow's ONNX loader applies
them when the server loads the model. ``--env-manager local`` serves it from the venv as
it is, instead of building a fresh environment from the model's requirements.

Protocol: MLflow's scoring protocol, ``POST /invocations`` with
``{"inputs": {"<input>": rows}}`` (nested lists, or strings for a text model); the answer
is ``{"predictions": {"<output>": rows, ...}}`` with every output of the model (the ONNX
flavor runs them all). Readiness: ``GET /ping``.

Parallelism: ``--workers N`` (uvicorn worker processes, each loading the model).

HTTP stack: MLflow's scoring server is a FastAPI app that ``mlflow models serve`` runs with
``uvicorn``; MLflow depends on plain ``uvicorn``, so a bare install serves on asyncio with
h11. The venv adds uvloop and httptools (what ``uvicorn[standard]`` brings, at Bastion's
versions: Bastion serves on the same two), which uvicorn then picks by itself. Without
them ``--workers`` >= 2 is also hit by a uvicorn bug (Kludex/uvicorn#3149, open): the
listening socket it binds for its worker processes leaves TCP_NODELAY off on asyncio, and
each keep-alive request waits ~40 ms on a delayed ACK (measured here: p50 43 ms instead of
1.2 ms at 200 req/s); uvloop sets TCP_NODELAY itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import orjson

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec, pin_as_here, venv_env
from bastion.bench.launcher import child_env

# The latest MLflow that installs from PyPI here: 3.18.0 is listed, but the mlflow-skinny
# 3.18.0 it pins is not (yet), so pip cannot install it.
MLFLOW_VERSION = "3.17.2"
SAVE_SCRIPT = "mlflow_save_model.py"
PEER_CODE = Path(__file__).resolve().parent / "peer_code"
SAVE_TIMEOUT_S = 600
# No usage reporting: this machine reaches no one, and a blocked call must not slow start-up.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}




class MLflowFramework(Framework):
    name = "mlflow"
    package = "mlflow"

    def requirements(self) -> list[str]:
        # onnx: mlflow.onnx.save_model writes the model with it. uvloop, httptools: see the
        # module doc (uvicorn's standard speed-ups, as Bastion's uvicorn has them).
        return [f"mlflow=={MLFLOW_VERSION}", *map(pin_as_here, ("onnx", "onnxruntime", "uvloop", "httptools"))]

    def spec(self, model: ModelSpec) -> dict[str, object]:
        """``bench_model.json``: what the save script needs to know about the model."""
        return {
            "name": model.name,
            "onnx_path": str(model.onnx_path.resolve()),
            "input_name": model.input_name,
            "datatype": model.datatype,
            "row_shape": list(model.row_shape),
            "output_name": model.output_name,
            "pip_requirements": self.requirements(),
        }

    def save_model(self, model: ModelSpec, workdir: Path, python: Path) -> Path:
        """``workdir/model``: the MLflow model, written by the venv's MLflow."""
        shutil.copyfile(PEER_CODE / SAVE_SCRIPT, workdir / SAVE_SCRIPT)
        spec_path = workdir / "bench_model.json"
        spec_path.write_text(json.dumps(self.spec(model), indent=2), encoding="utf-8")
        out = workdir / "model"
        done = subprocess.run(
            [str(python), SAVE_SCRIPT, str(spec_path), str(out)],
            cwd=workdir,
            env=child_env(QUIET_ENV),
            capture_output=True,
            text=True,
            timeout=SAVE_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0 or not (out / "MLmodel").exists():
            raise RuntimeError(
                f"saving {model.name} as an MLflow model failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )
        return out

    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        # absolute: the server runs with cwd=workdir (and a venv's python must not be resolved)
        workdir, python = workdir.resolve(), python.absolute()
        model_dir = self.save_model(model, workdir, python)
        argv = [
            str(python.with_name("mlflow")),
            "models",
            "serve",
            "--model-uri",
            str(model_dir),
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        return Launch.local(
            argv,
            port,
            "/ping",
            "/invocations",
            workdir,
            env={
                **QUIET_ENV,
                **venv_env(python),  # mlflow execs `uvicorn` by name
                # uvicorn reads its options from UVICORN_* too: no access log, as Bastion runs
                "UVICORN_ACCESS_LOG": "false",
            },
            notes=f"--workers {workers} (uvicorn processes), --env-manager local; onnx flavor with "
            "1 intra-op / 1 inter-op thread; uvloop + httptools added to the venv; no access log",
        )

    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        data = [str(t) for t in rows] if model.datatype == "BYTES" else np.asarray(rows, np.float32).tolist()
        return orjson.dumps({"inputs": {model.input_name: data}})

    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        predictions = orjson.loads(body)["predictions"]
        if isinstance(predictions, dict):
            if model.output_name not in predictions:
                raise ValueError(f"no output {model.output_name!r} in the response (outputs: {sorted(predictions)})")
            predictions = predictions[model.output_name]
        out = np.asarray(predictions, dtype=np.float32)
        return out.reshape((-1, *model.output_row_shape))
