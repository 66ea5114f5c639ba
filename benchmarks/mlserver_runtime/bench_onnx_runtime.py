"""A custom MLServer runtime that serves one ONNX file with ONNX Runtime.

MLServer has no ONNX runtime of its own, so the comparison needs this small one. It
is written the way MLServer's docs ask for a custom runtime (subclass ``MLModel``,
``load`` + ``predict``, MLServer's codecs for tensors) and does nothing Bastion or the
minimal app skips: the ONNX session has the same threading (one intra-op and one
inter-op thread) and ``predict`` is a decode → ``session.run`` → encode.

This module is imported by MLServer inside its own virtual environment
(``benchmarks/.venvs/mlserver``), never by Bastion's; ``serving_bench.py`` puts this
folder on ``PYTHONPATH`` and writes ``model-settings.json`` with
``"implementation": "bench_onnx_runtime.OnnxRuntime"``.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    """``parameters.uri`` names the ``.onnx`` file (absolute, or relative to model-settings.json)."""

    async def load(self) -> bool:
        path = await get_model_uri(self.settings, wellknown_filenames=["model.onnx"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # NumpyCodec turns V2 JSON data (or raw_input_contents under gRPC) into an ndarray
        # of the declared datatype and shape: MLServer's standard decode path.
        feeds = {inp.name: NumpyCodec.decode_input(inp) for inp in payload.inputs}
        results = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, value) for name, value in zip(self._output_names, results, strict=True)
            ],
        )
