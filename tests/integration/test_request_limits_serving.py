"""Request limits set on the command line hold on a live server, on every transport."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.serverproc import ServerProcess


@pytest.fixture(scope="module")
def server(onnx_demo_repo: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(onnx_demo_repo, "--poll-interval", "0", "--max-batch-size", "2", "--max-elements", "40",
                      "--max-string-bytes", "8", "--max-json-depth", "6")
    yield s
    assert s.stop() == 0, s.logs()


def simple_body(rows: int) -> dict:
    return {"inputs": [{"name": n, "datatype": "INT32", "shape": [rows, 16], "data": [0] * (16 * rows)}
                       for n in ("INPUT0", "INPUT1")]}


def grpc_code(server: ServerProcess, model: str, arrays: dict[str, np.ndarray], datatype: str) -> str:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for name, arr in arrays.items():
        t = grpcclient.InferInput(name, list(arr.shape), datatype)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    try:
        client.infer(model, inputs)
    except InferenceServerException as err:
        return str(err.status())
    finally:
        client.close()
    return "OK"


def test_within_limits_is_served(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v2/models/simple/infer", json=simple_body(1))
    assert r.status_code == 200, r.text


def test_batch_and_element_caps(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v2/models/simple/infer", json=simple_body(3))
    assert r.status_code == 400 and "max_batch_size" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/models/simple/infer", json=simple_body(2))  # 64 elements > 40
    assert r.status_code == 400 and "max_elements" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/models/simple:predict",
                   json={"instances": [{"INPUT0": [0] * 16, "INPUT1": [0] * 16}] * 3})
    assert r.status_code == 400, r.text
    x = np.zeros((3, 16), dtype=np.int32)
    assert grpc_code(server, "simple", {"INPUT0": x, "INPUT1": x}, "INT32") == "StatusCode.INVALID_ARGUMENT"


def test_string_length_cap(server: ServerProcess) -> None:
    body = {"inputs": [{"name": n, "datatype": "BYTES", "shape": [1, 16], "data": ["1"] * 15 + ["123456789"]}
                       for n in ("INPUT0", "INPUT1")]}
    r = httpx.post(f"{server.url}/v2/models/simple_string/infer", json=body)
    assert r.status_code == 413 and "max_string_bytes" in r.json()["error"]
    x = np.array([[b"1"] * 15 + [b"123456789"]], dtype=object)
    assert grpc_code(server, "simple_string", {"INPUT0": x, "INPUT1": x}, "BYTES") == "StatusCode.RESOURCE_EXHAUSTED"


def test_json_depth_cap(server: ServerProcess) -> None:
    body = simple_body(1)
    body["parameters"] = {"a": {"b": {"c": {"d": {"e": {"f": [1]}}}}}}  # 8 deep > 6
    r = httpx.post(f"{server.url}/v2/models/simple/infer", json=body)
    assert r.status_code == 400 and "max_json_depth" in r.json()["error"]
    # the server keeps serving
    assert httpx.post(f"{server.url}/v2/models/simple/infer", json=simple_body(1)).status_code == 200
