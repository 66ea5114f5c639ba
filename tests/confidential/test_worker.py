"""The trusted worker's own rules, in process: what it enforces whatever the front asks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import yaml

from bastion.confidential.package import package_confidential
from bastion.confidential.sealing import open_response, seal_request
from bastion.confidential.tensor_codec import decode_tensors, encode_tensors
from bastion.confidential.worker import TrustedWorker, build_identity
from bastion.confidential.worker_config import WorkerConfig
from bastion.core.errors import BastionError
from bastion.guard.bundles import generate_signing_key, write_public_key
from bastion.guard.keyproviders import generate_master_key, load_key_provider, write_master_key
from tests.runtimes.onnx_models import affine_model


def _bundles(tmp: Path, e2e: str) -> tuple[WorkerConfig, object, Path]:
    key = tmp / "master.key"
    write_master_key(key, generate_master_key())
    signer = generate_signing_key()
    write_public_key(signer.public_key(), tmp / "signer.pub")
    plain = tmp / "plain" / "m"
    (plain / "1").mkdir(parents=True)
    (plain / "1" / "model.onnx").write_bytes(affine_model(offset=0.5, width=4))
    (plain / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx", "max_batch_size": 8}))
    provider = load_key_provider(f"file:{key}")
    package_confidential(plain, tmp / "repo" / "m", key_id="k", signing_key=signer, key_provider=provider, e2e=e2e)
    config = WorkerConfig(attestation="dev", key_provider=f"file:{key}", trusted_signers=(tmp / "signer.pub",))
    return config, provider, tmp / "repo" / "m" / "1" / "model.bundle"


def _worker(tmp: Path, e2e: str) -> tuple[TrustedWorker, bytes]:
    config, provider, bundle = _bundles(tmp, e2e)
    worker = TrustedWorker(config, build_identity(config), provider)  # type: ignore[arg-type]
    return worker, bundle.read_bytes()


def test_e2e_required_comes_from_the_sealed_config_not_the_host(tmp_path: Path) -> None:
    worker, bundle = _worker(tmp_path, "required")

    async def run() -> None:
        loaded = await worker.dispatch({"op": "load", "model": "m", "version": 1, "bundle": bundle})
        assert loaded["source"] == "bundle" and len(loaded["bundle_sha256"]) == 64  # no mirror configured
        x = np.ones((2, 4), np.float32)
        with pytest.raises(BastionError, match="only end-to-end sealed") as err:
            await worker.dispatch({"op": "infer", "model": "m", "version": 1, "inputs": encode_tensors({"x": x})})
        assert err.value.http_status == 403
        envelope, secret = seal_request(worker.identity.public_key, "m", {"x": x})
        reply = await worker.dispatch({"op": "sealed", "model": "m", "version": 1, "envelope": envelope, "rows": 2})
        assert reply["status"] == 200
        np.testing.assert_allclose(open_response(secret, reply["envelope"])["y"], 2 * x + 0.5)

    asyncio.run(run())


def test_a_request_sealed_for_one_model_is_not_run_on_another(tmp_path: Path) -> None:
    worker, bundle = _worker(tmp_path, "optional")

    async def run() -> None:
        await worker.dispatch({"op": "load", "model": "m", "version": 1, "bundle": bundle})
        x = np.ones((1, 4), np.float32)
        envelope, _ = seal_request(worker.identity.public_key, "other", {"x": x})
        with pytest.raises(BastionError, match="sealed for 'other' is not run on 'm'"):
            await worker.dispatch(
                {"op": "sealed", "model": "m", "version": 1, "envelope": envelope, "sealed_for": "other"}
            )
        # plaintext is allowed by this model's sealed config; fast models end up on the loop
        for _ in range(12):
            reply = await worker.dispatch(
                {"op": "infer", "model": "m", "version": 1, "inputs": encode_tensors({"x": x})}
            )
        np.testing.assert_allclose(decode_tensors(reply["outputs"])["y"], 2 * x + 0.5)
        assert worker.models[("m", 1)].measured == 12

    asyncio.run(run())


def test_bundles_are_refused_without_signers_pins_or_by_digest(tmp_path: Path) -> None:
    config, provider, bundle = _bundles(tmp_path, "optional")
    pinned = WorkerConfig(
        attestation="dev",
        key_provider=config.key_provider,
        trusted_signers=config.trusted_signers,
        models={"m": ("0" * 64,)},
    )
    worker = TrustedWorker(pinned, build_identity(pinned), provider)  # type: ignore[arg-type]
    with pytest.raises(BastionError, match="not pinned"):
        asyncio.run(worker.dispatch({"op": "load", "model": "m", "version": 1, "bundle": bundle.read_bytes()}))
    bare = WorkerConfig(attestation="dev", key_provider=config.key_provider)
    worker = TrustedWorker(bare, build_identity(bare), provider)  # type: ignore[arg-type]
    with pytest.raises(BastionError, match="no trusted_signers"):
        asyncio.run(worker.dispatch({"op": "load", "model": "m", "version": 1, "bundle": bundle.read_bytes()}))
    with pytest.raises(BastionError, match="unknown operation"):
        asyncio.run(worker.dispatch({"op": "nope", "model": "m", "version": 1}))


def test_worker_package_cli_seals_each_version_and_writes_the_public_config(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bastion.cli.main import cli
    from bastion.guard.bundles import write_private_key

    key = tmp_path / "master.key"
    write_master_key(key, generate_master_key())
    signer = tmp_path / "signer.pem"
    write_private_key(generate_signing_key(), signer)
    plain = tmp_path / "plain" / "m"
    for version in (1, 2):
        (plain / str(version)).mkdir(parents=True)
        (plain / str(version) / "model.onnx").write_bytes(affine_model(offset=float(version), width=4))
    (plain / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx", "max_batch_size": 8,
                                                       "parameters": {"file": "model.onnx"}}))
    out = tmp_path / "repo" / "m"
    result = CliRunner().invoke(cli, ["worker", "package", str(plain), "--out", str(out), "--key-id", "k",
                                      "--signing-key", str(signer), "--key-provider", f"file:{key}"])
    assert result.exit_code == 0, result.output
    public = yaml.safe_load((out / "config.yaml").read_text())
    assert public["confidential"] == {"e2e": "required"} and "parameters" not in public
    for version in (1, 2):
        sealed = (out / str(version) / "model.bundle").read_bytes()
        assert affine_model(offset=float(version), width=4) not in sealed  # ciphertext only
    bad = CliRunner().invoke(cli, ["worker", "package", str(plain), "--out", str(tmp_path / "x"), "--key-id", "k",
                                   "--signing-key", str(signer), "--key-provider", "file:/nonexistent.key"])
    assert bad.exit_code != 0 and "nonexistent" in bad.output
