"""The floor of Python serving overhead: a bare ASGI app that runs one ONNX model.

It parses a V2 (Open Inference Protocol) JSON request, calls ``session.run`` inline on
the event loop and answers V2 JSON. No routing beyond "is this an infer call", no
validation, no batching, no metrics, no logging, no auth. Whatever Bastion costs over
this app is the price of its features; the benchmark's target is that this price
stays under ~10 % of throughput.

It is run by uvicorn in a child process, never imported by Bastion: the adapter
(``bastion.bench.frameworks.minimal``, used by ``bastion bench serving``) copies it into
the served folder and starts it by import string, so ``--workers`` works::

    MINIMAL_MODEL_PATH=repo/digits/1/model.onnx MINIMAL_MODEL_NAME=digits \
    python -m uvicorn minimal_app:app --app-dir FOLDER --host 127.0.0.1 --port 8000 \
        --loop uvloop --http httptools --no-access-log --log-level warning

Configuration comes from environment variables, not arguments, because uvicorn's
worker processes import the module afresh and pass nothing else along.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# numpy dtype → V2 datatype name, for the outputs this app can produce.
_V2_DATATYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.bool_): "BOOL",
}
_JSON = [(b"content-type", b"application/json")]


def _session(path: str) -> ort.InferenceSession:
    # Same threading as Bastion's ONNX runtime default: one intra-op and one inter-op
    # thread, so the three servers compare serving overhead, not ORT thread pools.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


MODEL_NAME = os.environ.get("MINIMAL_MODEL_NAME", "digits")
SESSION = _session(os.environ["MINIMAL_MODEL_PATH"]) if "MINIMAL_MODEL_PATH" in os.environ else None


def infer_json(session: ort.InferenceSession, body: bytes, model_name: str = MODEL_NAME) -> bytes:
    """One V2 JSON request → one V2 JSON response, with nothing checked on the way."""
    request = orjson.loads(body)
    feeds = {t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"]) for t in request["inputs"]}
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, feeds)
    outputs = [
        {
            "name": name,
            "datatype": _V2_DATATYPES[value.dtype],
            "shape": list(value.shape),
            "data": value.ravel(),  # orjson writes numpy arrays natively (OPT_SERIALIZE_NUMPY)
        }
        for name, value in zip(names, results, strict=True)
    ]
    return orjson.dumps({"model_name": model_name, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI entry point: POST …/infer runs the model, anything else answers 200 ``{}`` (health)."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    body = await _read_body(receive)
    status, payload = 200, b"{}"
    if scope["method"] == "POST" and scope["path"].endswith("/infer"):
        assert SESSION is not None, "set MINIMAL_MODEL_PATH"
        try:
            payload = infer_json(SESSION, body)
        except Exception as err:  # a benchmark error must show as a non-2xx count, not a dropped socket
            status, payload = 400, orjson.dumps({"error": str(err)})
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": payload})
