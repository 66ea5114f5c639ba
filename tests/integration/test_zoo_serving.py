"""A zoo served by a live server: targets pick the variant, responses name the zoo only,
infeasible targets get a 422 that says what the zoo offers, choices are counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.promtext import sample
from tests.serverproc import ServerProcess
from tests.zoo_fixture import VARIANTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo_repo(tmp_path_factory: pytest.TempPathFactory, make_digits_zoo) -> Path:  # type: ignore[no-untyped-def]
    repo = tmp_path_factory.mktemp("zoo") / "repo"
    repo.mkdir()
    make_digits_zoo(repo)
    out = subprocess.run([sys.executable, "-m", "bastion.cli.main", "profile", str(repo), "--zoo", "digits_zoo",
                          "--iterations", "50", "--json"], capture_output=True, text=True, check=True, timeout=300)
    profile = json.loads(out.stdout)
    assert {v["variant"] for v in profile["variants"]} == set(VARIANTS)
    assert profile["machine"] and profile["measured_at"]
    return repo


@pytest.fixture(scope="module")
def zoo_server(zoo_repo: Path):  # type: ignore[no-untyped-def]
    with ServerProcess(zoo_repo, "--poll-interval", "0") as server:
        yield server


def _body(accuracy: float | None = None, latency_ms: float | None = None) -> dict:
    params = {}
    if accuracy is not None:
        params["accuracy"] = accuracy
    if latency_ms is not None:
        params["latency_ms"] = latency_ms
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}],
            "parameters": params}


def _profile(repo: Path) -> dict[str, float]:
    doc = json.loads((repo / "digits_zoo" / "profile.json").read_text())
    return {v["variant"]: v["quality"] for v in doc["variants"]}


def test_zoo_show_lists_the_front(zoo_repo: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "bastion.cli.main", "zoo", "show", "digits_zoo", "--repository",
                          str(zoo_repo), "--json"], capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout)
    assert {v["variant"] for v in doc["variants"]} == set(VARIANTS)
    assert any(v["pareto"] for v in doc["variants"])
    best = max(doc["variants"], key=lambda v: v["quality"])
    assert best["pareto"]  # the most accurate variant is never dominated


def test_zoo_answers_in_its_own_name(zoo_server: ServerProcess) -> None:
    r = httpx.post(f"{zoo_server.url}/v2/models/digits_zoo/infer", json=_body())
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == "digits_zoo"
    assert "model_version" not in doc
    assert "variant" not in json.dumps(doc.get("parameters", {}))
    assert {o["name"] for o in doc["outputs"]} == {"label", "probabilities"}
    meta = httpx.get(f"{zoo_server.url}/v2/models/digits_zoo").json()
    assert meta["platform"] == "bastion_zoo" and meta["versions"] == []
    assert [i["name"] for i in meta["inputs"]] == ["input"]
    assert httpx.get(f"{zoo_server.url}/v2/models/digits_zoo/ready").status_code == 200
    index = {m["name"]: m for m in httpx.post(f"{zoo_server.url}/v2/repository/index").json()}
    assert index["digits_zoo"]["state"] == "READY"


def test_accuracy_target_restricts_the_choice(zoo_server: ServerProcess, zoo_repo: Path) -> None:
    quality = _profile(zoo_repo)
    best = max(quality, key=quality.get)  # type: ignore[arg-type]
    target = (sorted(quality.values())[-1] + sorted(quality.values())[-2]) / 2  # only the best meets it
    before = httpx.get(f"{zoo_server.url}/metrics").text
    n0 = sample(before, "bastion_zoo_selections_total", zoo="digits_zoo", variant=best, feasible="true") or 0
    for _ in range(10):
        r = httpx.post(f"{zoo_server.url}/v2/models/digits_zoo/infer", json=_body(accuracy=target))
        assert r.status_code == 200, r.text
    after = httpx.get(f"{zoo_server.url}/metrics").text
    assert sample(after, "bastion_zoo_selections_total", zoo="digits_zoo", variant=best, feasible="true") == n0 + 10


def test_unmeetable_targets_get_422_naming_them(zoo_server: ServerProcess) -> None:
    r = httpx.post(f"{zoo_server.url}/v2/models/digits_zoo/infer", json=_body(accuracy=0.999, latency_ms=0.00001))
    assert r.status_code == 422
    message = r.json()["error"]
    assert "accuracy" in message and "latency" in message and "offers" in message
    r = httpx.post(f"{zoo_server.url}/v2/models/digits_zoo/infer", json=_body(accuracy=1.5))
    assert r.status_code == 400 and "accuracy" in r.json()["error"]
    r = httpx.post(f"{zoo_server.url}/v2/models/digits_zoo/versions/1/infer", json=_body())
    assert r.status_code in (400, 404)


def test_zoo_over_grpc_and_tfserving(zoo_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(zoo_server.grpc_url)
    inp = grpcclient.InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(np.full((2, 64), 0.25, np.float32))
    # tritonclient sends no float parameters; an integer latency target still goes the zoo's way
    result = client.infer("digits_zoo", [inp], parameters={"latency_ms": 1000})
    assert result.as_numpy("probabilities").shape == (2, 10)
    assert result.get_response().model_name == "digits_zoo"
    client.close()
    r = httpx.post(f"{zoo_server.url}/v1/models/digits_zoo:predict", json={"instances": [[0.5] * 64]})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1
    status = httpx.get(f"{zoo_server.url}/v1/models/digits_zoo").json()["model_version_status"]
    assert status[0]["state"] == "AVAILABLE"


def test_expose_variant_switch(tmp_path: Path, make_digits_zoo) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    repo.mkdir()
    make_digits_zoo(repo, expose_variant=True)
    subprocess.run([sys.executable, "-m", "bastion.cli.main", "profile", str(repo), "--zoo", "digits_zoo",
                    "--iterations", "20"], capture_output=True, check=True, timeout=300)
    with ServerProcess(repo, "--poll-interval", "0", "--grpc-port", "-1") as server:
        doc = httpx.post(f"{server.url}/v2/models/digits_zoo/infer", json=_body()).json()
        assert doc["parameters"]["variant"] in VARIANTS
        assert doc["model_name"] == "digits_zoo"


def test_zoo_without_profile_is_not_ready(tmp_path: Path, make_digits_zoo) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    repo.mkdir()
    make_digits_zoo(repo)
    with ServerProcess(repo, "--poll-interval", "0", "--grpc-port", "-1") as server:
        r = httpx.post(f"{server.url}/v2/models/digits_zoo/infer", json=_body())
        assert r.status_code == 503 and "bastion profile" in r.json()["error"]
        # the variants themselves serve as ordinary models
        plain = {"inputs": _body()["inputs"]}
        assert httpx.post(f"{server.url}/v2/models/digits_mlp/infer", json=plain).status_code == 200


def test_goodput_from_the_servers_records(zoo_server: ServerProcess, zoo_repo: Path, tmp_path: Path) -> None:
    workload = tmp_path / "w.jsonl"
    # 5 requests only the best variant can meet on accuracy with a generous latency, and
    # 5 impossible ones (accuracy above every variant): goodput is at most half
    rows = [{"accuracy": 0.975, "latency_ms": 500}] * 5 + [{"accuracy": 0.9999}] * 5
    workload.write_text("\n".join(json.dumps(r) for r in rows))
    out = subprocess.run([sys.executable, "-m", "bastion.cli.main", "zoo", "goodput", "digits_zoo", "--url",
                          zoo_server.url, "--workload", str(workload), "--sample",
                          str(zoo_repo / "digits_zoo" / "eval.npz"), "--json"],
                         capture_output=True, text=True, check=True, timeout=120)
    report = json.loads(out.stdout)
    assert report["server_outcomes"]["rejected"] == 5
    assert report["server_outcomes"]["met"] == 5
    assert report["goodput"] == 0.5
    assert report["client_statuses"] == {"200": 5, "422": 5}
    out = subprocess.run([sys.executable, "-m", "bastion.cli.main", "zoo", "goodput", "digits_zoo", "--url",
                          zoo_server.url, "--requests", "20", "--accuracy", "0.5:0.8", "--latency-ms", "100:1000"],
                         capture_output=True, text=True, check=True, timeout=120)
    assert "goodput 100.0%" in out.stdout


def test_zoo_show_plot(zoo_repo: Path, tmp_path: Path) -> None:
    png = tmp_path / "front.png"
    subprocess.run([sys.executable, "-m", "bastion.cli.main", "zoo", "show", "digits_zoo", "--repository",
                    str(zoo_repo), "--plot", str(png)], capture_output=True, check=True, timeout=120)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
