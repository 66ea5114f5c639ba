"""Several worker processes share the ports and behave as one server."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.promtext import sample
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow

SIMPLE = {"inputs": [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [2] * 16},
]}


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def test_two_workers_serve_and_agree(demo_repo: Path) -> None:
    with ServerProcess(demo_repo, "--poll-interval", "0", "--workers", "2") as server:
        workers = _children(server.proc.pid)
        assert len(workers) >= 2
        # both workers answer: with fresh connections the kernel spreads them over the listeners
        for _ in range(40):
            with httpx.Client() as c:
                assert c.post(f"{server.url}/v2/models/simple/infer", json=SIMPLE).status_code == 200
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        inp = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        inp.set_data_from_numpy(np.ones((1, 16), np.int32))
        inp2 = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
        inp2.set_data_from_numpy(np.ones((1, 16), np.int32))
        assert (grpc.infer("simple", [inp, inp2]).as_numpy("OUTPUT0") == 2).all()
        # metrics are the sum over workers (each flushes its tallies once a second)
        time.sleep(1.5)
        text = httpx.get(f"{server.url}/metrics").text
        success = sample(text, "bastion_inference_requests_total", model="simple", outcome="success")
        assert success is not None and success >= 41
        # an operator's unload reaches every worker
        assert httpx.post(f"{server.url}/v2/repository/models/digits/unload").status_code == 200
        time.sleep(1.0)
        for _ in range(20):
            with httpx.Client() as c:
                assert c.get(f"{server.url}/v2/models/digits/ready").status_code != 200
        assert httpx.post(f"{server.url}/v2/repository/models/digits/load").status_code == 200
        time.sleep(1.0)
        for _ in range(20):
            with httpx.Client() as c:
                assert c.get(f"{server.url}/v2/models/digits/ready").status_code == 200
        grpc.close()
        assert server.stop() == 0


def test_workers_share_one_query_budget_and_each_keeps_an_audit_chain(demo_repo: Path, tmp_path: Path) -> None:
    """Two workers draw on one quota through the key store's ledger: exactly the budget is
    served, whichever worker each connection lands on; each worker chains its own audit log."""
    import subprocess
    import sys

    from bastion.guard.keystore import KeyStore
    from bastion.guard.principal import Limits

    db = tmp_path / "keys.db"
    with KeyStore(db) as store:
        token, _ = store.create_key("metered", limits=Limits(quota=30, quota_period="total"))
    codes = []
    with ServerProcess(demo_repo, "--keys", str(db), "--poll-interval", "0", "--workers", "2") as server:
        assert len(_children(server.proc.pid)) >= 2
        for _ in range(45):
            with httpx.Client(headers={"authorization": f"Bearer {token}"}) as c:  # a new connection each time
                codes.append(c.post(f"{server.url}/v2/models/simple/infer", json=SIMPLE).status_code)
    assert codes.count(200) == 30 and codes.count(429) == 15, codes
    writers = {p.name.split("-")[1] for p in (tmp_path / "audit").glob("audit-*.jsonl")}
    assert writers == {"0", "1"}
    out = subprocess.run([sys.executable, "-m", "bastion.cli.main", "audit", "verify", "--keys", str(db)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "45 records from 2 writer(s)" in out.stdout, out.stdout + out.stderr
