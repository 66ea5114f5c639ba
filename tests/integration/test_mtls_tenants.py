"""Mutual TLS with the key store: a registered client certificate stands for an API key
(its tenant, scope and limits) on REST and gRPC; an unregistered one still needs a key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from bastion.guard.keystore import KeyStore
from bastion.guard.tls import fingerprint_pem, write_dev_certificates
from tests.serverproc import ServerProcess

BODY = {
    "inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    ]
}


@pytest.fixture(scope="module")
def setup(onnx_demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict, str]]:
    d = tmp_path_factory.mktemp("mtls-tenants")
    certs = write_dev_certificates(d / "certs", clients=("acme", "stranger"))
    db = d / "keys.db"
    with KeyStore(db) as store:
        store.create_key("acme", models=["simple"], cert_fingerprint=fingerprint_pem(certs["acme"].read_bytes()))
        token, _ = store.create_key("keyholder")
    server = ServerProcess(
        onnx_demo_repo, "--keys", str(db), "--poll-interval", "0",
        "--tls-cert", str(certs["server"]), "--tls-key", str(certs["server_key"]),
        "--tls-client-ca", str(certs["ca"]), "--tls-client-auth", "required",
        tls_ca=certs["ca"], tls_client_cert=(certs["acme"], certs["acme_key"]),
    )
    yield server, certs, token
    assert server.stop() == 0, server.logs()


def _ctx(certs: dict, client: str):  # type: ignore[no-untyped-def]
    import ssl

    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    ctx.load_cert_chain(str(certs[client]), str(certs[f"{client}_key"]))
    return ctx


def test_a_registered_certificate_is_the_tenants_credential_on_rest(setup) -> None:  # type: ignore[no-untyped-def]
    server, certs, _ = setup
    with httpx.Client(verify=_ctx(certs, "acme")) as http:
        r = http.post(f"{server.url}/v2/models/simple/infer", json=BODY)
        assert r.status_code == 200, r.text
        # the certificate carries the tenant's scope
        r = http.post(f"{server.url}/v2/models/digits/infer", json=BODY)
        assert r.status_code == 403 and "acme" in r.json()["error"]


def test_an_unregistered_certificate_needs_a_key(setup) -> None:  # type: ignore[no-untyped-def]
    server, certs, token = setup
    with httpx.Client(verify=_ctx(certs, "stranger")) as http:
        r = http.post(f"{server.url}/v2/models/simple/infer", json=BODY)
        assert r.status_code == 401 and "not registered" in r.json()["error"]
        r = http.post(f"{server.url}/v2/models/simple/infer", json=BODY, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200


def _grpc(server: ServerProcess, certs: dict, client: str) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        server.grpc_url, ssl=True, root_certificates=str(certs["ca"]),
        private_key=str(certs[f"{client}_key"]), certificate_chain=str(certs[client]),
    )


def _inputs() -> list[grpcclient.InferInput]:
    out = []
    for name, data in (("INPUT0", np.arange(16, dtype=np.int32)), ("INPUT1", np.ones(16, dtype=np.int32))):
        t = grpcclient.InferInput(name, [1, 16], "INT32")
        t.set_data_from_numpy(data.reshape(1, 16))
        out.append(t)
    return out


def test_a_registered_certificate_is_the_tenants_credential_on_grpc(setup) -> None:  # type: ignore[no-untyped-def]
    server, certs, _ = setup
    client = _grpc(server, certs, "acme")
    try:
        assert client.infer("simple", _inputs()).as_numpy("OUTPUT0").tolist() == [[i + 1 for i in range(16)]]
        with pytest.raises(InferenceServerException) as err:
            client.infer("digits", _inputs())  # outside the certificate's scope
        assert str(err.value.status()) == "StatusCode.PERMISSION_DENIED"
    finally:
        client.close()
    client = _grpc(server, certs, "stranger")
    try:
        with pytest.raises(InferenceServerException) as err:
            client.infer("simple", _inputs())
        assert str(err.value.status()) == "StatusCode.UNAUTHENTICATED"
    finally:
        client.close()
