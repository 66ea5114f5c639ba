"""Save one ONNX file as an MLflow model (the ``onnx`` flavor), for ``mlflow models serve``.

Runs inside MLflow's own virtual environment (``.bench/venvs/mlflow``), never in Bastion's:
the adapter (``bastion.bench.frameworks.mlflow``) calls
``python mlflow_save_model.py bench_model.json OUT_DIR``.

The model is saved the way MLflow's docs save an ONNX model: ``mlflow.onnx.save_model``
with a tensor signature (the input's name, dtype and shape, so the scoring server turns
``{"inputs": {name: rows}}`` into the ndarray the model takes) and ONNX Runtime session
options that give it Bastion's threading (one intra-op, one inter-op thread, sequential
execution); MLflow's ONNX loader applies them when ``mlflow models serve`` loads the model.
The signature's outputs come from running the model once on the example rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow.onnx
import numpy as np
import onnx
import onnxruntime as ort
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

SESSION_OPTIONS = {"intra_op_num_threads": 1, "inter_op_num_threads": 1, "execution_mode": "sequential"}
_DTYPES = {"FP32": np.dtype(np.float32), "BYTES": np.dtype(object)}


def _example(spec: dict) -> np.ndarray:
    if spec["datatype"] == "BYTES":
        return np.array(["an example text", "another one"], dtype=object)
    return np.zeros((2, *spec["row_shape"]), dtype=np.float32)


def main(spec_path: str, out: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    example = _example(spec)
    session = ort.InferenceSession(spec["onnx_path"], providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, {spec["input_name"]: example})
    signature = ModelSignature(
        inputs=Schema([TensorSpec(_DTYPES[spec["datatype"]], (-1, *spec["row_shape"]), spec["input_name"])]),
        outputs=Schema([TensorSpec(r.dtype, (-1, *r.shape[1:]), n) for n, r in zip(names, results, strict=True)]),
    )
    mlflow.onnx.save_model(
        onnx.load(spec["onnx_path"]),
        out,
        signature=signature,
        onnx_execution_providers=["CPUExecutionProvider"],
        onnx_session_options=SESSION_OPTIONS,
        # the venv's own pins; without them MLflow infers requirements by loading the model
        # in a subprocess (slow, and nothing reads them: the server runs in this venv)
        pip_requirements=spec.get("pip_requirements") or None,
        save_as_external_data=False,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
