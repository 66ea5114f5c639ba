"""The minimal app: the floor of Python serving, for ``bastion bench serving``.

``peer_code/minimal_app.py`` is a bare ASGI callable on uvicorn + uvloop + httptools:
V2 JSON parsed with orjson, ``session.run`` inline, V2 JSON out; no validation, batching,
metrics, logging or auth. It runs in Bastion's own venv (uvicorn, ONNX Runtime and orjson
are Bastion's dependencies), so the HTTP stack and kernels are the ones Bastion has.

Not in the study's registry (``frameworks.MODULES``): it is a floor to measure Bastion's
overhead against, not a framework anyone deploys.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec
from bastion.bench.frameworks.v2json import decode_v2, encode_v2

PEER_CODE = Path(__file__).with_name("peer_code")
APP_FILE = "minimal_app.py"


class MinimalApp(Framework):
    name = "minimal"
    package = "uvicorn"

    def requirements(self) -> list[str]:
        return []  # Bastion's venv

    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PEER_CODE / APP_FILE, workdir / APP_FILE)
        argv = [
            str(python),
            "-m",
            "uvicorn",
            "minimal_app:app",
            "--app-dir",
            str(workdir.resolve()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        if workers > 1:  # uvicorn's --workers 1 still starts a supervisor; without it, one process
            argv += ["--workers", str(workers)]
        return Launch.local(
            argv,
            port,
            "/v2/health/ready",  # the app answers 200 to anything but an infer call: ready once it listens
            f"/v2/models/{model.name}/infer",
            workdir,
            # configuration by environment: uvicorn's workers import the module afresh
            env={
                "MINIMAL_MODEL_PATH": str(model.onnx_path),
                "MINIMAL_MODEL_NAME": model.name,
                "PYTHONUNBUFFERED": "1",
            },
            ready_streak=max(5, 10 * workers),
            notes=f"uvicorn --workers {workers}, uvloop + httptools, no access log; session.run inline",
        )

    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        return encode_v2(model, rows)

    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        return decode_v2(model, body)
