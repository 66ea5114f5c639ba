"""BentoML service for the benchmark: one ONNX model behind one ``@bentoml.api`` endpoint.

Runs inside BentoML's own virtual environment (``.bench/venvs/bentoml``), never in
Bastion's. The adapter (``bastion.bench.frameworks.bentoml``) copies this file into the
served folder as ``service.py``, writes ``bench_model.json`` beside it, and runs
``bentoml serve service:OnnxService`` there.

Written the way BentoML's docs write a service: a ``@bentoml.service`` class whose
``__init__`` loads the model (here an ONNX Runtime session with Bastion's threading: one
intra-op, one inter-op thread) and a synchronous ``@bentoml.api`` method with typed
parameters, from which BentoML builds its JSON API:

* a numeric model: ``POST /predict`` with ``{"inputs": [row, ...]}``, rows nested like the
  model's input (``np.ndarray`` with BentoML's ``Shape`` and ``DType`` validators);
* a text model: ``POST /predict`` with ``{"texts": ["...", ...]}`` (``list[str]``).

The answer is the model's ``output_name`` as a JSON array (BentoML serialises the
returned ``np.ndarray`` with ``tolist()``).

Service configuration: ``workers`` (BentoML's worker processes, each with its own
session) from ``bench_model.json``; the access log off (Bastion runs without one);
everything else at BentoML's defaults.

(No ``from __future__ import annotations``: BentoML reads the API's types from the method.)
"""

import json
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.validators import DType, Shape

SPEC = json.loads(Path(__file__).with_name("bench_model.json").read_text(encoding="utf-8"))
TEXT = SPEC["datatype"] == "BYTES"
Rows = Annotated[np.ndarray, Shape((-1, *SPEC["row_shape"])), DType("float32")]


@bentoml.service(
    name="bench_onnx",
    workers=int(SPEC["workers"]),
    logging={"access": {"enabled": False}},
)
class OnnxService:
    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(SPEC["onnx_path"], options, providers=["CPUExecutionProvider"])
        self.input_name = SPEC["input_name"]
        self.output_names = [SPEC["output_name"]]

    if TEXT:

        @bentoml.api
        def predict(self, texts: list[str]) -> np.ndarray:
            feed = np.array(texts, dtype=object)
            return self.session.run(self.output_names, {self.input_name: feed})[0]

    else:

        @bentoml.api
        def predict(self, inputs: Rows) -> np.ndarray:
            return self.session.run(self.output_names, {self.input_name: inputs})[0]
