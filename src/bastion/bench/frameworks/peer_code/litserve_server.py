"""LitServe server for the benchmark: one ONNX model behind LitServe's default ``/predict``.

Runs inside LitServe's own virtual environment (``.bench/venvs/litserve``), never in
Bastion's. Written the way LitServe's docs write a server: a ``LitAPI`` whose ``setup``
loads the model, ``decode_request`` / ``predict`` / ``encode_response`` do the work, and
``LitServer(...).run(...)``.

Request: ``{"input": [row, ...]}`` (rows nested like the model's input, or strings for a
text model). Response: ``{"output": [row, ...]}`` (the model's ``output_name``).

Usage: ``python litserve_server.py bench_model.json --port P --workers N``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import litserve as ls
import numpy as np
import onnxruntime as ort


class OnnxLitAPI(ls.LitAPI):
    def __init__(self, model_spec: dict) -> None:
        super().__init__()
        self.model_spec = model_spec

    def setup(self, device: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.model_spec["onnx_path"], options, providers=["CPUExecutionProvider"])
        self.input_name = self.model_spec["input_name"]
        self.output_name = self.model_spec["output_name"]
        self.text = self.model_spec["datatype"] == "BYTES"
        self.row_shape = tuple(self.model_spec["row_shape"])

    def decode_request(self, request: dict) -> np.ndarray:
        rows = request["input"]
        if self.text:
            return np.array([str(t) for t in rows], dtype=object)
        return np.asarray(rows, dtype=np.float32).reshape((-1, *self.row_shape))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def encode_response(self, output: np.ndarray) -> dict:
        return {"output": output.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    server = ls.LitServer(OnnxLitAPI(spec), accelerator="cpu", workers_per_device=args.workers)
    # num_api_servers=None: LitServe's default, one uvicorn process per inference worker
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
