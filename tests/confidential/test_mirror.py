"""The worker's fast-recovery mirror: a restarted worker loads from its encrypted mirror instead
of a key release and the bundle's decryption, and nothing it reads there is trusted more than
the bundle itself (pins and signature are checked first; a mirror that does not open is
removed and the load goes cold)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from bastion.confidential.dev_evidence import DevEvidenceProducer
from bastion.confidential.identity import WorkerIdentity
from bastion.confidential.kms import KmsApp
from bastion.confidential.kms_client import KmsKeyProvider
from bastion.confidential.kms_store import check_policy
from bastion.confidential.mirror import KEY_FILE, SUFFIX, Mirror
from bastion.confidential.package import package_confidential
from bastion.confidential.tensor_codec import decode_tensors, encode_tensors
from bastion.confidential.worker import TrustedWorker, build_identity, build_mirror
from bastion.confidential.worker_config import WorkerConfig, WorkerConfigError, parse_worker_config
from bastion.core.errors import BastionError
from bastion.guard.bundles import generate_signing_key, write_public_key
from bastion.guard.keyproviders import FileKeyProvider, generate_master_key, write_master_key
from tests.confidential.test_kms import GOOD, MODIFIED, _running, _setup_store
from tests.runtimes.onnx_models import affine_model

MIRROR_KEY_ID = "worker-mirror"
OFFSET = 0.75


class GeneratingProvider(FileKeyProvider):
    """A key file provider that also generates data keys, as the KMS does, and counts unwraps."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.unwrapped: list[str] = []

    def unwrap_key(self, key_id: str, wrapped: bytes) -> bytes:
        self.unwrapped.append(key_id)
        return super().unwrap_key(key_id, wrapped)

    def generate_data_key(self, key_id: str) -> tuple[bytes, bytes]:
        key = secrets.token_bytes(32)
        return self.wrap_key(key_id, key), key


@dataclass
class Setup:
    root: Path
    config: WorkerConfig
    provider: GeneratingProvider
    bundle: bytes
    weights: bytes
    mirror_dir: Path

    def worker(self, *, start: bool = True, provider: object = None) -> TrustedWorker:
        """A worker as a (re)started process makes it: new identity, a mirror on the same directory."""
        provider = provider or self.provider
        mirror = Mirror(self.mirror_dir, MIRROR_KEY_ID, provider)  # type: ignore[arg-type]
        if start:
            mirror.unlock()
        return TrustedWorker(self.config, build_identity(self.config), provider, mirror=mirror)  # type: ignore[arg-type]


def _package(root: Path, signer_name: str = "signer", offset: float = OFFSET) -> tuple[Path, bytes, Path]:
    """(master key file, model bytes, bundle path) of model ``m`` version 1, sealed and signed."""
    key = root / "master.key"
    if not key.exists():
        write_master_key(key, generate_master_key())
    signer = generate_signing_key()
    write_public_key(signer.public_key(), root / f"{signer_name}.pub")
    weights = affine_model(offset=offset, width=4)
    plain = root / f"plain-{signer_name}" / "m"
    (plain / "1").mkdir(parents=True)
    (plain / "1" / "model.onnx").write_bytes(weights)
    (plain / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx", "max_batch_size": 8}))
    out = root / f"repo-{signer_name}" / "m"
    package_confidential(plain, out, key_id="k", signing_key=signer, key_provider=FileKeyProvider(key), e2e="optional")
    return key, weights, out / "1" / "model.bundle"


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    key, weights, bundle = _package(tmp_path)
    config = WorkerConfig(attestation="dev", key_provider=f"file:{key}", trusted_signers=(tmp_path / "signer.pub",))
    return Setup(tmp_path, config, GeneratingProvider(key), bundle.read_bytes(), weights, tmp_path / "mirror")


def _load(worker: TrustedWorker, bundle: bytes) -> dict:
    return asyncio.run(worker.dispatch({"op": "load", "model": "m", "version": 1, "bundle": bundle}))


def _infer(worker: TrustedWorker) -> np.ndarray:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    reply = asyncio.run(
        worker.dispatch({"op": "infer", "model": "m", "version": 1, "inputs": encode_tensors({"x": x})})
    )
    return decode_tensors(reply["outputs"])["y"]


def _mirror_files(setup: Setup) -> list[Path]:
    return sorted(setup.mirror_dir.glob(f"*/*{SUFFIX}"))


def test_round_trip_a_restarted_worker_loads_from_the_mirror(setup: Setup) -> None:
    first = setup.worker()
    assert first.mirror is not None and first.mirror.status == "generated"
    assert _load(first, setup.bundle)["source"] == "bundle"
    assert setup.provider.unwrapped == ["k"]  # the bundle's key, released once
    (path,) = _mirror_files(setup)
    assert path.name.startswith("1-") and path.parent.name == "m"
    assert (path.stat().st_mode & 0o777) == 0o600 and (setup.mirror_dir / KEY_FILE).stat().st_mode & 0o777 == 0o600

    setup.provider.unwrapped.clear()
    second = setup.worker()  # "after a restart": a new identity, the same directory
    assert second.mirror is not None and second.mirror.status == "released"
    reply = _load(second, setup.bundle)
    assert reply["source"] == "mirror" and reply["bundle_sha256"] == path.name[2:66]
    assert setup.provider.unwrapped == [MIRROR_KEY_ID]  # the mirror key only: no bundle key release
    np.testing.assert_allclose(_infer(second), 2 * np.arange(8, dtype=np.float32).reshape(2, 4) + OFFSET)


def test_background_unlock_and_a_provider_that_cannot_generate(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    worker = setup.worker(start=False)
    assert worker.mirror is not None
    worker.mirror.start()  # as serve_worker does: the load waits for the key
    assert _load(worker, setup.bundle)["source"] == "bundle"
    assert len(_mirror_files(setup)) == 1
    assert _load(setup.worker(start=False), setup.bundle)["source"] == "bundle"  # never unlocked: cold

    config = parse_worker_config(
        {"key_provider": "file:x", "mirror": {"dir": "mirror", "key_id": MIRROR_KEY_ID}}, base=setup.root
    )
    with caplog.at_level(logging.WARNING, "bastion.confidential.worker"):
        assert build_mirror(config, FileKeyProvider(setup.root / "master.key")) is None
    assert "cannot generate data keys" in caplog.text
    mirror = build_mirror(config, setup.provider)
    assert mirror is not None and mirror.directory == setup.root / "mirror" and mirror.key_id == MIRROR_KEY_ID


def test_a_tampered_or_renamed_mirror_is_removed_and_the_load_goes_cold(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    _load(setup.worker(), setup.bundle)
    (path,) = _mirror_files(setup)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1
    path.write_bytes(bytes(blob))
    setup.provider.unwrapped.clear()
    with caplog.at_level(logging.WARNING, "bastion.confidential.mirror"):
        reply = _load(setup.worker(), setup.bundle)
    assert reply["source"] == "bundle" and setup.provider.unwrapped == [MIRROR_KEY_ID, "k"]
    assert "removed, loading from the bundle instead: does not authenticate" in caplog.text
    assert path.read_bytes() != bytes(blob)  # the cold load wrote a good one in its place
    assert _load(setup.worker(), setup.bundle)["source"] == "mirror"

    # a mirror file renamed to stand for another bundle digest does not authenticate (the AAD binds it)
    other = path.with_name(f"1-{'0' * 64}{SUFFIX}")
    path.rename(other)
    worker = setup.worker()
    assert worker.mirror is not None and worker.mirror.read("m", 1, "0" * 64) is None
    assert not other.exists()
    # nor does one truncated, or one that is not a mirror file at all
    for junk in (b"", b"BSTNMIR1" + b"\x00" * 10, b"plaintext?" * 100):
        _load(worker, setup.bundle)
        (path,) = _mirror_files(setup)
        path.write_bytes(junk)
        assert _load(setup.worker(), setup.bundle)["source"] == "bundle"


def test_a_wrong_mirror_key_means_cold_loads(setup: Setup) -> None:
    _load(setup.worker(), setup.bundle)
    (path,) = _mirror_files(setup)
    written = path.read_bytes()
    # another worker's mirror (another key) given this worker's file: it does not open
    other = Setup(setup.root, setup.config, setup.provider, setup.bundle, setup.weights, setup.root / "other")
    worker = other.worker()
    (other.mirror_dir / "m").mkdir()
    (other.mirror_dir / "m" / path.name).write_bytes(written)
    assert _load(worker, setup.bundle)["source"] == "bundle"
    assert (other.mirror_dir / "m" / path.name).read_bytes() != written

    # a mirror key file that no longer unwraps (or was replaced): a new key, the old files go
    key_file = setup.mirror_dir / KEY_FILE
    data = json.loads(key_file.read_text())
    wrapped = bytearray(base64.b64decode(data["wrapped"]))
    wrapped[-1] ^= 1
    key_file.write_text(json.dumps({**data, "wrapped": base64.b64encode(bytes(wrapped)).decode()}))
    worker = setup.worker()
    assert worker.mirror is not None and worker.mirror.status == "generated"
    assert _mirror_files(setup) == []
    assert _load(worker, setup.bundle)["source"] == "bundle"
    # a key file made for another key id is not used either
    config_key = setup.worker()
    assert config_key.mirror is not None and config_key.mirror.status == "released"
    renamed = Mirror(setup.mirror_dir, "another-id", setup.provider)
    assert renamed.unlock() and renamed.status == "generated" and _mirror_files(setup) == []


def test_an_untrusted_or_unpinned_bundle_is_refused_even_with_a_mirror(setup: Setup) -> None:
    # a bundle from a signer this worker does not trust, whose mirror file is present anyway
    _, _, foreign_path = _package(setup.root, "stranger", offset=99.0)
    foreign = foreign_path.read_bytes()
    worker = setup.worker()
    assert worker.mirror is not None
    good = _load(worker, setup.bundle)
    content = worker.mirror.read("m", 1, good["bundle_sha256"])
    assert content is not None
    foreign_digest = hashlib.sha256(foreign).hexdigest()
    assert worker.mirror.write("m", 1, foreign_digest, content)
    setup.provider.unwrapped.clear()
    refused = setup.worker()
    with pytest.raises(BastionError, match="not a trusted signer"):
        _load(refused, foreign)
    assert refused.models == {}
    assert setup.provider.unwrapped == [MIRROR_KEY_ID]  # no bundle key asked for
    # pins come first, mirror or not
    pinned = WorkerConfig(
        attestation="dev",
        key_provider=setup.config.key_provider,
        trusted_signers=setup.config.trusted_signers,
        models={"m": ("1" * 64,)},
    )
    mirror = Mirror(setup.mirror_dir, MIRROR_KEY_ID, setup.provider)
    mirror.unlock()
    worker = TrustedWorker(pinned, build_identity(pinned), setup.provider, mirror=mirror)
    with pytest.raises(BastionError, match="not pinned"):
        _load(worker, setup.bundle)


def test_no_plaintext_of_the_model_on_disk(setup: Setup) -> None:
    worker = setup.worker()
    _load(worker, setup.bundle)
    assert _load(setup.worker(), setup.bundle)["source"] == "mirror"
    on_disk = b"".join(p.read_bytes() for p in setup.mirror_dir.rglob("*") if p.is_file())
    assert len(on_disk) > len(setup.weights)
    weights = setup.weights
    # the whole model, and any 32-byte window of it (the weights are its bulk)
    assert weights not in on_disk
    assert not any(weights[i : i + 32] in on_disk for i in range(0, len(weights) - 32, 16))
    assert b"max_batch_size" not in on_disk and b"runtime" not in on_disk  # the sealed config.yaml
    assert not list(setup.mirror_dir.rglob("*.tmp"))


def test_worker_yaml_mirror_is_parsed_strictly_and_measured(tmp_path: Path) -> None:
    base = {"attestation": "dev"}
    plain = parse_worker_config(base, base=tmp_path)
    assert plain.mirror is None and "mirror" not in plain.canonical()
    config = parse_worker_config({**base, "mirror": {"dir": "state/mirror", "key_id": "m-1"}}, base=tmp_path)
    assert config.mirror is not None and config.mirror.dir == tmp_path / "state" / "mirror"
    assert config.canonical()["mirror"] == {"dir": "state/mirror", "key_id": "m-1"}
    moved = parse_worker_config({**base, "mirror": {"dir": "state/mirror", "key_id": "m-1"}}, base=tmp_path / "x")
    assert moved.canonical() == config.canonical()  # measured as written, wherever installed
    other = parse_worker_config({**base, "mirror": {"dir": "state/mirror", "key_id": "m-2"}}, base=tmp_path)
    assert other.canonical() != config.canonical()
    absolute = parse_worker_config({**base, "mirror": {"dir": str(tmp_path / "abs"), "key_id": "m"}}, base=Path("/"))
    assert absolute.mirror is not None and absolute.mirror.dir == tmp_path / "abs"
    for bad, where in (
        ("yes", "mirror"),
        ({"dir": "d"}, "mirror.key_id"),
        ({"key_id": "k"}, "mirror.dir"),
        ({"dir": "", "key_id": "k"}, "mirror.dir"),
        ({"dir": "d", "key_id": "../k"}, "mirror.key_id"),
        ({"dir": "d", "key_id": "k", "sync": True}, "mirror.sync"),
    ):
        with pytest.raises(WorkerConfigError, match=f"worker.yaml: {where}: "):
            parse_worker_config({**base, "mirror": bad}, base=tmp_path)


def test_only_the_attested_worker_reads_the_mirror(setup: Setup, tmp_path: Path) -> None:
    """Through the real KMS: the mirror key is generated for, and released to, a worker whose
    measurement the policy accepts; a modified worker is refused it, so it cannot read the mirror
    (and its cold loads' key releases are refused the same way: test_kms)."""
    (tmp_path / "kms").mkdir()
    store, _, _ = _setup_store(tmp_path / "kms")
    store.add_key(MIRROR_KEY_ID)  # generated in the KMS: no key file of it exists anywhere
    store.set_policy(MIRROR_KEY_ID, check_policy([{"measurement": GOOD.hex()}], allow_dev=True))
    try:
        with _running(KmsApp(store, None)) as url:
            good = KmsKeyProvider(url, WorkerIdentity.generate(DevEvidenceProducer(GOOD)))
            mirror = Mirror(setup.mirror_dir, MIRROR_KEY_ID, good)
            assert mirror.unlock() and mirror.status == "generated"
            worker = TrustedWorker(setup.config, build_identity(setup.config), setup.provider, mirror=mirror)
            digest = _load(worker, setup.bundle)["bundle_sha256"]
            again = Mirror(setup.mirror_dir, MIRROR_KEY_ID, KmsKeyProvider(url, good.identity))
            assert again.unlock() and again.status == "released" and again.read("m", 1, digest) is not None

            modified = KmsKeyProvider(url, WorkerIdentity.generate(DevEvidenceProducer(MODIFIED)))
            theirs = Mirror(setup.mirror_dir, MIRROR_KEY_ID, modified)
            assert not theirs.unlock()
            assert theirs.status.startswith("off: ") and "the worker attests" in theirs.status
            assert theirs.read("m", 1, digest) is None
            assert len(_mirror_files(setup)) == 1 and (setup.mirror_dir / KEY_FILE).exists()  # left as they were
            for provider in (good, again.provider, modified):
                provider.close()  # type: ignore[attr-defined]
    finally:
        store.close()
