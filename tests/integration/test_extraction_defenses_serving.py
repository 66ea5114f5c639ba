"""Output hardening and the extraction monitor on a live server: hardened answers keep the
top-1 label, a benign tenant replaying real digits is never flagged, and a tenant sending
synthetic JBDA-style queries is flagged, audited and blocked."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from sklearn.datasets import load_digits

from bastion.guard.keystore import KeyStore
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict, Path]]:
    d = tmp_path_factory.mktemp("extraction")
    repo = d / "repo"
    shutil.copytree(demo_repo / "digits", repo / "digits")
    for name, hardening in (("digits_round", {"round": 1, "reverse_sigmoid": {"beta": 0.5, "gamma": 0.5}}),
                            ("digits_label", {"label_only": True})):
        shutil.copytree(demo_repo / "digits", repo / name)
        cfg = yaml.safe_load((repo / name / "config.yaml").read_text())
        cfg["hardening"] = hardening
        (repo / name / "config.yaml").write_text(yaml.safe_dump(cfg))
    db = d / "keys.db"
    with KeyStore(db) as store:
        tokens = {name: store.create_key(name)[0] for name in ("benign", "attacker", "ops")}
    settings = d / "serve.yaml"
    settings.write_text(yaml.safe_dump({"extraction_monitor": {"min_samples": 50, "action": "block"}}))
    with ServerProcess(repo, "--keys", str(db), "--config", str(settings), "--poll-interval", "0",
                       "--grpc-port", "-1") as server:
        yield server, tokens, db  # type: ignore[misc]


def _infer(http: httpx.Client, server: ServerProcess, model: str, rows: np.ndarray) -> httpx.Response:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                        "data": rows.astype(np.float32).ravel().tolist()}]}
    return http.post(f"{server.url}/v2/models/{model}/infer", json=body)


def test_hardened_answers_keep_the_label_and_hide_the_scores(served, demo_repo: Path) -> None:  # type: ignore[no-untyped-def]
    server, tokens, _ = served
    x = (load_digits().data[:32] / 16.0).astype(np.float32)
    session = ort.InferenceSession(str(demo_repo / "digits" / "1" / "model.onnx"))
    probs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x}), strict=True))
    truth = probs["probabilities"]
    with httpx.Client(headers={"authorization": f"Bearer {tokens['ops']}"}) as http:
        out = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in _infer(http, server, "digits_round",
                                                                                    x).json()["outputs"]}
        p = out["probabilities"]
        assert np.array_equal(p.argmax(axis=1), truth.argmax(axis=1))
        assert np.allclose(p.sum(axis=1), 1.0, atol=1e-6)
        assert np.allclose(p * 10, np.round(p * 10), atol=1e-5)  # one decimal
        assert np.abs(p - truth).max() > 0.05  # the scores an extractor would train on are not the model's
        r = _infer(http, server, "digits_label", x)
        names = [o["name"] for o in r.json()["outputs"]]
        assert names == ["label"]
        meta = http.get(f"{server.url}/v2/models/digits_label").json()
        assert [o["name"] for o in meta["outputs"]] == ["label"]


def test_benign_replay_is_not_flagged_and_synthetic_queries_are(served) -> None:  # type: ignore[no-untyped-def]
    server, tokens, db = served
    x = (load_digits().data / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    with httpx.Client(headers={"authorization": f"Bearer {tokens['benign']}"}) as http:
        for i in rng.permutation(len(x))[:400]:
            r = _infer(http, server, "digits", x[i : i + 1])
            assert r.status_code == 200, r.text
    # JBDA-style: a few natural seeds, then small signed perturbations of earlier queries
    pool = [x[i] for i in rng.choice(len(x), 10, replace=False)]
    flagged_after = None
    with httpx.Client(headers={"authorization": f"Bearer {tokens['attacker']}"}) as http:
        for n in range(600):
            parent = pool[n] if n < len(pool) else pool[rng.integers(len(pool))]
            q = np.clip(parent + 0.2 * np.sign(rng.standard_normal(64)), 0, 1).astype(np.float32)
            pool.append(q)
            r = _infer(http, server, "digits", q[None, :])
            if r.status_code == 403:
                assert "extraction" in r.json()["error"]
                flagged_after = n
                break
            assert r.status_code == 200, r.text
    assert flagged_after is not None and flagged_after <= 300, flagged_after
    with httpx.Client(headers={"authorization": f"Bearer {tokens['benign']}"}) as http:
        assert _infer(http, server, "digits", x[:1]).status_code == 200  # the benign tenant is unaffected
        metrics = httpx.get(f"{server.url}/metrics", headers={"authorization": f"Bearer {tokens['ops']}"})
    assert metrics.status_code == 403  # ops is not an admin: metrics stay closed
    from bastion.guard.audit import iter_records

    alerts = [r for r in iter_records(db.parent / "audit") if r.get("action") == "extraction_alert"]
    assert [a["tenant"] for a in alerts] == ["attacker"]
    print(f"attacker blocked after {flagged_after} queries")
