"""A custom MLServer runtime that serves one ONNX file with ONNX Runtime.

MLServer has no ONNX runtime of its own, so the benchmark needs this small one. It is
written the way MLServer's docs ask for a custom runtime (subclass ``MLModel``, ``load`` +
``predict``, MLServer's codecs for tensors) and does nothing Bastion skips: the ONNX
session has the same threading (one intra-op and one inter-op thread) and ``predict`` is
a decode -> ``session.run`` -> encode.

Decoding goes through ``MLModel.decode``, which picks the codec from the input's content
type, or else from the model's metadata (``inputs`` in ``model-settings.json``: the
adapter declares ``"content_type": "str"`` for a BYTES input, ``"np"`` otherwise), with
``NumpyCodec`` as the fallback. So a V2 BYTES tensor (JSON data: a list of strings) comes
in through ``StringCodec`` as a list of ``str``, and becomes the object array of strings
that ONNX Runtime takes for a ``tensor(string)`` input.

The outputs are those the request names (V2 ``outputs``), or all of the model's.

This module is imported by MLServer inside its own virtual environment, never by
Bastion's; the adapter (``bastion.bench.frameworks.mlserver``) copies it into the served
folder, puts that folder on ``PYTHONPATH`` and writes ``model-settings.json`` with
``"implementation": "mlserver_onnx_runtime.OnnxRuntime"``. ``bastion bench`` and
``bastion bench serving`` both serve MLServer through that adapter.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, RequestInput
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

    def _feed(self, request_input: RequestInput) -> np.ndarray:
        value = self.decode(request_input, default_codec=NumpyCodec)
        if isinstance(value, list):  # StringCodec: BYTES as a list of str
            return np.array(value, dtype=object).reshape(request_input.shape)
        return value

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {inp.name: self._feed(inp) for inp in payload.inputs}
        names = [o.name for o in payload.outputs] if payload.outputs else self._output_names
        results = self._session.run(names, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(names, results, strict=True)],
        )
