"""The official tritonclient (HTTP and gRPC) against a real server on the demo models.

Results must equal the in-process runtime's output: the server adds nothing to the math.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow


def _simple_inputs(mod, binary: bool | None = None):  # type: ignore[no-untyped-def]
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    inputs = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
    if binary is None:
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
    else:
        inputs[0].set_data_from_numpy(a, binary_data=binary)
        inputs[1].set_data_from_numpy(b, binary_data=binary)
    return a, b, inputs


def _digits(demo_repo: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    data = np.load(demo_repo / "digits" / "test_data.npz")
    x = data["X"][:32].astype(np.float32)
    sess = ort.InferenceSession(str(demo_repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return x, dict(zip(names, sess.run(None, {"input": x}), strict=True))


@pytest.fixture(scope="module")
def http(demo_server: ServerProcess):  # type: ignore[no-untyped-def]
    client = httpclient.InferenceServerClient(demo_server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(demo_server: ServerProcess):  # type: ignore[no-untyped-def]
    client = grpcclient.InferenceServerClient(demo_server.grpc_url)
    yield client
    client.close()


def test_http_health_and_metadata(http) -> None:  # type: ignore[no-untyped-def]
    assert http.is_server_live()
    assert http.is_server_ready()
    assert http.is_model_ready("simple")
    assert http.is_model_ready("digits", "1")
    meta = http.get_server_metadata()
    assert meta["name"] == "bastion"
    assert "binary_tensor_data" in meta["extensions"]
    model = http.get_model_metadata("simple")
    assert model["name"] == "simple"
    assert model["versions"] == ["1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in model["inputs"]} == {
        "INPUT0": ("INT32", [-1, 16]),
        "INPUT1": ("INT32", [-1, 16]),
    }


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_http_simple(http, binary: bool, compression: str | None) -> None:  # type: ignore[no-untyped-def]
    a, b, inputs = _simple_inputs(httpclient, binary)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary),
    ]
    result = http.infer(
        "simple",
        inputs,
        outputs=outputs,
        request_id="req-7",
        request_compression_algorithm=compression,
        response_compression_algorithm=compression,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.get_response()["id"] == "req-7"


def test_http_digits_matches_in_process(http, demo_repo: Path) -> None:  # type: ignore[no-untyped-def]
    x, expected = _digits(demo_repo)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = http.infer("digits", [inp], model_version="1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])


def test_http_requested_output_only(http) -> None:  # type: ignore[no-untyped-def]
    _, _, inputs = _simple_inputs(httpclient, True)
    result = http.infer("simple", inputs, outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert result.as_numpy("OUTPUT0") is None
    assert result.as_numpy("OUTPUT1") is not None


def test_http_errors_are_client_errors(http) -> None:  # type: ignore[no-untyped-def]
    _, _, inputs = _simple_inputs(httpclient, False)
    with pytest.raises(InferenceServerException) as err:
        http.infer("no_such_model", inputs)
    assert "no_such_model" in str(err.value)
    bad = httpclient.InferInput("INPUT0", [1, 8], "INT32")
    bad.set_data_from_numpy(np.zeros((1, 8), np.int32))
    with pytest.raises(InferenceServerException) as err:
        http.infer("simple", [bad, inputs[1]])
    assert "INPUT0" in str(err.value) and "shape" in str(err.value)
    assert http.is_server_ready()


def test_grpc_health_and_metadata(grpc) -> None:  # type: ignore[no-untyped-def]
    assert grpc.is_server_live()
    assert grpc.is_server_ready()
    assert grpc.is_model_ready("simple")
    meta = grpc.get_model_metadata("digits", as_json=True)
    assert meta["name"] == "digits"
    assert [i["name"] for i in meta["inputs"]] == ["input"]
    assert grpc.get_server_metadata(as_json=True)["name"] == "bastion"


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_grpc_simple(grpc, compression: str | None) -> None:  # type: ignore[no-untyped-def]
    a, b, inputs = _simple_inputs(grpcclient)
    result = grpc.infer("simple", inputs, compression_algorithm=compression)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_grpc_digits_matches_in_process(grpc, demo_repo: Path) -> None:  # type: ignore[no-untyped-def]
    x, expected = _digits(demo_repo)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = grpc.infer("digits", [inp])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])


def test_grpc_errors(grpc) -> None:  # type: ignore[no-untyped-def]
    _, _, inputs = _simple_inputs(grpcclient)
    with pytest.raises(InferenceServerException) as err:
        grpc.infer("no_such_model", inputs)
    assert err.value.status() == "StatusCode.NOT_FOUND"
    bad = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as err:
        grpc.infer("simple", [bad, inputs[1]])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT0" in err.value.message()
    assert grpc.is_server_live()


def test_load_unload_through_both_clients(onnx_demo_repo: Path) -> None:
    with ServerProcess(onnx_demo_repo, "--poll-interval", "0") as server:
        http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        index = {m["name"]: m for m in http.get_model_repository_index()}
        assert index["digits"]["state"] == "READY"
        http.unload_model("digits")
        assert not http.is_model_ready("digits")
        with pytest.raises(InferenceServerException):
            inp = httpclient.InferInput("input", [1, 64], "FP32")
            inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
            http.infer("digits", [inp])
        grpc.load_model("digits")
        assert grpc.is_model_ready("digits")
        grpc.unload_model("simple")
        assert not http.is_model_ready("simple")
        http.load_model("simple")
        assert http.is_model_ready("simple")
        # a client-supplied config is refused alike on both transports (one rule, in the plane)
        for client in (http, grpc):
            with pytest.raises(InferenceServerException, match="only from its model repository"):
                client.load_model("simple", config='{"backend": "python"}')
        refused = httpx.post(f"{server.url}/v2/repository/models/simple/unload", json={"parameters": {"force": True}})
        assert refused.status_code == 400
        assert "parameters['force']: unknown unloading a model parameter" in refused.json()["error"]
        assert http.is_model_ready("simple")
        http.close()
        grpc.close()
