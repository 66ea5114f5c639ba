"""Raw HTTP (curl and hand-built bodies): the V2 API, TF-Serving REST, metrics, and bad input.

Every malformed request must get a 4xx whose message names the field, and the server
must keep serving afterwards.
"""

from __future__ import annotations

import gzip
import json
import struct
import subprocess

import httpx
import numpy as np
import orjson
import pytest

from tests.promtext import sample
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow

SIMPLE = {
    "inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    ]
}


def _post(
    server: ServerProcess, path: str, body: bytes | dict, headers: dict[str, str] | None = None
) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers or {}, timeout=10)


def test_curl_health_and_infer(demo_server: ServerProcess) -> None:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{demo_server.url}/v2/health/ready"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout == "200"
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", f"{demo_server.url}/v2/models/simple/infer",
         "-H", "content-type: application/json", "-d", json.dumps(SIMPLE)],
        capture_output=True, text=True, check=True,
    )
    doc = json.loads(out.stdout)
    assert doc["model_name"] == "simple"
    outs = {o["name"]: o for o in doc["outputs"]}
    assert outs["OUTPUT0"]["data"] == [i + 1 for i in range(16)]
    assert outs["OUTPUT1"]["data"] == [i - 1 for i in range(16)]
    assert outs["OUTPUT0"]["shape"] == [1, 16] and outs["OUTPUT0"]["datatype"] == "INT32"


def test_curl_gzip_response(demo_server: ServerProcess) -> None:
    """curl --compressed gets a gzipped answer when it is big enough to be worth it
    (64 rows here); a one-row answer (~300 bytes) is sent as it is."""
    def post(rows: int) -> tuple[bytes, bytes]:
        body = {"inputs": [{**t, "shape": [rows, 16], "data": t["data"] * rows} for t in SIMPLE["inputs"]]}
        out = subprocess.run(
            ["curl", "-s", "--compressed", "-D", "-", "-X", "POST", f"{demo_server.url}/v2/models/simple/infer",
             "-d", json.dumps(body)],
            capture_output=True, check=True,
        )
        head, _, answer = out.stdout.partition(b"\r\n\r\n")
        assert json.loads(answer)["model_name"] == "simple"
        return head.lower(), answer

    head, _ = post(64)
    assert b"content-encoding: gzip" in head
    head, _ = post(1)
    assert b"content-encoding" not in head


def test_nested_data_and_versioned_route(demo_server: ServerProcess) -> None:
    body = {
        "id": "abc",
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [2, 16], "data": [list(range(16)), list(range(16))]},
            {"name": "INPUT1", "datatype": "INT32", "shape": [2, 16], "data": [[2] * 16, [3] * 16]},
        ],
        "outputs": [{"name": "OUTPUT1"}],
    }
    r = _post(demo_server, "/v2/models/simple/versions/1/infer", body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "abc" and doc["model_version"] == "1"
    assert [o["name"] for o in doc["outputs"]] == ["OUTPUT1"]
    assert doc["outputs"][0]["data"][:3] == [-2, -1, 0]
    assert doc["outputs"][0]["data"][16:19] == [-3, -2, -1]


def test_binary_request_and_gzip_request(demo_server: ServerProcess) -> None:
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    header = orjson.dumps({
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [4, 64], "parameters": {"binary_data_size": x.nbytes}}
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    })
    body = header + x.tobytes()
    r = _post(demo_server, "/v2/models/digits/infer", gzip.compress(body), {
        "inference-header-content-length": str(len(header)), "content-encoding": "gzip",
    })
    assert r.status_code == 200, r.text
    hl = int(r.headers["inference-header-content-length"])
    doc = orjson.loads(r.content[:hl])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 4 * 10 * 4
    probs = np.frombuffer(r.content[hl:], dtype=np.float32).reshape(4, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def _nan_binary() -> tuple[bytes, dict[str, str]]:
    x = np.zeros((1, 64), np.float32)
    x[0, 3] = np.nan
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                       "parameters": {"binary_data_size": x.nbytes}}]})
    return header + x.tobytes(), {"inference-header-content-length": str(len(header))}


def _lying_binary() -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                       "parameters": {"binary_data_size": 256}}]})
    return header + b"\0" * 100, {"inference-header-content-length": str(len(header))}


def _header_too_long() -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(SIMPLE)
    return body, {"inference-header-content-length": str(len(body) + 10)}


def _bad(inputs_patch: dict, index: int = 0) -> dict:
    doc = json.loads(json.dumps(SIMPLE))
    doc["inputs"][index].update(inputs_patch)
    return doc


BAD_REQUESTS = [
    # (id, path, body, headers, status, words the message must contain)
    ("malformed-json", "/v2/models/simple/infer", b"{not json", {}, 400, ["JSON"]),
    ("not-an-object", "/v2/models/simple/infer", b"[1,2,3]", {}, 400, ["object"]),
    ("no-inputs", "/v2/models/simple/infer", {"outputs": []}, {}, 400, ["inputs"]),
    ("unknown-input", "/v2/models/simple/infer", _bad({"name": "NOPE"}), {}, 400, ["NOPE"]),
    ("missing-input", "/v2/models/simple/infer", {"inputs": SIMPLE["inputs"][:1]}, {}, 400, ["INPUT1"]),
    ("wrong-datatype", "/v2/models/simple/infer", _bad({"datatype": "FP32"}), {}, 400, ["INPUT0", "INT32"]),
    ("bad-datatype", "/v2/models/simple/infer", _bad({"datatype": "INT33"}), {}, 400, ["INT33"]),
    ("wrong-shape", "/v2/models/simple/infer", _bad({"shape": [1, 8], "data": list(range(8))}), {}, 400,
     ["INPUT0", "shape"]),
    ("data-length", "/v2/models/simple/infer", _bad({"data": list(range(15))}), {}, 400, ["INPUT0", "15"]),
    ("string-in-ints", "/v2/models/simple/infer", _bad({"data": ["a"] * 16}), {}, 400, ["INPUT0"]),
    ("int-overflow", "/v2/models/simple/infer", _bad({"data": [2**40] * 16}), {}, 400, ["INPUT0"]),
    ("negative-dim", "/v2/models/simple/infer", _bad({"shape": [-1, 16]}), {}, 400, ["shape"]),
    ("unknown-output", "/v2/models/simple/infer", {**SIMPLE, "outputs": [{"name": "OUT9"}]}, {}, 400, ["OUT9"]),
    ("unknown-model", "/v2/models/nope/infer", SIMPLE, {}, 404, ["nope"]),
    ("unknown-version", "/v2/models/simple/versions/9/infer", SIMPLE, {}, 404, ["9"]),
    ("unknown-route", "/v2/models/simple/predict", SIMPLE, {}, 404, ["route"]),
    ("nan-binary", "/v2/models/digits/infer", *_nan_binary(), 400, ["NaN"]),
    ("binary-lies", "/v2/models/digits/infer", *_lying_binary(), 400, ["binary"]),
    ("header-length-lies", "/v2/models/simple/infer", *_header_too_long(), 400, ["Header"]),
    ("bad-header-value", "/v2/models/simple/infer", orjson.dumps(SIMPLE),
     {"inference-header-content-length": "abc"}, 400, ["Inference-Header-Content-Length"]),
    ("bad-gzip", "/v2/models/simple/infer", b"not gzip", {"content-encoding": "gzip"}, 400, ["gzip"]),
    ("unsupported-encoding", "/v2/models/simple/infer", b"x", {"content-encoding": "br"}, 415, ["br"]),
    ("batch-too-big", "/v2/models/simple/infer",
     {"inputs": [{**i, "shape": [65, 16], "data": [0] * (65 * 16)} for i in SIMPLE["inputs"]]}, {}, 400,
     ["max_batch_size"]),
    ("tfs-both-formats", "/v1/models/digits:predict", {"instances": [[0] * 64], "inputs": [[0] * 64]}, {}, 400,
     ["instances"]),
    ("tfs-ragged", "/v1/models/digits:predict", {"instances": [[0] * 64, [0] * 3]}, {}, 400, []),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "words"),
                         [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_4xx_and_server_keeps_serving(
    demo_server: ServerProcess, path: str, body: bytes | dict, headers: dict, status: int, words: list[str]
) -> None:
    r = _post(demo_server, path, body, headers)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    for word in words:
        assert word in message, message
    ok = _post(demo_server, "/v2/models/simple/infer", SIMPLE)
    assert ok.status_code == 200


def test_method_not_allowed(demo_server: ServerProcess) -> None:
    r = httpx.get(f"{demo_server.url}/v2/models/simple/infer")
    assert r.status_code == 405
    assert "POST" in r.json()["error"]


def test_oversized_body_is_413(small_body_server: ServerProcess) -> None:
    server = small_body_server  # --max-body-bytes 1000
    r = _post(server, "/v2/models/simple/infer", b"{" + b" " * 10_000 + b"}")
    assert r.status_code == 413
    assert "1000" in r.json()["error"]
    # a small gzip body that inflates past the limit is refused the same way
    compressed = gzip.compress(b" " * 100_000)
    assert len(compressed) < 1000
    r = _post(server, "/v2/models/simple/infer", compressed, {"content-encoding": "gzip"})
    assert r.status_code == 413
    assert _post(server, "/v2/models/simple/infer", SIMPLE).status_code == 200


def test_tfserving_predict_and_status(demo_server: ServerProcess) -> None:
    r = _post(demo_server, "/v1/models/simple:predict", {
        "instances": [{"INPUT0": list(range(16)), "INPUT1": [1] * 16}, {"INPUT0": [5] * 16, "INPUT1": [5] * 16}],
    })
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert preds[0]["OUTPUT0"] == [i + 1 for i in range(16)]
    assert preds[1]["OUTPUT1"] == [0] * 16
    r = _post(demo_server, "/v1/models/digits/versions/1:predict", {"inputs": {"input": [[0.5] * 64]}})
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    assert len(outs["probabilities"][0]) == 10
    # row format with a 1-D INT64 output (ONNX Runtime returns numpy.longlong rows)
    r = _post(demo_server, "/v1/models/digits:predict", {"instances": [[0.5] * 64, [0.0] * 64]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and isinstance(preds[0]["label"], int) and len(preds[0]["probabilities"]) == 10
    status = httpx.get(f"{demo_server.url}/v1/models/digits").json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    assert httpx.get(f"{demo_server.url}/v1/models/nope").status_code == 404
    one = httpx.get(f"{demo_server.url}/v1/models/digits/versions/1").json()["model_version_status"]
    assert one == [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    seven = httpx.get(f"{demo_server.url}/v1/models/digits/versions/7").json()["model_version_status"][0]
    assert seven["state"] == "UNAVAILABLE" and "7" in seven["status"]["error_message"]
    assert httpx.get(f"{demo_server.url}/v1/models/digits/versions/x").status_code == 400


def test_metrics_count_requests(demo_server: ServerProcess) -> None:
    for _ in range(3):
        assert _post(demo_server, "/v2/models/simple/infer", SIMPLE).status_code == 200
    _post(demo_server, "/v2/models/simple/infer", _bad({"datatype": "FP32"}))
    text = httpx.get(f"{demo_server.url}/metrics").text
    success = sample(text, "bastion_inference_requests_total", model="simple", version="1", outcome="success")
    assert success is not None and success >= 3
    errors = sample(text, "bastion_inference_requests_total", model="simple", version="1", outcome="client_error")
    assert errors is not None and errors >= 1
    for name in ("bastion_inference_request_duration_seconds_bucket", "bastion_inference_queue_duration_seconds",
                 "bastion_inference_compute_duration_seconds", "bastion_inference_batch_size_bucket",
                 "bastion_inference_queue_depth"):
        assert name in text
    # unknown model names never become label values (unbounded cardinality)
    _post(demo_server, "/v2/models/attacker-chosen-name/infer", SIMPLE)
    assert "attacker-chosen-name" not in httpx.get(f"{demo_server.url}/metrics").text


def test_fp32_binary_roundtrip_struct(demo_server: ServerProcess) -> None:
    # BYTES-free sanity check that the binary layout is little-endian row-major
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    header = orjson.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
    ], "parameters": {"binary_data_output": True}})
    body = header + struct.pack("<16i", *x.ravel()) + struct.pack("<16i", *([2] * 16))
    r = _post(demo_server, "/v2/models/simple/infer", body, {"inference-header-content-length": str(len(header))})
    assert r.status_code == 200
    hl = int(r.headers["inference-header-content-length"])
    raw = r.content[hl:]
    assert struct.unpack("<16i", raw[:64]) == tuple(i + 2 for i in range(16))
