"""Ray Serve application for the benchmark: one ONNX model behind Ray Serve's HTTP proxy.

Runs inside Ray's own virtual environment (``.bench/venvs/rayserve``), never in Bastion's.
Written the way Ray Serve's docs write an HTTP deployment: a ``@serve.deployment`` class
that loads the model in ``__init__`` and answers a Starlette ``Request`` in ``__call__``.

Request: ``POST /`` with ``{"instances": [row, ...]}``. Response: ``{"predictions": [row, ...]}``
(the model's ``output_name``). ``GET /`` is the readiness probe, answered by a replica:
200 once the launcher's ``serve.run`` has returned (the application is RUNNING with all its
replicas; the launcher then writes ``--ready-file``), 503 before.

Usage: ``python rayserve_app.py bench_model.json --port P --replicas N --temp-dir DIR``. The
script starts a private local Ray cluster (no dashboard, its own temp dir, loopback
addresses), deploys the application, and blocks. It writes its pid to ``--pid-file``;
``rayserve_stop.py`` ends it and every process of its cluster (Ray's workers leave the
launcher's process group, so signalling the group is not enough).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse


@serve.deployment
class OnnxModel:
    def __init__(self, model_spec: dict, ready_file: str) -> None:
        self.ready_file = ready_file
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model_spec["onnx_path"], options, providers=["CPUExecutionProvider"])
        self.input_name = model_spec["input_name"]
        self.output_name = model_spec["output_name"]
        self.text = model_spec["datatype"] == "BYTES"
        self.row_shape = tuple(model_spec["row_shape"])

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            ready = os.path.exists(self.ready_file)
            return JSONResponse({"ready": ready}, status_code=200 if ready else 503)
        try:
            rows = (await request.json())["instances"]
            if self.text:
                x = np.array([str(t) for t in rows], dtype=object)
            else:
                x = np.asarray(rows, dtype=np.float32).reshape((-1, *self.row_shape))
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        output = self.session.run([self.output_name], {self.input_name: x})[0]
        return JSONResponse({"predictions": output.tolist()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--pid-file", default="rayserve_driver.pid")
    parser.add_argument("--ready-file", default="rayserve.ready")
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text(encoding="utf-8"))

    Path(args.pid_file).write_text(f"{os.getpid()}\n", encoding="utf-8")
    # A private single-node cluster: address="local" never joins a running one.
    ray.init(
        address="local",
        num_cpus=max(args.replicas, os.cpu_count() or 1),
        include_dashboard=False,
        _temp_dir=args.temp_dir,
        _node_ip_address="127.0.0.1",
        namespace="bench",
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    app = OnnxModel.options(
        name=spec["name"],
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": 1},
    ).bind(spec, str(Path(args.ready_file).resolve()))
    # returns once the application is RUNNING: every replica constructed and healthy
    serve.run(app, name=spec["name"], route_prefix="/")
    Path(args.ready_file).write_text("ready\n", encoding="utf-8")
    print(f"ray serve: {spec['name']} running with {args.replicas} replica(s) on 127.0.0.1:{args.port}", flush=True)
    threading.Event().wait()  # until rayserve_stop.py (or a signal) ends the cluster


if __name__ == "__main__":
    main()
