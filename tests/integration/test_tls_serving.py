"""`bastion serve` over TLS and mutual TLS, with the clients people use: httpx, curl,
tritonclient (HTTP and gRPC)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from bastion.guard.tls import write_dev_certificates
from tests.serverproc import ServerProcess

pytestmark = [
    pytest.mark.slow,
    # tritonclient.http's TLS goes through gevent's ssl.wrap_socket and match_hostname
    pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:ssl.match_hostname\\(\\) is deprecated:DeprecationWarning"),
]

BODY = orjson.dumps({"inputs": [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
]})
CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_dev_certificates(tmp_path_factory.mktemp("certs"), clients=("alice",))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Another CA, with a client certificate of the same name."""
    return write_dev_certificates(tmp_path_factory.mktemp("rogue"), clients=("alice",))


def _tls_args(certs: dict[str, Path], client_auth: str = "none") -> list[str]:
    args = ["--poll-interval", "0", "--insecure-no-auth",
            "--tls-cert", str(certs["server"]), "--tls-key", str(certs["server_key"])]
    if client_auth != "none":
        args += ["--tls-client-ca", str(certs["ca"]), "--tls-client-auth", client_auth]
    return args


@pytest.fixture(scope="module")
def tls_server(onnx_demo_repo: Path, certs: dict[str, Path]) -> Iterator[ServerProcess]:
    server = ServerProcess(onnx_demo_repo, *_tls_args(certs), tls_ca=certs["ca"])
    yield server
    assert server.stop() == 0, server.logs()


@pytest.fixture(scope="module")
def mtls_server(onnx_demo_repo: Path, certs: dict[str, Path]) -> Iterator[ServerProcess]:
    server = ServerProcess(onnx_demo_repo, *_tls_args(certs, "required"), tls_ca=certs["ca"],
                           tls_client_cert=(certs["alice"], certs["alice_key"]))
    yield server
    assert server.stop() == 0, server.logs()


def _ctx(certs: dict[str, Path], cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _check_infer(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    out = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert out["OUTPUT0"] == [i + 1 for i in range(16)]


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run([CURL, "--silent", "--show-error", "--max-time", "10", *args],
                          capture_output=True, text=True, timeout=30)


def _simple_inputs(mod):  # type: ignore[no-untyped-def]
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    inputs = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return a + b, inputs


# ---- TLS ------------------------------------------------------------------------------------------


def test_rest_over_https_with_httpx(tls_server: ServerProcess, certs: dict[str, Path]) -> None:
    assert tls_server.url.startswith("https://")
    with httpx.Client(base_url=tls_server.url, verify=_ctx(certs)) as client:
        assert client.get("/v2/health/ready").status_code == 200
        _check_infer(client.post("/v2/models/simple/infer", content=BODY))
        # keep-alive over TLS
        _check_infer(client.post("/v2/models/simple/infer", content=BODY))


def test_rest_refuses_a_client_that_does_not_trust_the_server(tls_server: ServerProcess) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_server.url}/v2/health/live")  # system CAs do not include the dev CA


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_rest_over_https_with_curl(tls_server: ServerProcess, certs: dict[str, Path]) -> None:
    r = _curl("--cacert", str(certs["ca"]), "-H", "content-type: application/json",
              "--data-binary", BODY.decode(), f"{tls_server.url}/v2/models/simple/infer")
    assert r.returncode == 0, r.stderr
    assert orjson.loads(r.stdout)["model_name"] == "simple"
    r = _curl("--cacert", str(certs["ca"]), f"https://localhost:{tls_server.http_port}/v2/health/ready",
              "-o", "/dev/null", "-w", "%{http_code} %{ssl_verify_result}")
    assert r.returncode == 0 and r.stdout == "200 0", r.stderr


def test_plain_http_to_the_tls_port_fails(tls_server: ServerProcess) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_server.http_port}/v2/health/live", timeout=5)
    # the server survives it
    assert httpx.get(f"{tls_server.url}/v2/health/live", verify=tls_server.verify).status_code == 200


def test_grpc_over_tls_with_tritonclient(tls_server: ServerProcess, certs: dict[str, Path]) -> None:
    client = grpcclient.InferenceServerClient(tls_server.grpc_url, ssl=True, root_certificates=str(certs["ca"]))
    try:
        assert client.is_server_ready()
        expected, inputs = _simple_inputs(grpcclient)
        result = client.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected)
    finally:
        client.close()


def test_grpc_plaintext_to_the_tls_port_fails(tls_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(tls_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException):
            client.is_server_live(client_timeout=5)
    finally:
        client.close()


def test_http_tritonclient_over_tls(tls_server: ServerProcess, certs: dict[str, Path]) -> None:
    client = httpclient.InferenceServerClient(
        f"127.0.0.1:{tls_server.http_port}", ssl=True, ssl_options={"ca_certs": str(certs["ca"])})
    try:
        assert client.is_server_ready()
        expected, inputs = _simple_inputs(httpclient)
        np.testing.assert_array_equal(client.infer("simple", inputs).as_numpy("OUTPUT0"), expected)
    finally:
        client.close()


# ---- mutual TLS ------------------------------------------------------------------------------------


def test_mtls_rest_serves_a_client_with_a_good_certificate(mtls_server: ServerProcess, certs: dict[str, Path]) -> None:
    with httpx.Client(base_url=mtls_server.url, verify=_ctx(certs, certs["alice"], certs["alice_key"])) as client:
        _check_infer(client.post("/v2/models/simple/infer", content=BODY))


def test_mtls_rest_refuses_clients_without_a_good_certificate(
    mtls_server: ServerProcess, certs: dict[str, Path], rogue: dict[str, Path]
) -> None:
    url = f"{mtls_server.url}/v2/health/live"
    with pytest.raises(httpx.TransportError):
        httpx.get(url, verify=_ctx(certs), timeout=5)
    with pytest.raises(httpx.TransportError):
        httpx.get(url, verify=_ctx(certs, rogue["alice"], rogue["alice_key"]), timeout=5)


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_mtls_with_curl(mtls_server: ServerProcess, certs: dict[str, Path], rogue: dict[str, Path]) -> None:
    url = f"{mtls_server.url}/v2/health/ready"
    r = _curl("--cacert", str(certs["ca"]), "--cert", str(certs["alice"]), "--key", str(certs["alice_key"]),
              "-o", "/dev/null", "-w", "%{http_code}", url)
    assert r.returncode == 0 and r.stdout == "200", r.stderr
    assert _curl("--cacert", str(certs["ca"]), url).returncode != 0
    assert _curl("--cacert", str(certs["ca"]), "--cert", str(rogue["alice"]), "--key", str(rogue["alice_key"]),
                 url).returncode != 0


def test_mtls_grpc(mtls_server: ServerProcess, certs: dict[str, Path], rogue: dict[str, Path]) -> None:
    def client(cert: Path | None = None, key: Path | None = None) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(
            mtls_server.grpc_url, ssl=True, root_certificates=str(certs["ca"]),
            private_key=str(key) if key else None, certificate_chain=str(cert) if cert else None)

    good = client(certs["alice"], certs["alice_key"])
    try:
        expected, inputs = _simple_inputs(grpcclient)
        np.testing.assert_array_equal(good.infer("simple", inputs).as_numpy("OUTPUT0"), expected)
    finally:
        good.close()
    for bad in (client(), client(rogue["alice"], rogue["alice_key"])):
        try:
            with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
                bad.is_server_live(client_timeout=5)
        finally:
            bad.close()


def test_mtls_http_tritonclient(mtls_server: ServerProcess, certs: dict[str, Path]) -> None:
    client = httpclient.InferenceServerClient(
        f"127.0.0.1:{mtls_server.http_port}", ssl=True,
        ssl_options={"ca_certs": str(certs["ca"]), "certfile": str(certs["alice"]), "keyfile": str(certs["alice_key"])})
    try:
        expected, inputs = _simple_inputs(httpclient)
        np.testing.assert_array_equal(client.infer("simple", inputs).as_numpy("OUTPUT0"), expected)
    finally:
        client.close()


def test_mtls_with_uvicorn(onnx_demo_repo: Path, certs: dict[str, Path]) -> None:
    with ServerProcess(onnx_demo_repo, *_tls_args(certs, "required"), "--http-impl", "uvicorn", "--grpc-port", "-1",
                       tls_ca=certs["ca"], tls_client_cert=(certs["alice"], certs["alice_key"])) as server:
        with httpx.Client(base_url=server.url, verify=_ctx(certs, certs["alice"], certs["alice_key"])) as client:
            _check_infer(client.post("/v2/models/simple/infer", content=BODY))
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/v2/health/live", verify=_ctx(certs), timeout=5)


# ---- settings refused at startup -----------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--tls-cert", "{server}"], "tls_cert is set but tls_key is not"),
    (["--tls-key", "{server_key}"], "tls_key is set but tls_cert is not"),
    (["--tls-cert", "{server}", "--tls-key", "{server_key}", "--tls-client-auth", "required"],
     "tls_client_auth=required needs tls_client_ca"),
    (["--tls-cert", "{server}", "--tls-key", "{alice_key}"], "cannot load the TLS certificate"),
])
def test_inconsistent_tls_settings_stop_the_server(
    onnx_demo_repo: Path, certs: dict[str, Path], args: list[str], message: str
) -> None:
    names = {k: str(v) for k, v in certs.items()}
    server = ServerProcess(onnx_demo_repo, "--poll-interval", "0", "--insecure-no-auth",
                           *(a.format(**names) for a in args), wait_ready=False)
    try:
        code = server.proc.wait(60)
    finally:
        server.stop()
    assert code != 0
    assert message in server.log_path.read_text(errors="replace")
