"""The key-release service, for real over loopback HTTP: releases only to an attested worker
whose measurement the policy accepts, single-use nonces, every refusal named and audited,
and the worker's KmsKeyProvider opening a bundle sealed with a plain key file."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from click.testing import CliRunner

from bastion.cli.main import cli
from bastion.confidential.dev_evidence import DevEvidenceProducer
from bastion.confidential.identity import UnsealError, WorkerIdentity, set_current_identity
from bastion.confidential.kms import NONCE_BYTES, KmsApp, NonceBook, audit_log_for, bind_socket, release_info, serve_kms
from bastion.confidential.kms_client import KmsKeyProvider
from bastion.confidential.kms_store import KmsStore, check_policy
from bastion.core.errors import Overloaded, PermissionDenied
from bastion.guard.bundles import BundleKeyError, generate_signing_key, open_bundle, seal_bundle
from bastion.guard.keyproviders import (
    FileKeyProvider,
    KeyProviderError,
    KeyUnwrapError,
    encode_master_key,
    generate_master_key,
    load_key_provider,
    write_master_key,
)

KEY_ID = "models-v1"
GOOD = bytes.fromhex("5a" * 48)  # the measurement of the worker the policy expects
MODIFIED = bytes.fromhex("5b" * 48)  # one bit different: a modified worker
WEIGHTS = b"\x08\x01secret-weights" * 200


@dataclass
class Kms:
    url: str
    store: KmsStore
    app: KmsApp
    audit_dir: Path
    key_file: Path
    master: bytes

    def wrap(self, data_key: bytes, key_id: str = KEY_ID) -> bytes:
        return FileKeyProvider(self.key_file).wrap_key(key_id, data_key)


@contextmanager
def _running(app: KmsApp) -> Iterator[str]:
    """The service on a free loopback port, in a thread of its own (the tests' HTTP calls
    are synchronous, as the KmsKeyProvider's are)."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    started = threading.Event()
    holder: dict = {}

    async def main() -> None:
        holder["loop"], holder["stop"] = asyncio.get_running_loop(), asyncio.Event()
        started.set()
        await serve_kms(app, sock, stop=holder["stop"])

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(5)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(10)
        sock.close()


def _setup_store(tmp_path: Path) -> tuple[KmsStore, Path, bytes]:
    master = generate_master_key()
    key_file = tmp_path / "master.key"
    write_master_key(key_file, master)
    store = KmsStore(tmp_path / "kms.db")
    store.import_key_file(KEY_ID, key_file)
    store.set_policy(KEY_ID, check_policy([{"measurement": GOOD.hex()}], allow_dev=True))
    return store, key_file, master


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[Kms]:
    store, key_file, master = _setup_store(tmp_path)
    audit = audit_log_for(tmp_path / "kms-audit")
    app = KmsApp(store, audit)
    try:
        with _running(app) as url:
            yield Kms(url, store, app, tmp_path / "kms-audit", key_file, master)
    finally:
        audit.close()
        store.close()


@pytest.fixture
def http(kms: Kms) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=kms.url, timeout=5, trust_env=False) as client:
        yield client


def _worker(measurement: bytes = GOOD) -> WorkerIdentity:
    return WorkerIdentity.generate(DevEvidenceProducer(measurement))


def _nonce(http: httpx.Client) -> bytes:
    r = http.post("/v1/nonce")
    assert r.status_code == 200, r.text
    assert r.json()["expires_in"] == 120
    return base64.b64decode(r.json()["nonce"])


def _release_body(worker: WorkerIdentity, nonce: bytes, wrapped: bytes, *, evidence_nonce: bytes | None = None) -> dict:
    kind, evidence = worker.evidence(evidence_nonce or nonce)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return {"kind": kind, "evidence": b64(evidence), "nonce": b64(nonce), "wrapped": b64(wrapped)}


def _records(audit_dir: Path, writer: str = "kms") -> list[dict]:
    return [
        orjson.loads(line)
        for p in sorted(audit_dir.glob(f"audit-{writer}-*.jsonl"))
        for line in p.read_bytes().splitlines()
    ]


def test_release_to_a_matching_dev_worker(kms: Kms, http: httpx.Client) -> None:
    worker, data_key = _worker(), secrets.token_bytes(32)
    nonce = _nonce(http)
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(worker, nonce, kms.wrap(data_key)))
    assert r.status_code == 200, r.text
    sealed = base64.b64decode(r.json()["sealed_key"])
    assert data_key not in sealed
    assert worker.open(sealed, release_info(KEY_ID, nonce)) == data_key
    # only that worker opens it, and only for this key id and nonce
    with pytest.raises(UnsealError):
        _worker().open(sealed, release_info(KEY_ID, nonce))
    with pytest.raises(UnsealError):
        worker.open(sealed, release_info("other", nonce))
    with pytest.raises(UnsealError):
        worker.open(sealed, release_info(KEY_ID, bytes(NONCE_BYTES)))

    rec = _records(kms.audit_dir)[-1]
    assert rec["action"] == "kms.release" and rec["decision"] == "released" and rec["status"] == 200
    assert rec["key_id"] == KEY_ID and rec["kind"] == "dev" and rec["client"] == "127.0.0.1"
    assert rec["measurement"] == {"measurement": GOOD.hex()}
    assert rec["policy"] == kms.store.policy(KEY_ID).digest()


def test_kms_key_provider_opens_a_bundle_sealed_with_a_key_file(kms: Kms, tmp_path: Path) -> None:
    model = tmp_path / "secret_cnn"
    (model / "1").mkdir(parents=True)
    (model / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx"}))
    (model / "1" / "model.onnx").write_bytes(WEIGHTS)
    signer = generate_signing_key()
    out = tmp_path / "secret_cnn.bundle"
    seal_bundle(model, out, key_id=KEY_ID, signing_key=signer, key_provider=FileKeyProvider(kms.key_file))

    provider = KmsKeyProvider(kms.url, _worker())
    opened = open_bundle(out.read_bytes(), [signer.public_key()], provider, source=out.name)
    assert opened.read("1/model.onnx") == WEIGHTS

    # the modified worker is refused, and the bundle stays closed
    modified = KmsKeyProvider(kms.url, _worker(MODIFIED))
    with pytest.raises(
        BundleKeyError, match=f"measurement measurement: expected {GOOD.hex()}, the worker attests {MODIFIED.hex()}"
    ):
        open_bundle(out.read_bytes(), [signer.public_key()], modified, source=out.name)
    with pytest.raises(KeyProviderError, match="refused to release") as info:
        modified.unwrap_key(KEY_ID, kms.wrap(secrets.token_bytes(32)))
    assert not isinstance(info.value, KeyUnwrapError)
    # the service never wraps: the provider says how to seal instead
    with pytest.raises(KeyProviderError, match="import-key"):
        provider.wrap_key(KEY_ID, secrets.token_bytes(32))
    provider.close()
    modified.close()


def test_modified_worker_and_dev_policy_refusals_are_named_and_audited(kms: Kms, http: httpx.Client) -> None:
    wrapped = kms.wrap(secrets.token_bytes(32))
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(_worker(MODIFIED), _nonce(http), wrapped))
    assert r.status_code == 403
    assert r.json()["error"] == f"measurement measurement: expected {GOOD.hex()}, the worker attests {MODIFIED.hex()}"
    rec = _records(kms.audit_dir)[-1]
    assert (
        rec["action"] == "kms.refuse" and rec["status"] == 403 and rec["measurement"] == {"measurement": MODIFIED.hex()}
    )

    # two accepted measurements: the modified worker matches the second; a third still matches none
    kms.store.set_policy(
        KEY_ID, check_policy([{"measurement": GOOD.hex()}, {"measurement": MODIFIED.hex()}], allow_dev=True)
    )
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(_worker(MODIFIED), _nonce(http), wrapped))
    assert r.status_code == 200, r.text
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(_worker(b"\x01" * 48), _nonce(http), wrapped))
    assert r.status_code == 403 and "matches none of the 2 accepted measurements" in r.json()["error"]

    # the policy changes in the store apply to the running service at once
    kms.store.set_policy(KEY_ID, check_policy([{"measurement": GOOD.hex()}], allow_dev=False))
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(_worker(), _nonce(http), wrapped))
    assert r.status_code == 403 and r.json()["error"].startswith("dev evidence refused by policy")
    assert _records(kms.audit_dir)[-1]["reason"].startswith("dev evidence refused by policy")


def test_nonces_are_single_use_and_must_be_issued_here(kms: Kms, http: httpx.Client) -> None:
    worker, wrapped = _worker(), kms.wrap(secrets.token_bytes(32))
    nonce = _nonce(http)
    body = _release_body(worker, nonce, wrapped)
    assert http.post(f"/v1/keys/{KEY_ID}/release", json=body).status_code == 200
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=body)  # replayed
    assert r.status_code == 403 and r.json()["error"].startswith("unknown nonce or already used")
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(worker, secrets.token_bytes(32), wrapped))
    assert r.status_code == 403 and r.json()["error"].startswith("unknown nonce or already used")
    # evidence made for another nonce than the one sent
    r = http.post(
        f"/v1/keys/{KEY_ID}/release",
        json=_release_body(worker, _nonce(http), wrapped, evidence_nonce=secrets.token_bytes(32)),
    )
    assert r.status_code == 403 and "nonce does not match" in r.json()["error"]
    # a refused attempt used its nonce up too
    nonce = _nonce(http)
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(_worker(MODIFIED), nonce, wrapped))
    assert r.status_code == 403
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(worker, nonce, wrapped))
    assert r.status_code == 403 and "already used" in r.json()["error"]


def test_wrong_key_id_and_tampered_wrapped_key(kms: Kms, http: httpx.Client) -> None:
    worker = _worker()
    wrapped = kms.wrap(secrets.token_bytes(32))
    r = http.post("/v1/keys/other-key/release", json=_release_body(worker, _nonce(http), wrapped))
    assert r.status_code == 404 and "unknown key id 'other-key'" in r.json()["error"]
    r = http.post("/v1/keys/..%2Fx/release", json=_release_body(worker, _nonce(http), wrapped))
    assert r.status_code == 404
    # wrapped under another key id (the key id is bound into the wrap): does not unwrap here
    kms.store.add_key("other-key")
    kms.store.set_policy("other-key", check_policy([{"measurement": GOOD.hex()}], allow_dev=True))
    r = http.post("/v1/keys/other-key/release", json=_release_body(worker, _nonce(http), wrapped))
    assert r.status_code == 400 and r.json()["field"] == "wrapped"
    # a key id without a policy releases nothing
    kms.store.add_key("no-policy")
    r = http.post("/v1/keys/no-policy/release", json=_release_body(worker, _nonce(http), wrapped))
    assert r.status_code == 403 and "has no release policy" in r.json()["error"]

    tampered = bytearray(wrapped)
    tampered[-1] ^= 1
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(worker, _nonce(http), bytes(tampered)))
    assert r.status_code == 400 and r.json()["field"] == "wrapped"
    assert "does not unwrap under master key" in r.json()["error"]
    with pytest.raises(KeyUnwrapError, match="does not unwrap"):
        KmsKeyProvider(kms.url, worker).unwrap_key(KEY_ID, bytes(tampered))
    with pytest.raises(KeyUnwrapError, match="unknown key id"):
        KmsKeyProvider(kms.url, worker).unwrap_key("absent", wrapped)
    # (the "../x" path is no route at all, answered before any release decision)
    assert [r["status"] for r in _records(kms.audit_dir)[-6:]] == [404, 400, 403, 400, 400, 404]


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        ({"evidence": "", "nonce": "", "wrapped": ""}, "kind"),
        ({"kind": 7}, "kind"),
        ({"kind": "dev", "nonce": 5}, "nonce"),
        ({"kind": "dev", "nonce": "%%%"}, "nonce"),
        ({"kind": "dev", "nonce": _b64(b"short")}, "nonce"),
        ({"kind": "dev", "nonce": _b64(bytes(32))}, "evidence"),
        ({"kind": "dev", "nonce": _b64(bytes(32)), "evidence": ["x"]}, "evidence"),
        ({"kind": "dev", "nonce": _b64(bytes(32)), "evidence": _b64(b"e"), "wrapped": _b64(bytes(5000))}, "wrapped"),
        ({"kind": "dev", "nonce": _b64(bytes(32)), "evidence": _b64(b"e"), "wrapped": _b64(b"w"), "x": 1}, "x"),
    ],
)
def test_malformed_bodies_are_400_naming_the_field(kms: Kms, http: httpx.Client, body: object, field: str) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    r = http.post(f"/v1/keys/{KEY_ID}/release", content=content)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field and r.json()["error"].startswith(field)
    assert _records(kms.audit_dir)[-1]["status"] == 400


def test_oversized_bodies_wrong_routes_and_the_service_keeps_serving(kms: Kms, http: httpx.Client) -> None:
    r = http.post(f"/v1/keys/{KEY_ID}/release", content=b"{" + b" " * (300 * 1024) + b"}")
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    assert http.get("/v1/nonce").status_code == 405
    assert http.post("/v1/keys/x/wrap", content=b"{}").status_code == 404
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(_worker(), _nonce(http), kms.wrap(bytes(32))))
    assert r.status_code == 200


def test_nonce_table_is_bounded_and_nonces_expire(tmp_path: Path) -> None:
    now = [1000.0]
    book = NonceBook(capacity=2, ttl_s=120, clock=lambda: now[0])
    first, second = book.issue(), book.issue()
    with pytest.raises(Overloaded) as info:
        book.issue()  # full: the unexpired ones are not evicted
    assert info.value.retry_after_s == 120
    book.consume(first)
    third = book.issue()
    now[0] += 121
    with pytest.raises(PermissionDenied, match="expired"):
        book.consume(second)
    book.issue()  # the expired third is purged to make room
    assert len(book) == 1
    with pytest.raises(PermissionDenied, match="unknown nonce"):
        book.consume(third)

    store, _, _ = _setup_store(tmp_path)
    audit = audit_log_for(tmp_path / "audit")
    try:
        with _running(KmsApp(store, audit, nonces=NonceBook(capacity=1))) as url:
            assert httpx.post(url + "/v1/nonce", trust_env=False).status_code == 200
            r = httpx.post(url + "/v1/nonce", trust_env=False)
            assert r.status_code == 503 and r.headers["retry-after"] == "120"
            assert "nonces are outstanding" in r.json()["error"]
    finally:
        audit.close()
        store.close()
    assert _records(tmp_path / "audit")[-1]["action"] == "kms.nonce"


def test_audit_has_no_key_material_and_verifies(kms: Kms, http: httpx.Client) -> None:
    worker, data_key = _worker(), secrets.token_bytes(32)
    nonce = _nonce(http)
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(worker, nonce, kms.wrap(data_key)))
    assert r.status_code == 200
    http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(_worker(MODIFIED), _nonce(http), kms.wrap(data_key)))
    kms.app.audit.flush()
    raw = b"".join(p.read_bytes() for p in kms.audit_dir.iterdir())
    for secret in (data_key, kms.master):
        for form in (secret, secret.hex().encode(), base64.b64encode(secret), encode_master_key(secret).encode()):
            assert form not in raw
    assert r.json()["sealed_key"].encode() not in raw
    assert [rec["action"] for rec in _records(kms.audit_dir)] == ["kms.release", "kms.refuse"]
    r = CliRunner().invoke(cli, ["audit", "verify", "--dir", str(kms.audit_dir)])
    assert r.exit_code == 0, r.output


def test_from_env_is_a_key_provider_spec(kms: Kms, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = "module:bastion.confidential.kms_client:from_env"
    monkeypatch.delenv("BASTION_KMS_URL", raising=False)
    with pytest.raises(KeyProviderError, match="BASTION_KMS_URL"):
        load_key_provider(spec)
    monkeypatch.setenv("BASTION_KMS_URL", kms.url)
    set_current_identity(None)
    with pytest.raises(KeyProviderError, match="only inside the trusted worker"):
        load_key_provider(spec)
    worker = _worker()
    set_current_identity(worker)
    try:
        provider = load_key_provider(spec)
        data_key = secrets.token_bytes(32)
        assert provider.unwrap_key(KEY_ID, kms.wrap(data_key)) == data_key
        assert isinstance(provider, KmsKeyProvider) and provider.identity is worker
        provider.close()
    finally:
        set_current_identity(None)
    with pytest.raises(KeyProviderError, match="cannot reach"):
        KmsKeyProvider("http://127.0.0.1:9", worker, timeout_s=2).unwrap_key(KEY_ID, kms.wrap(data_key))


def test_bastion_kms_serve_subprocess(tmp_path: Path) -> None:
    runner = CliRunner()
    master_key = tmp_path / "master.key"
    db, audit_dir, port_file = tmp_path / "kms.db", tmp_path / "kms-audit", tmp_path / "port"
    assert runner.invoke(cli, ["bundle", "keygen", "--master-key", str(master_key)]).exit_code == 0
    r = runner.invoke(cli, ["kms", "import-key", "--db", str(db), KEY_ID, "--key-file", str(master_key)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["kms", "policy", "--db", str(db), KEY_ID, "--accept", GOOD.hex(), "--allow-dev"])
    assert r.exit_code == 0, r.output

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bastion.cli.main",
            "kms",
            "serve",
            "--db",
            str(db),
            "--audit-dir",
            str(audit_dir),
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "bastion kms serve did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        data_key = secrets.token_bytes(32)
        wrapped = FileKeyProvider(master_key).wrap_key(KEY_ID, data_key)
        provider = KmsKeyProvider(url, _worker())
        assert provider.unwrap_key(KEY_ID, wrapped) == data_key
        with pytest.raises(KeyProviderError, match="the worker attests"):
            KmsKeyProvider(url, _worker(MODIFIED)).unwrap_key(KEY_ID, wrapped)
        provider.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out.decode()
    assert f"serving on {url}" in out.decode()
    assert [rec["action"] for rec in _records(audit_dir)] == ["kms.start", "kms.release", "kms.refuse", "kms.stop"]
    r = runner.invoke(cli, ["audit", "verify", "--dir", str(audit_dir)])
    assert r.exit_code == 0, r.output


def test_https_service_with_a_private_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.guard.tls import server_ssl_context, write_dev_certificates

    certs = write_dev_certificates(tmp_path / "certs", clients=())
    store, key_file, _ = _setup_store(tmp_path)
    ctx = server_ssl_context(certs["server"], certs["server_key"], None, "none")
    sock = bind_socket("127.0.0.1", 0)
    url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    holder: dict = {}
    started = threading.Event()

    async def main() -> None:
        holder["loop"], holder["stop"] = asyncio.get_running_loop(), asyncio.Event()
        started.set()
        await serve_kms(KmsApp(store, None), sock, ssl_context=ctx, stop=holder["stop"])

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(5)
    worker = _worker()
    try:
        data_key = secrets.token_bytes(32)
        wrapped = FileKeyProvider(key_file).wrap_key(KEY_ID, data_key)
        with pytest.raises(KeyProviderError, match="cannot reach"):  # the system CAs do not know the dev CA
            KmsKeyProvider(url, worker).unwrap_key(KEY_ID, wrapped)
        monkeypatch.setenv("BASTION_KMS_URL", url)
        monkeypatch.setenv("BASTION_KMS_CA", str(certs["ca"]))
        set_current_identity(worker)
        provider = load_key_provider("module:bastion.confidential.kms_client:from_env")
        assert provider.unwrap_key(KEY_ID, wrapped) == data_key
        provider.close()
    finally:
        set_current_identity(None)
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(10)
        sock.close()
        store.close()


def test_nothing_is_released_unaudited(kms: Kms, http: httpx.Client) -> None:
    nonce = _nonce(http)
    kms.app.audit.close()  # appends now fail, as on a full disk
    r = http.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(_worker(), nonce, kms.wrap(bytes(32))))
    assert r.status_code == 503 and "sealed_key" not in r.json() and "audit log" in r.json()["error"]


def test_the_app_under_a_plain_asgi_server(kms: Kms) -> None:
    """``__call__`` (uvicorn or any ASGI server): the same routes, the body bounded by the app itself."""

    async def check() -> None:
        transport = httpx.ASGITransport(app=kms.app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://kms") as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            r = await client.post(f"/v1/keys/{KEY_ID}/release", content=b"x" * (kms.app.max_body_bytes + 1))
            assert r.status_code == 413
            nonce = base64.b64decode((await client.post("/v1/nonce")).json()["nonce"])
            worker, data_key = _worker(), secrets.token_bytes(32)
            r = await client.post(f"/v1/keys/{KEY_ID}/release", json=_release_body(worker, nonce, kms.wrap(data_key)))
            assert r.status_code == 200
            assert worker.open(base64.b64decode(r.json()["sealed_key"]), release_info(KEY_ID, nonce)) == data_key

    asyncio.run(check())


# ---------------------------------------------------------------------- generate (the worker's mirror key)

MIRROR_KEY_ID = "mirror-v1"


def _generate_body(worker: WorkerIdentity, nonce: bytes) -> dict:
    body = _release_body(worker, nonce, b"unused")
    del body["wrapped"]
    return body


@pytest.fixture
def mirror_key(kms: Kms) -> str:
    kms.store.add_key(MIRROR_KEY_ID)  # generated here: the only master key generate serves
    kms.store.set_policy(MIRROR_KEY_ID, check_policy([{"measurement": GOOD.hex()}], allow_dev=True))
    return MIRROR_KEY_ID


def test_generate_a_data_key_for_the_attested_worker(kms: Kms, http: httpx.Client, mirror_key: str) -> None:
    worker = _worker()
    nonce = _nonce(http)
    r = http.post(f"/v1/keys/{mirror_key}/generate", json=_generate_body(worker, nonce))
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"wrapped", "sealed_key"}
    wrapped = base64.b64decode(r.json()["wrapped"])
    data_key = worker.open(base64.b64decode(r.json()["sealed_key"]), release_info(mirror_key, nonce))
    assert len(data_key) == 32 and data_key not in wrapped
    with pytest.raises(UnsealError):  # sealed to that worker only
        _worker().open(base64.b64decode(r.json()["sealed_key"]), release_info(mirror_key, nonce))
    # the wrapped form is what release unwraps: the same key again, after a restart (a new identity)
    later = _worker()
    nonce2 = _nonce(http)
    r2 = http.post(f"/v1/keys/{mirror_key}/release", json=_release_body(later, nonce2, wrapped))
    assert r2.status_code == 200, r2.text
    assert later.open(base64.b64decode(r2.json()["sealed_key"]), release_info(mirror_key, nonce2)) == data_key
    rec = _records(kms.audit_dir)[-2]
    assert rec["action"] == "kms.generate" and rec["decision"] == "released" and rec["route"] == "generate"
    assert rec["key_id"] == mirror_key and rec["measurement"] == {"measurement": GOOD.hex()}
    assert _records(kms.audit_dir)[-1]["action"] == "kms.release"
    # through the worker's provider
    provider = KmsKeyProvider(kms.url, _worker())
    wrapped, key = provider.generate_data_key(mirror_key)
    assert provider.unwrap_key(mirror_key, wrapped) == key
    assert KmsKeyProvider(kms.url, _worker()).generate_data_key(mirror_key)[1] != key  # fresh each time
    provider.close()


def test_generate_refusals_are_those_of_release_and_audited(kms: Kms, http: httpx.Client, mirror_key: str) -> None:
    # a modified worker
    r = http.post(f"/v1/keys/{mirror_key}/generate", json=_generate_body(_worker(MODIFIED), _nonce(http)))
    assert r.status_code == 403 and "the worker attests" in r.json()["error"] and "wrapped" not in r.json()
    rec = _records(kms.audit_dir)[-1]
    assert rec["action"] == "kms.refuse" and rec["route"] == "generate" and rec["status"] == 403
    with pytest.raises(KeyProviderError, match="refused to release"):
        KmsKeyProvider(kms.url, _worker(MODIFIED)).generate_data_key(mirror_key)
    # single-use nonces
    worker, nonce = _worker(), _nonce(http)
    assert http.post(f"/v1/keys/{mirror_key}/generate", json=_generate_body(worker, nonce)).status_code == 200
    r = http.post(f"/v1/keys/{mirror_key}/generate", json=_generate_body(worker, nonce))
    assert r.status_code == 403 and "already used" in r.json()["error"]
    # a master key imported from a key file: its holder could unwrap what generate wraps
    r = http.post(f"/v1/keys/{KEY_ID}/generate", json=_generate_body(worker, _nonce(http)))
    assert r.status_code == 403 and "imported from a key file" in r.json()["error"]
    # unknown key id, no policy, a body with wrapped (release's), the wrong method
    r = http.post("/v1/keys/absent/generate", json=_generate_body(worker, _nonce(http)))
    assert r.status_code == 404
    kms.store.add_key("no-policy")
    r = http.post("/v1/keys/no-policy/generate", json=_generate_body(worker, _nonce(http)))
    assert r.status_code == 403 and "has no release policy" in r.json()["error"]
    r = http.post(f"/v1/keys/{mirror_key}/generate", json=_release_body(worker, _nonce(http), b"w"))
    assert r.status_code == 400 and r.json()["field"] == "wrapped"
    assert http.get(f"/v1/keys/{mirror_key}/generate").status_code == 405
    statuses = [(rec["route"], rec["status"]) for rec in _records(kms.audit_dir)[-4:]]
    assert statuses == [("generate", 403), ("generate", 404), ("generate", 403), ("generate", 400)]
    # nothing generated is in the audit log
    kms.app.audit.flush()
    raw = b"".join(p.read_bytes() for p in kms.audit_dir.iterdir())
    assert b"sealed_key" not in raw and b'"wrapped"' not in raw


def test_generate_refuses_dev_evidence_unless_the_policy_admits_it(
    kms: Kms, http: httpx.Client, mirror_key: str
) -> None:
    kms.store.set_policy(mirror_key, check_policy([{"measurement": GOOD.hex()}], allow_dev=False))
    r = http.post(f"/v1/keys/{mirror_key}/generate", json=_generate_body(_worker(), _nonce(http)))
    assert r.status_code == 403 and r.json()["error"].startswith("dev evidence refused by policy")
