"""A real server serving sealed bundles: inference works, refusals are isolated, no plaintext on disk."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from bastion.guard.bundles import generate_signing_key, seal_bundle, write_public_key
from bastion.guard.keyproviders import encode_master_key, generate_master_key, load_key_provider
from bastion.runtimes.export import sklearn_to_skops
from tests.polling import wait_until
from tests.runtimes.onnx_models import affine_model, write_model
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow

KEY_VAR = "BASTION_TEST_SEALED_SERVING_KEY"
AFFINE_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0] * 4}]}


def _infer_affine(url: str, name: str) -> float:
    r = httpx.post(f"{url}/v2/models/{name}/infer", json=AFFINE_BODY, timeout=10)
    assert r.status_code == 200, r.text
    return next(o for o in r.json()["outputs"] if o["name"] == "y")["data"][0]


def _index(url: str) -> dict[str, dict[str, str]]:
    r = httpx.post(f"{url}/v2/repository/index", json={}, timeout=10)
    assert r.status_code == 200, r.text
    return {row["name"]: row for row in r.json()}


def _wait(check: Callable[[], bool], what: str, server: ServerProcess, timeout: float = 30.0) -> None:
    wait_until(check, timeout, 0.05, what=what, details=server.logs)


def _drop(repo: Path, name: str, data: bytes) -> None:
    """Atomically, as operators should: a hidden temp name the repository ignores, then rename."""
    tmp = repo / f".{name}.tmp"
    tmp.write_bytes(data)
    tmp.rename(repo / name)


def _files_containing(roots: list[Path], needles: tuple[bytes, ...], since: float | None = None) -> list[str]:
    """Files under ``roots`` (modified since ``since``) holding any of ``needles``: one walk
    and one read per file for all the needles."""
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root, onerror=lambda _: None):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                    if not os.path.isfile(path) or st.st_size > 256 << 20:
                        continue
                    if since is not None and st.st_mtime < since:
                        continue
                    with open(path, "rb") as f:
                        data = f.read()
                    if any(needle in data for needle in needles):
                        found.append(path)
                except OSError:  # vanished or unreadable: not ours
                    continue
    return found


def test_sealed_models_serve_and_never_touch_the_disk_in_plaintext(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    master = generate_master_key()
    monkeypatch.setenv(KEY_VAR, encode_master_key(master))
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(server_tmp))  # whatever the server puts in "its" temp dir lands here
    provider = load_key_provider(f"env:{KEY_VAR}")
    signer = generate_signing_key()
    public = tmp_path / "signer.pub.pem"
    write_public_key(signer.public_key(), public)

    # offsets no other test uses, so these exact ONNX bytes exist nowhere else on this machine
    offset = 1000.0 + secrets.randbelow(10**6) / 8
    onnx_bytes = affine_model(offset)
    new_offset = offset + 1.0
    src, repo = tmp_path / "src", tmp_path / "repo"
    repo.mkdir()
    seal = {"key_id": "test", "signing_key": signer, "key_provider": provider}
    affine_dir = write_model(src, "affine", {1: onnx_bytes}, {"runtime": "onnx", "max_batch_size": 8})
    seal_bundle(affine_dir, repo / "affine.bundle", **seal)  # type: ignore[arg-type]
    iris_x, iris_y = load_iris(return_X_y=True)
    skops_bytes = sklearn_to_skops(LogisticRegression(max_iter=500).fit(iris_x, iris_y))
    iris_dir = src / "iris"
    (iris_dir / "1").mkdir(parents=True)
    (iris_dir / "1" / "model.skops").write_bytes(skops_bytes)
    (iris_dir / "config.yaml").write_text(yaml.safe_dump({
        "runtime": "skops", "max_batch_size": 8,
        "inputs": [{"name": "features", "datatype": "FP64", "shape": [-1, 4]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
        "parameters": {"method": "predict"},
    }))
    seal_bundle(iris_dir, repo / "iris.bundle", **seal)  # type: ignore[arg-type]
    write_model(repo, "plain", {1: affine_model(7.0)})
    evil_dir = write_model(src / "evil", "evil", {1: onnx_bytes}, {"runtime": "onnx"})
    staged = tmp_path / "staged"  # bundles to drop in while the server runs
    seal_bundle(evil_dir, staged / "evil.bundle", **seal)  # type: ignore[arg-type]
    replacement = write_model(src / "next", "affine", {1: affine_model(new_offset)}, {"runtime": "onnx"})
    seal_bundle(replacement, staged / "affine.bundle", **seal)  # type: ignore[arg-type]
    shutil.rmtree(src)  # from here on the plaintext exists only in this test's memory

    started = time.time()
    server = ServerProcess(
        repo, "--insecure-no-auth", "--poll-interval", "0.2",
        "--trusted-signer", str(public), "--bundle-key-provider", f"env:{KEY_VAR}",
    )
    try:
        assert _infer_affine(server.url, "affine") == pytest.approx(offset)
        assert _infer_affine(server.url, "plain") == 7.0
        body = {"inputs": [{"name": "features", "datatype": "FP64", "shape": [2, 4],
                            "data": iris_x[[0, 100]].ravel().tolist()}]}
        r = httpx.post(f"{server.url}/v2/models/iris/infer", json=body, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [0, 2]

        # a tampered bundle dropped in: FAILED with the reason, everything else keeps serving
        data = bytearray((staged / "evil.bundle").read_bytes())
        data[len(data) // 2] ^= 0x01
        _drop(repo, "evil.bundle", bytes(data))
        _wait(lambda: _index(server.url).get("evil", {}).get("state") == "FAILED", "evil FAILED", server)
        reason = _index(server.url)["evil"]["reason"]
        assert "evil.bundle: the signature does not verify" in reason, reason
        assert _infer_affine(server.url, "affine") == pytest.approx(offset)
        assert httpx.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200
        r = httpx.post(f"{server.url}/v2/models/evil/infer", json=AFFINE_BODY, timeout=10)
        assert r.status_code == 503 and "signature does not verify" in r.text, r.text

        # hot reload: a re-sealed bundle replaces the served one
        _drop(repo, "affine.bundle", (staged / "affine.bundle").read_bytes())
        _wait(lambda: _infer_affine(server.url, "affine") == pytest.approx(new_offset), "the new bundle", server)

        # no plaintext model anywhere on disk: not in the repository, not in the server's temp
        # dir, not in any file written under the system temp dirs since the server started
        needles = (onnx_bytes, affine_model(new_offset), skops_bytes)
        assert not _files_containing([repo, server_tmp], needles)
        system_tmp = [Path(p) for p in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(p)]
        hits = _files_containing(system_tmp, needles, since=started)
        assert not hits, hits
        # nor an unlinked temp file the server still holds open
        fd_dir = Path(f"/proc/{server.proc.pid}/fd")
        if fd_dir.is_dir():
            targets = []
            for fd in fd_dir.iterdir():
                try:
                    targets.append(os.readlink(fd))
                except OSError:
                    continue
            assert not [t for t in targets if t.endswith("(deleted)")], targets
    finally:
        code = server.stop()
    assert code == 0, server.logs()
