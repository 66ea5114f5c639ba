"""Open Inference Protocol (KServe V2) JSON bodies, shared by the frameworks that speak it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson

from bastion.bench.frameworks.base import ModelSpec
from bastion.core.tensors import InferenceRequest, InferTensor, RequestedOutput
from bastion.protocol import v2_rest


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


def encode_v2_binary(
    model: ModelSpec, rows: np.ndarray, outputs: Sequence[str] | None = None
) -> tuple[bytes, dict[str, str]]:
    """The same request in the binary-tensor extension, as ``tritonclient`` sends it by
    default: a JSON header, then the raw little-endian tensor; the outputs (default:
    ``model.output_name`` alone) asked for as binary too. Returns the body and the headers
    it needs (``Inference-Header-Content-Length``)."""
    if model.datatype == "BYTES":
        data = np.array([str(t).encode("utf-8") for t in rows], dtype=object)
    else:
        data = np.ascontiguousarray(rows, dtype=np.float32)
    tensor = InferTensor(model.input_name, model.datatype, tuple(data.shape), data)
    request = InferenceRequest(
        model.name,
        None,
        [tensor],
        outputs=[RequestedOutput(name, {"binary_data": True}) for name in (outputs or [model.output_name])],
    )
    body, header_length = v2_rest.encode_infer_request(request, True)
    assert header_length is not None
    return body, {"Inference-Header-Content-Length": str(header_length)}


def decode_v2_binary(model: ModelSpec, body: bytes, header_length: int | None) -> np.ndarray:
    """``model.output_name`` from a V2 response, binary or JSON."""
    response = v2_rest.decode_infer_response(body, header_length)
    for out in response.outputs:
        if out.name == model.output_name:
            return np.asarray(out.data, dtype=np.float32).reshape(out.shape)
    raise ValueError(f"no output {model.output_name!r} in the response (outputs: {[o.name for o in response.outputs]})")
