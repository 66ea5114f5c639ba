"""LitServe (Lightning AI): a ``LitAPI`` running ONNX Runtime behind ``/predict``.

The server code is ``peer_code/litserve_server.py``; it runs under LitServe's venv. LitServe's
request body is whatever the ``LitAPI`` decodes; ours follows its docs' examples:
``{"input": rows}`` in, ``{"output": rows}`` out.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec, rows_json, spec_json

PEER_CODE = Path(__file__).with_name("peer_code")
SERVER_FILE = "litserve_server.py"
SPEC_FILE = "bench_model.json"






class LitServe(Framework):
    name = "litserve"
    package = "litserve"

    def requirements(self) -> list[str]:
        return ["litserve==0.2.19", "onnxruntime==1.31.1", "numpy==2.4.6"]

    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PEER_CODE / SERVER_FILE, workdir / SERVER_FILE)
        (workdir / SPEC_FILE).write_text(spec_json(model), encoding="utf-8")
        base = f"http://127.0.0.1:{port}"
        return Launch(
            argv=[str(python), SERVER_FILE, SPEC_FILE, "--port", str(port), "--workers", str(workers)],
            port=port,
            ready_url=f"{base}/health",
            infer_url=f"{base}/predict",
            cwd=workdir,
            env={"PYTHONUNBUFFERED": "1"},
            notes=(
                f"LitServer(accelerator='cpu', workers_per_device={workers}): {workers} inference worker "
                f"process(es) and, by LitServe's default (num_api_servers=None), {workers} uvicorn API server "
                "process(es); max_batch_size=1 (no server-side batching); ONNX Runtime with 1 intra-op and "
                "1 inter-op thread per worker"
            ),
        )

    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        return orjson.dumps({"input": rows_json(model, rows)})

    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        out = orjson.loads(body)["output"]
        return np.asarray(out, dtype=np.float32).reshape((-1, *model.output_row_shape))
