"""Open Inference Protocol (KServe V2) JSON bodies, shared by the frameworks that speak it."""

from __future__ import annotations

import numpy as np
import orjson

from bastion.bench.frameworks.base import ModelSpec


def encode_v2(model: ModelSpec, rows: np.ndarray, *, request_output: bool = True) -> bytes:
    """One input tensor, flattened row-major; asks for ``model.output_name`` only."""
    data = [str(t) for t in rows] if model.datatype == "BYTES" else np.asarray(rows, np.float32).ravel().tolist()
    body: dict[str, object] = {
        "inputs": [{"name": model.input_name, "datatype": model.datatype, "shape": list(rows.shape), "data": data}]
    }
    if request_output:
        body["outputs"] = [{"name": model.output_name}]
    return orjson.dumps(body)


def decode_v2(model: ModelSpec, body: bytes) -> np.ndarray:
    doc = orjson.loads(body)
    for out in doc.get("outputs", []):
        if out.get("name") == model.output_name:
            return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    names = [o.get("name") for o in doc.get("outputs", [])]
    raise ValueError(f"no output {model.output_name!r} in the response (outputs: {names})")
