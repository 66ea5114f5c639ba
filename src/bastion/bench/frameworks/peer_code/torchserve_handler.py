"""TorchServe custom handler for the benchmark: one ONNX model run with ONNX Runtime.

Packaged into the model archive by ``torch-model-archiver --serialized-file model.onnx
--handler torchserve_handler.py --extra-files bench_model.json`` and run by TorchServe's
Python backend workers inside TorchServe's own virtual environment, never in Bastion's.
It is written the way TorchServe's docs write a custom handler: a ``BaseHandler``
subclass whose ``initialize`` loads the model from the archive's ``model_dir`` and whose
``preprocess`` / ``inference`` / ``postprocess`` turn each request of a batch into one
response (``BaseHandler.handle`` drives them).

``BaseHandler`` can load ``.onnx`` files itself, but with as many intra-op threads as the
machine has cores; the benchmark gives every framework's session 1 intra-op and 1 inter-op
thread, so ``initialize`` builds the session here.

Request (``POST /predictions/<name>``, ``Content-Type: application/json``):
``{"data": [row, ...]}``. Response: the model's ``output_name`` rows, ``[row, ...]``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
from ts.torch_handler.base_handler import BaseHandler

SPEC_FILE = "bench_model.json"


class OnnxHandler(BaseHandler):
    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        self.manifest = context.manifest
        with open(os.path.join(model_dir, SPEC_FILE), encoding="utf-8") as f:
            spec = json.load(f)
        self.model_pt_path = os.path.join(model_dir, self.manifest["model"]["serializedFile"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.model = ort.InferenceSession(self.model_pt_path, options, providers=["CPUExecutionProvider"])
        self.map_location = "cpu"
        self.input_name = spec["input_name"]
        self.output_name = spec["output_name"]
        self.text = spec["datatype"] == "BYTES"
        self.row_shape = tuple(spec["row_shape"])
        self.initialized = True

    def preprocess(self, data: list[dict]) -> list[np.ndarray]:
        """One array per request of the batch (TorchServe hands the body over as ``body``)."""
        batch = []
        for request in data:
            body = request.get("data") or request.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            rows = body["data"]
            if self.text:
                batch.append(np.array([str(t) for t in rows], dtype=object))
            else:
                batch.append(np.asarray(rows, dtype=np.float32).reshape((-1, *self.row_shape)))
        return batch

    def inference(self, data: list[np.ndarray], *args, **kwargs) -> list[np.ndarray]:
        return [self.model.run([self.output_name], {self.input_name: x})[0] for x in data]

    def postprocess(self, data: list[np.ndarray]) -> list[list]:
        return [output.tolist() for output in data]
