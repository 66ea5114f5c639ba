"""Sealed bundles in a real ModelRepository: served from memory, refused with a reason, hot reloaded."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from bastion.core.metadata import ModelConfig
from bastion.guard.bundles import generate_signing_key, seal_bundle, write_public_key
from bastion.guard.keyproviders import EnvKeyProvider, generate_master_key
from bastion.repository.store import ModelRepository, ModelState
from bastion.runtimes import ModelFiles, create_runtime
from bastion.runtimes.base import Runtime
from bastion.runtimes.export import sklearn_to_skops
from tests.runtimes.onnx_models import affine_model, write_model

X = np.zeros((1, 4), np.float32)
IRIS_X, IRIS_Y = load_iris(return_X_y=True)
SKOPS_CONFIG = {
    "runtime": "skops",
    "max_batch_size": 16,
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ],
}


class FixedKey(EnvKeyProvider):
    def __init__(self, key: bytes) -> None:
        self.var = "TEST"
        self._key = key


class Keys:
    def __init__(self, root: Path) -> None:
        self.signer = generate_signing_key()
        self.public = root / "signer.pub.pem"
        write_public_key(self.signer.public_key(), self.public)
        self.provider = FixedKey(generate_master_key())

    def seal(self, model_dir: Path, out: Path, **kwargs: Any) -> Path:
        args: dict[str, Any] = {"key_id": "k1", "signing_key": self.signer, "key_provider": self.provider}
        seal_bundle(model_dir, out, **{**args, **kwargs})
        return out


class CountingFactory:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, config: ModelConfig, version_dir: Path, files: ModelFiles | None = None) -> Runtime:
        self.calls.append((config.name, files is not None))
        return create_runtime(config, version_dir, files)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """Model directories to seal from (outside the repository)."""
    return tmp_path / "src"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    return path


def _run(root: Path, body: Callable[[ModelRepository], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        repository = ModelRepository(root, poll_interval_s=None, **kwargs)
        await repository.start()
        try:
            await body(repository)
        finally:
            await repository.stop()

    asyncio.run(main())


def _offset(repository: ModelRepository, name: str, version: int | None = None) -> float:
    versions = repository.get(name).versions
    loaded = versions[version if version is not None else max(versions)]
    return float(loaded.runtime.predict({"x": X})["y"][0, 0])


def _onnx(src: Path, name: str, versions: dict[int, float]) -> Path:
    return write_model(src, name, {v: affine_model(o) for v, o in versions.items()},
                       {"runtime": "onnx", "max_batch_size": 8, "version_policy": "all"})


def _skops(src: Path, name: str) -> tuple[Path, LogisticRegression]:
    model = LogisticRegression(max_iter=500).fit(IRIS_X, IRIS_Y)
    model_dir = src / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.skops").write_bytes(sklearn_to_skops(model))
    (model_dir / "config.yaml").write_text(yaml.safe_dump(SKOPS_CONFIG))
    return model_dir, model


def _tamper(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_sealed_onnx_and_skops_serve_beside_a_plain_model_and_a_tampered_bundle(
    keys: Keys, src: Path, repo: Path
) -> None:
    keys.seal(_onnx(src, "affine", {1: 1.0, 2: 5.0}), repo / "affine.bundle")
    skops_dir, sk_model = _skops(src, "iris")
    keys.seal(skops_dir, repo / "iris.bundle")
    write_model(repo, "plain", {1: affine_model(7.0)})
    keys.seal(_onnx(src, "evil", {1: 1.0}), repo / "evil.bundle")
    _tamper(repo / "evil.bundle", os.path.getsize(repo / "evil.bundle") // 2)
    factory = CountingFactory()

    async def body(r: ModelRepository) -> None:
        assert r.get("affine").state is ModelState.READY, r.get("affine").reason
        assert sorted(r.get("affine").versions) == [1, 2]
        assert _offset(r, "affine", 1) == 1.0 and _offset(r, "affine", 2) == 5.0
        assert r.get("affine").config.platform == "onnxruntime_onnx"  # type: ignore[union-attr]

        iris = r.get("iris")
        assert iris.state is ModelState.READY, iris.reason
        out = iris.versions[1].runtime.predict({"features": IRIS_X[:5].astype(np.float32)})
        np.testing.assert_array_equal(out["label"], sk_model.predict(IRIS_X[:5].astype(np.float32)))

        assert r.get("plain").state is ModelState.READY and _offset(r, "plain") == 7.0
        evil = r.get("evil")
        assert evil.state is ModelState.FAILED and not evil.versions
        assert evil.reason.startswith("evil.bundle: the signature does not verify"), evil.reason
        assert "refusing to decrypt" in evil.reason

    _run(repo, body, trusted_signers=[keys.public], key_provider=keys.provider, runtime_factory=factory)
    # sealed versions were handed over as bytes; the plain model was read from disk; evil never decrypted
    assert sorted(factory.calls) == [("affine", True), ("affine", True), ("iris", True), ("plain", False)]


def test_without_trusted_signers_or_key_provider_a_bundle_fails_and_says_what_to_configure(
    keys: Keys, src: Path, repo: Path
) -> None:
    keys.seal(_onnx(src, "affine", {1: 1.0}), repo / "affine.bundle")
    write_model(repo, "plain", {1: affine_model(7.0)})

    async def nothing(r: ModelRepository) -> None:
        status = r.get("affine")
        assert status.state is ModelState.FAILED
        assert "--trusted-signer" in status.reason and "--bundle-key-provider" in status.reason
        assert r.get("plain").state is ModelState.READY

    async def no_provider(r: ModelRepository) -> None:
        reason = r.get("affine").reason
        assert "--bundle-key-provider" in reason and "--trusted-signer" not in reason

    _run(repo, nothing)
    _run(repo, no_provider, trusted_signers=[keys.public])


def test_wrong_signer_wrong_key_unsigned_and_misnamed_bundles(
    keys: Keys, src: Path, repo: Path, tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    other = Keys(tmp_path / "other")  # another signer and another master key
    model_dir = _onnx(src, "affine", {1: 1.0})
    other.seal(model_dir, repo / "a.bundle", model_name="a")
    keys.seal(model_dir, repo / "b.bundle", model_name="b", key_provider=other.provider)
    keys.seal(model_dir, repo / "c.bundle", model_name="c")
    (repo / "c.bundle").write_bytes((repo / "c.bundle").read_bytes()[:-104])
    keys.seal(model_dir, repo / "d.bundle", model_name="renamed")
    keys.seal(model_dir, repo / "ok.bundle", model_name="ok")

    async def body(r: ModelRepository) -> None:
        reasons = {s.name: s.reason for s in r.index() if s.state is ModelState.FAILED}
        assert sorted(reasons) == ["a", "b", "c", "d"], reasons
        assert "not a trusted signer" in reasons["a"]
        assert "wrong master key" in reasons["b"]
        assert "not signed" in reasons["c"]
        assert "sealed for model 'renamed'" in reasons["d"] and "renamed.bundle" in reasons["d"]
        assert r.get("ok").state is ModelState.READY

    _run(repo, body, trusted_signers=[keys.public], key_provider=keys.provider)


def test_a_model_both_as_directory_and_bundle_is_refused(keys: Keys, src: Path, repo: Path) -> None:
    keys.seal(_onnx(src, "affine", {1: 1.0}), repo / "affine.bundle")
    write_model(repo, "affine", {1: affine_model(3.0)})

    async def body(r: ModelRepository) -> None:
        status = r.get("affine")
        assert status.state is ModelState.FAILED and "both affine/ and affine.bundle exist" in status.reason
        shutil.rmtree(repo / "affine")
        await r.poll_once()
        assert r.get("affine").state is ModelState.READY and _offset(r, "affine") == 1.0

    _run(repo, body, trusted_signers=[keys.public], key_provider=keys.provider)


def test_hot_reload_replaces_a_bundle(keys: Keys, src: Path, repo: Path) -> None:
    keys.seal(_onnx(src, "affine", {1: 1.0}), repo / "affine.bundle")
    factory = CountingFactory()

    async def body(r: ModelRepository) -> None:
        first = r.get("affine").versions[1]
        await r.poll_once()
        assert r.get("affine").versions[1] is first and len(factory.calls) == 1  # unchanged: nothing reloaded

        # a new version beside an unchanged one: only the new one loads
        keys.seal(_onnx(src / "b", "affine", {1: 1.0, 2: 4.0}), repo / "affine.bundle")
        await r.poll_once()
        status = r.get("affine")
        assert sorted(status.versions) == [1, 2] and status.versions[1] is first, status.reason
        assert _offset(r, "affine", 2) == 4.0 and len(factory.calls) == 2

        # new content for version 1: reloaded
        keys.seal(_onnx(src / "c", "affine", {1: 9.0, 2: 4.0}), repo / "affine.bundle")
        await r.poll_once()
        assert _offset(r, "affine", 1) == 9.0 and r.get("affine").versions[2] is status.versions[2]

        # a tampered replacement is refused; the verified versions keep serving
        keys.seal(_onnx(src / "d", "affine", {1: 100.0}), repo / "affine.bundle")
        _tamper(repo / "affine.bundle", 30)
        await r.poll_once()
        status = r.get("affine")
        assert status.state is ModelState.READY and _offset(r, "affine", 1) == 9.0
        assert "signature does not verify" in status.reason and "previously loaded bundle" in status.reason

        # a good bundle again, then the file removed: unloaded
        keys.seal(_onnx(src / "e", "affine", {1: 2.0}), repo / "affine.bundle")
        await r.poll_once()
        status = r.get("affine")
        assert status.state is ModelState.READY and sorted(status.versions) == [1] and not status.reason
        assert _offset(r, "affine") == 2.0
        (repo / "affine.bundle").unlink()
        await r.poll_once()
        assert "affine" not in [s.name for s in r.index()]

        # a bundle that appears later is picked up
        keys.seal(_onnx(src / "f", "late", {1: 6.0}), repo / "late.bundle")
        await r.poll_once()
        assert _offset(r, "late") == 6.0

    _run(repo, body, trusted_signers=[keys.public], key_provider=keys.provider, runtime_factory=factory)


def test_explicit_load_of_a_bundle(keys: Keys, src: Path, repo: Path) -> None:
    keys.seal(_onnx(src, "affine", {1: 1.0}), repo / "affine.bundle")

    async def body(r: ModelRepository) -> None:
        assert r.get("affine").state is ModelState.UNAVAILABLE
        status = await r.load("affine")
        assert status.state is ModelState.READY and _offset(r, "affine") == 1.0
        await r.unload("affine")
        assert not r.get("affine").versions
        assert (await r.load("affine")).state is ModelState.READY

    _run(repo, body, trusted_signers=[keys.public], key_provider=keys.provider, explicit=True)


def test_runtime_errors_inside_a_bundle_name_the_bundle(keys: Keys, src: Path, repo: Path) -> None:
    model_dir = write_model(src, "broken", {1: b"not an onnx model"})
    (model_dir / "2").mkdir()
    (model_dir / "2" / "other.onnx").write_bytes(affine_model())
    (model_dir / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx", "version_policy": "all"}))
    keys.seal(model_dir, repo / "broken.bundle")

    async def body(r: ModelRepository) -> None:
        reason = r.get("broken").reason
        assert "version 1 failed to load: broken: ONNX Runtime cannot load model.onnx" in reason
        assert "model file 'model.onnx' not found in" in reason and "broken.bundle/2 (it holds other.onnx)" in reason

    _run(repo, body, trusted_signers=[keys.public], key_provider=keys.provider)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # still served, as in test_torch_runtime
def test_sealed_torchscript_loads_from_memory(keys: Keys, src: Path, repo: Path) -> None:
    torch = pytest.importorskip("torch")

    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    model_dir = src / "double"
    (model_dir / "1").mkdir(parents=True)
    torch.jit.save(torch.jit.script(Double()), str(model_dir / "1" / "model.pt"))
    tensor = {"name": "x", "datatype": "FP32", "shape": [-1, 2]}
    out = {"name": "y", "datatype": "FP32", "shape": [-1, 2]}
    (model_dir / "config.yaml").write_text(yaml.safe_dump(
        {"runtime": "torchscript", "max_batch_size": 4, "inputs": [tensor], "outputs": [out]}
    ))
    keys.seal(model_dir, repo / "double.bundle")

    async def body(r: ModelRepository) -> None:
        status = r.get("double")
        assert status.state is ModelState.READY, status.reason
        y = status.versions[1].runtime.predict({"x": np.ones((1, 2), np.float32)})["y"]
        np.testing.assert_array_equal(y, [[2.0, 2.0]])

    _run(repo, body, trusted_signers=[keys.public], key_provider=keys.provider)

