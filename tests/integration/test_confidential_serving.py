"""Confidential serving with real processes: a front server, its supervised trusted worker
(an ordinary process here: no TEE), and the key-release service, on loopback.

One deployment is shared by the module's tests (it takes a few seconds to start); the
tests that kill the worker or start a modified one run last or on their own servers.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bastion.client import Client, ClientError
from bastion.confidential.attestation import AttestationError
from bastion.confidential.package import package_confidential
from bastion.confidential.sealing import PARAMETER, SEALED_TENSOR, SUITE_NAME, SealedRemoteError, seal_request
from bastion.guard.bundles import generate_signing_key, write_public_key
from bastion.guard.keyproviders import generate_master_key, load_key_provider, write_master_key
from tests.polling import wait_until
from tests.runtimes.onnx_models import affine_model
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow

WIDTH = 64
OFFSET = 7.25
BASTION = [sys.executable, "-m", "bastion.cli.main"]
ZOO_VARIANTS = ("digits_tree", "digits_logreg", "digits_mlp")
OPEN_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}


@dataclass
class Deployment:
    root: Path
    repo: Path
    worker_yaml: Path
    measurement: str
    kms_url: str
    kms: subprocess.Popen[bytes]
    server: ServerProcess
    audit_dir: Path


def _run(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([*BASTION, *args], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def _model_dir(root: Path, name: str) -> Path:
    plain = root / "plain" / name
    (plain / "1").mkdir(parents=True)
    (plain / "1" / "model.onnx").write_bytes(affine_model(offset=OFFSET, width=WIDTH))
    (plain / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx", "max_batch_size": 64}))
    return plain


def _worker_yaml(path: Path, **extra: object) -> Path:
    config = {"attestation": "dev", "key_provider": "module:bastion.confidential.kms_client:from_env",
              "trusted_signers": ["signer.pub"], "max_sealed_bytes": 1 << 20,
              "zoos": {"digits_zoo": list(ZOO_VARIANTS)}, **extra}
    path.write_text(yaml.safe_dump(config))
    return path


def _confidential_zoo(make_digits_zoo: Callable[..., Path], root: Path, repo: Path, **seal: Any) -> None:
    """The tests' digits zoo, profiled as plain models (profiling runs the models in the
    profiler's process), then every variant packaged confidential beside the zoo files."""
    plain = root / "plain-zoo"
    plain.mkdir()
    make_digits_zoo(plain)
    subprocess.run([*BASTION, "profile", str(plain), "--zoo", "digits_zoo", "--iterations", "20", "--json"],
                   capture_output=True, text=True, check=True, timeout=300)
    for variant in ZOO_VARIANTS:
        package_confidential(plain / variant, repo / variant, e2e="optional", **seal)
    shutil.copytree(plain / "digits_zoo", repo / "digits_zoo")


def _chain_model() -> bytes:
    """x FP32 [batch, 16] -> relu(x W1) W2 -> y [batch, 4]: a two-layer net with one cut point."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["features"]),
         helper.make_node("MatMul", ["features", "w2"], ["y"])],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(size=(32, 4)).astype(np.float32), "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _partitioned(root: Path, repo: Path, **seal: Any) -> None:
    """``chain`` served whole and plain, and ``chain_split``: its head (x -> features) sealed
    for the worker, its tail (features -> y) plain beside it."""
    import onnx.utils

    full = root / "chain.onnx"
    full.write_bytes(_chain_model())
    (repo / "chain" / "1").mkdir(parents=True)
    shutil.copyfile(full, repo / "chain" / "1" / "model.onnx")
    (repo / "chain" / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx", "max_batch_size": 64}))
    head_dir = root / "plain" / "chain_split"
    (head_dir / "1").mkdir(parents=True)
    onnx.utils.extract_model(str(full), str(head_dir / "1" / "model.onnx"), ["x"], ["features"])
    onnx.utils.extract_model(str(full), str(root / "tail.onnx"), ["features"], ["y"])
    (head_dir / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx", "max_batch_size": 64}))
    package_confidential(head_dir, repo / "chain_split", e2e="optional", tails={1: root / "tail.onnx"}, **seal)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, make_digits_zoo: Callable[..., Path]) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("conf")
    key_file = root / "master.key"
    write_master_key(key_file, generate_master_key())
    signer = generate_signing_key()
    write_public_key(signer.public_key(), root / "signer.pub")
    provider = load_key_provider(f"file:{key_file}")
    repo = root / "repo"
    plain = _model_dir(root, "affine")
    for name, e2e in (("secret", "optional"), ("strict", "required")):
        package_confidential(plain, repo / name, key_id="k1", signing_key=signer, key_provider=provider, e2e=e2e)
    _confidential_zoo(make_digits_zoo, root, repo, key_id="k1", signing_key=signer, key_provider=provider)
    _partitioned(root, repo, key_id="k1", signing_key=signer, key_provider=provider)
    # a plain model beside them: it keeps serving whatever happens to the worker
    (repo / "open" / "1").mkdir(parents=True)
    (repo / "open" / "1" / "model.onnx").write_bytes(affine_model(offset=1.0, width=4))
    (repo / "open" / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx", "max_batch_size": 8}))

    worker_yaml = _worker_yaml(root / "worker.yaml")
    measurement = _run("worker", "measure", "--config", str(worker_yaml)).strip()
    db = root / "kms.db"
    _run("kms", "import-key", "k1", "--key-file", str(key_file), "--db", str(db))
    _run("kms", "policy", "k1", "--accept", measurement, "--allow-dev", "--db", str(db))
    port_file = root / "kms.port"
    kms = subprocess.Popen([*BASTION, "kms", "serve", "--db", str(db), "--audit-dir", str(root / "kms-audit"),
                            "--port", "0", "--port-file", str(port_file)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 30, 0.05, what="kms port file")
    kms_url = f"http://127.0.0.1:{port_file.read_text().strip()}"
    old = os.environ.get("BASTION_KMS_URL")
    os.environ["BASTION_KMS_URL"] = kms_url  # the server's supervised worker inherits it
    audit_dir = root / "audit"
    try:
        server = ServerProcess(repo, "--poll-interval", "0", "--worker-socket", str(root / "w.sock"),
                               "--worker-config", str(worker_yaml), "--audit-dir", str(audit_dir))
    except BaseException:
        kms.kill()
        raise
    try:
        yield Deployment(root, repo, worker_yaml, measurement, kms_url, kms, server, audit_dir)
    finally:
        server.stop()
        kms.send_signal(signal.SIGTERM)
        kms.wait(10)
        if old is None:
            os.environ.pop("BASTION_KMS_URL", None)
        else:
            os.environ["BASTION_KMS_URL"] = old


def _expected(x: np.ndarray) -> np.ndarray:
    return 2 * x + OFFSET


def test_plain_and_sealed_requests_are_answered_by_the_worker(deployment: Deployment) -> None:
    client = Client(deployment.server.url)
    meta = client.model_metadata("secret")
    assert meta["platform"].startswith("confidential/")
    x = np.random.default_rng(0).random((3, WIDTH), dtype=np.float32)
    plain = client.infer("secret", {"x": x})
    np.testing.assert_allclose(plain.outputs[0].data, _expected(x), rtol=1e-6)
    session = client.confidential("secret", expect=deployment.measurement, allow_dev=True)
    sealed = client.infer_confidential(session, {"x": x})
    np.testing.assert_allclose(sealed["y"], _expected(x), rtol=1e-6)
    np.testing.assert_allclose(sealed["z"], x.sum(axis=1), rtol=1e-5)
    # only the requested output, still sealed
    assert set(client.infer_confidential(session, {"x": x}, outputs=["z"])) == {"z"}


def test_required_e2e_refuses_plaintext_and_errors_inside_are_sealed(deployment: Deployment) -> None:
    client = Client(deployment.server.url)
    x = np.ones((1, WIDTH), np.float32)
    with pytest.raises(ClientError, match="end-to-end encrypted") as err:
        client.infer("strict", {"x": x})
    assert err.value.status == 400
    session = client.confidential("strict", expect=deployment.measurement, allow_dev=True)
    np.testing.assert_allclose(client.infer_confidential(session, {"x": x})["y"], _expected(x))
    # a wrong shape is found inside the worker: the message is sealed to the client
    with pytest.raises(SealedRemoteError, match="shape") as sealed:
        client.infer_confidential(session, {"x": np.ones((1, WIDTH + 1), np.float32)})
    assert sealed.value.status == 400
    # a declared row count that disagrees with the sealed rows is refused (quotas count it)
    envelope, _ = seal_request(session.attestation().public_key, "strict", {"x": np.ones((4, WIDTH), np.float32)})
    r = _post_sealed(deployment.server.url, "strict", envelope, bastion_rows=1)
    assert r.status_code == 200 and _header(r)["parameters"]["bastion_status"] == 400


def _header(r: httpx.Response) -> dict[str, object]:
    """The JSON part of a V2 answer (the sealed output travels as binary data after it)."""
    length = int(r.headers.get("inference-header-content-length", len(r.content)))
    return json.loads(r.content[:length])


def test_a_zoo_of_confidential_variants_takes_sealed_requests(deployment: Deployment) -> None:
    """The client seals for the zoo; the host picks a variant; the worker runs it because its
    measured config names the variant as the zoo's (and nothing else)."""
    client = Client(deployment.server.url)
    x = np.random.default_rng(2).random((4, 64), dtype=np.float32)
    plain = client.infer("digits_zoo", {"input": x})
    assert plain.model_name == "digits_zoo"
    session = client.confidential("digits_zoo", expect=deployment.measurement, allow_dev=True)
    sealed = client.infer_confidential(session, {"input": x})
    assert set(sealed) >= {"label"}, sealed.keys()
    assert sealed["label"].shape[0] == 4
    # a request sealed for the zoo is still refused by a model outside it
    envelope, _ = seal_request(session.attestation().public_key, "digits_zoo", {"x": np.ones((1, WIDTH), np.float32)})
    r = _post_sealed(deployment.server.url, "secret", envelope)
    assert r.status_code == 400 and "not sealed to this worker" in r.json()["error"]


def test_a_partitioned_model_answers_as_the_whole_model(deployment: Deployment) -> None:
    """The head runs in the worker (on a sealed input, or a plaintext one), the tail in the
    front: REST, gRPC and the sealed path all give the whole model's answers."""
    import tritonclient.grpc as grpcclient

    client = Client(deployment.server.url)
    x = np.random.default_rng(6).normal(size=(5, 16)).astype(np.float32)
    whole = client.infer("chain", {"x": x}).outputs[0].data
    meta = client.model_metadata("chain_split")
    assert meta["platform"].startswith("partitioned/") and meta["outputs"][0]["name"] == "y"
    np.testing.assert_allclose(client.infer("chain_split", {"x": x}).outputs[0].data, whole, rtol=1e-5, atol=1e-5)
    grpc = grpcclient.InferenceServerClient(deployment.server.grpc_url)
    tensor = grpcclient.InferInput("x", [5, 16], "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_allclose(grpc.infer("chain_split", [tensor]).as_numpy("y"), whole, rtol=1e-5, atol=1e-5)
    grpc.close()
    session = client.confidential("chain_split", expect=deployment.measurement, allow_dev=True)
    sealed = client.infer_confidential(session, {"x": x})
    np.testing.assert_allclose(sealed["y"], whole, rtol=1e-5, atol=1e-5)
    metrics = httpx.get(f"{deployment.server.url}/metrics", timeout=10).text
    for part in ("head", "tail"):
        assert re.search(rf'bastion_partition_part_seconds_count{{model="chain_split",part="{part}",version="1"}} '
                         r"[1-9]", metrics), part


def test_client_refuses_a_worker_with_another_measurement_or_dev_evidence(deployment: Deployment) -> None:
    client = Client(deployment.server.url)
    other = "ab" * 48
    with pytest.raises(AttestationError, match="measurement measurement: expected ab"):
        client.confidential("secret", expect=other, allow_dev=True).attest()
    with pytest.raises(AttestationError, match="dev evidence"):
        client.confidential("secret", expect=deployment.measurement).attest()


def test_cli_infer_confidential(deployment: Deployment, tmp_path: Path) -> None:
    x = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
    np.save(tmp_path / "x.npy", x)
    base = ["infer", "secret", "--url", deployment.server.url, "--input", str(tmp_path / "x.npy"), "--json"]
    done = subprocess.run([*BASTION, *base, "--confidential", "--expect-measurement", deployment.measurement,
                           "--allow-dev-attestation"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "DEV attestation" in done.stderr
    outputs = {o["name"]: o for o in json.loads(done.stdout)["outputs"]}
    np.testing.assert_allclose(np.array(outputs["y"]["data"]).reshape(2, WIDTH), _expected(x))
    refused = subprocess.run([*BASTION, *base, "--confidential", "--expect-measurement", "cd" * 48,
                              "--allow-dev-attestation"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "measurement" in refused.stderr
    no_expect = subprocess.run([*BASTION, *base, "--confidential"], capture_output=True, text=True, timeout=60)
    assert no_expect.returncode != 0 and "--expect-measurement" in no_expect.stderr


def test_tritonclient_http_and_grpc_carry_sealed_requests(deployment: Deployment) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from bastion.confidential.triton import TritonSealer

    sealer = TritonSealer(deployment.server.url, "strict", expect=deployment.measurement, allow_dev=True)
    x = np.random.default_rng(1).random((5, WIDTH), dtype=np.float32)
    http = httpclient.InferenceServerClient(deployment.server.url.removeprefix("http://"))
    np.testing.assert_allclose(sealer.infer(http, httpclient, {"x": x})["y"], _expected(x), rtol=1e-6)
    grpc = grpcclient.InferenceServerClient(deployment.server.grpc_url)
    np.testing.assert_allclose(sealer.infer(grpc, grpcclient, {"x": x})["y"], _expected(x), rtol=1e-6)
    http.close()
    grpc.close()
    sealer.close()


def _post_sealed(url: str, model: str, envelope: bytes, **params: object) -> httpx.Response:
    """The binary tensor extension: the envelope's bytes as they are (JSON strings are UTF-8)."""
    header = json.dumps({"inputs": [{"name": SEALED_TENSOR, "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 4 + len(envelope)}}],
                         "parameters": {PARAMETER: SUITE_NAME, **params}}).encode()
    body = header + len(envelope).to_bytes(4, "little") + envelope
    return httpx.post(f"{url}/v2/models/{model}/infer", content=body, timeout=10,
                      headers={"inference-header-content-length": str(len(header)),
                               "content-type": "application/octet-stream"})


def test_bad_sealed_input_is_refused_by_name_and_serving_goes_on(deployment: Deployment) -> None:
    url = deployment.server.url
    client = Client(url)
    session = client.confidential("secret", expect=deployment.measurement, allow_dev=True)
    key = session.attestation().public_key
    x = {"x": np.ones((1, WIDTH), np.float32)}
    good, _ = seal_request(key, "secret", x)
    stranger = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    other_key, _ = seal_request(stranger, "secret", x)
    other_model, _ = seal_request(key, "strict", x)
    cases = {
        "garbage": (os.urandom(200), "magic"),
        "truncated": (good[:40], "truncated"),
        "another key": (other_key, "not sealed to this worker"),
        "another model": (other_model, "not sealed to this worker"),
        "oversized": (b"BSE1" + os.urandom((1 << 20) + 10), "bytes"),
    }
    for what, (envelope, reason) in cases.items():
        r = _post_sealed(url, "secret", envelope)
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        assert re.search(reason, r.json()["error"], re.IGNORECASE), (what, r.text)
    assert _post_sealed(url, "secret", good).status_code == 200
    replay = _post_sealed(url, "secret", good)
    assert replay.status_code == 400 and "replay" in replay.json()["error"].lower()
    # the shape of the request itself
    r = httpx.post(f"{url}/v2/models/secret/infer", timeout=10, json={
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}],
        "parameters": {PARAMETER: SUITE_NAME}})
    assert r.status_code == 400 and SEALED_TENSOR in r.json()["error"]
    r = _post_sealed(url, "open", good)
    assert r.status_code == 400 and "not confidential" in r.json()["error"]
    # attestation: bad nonce, model that is not confidential
    assert httpx.get(f"{url}/v2/models/secret/attestation/zz", timeout=10).status_code == 400
    assert httpx.get(f"{url}/v2/models/secret/attestation/{'00' * 8}", timeout=10).status_code == 400
    assert httpx.get(f"{url}/v2/models/open/attestation/{'00' * 32}", timeout=10).status_code == 404
    # still serving, sealed and plain
    assert client.infer_confidential(session, x)["y"][0, 0] == pytest.approx(2 + OFFSET)
    assert client.infer("open", {"x": np.ones((1, 4), np.float32)}).outputs[0].data[0, 0] == pytest.approx(3.0)


def _memory_holds(pid: int, needles: list[bytes]) -> list[bool]:
    """Which ``needles`` occur anywhere in the readable memory of process ``pid``."""
    found = [False] * len(needles)
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split()
            start, end = (int(v, 16) for v in parts[0].split("-"))
            path = parts[5] if len(parts) > 5 else ""
            # code and read-only data of libraries cannot hold request data; huge reservations
            # are untouched address space
            if "r" not in parts[1] or ("w" not in parts[1] and path.startswith("/")) or end - start > 1 << 30:
                continue
            if path in ("[vvar]", "[vsyscall]"):
                continue
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            for i, needle in enumerate(needles):
                found[i] = found[i] or needle in chunk
    return found


def test_a_sealed_canary_never_reaches_the_front_process(deployment: Deployment) -> None:
    client = Client(deployment.server.url)
    session = client.confidential("secret", expect=deployment.measurement, allow_dev=True)
    rng = np.random.default_rng()
    # values in [1, 2): finite, and their bytes are as random as their mantissas
    secret = (1 + rng.random((1, WIDTH))).astype(np.float32)
    control = (1 + rng.random((1, WIDTH))).astype(np.float32)
    for _ in range(20):
        client.infer_confidential(session, {"x": secret})
    for _ in range(20):  # the same kind of data sent in the clear must be found: the scan works
        client.infer("secret", {"x": control})
    held = _memory_holds(deployment.server.proc.pid, [secret.tobytes(), control.tobytes()])
    assert held == [False, True], held
    logs = deployment.server.logs().encode()
    audit = b"".join(p.read_bytes() for p in deployment.audit_dir.rglob("*") if p.is_file())
    assert secret.tobytes() not in logs and secret.tobytes() not in audit
    assert base64.b64encode(secret.tobytes()) not in audit


def test_a_new_bundle_replaces_the_version_in_the_worker(deployment: Deployment) -> None:
    """Hot reload: the new runtime loads before the old one closes, and closing the old one
    must not unload the version just loaded."""
    root = deployment.root
    key_file = root / "master.key"
    signer = root / "signer2.pem"
    # a fresh signer is not trusted by the worker: the reload is refused and the old version serves
    from bastion.guard.bundles import write_private_key

    other = generate_signing_key()
    write_private_key(other, signer)
    plain = root / "plain2" / "affine"
    (plain / "1").mkdir(parents=True)
    (plain / "1" / "model.onnx").write_bytes(affine_model(offset=9.0, width=WIDTH))
    (plain / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx", "max_batch_size": 64}))
    staged = root / "staged" / "secret"
    package_confidential(plain, staged, key_id="k1", signing_key=other,
                         key_provider=load_key_provider(f"file:{key_file}"), e2e="optional")
    target = deployment.repo / "secret" / "1" / "model.bundle"
    original = target.read_bytes()
    client = Client(deployment.server.url)
    x = {"x": np.zeros((1, WIDTH), np.float32)}
    try:
        (staged / "1" / "model.bundle").replace(target)
        with contextlib.suppress(ClientError):  # refused by the worker: the loaded version stays
            client.load("secret")
        assert client.infer("secret", x).outputs[0].data[0, 0] == pytest.approx(OFFSET)
    finally:
        tmp = target.with_name(".restore")
        tmp.write_bytes(original)
        tmp.replace(target)
    client.load("secret")  # the same bundle loaded again: a new runtime, then the old one closes
    for _ in range(20):
        assert client.infer("secret", x).outputs[0].data[0, 0] == pytest.approx(OFFSET)
        time.sleep(0.05)


def test_keys_scopes_quotas_and_audit_hold_for_confidential_models(deployment: Deployment) -> None:
    """The same rules as for any model: the attestation and sealed requests need a key in
    scope, count against the tenant's quota, and are audited with digests only."""
    from bastion.guard.keystore import KeyStore
    from bastion.guard.principal import Limits

    root = deployment.root
    db = root / "keys.db"
    store = KeyStore(db)
    alice, _ = store.create_key("alice", models=["secret"])
    bob, _ = store.create_key("bob", models=["open"])
    carol, _ = store.create_key("carol", models=["secret"], limits=Limits(quota=3, quota_period="total"))
    store.close()
    x = {"x": np.full((1, WIDTH), 3.0, np.float32)}
    with ServerProcess(deployment.repo, "--keys", str(db), "--poll-interval", "0", "--worker-socket",
                       str(root / "w3.sock"), "--worker-config", str(deployment.worker_yaml),
                       "--audit-dir", str(root / "audit3")) as server:
        nonce = "11" * 32
        assert httpx.get(f"{server.url}/v2/models/secret/attestation/{nonce}", timeout=10).status_code == 401
        bob_headers = {"authorization": f"Bearer {bob}"}
        assert httpx.get(f"{server.url}/v2/models/secret/attestation/{nonce}", headers=bob_headers,
                         timeout=10).status_code == 403
        client = Client(server.url, api_key=alice)
        session = client.confidential("secret", expect=deployment.measurement, allow_dev=True)
        assert client.infer_confidential(session, x)["y"][0, 0] == pytest.approx(6 + OFFSET)
        envelope, _ = seal_request(session.attestation().public_key, "secret", x)
        assert _post_sealed(server.url, "secret", envelope).status_code == 401
        with pytest.raises(ClientError) as refused:
            Client(server.url, api_key=bob).infer_confidential(session, x)
        assert refused.value.status == 403
        limited = Client(server.url, api_key=carol)
        carol_session = limited.confidential("secret", expect=deployment.measurement, allow_dev=True)
        for _ in range(3):
            limited.infer_confidential(carol_session, x)
        with pytest.raises(ClientError) as over:
            limited.infer_confidential(carol_session, x)
        assert over.value.status == 429
    records = [json.loads(line) for p in sorted((root / "audit3").glob("*.jsonl"))
               for line in p.read_text().splitlines()]
    sealed = [r for r in records if r.get("model") == "secret" and r.get("tenant") == "alice"]
    assert sealed, records[-5:]
    text = json.dumps(sealed)
    assert base64.b64encode(x["x"].tobytes()).decode() not in text


def test_modified_worker_is_refused_its_keys(deployment: Deployment) -> None:
    """Another worker config is another measurement: the key-release service refuses it, the
    confidential models stay FAILED with the reason, the plain model serves."""
    root = deployment.root
    modified = _worker_yaml(root / "worker-modified.yaml", max_frame_bytes=1 << 24)
    with ServerProcess(deployment.repo, "--poll-interval", "0", "--worker-socket", str(root / "w2.sock"),
                       "--worker-config", str(modified), "--no-audit", wait_ready=False) as server:
        client = Client(server.url)

        def index() -> dict[str, dict[str, str]]:
            try:
                return {row["name"]: row for row in client.repository_index()}
            except ClientError:
                return {}

        wait_until(lambda: index().get("secret", {}).get("state") == "FAILED", 60, 0.1,
                   what="secret FAILED", details=server.logs)
        index = index()
        assert "measurement" in index["secret"]["reason"], index["secret"]
        r = httpx.post(f"{server.url}/v2/models/open/infer", timeout=10, json={
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]})
        assert r.status_code == 200


def test_worker_sigkill_answers_503_then_recovers(deployment: Deployment) -> None:
    """Runs last in the module: it restarts the shared deployment's worker."""
    url = deployment.server.url
    client = Client(url)
    session = client.confidential("secret", expect=deployment.measurement, allow_dev=True)
    x = {"x": np.ones((1, WIDTH), np.float32)}
    client.infer_confidential(session, x)
    children = subprocess.run(["pgrep", "-P", str(deployment.server.proc.pid)], capture_output=True, text=True)
    worker_pid = int(children.stdout.split()[0])
    os.kill(worker_pid, signal.SIGKILL)
    killed = time.monotonic()
    statuses: list[int] = []
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, WIDTH], "data": [1.0] * WIDTH}]}
    with httpx.Client(timeout=10) as http:
        while time.monotonic() - killed < 60:
            r = http.post(f"{url}/v2/models/secret/infer", json=body)
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert r.headers.get("retry-after"), r.headers
            elif r.status_code == 200 and 503 in statuses:
                break
            assert r.status_code in (200, 503), r.text
            # the plain model never stops
            assert http.post(f"{url}/v2/models/open/infer", json=OPEN_BODY).status_code == 200
    assert 503 in statuses and statuses[-1] == 200, statuses[-20:]
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert re.search(r"^bastion_trusted_worker_up 1\.0$", metrics, re.M), metrics
    connects = re.search(r"^bastion_trusted_worker_connects_total (\S+)$", metrics, re.M)
    assert connects is not None and float(connects.group(1)) >= 2
    # the restarted worker has a new key: the client's request is refused unopened, and the
    # client re-attests and sends it again by itself
    assert client.infer_confidential(session, x)["y"][0, 0] == pytest.approx(2 + OFFSET)
