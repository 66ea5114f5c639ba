"""A Triton Inference Server python-backend model that serves one ONNX file with ONNX Runtime.

The only Triton server installable here (the ``tritonserver`` binary inside the
``nvidia-pytriton`` wheel) ships the python backend alone, without Triton's
onnxruntime backend, so the ONNX file is run by this model: the way Triton's docs
ask for a python-backend model (``TritonPythonModel`` with ``initialize`` +
``execute`` in ``<model>/<version>/model.py``, tensors through
``triton_python_backend_utils``). It does the work Bastion does: an ONNX Runtime
session with one intra-op and one inter-op thread on the CPU provider; ``execute``
is a decode → ``session.run`` → encode per request.

The adapter copies this file to ``<repository>/<model>/1/model.py`` next to
``model.onnx``; the config's ``parameters`` name the input and the output served.
Imported by Triton's python-backend stub inside the triton venv, never by Bastion.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_name = params["input_name"]
        self.output_name = params["output_name"]
        self.is_bytes = params["datatype"] == "BYTES"
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                out = self._run(pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy())
            except Exception as exc:  # one bad request answers an error, the model stays up
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            tensor = pb_utils.Tensor(self.output_name, np.ascontiguousarray(out, dtype=np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def _run(self, rows: np.ndarray) -> np.ndarray:
        if self.is_bytes:
            # BYTES tensors arrive as an object array of bytes; ONNX string tensors take str
            rows = np.array(
                [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in rows.reshape(-1)], dtype=object
            ).reshape(rows.shape)
        else:
            rows = rows.astype(np.float32, copy=False)
        return self.session.run([self.output_name], {self.input_name: rows})[0]

    def finalize(self) -> None:
        self.session = None
