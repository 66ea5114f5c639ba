"""Hot reload of a live server: versions and models appear and vanish on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from tests.polling import wait_until
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow

SIMPLE = {"inputs": [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
]}


def _wait(predicate, what: str, server: ServerProcess) -> None:  # type: ignore[no-untyped-def]
    """The repository is polled every 0.2 s: the change shows within a few polls."""
    wait_until(predicate, 30, 0.05, what=what, details=server.logs)


def _versions(url: str, model: str) -> list[str]:
    r = httpx.get(f"{url}/v2/models/{model}")
    return r.json().get("versions", []) if r.status_code == 200 else []


def test_versions_and_models_follow_the_disk(tmp_path: Path, demo_repo: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(demo_repo / "simple", repo / "simple")
    cfg_path = repo / "simple" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["version_policy"] = {"latest": 2}
    cfg_path.write_text(yaml.safe_dump(cfg))
    with ServerProcess(repo, "--poll-interval", "0.2") as server:
        assert _versions(server.url, "simple") == ["1"]
        # a new version on disk is served without a restart
        shutil.copytree(repo / "simple" / "1", repo / "simple" / "2")
        _wait(lambda: _versions(server.url, "simple") == ["1", "2"], "version 2 served", server)
        r = httpx.post(f"{server.url}/v2/models/simple/infer", json=SIMPLE)
        assert r.json()["model_version"] == "2"
        # a removed version stops being served
        shutil.rmtree(repo / "simple" / "2")
        _wait(lambda: _versions(server.url, "simple") == ["1"], "version 2 gone", server)
        # a new model appears; a broken one is reported and does not take the others down
        shutil.copytree(demo_repo / "digits", repo / "digits")
        _wait(lambda: _versions(server.url, "digits") == ["1"], "the new model digits served", server)
        (repo / "broken" / "1").mkdir(parents=True)
        (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
        (repo / "broken" / "config.yaml").write_text("runtime: onnx\n")
        _wait(lambda: any(m["name"] == "broken" for m in httpx.post(f"{server.url}/v2/repository/index").json()),
              "the broken model in the index", server)
        index = {m["name"]: m for m in httpx.post(f"{server.url}/v2/repository/index").json()}
        assert index["broken"]["state"] == "FAILED"
        assert index["broken"]["reason"]
        meta = httpx.get(f"{server.url}/v2/models/broken").json()
        assert meta["state"] == "FAILED" and meta["reason"] and meta["versions"] == []
        assert httpx.post(f"{server.url}/v2/models/broken/infer", json=SIMPLE).status_code == 503
        assert httpx.get(f"{server.url}/v2/models/broken/ready").status_code != 200
        assert httpx.post(f"{server.url}/v2/models/simple/infer", json=SIMPLE).status_code == 200
        # strict readiness: a failed model makes the server not ready, but it stays live
        assert httpx.get(f"{server.url}/v2/health/ready").status_code != 200
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        # a removed model goes away
        shutil.rmtree(repo / "broken")
        _wait(lambda: httpx.get(f"{server.url}/v2/health/ready").status_code == 200, "ready once broken is gone",
              server)
