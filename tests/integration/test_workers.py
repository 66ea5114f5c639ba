"""Several worker processes share the ports and behave as one server."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.polling import wait_until
from tests.promtext import sample
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow

DIGITS_READY = "/v2/models/digits/ready"
SIMPLE = {"inputs": [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [2] * 16},
]}


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def _ready_on_fresh_connections(url: str, path: str, n: int = 20) -> list[int]:
    """``n`` answers to GET ``path``, each on a new connection (the kernel spreads new
    connections over the workers' listeners: 20 all on one of two workers is a 1 in 500,000 chance)."""
    codes = []
    for _ in range(n):
        with httpx.Client() as c:
            codes.append(c.get(f"{url}{path}").status_code)
    return codes


def _serving(server: ServerProcess) -> int:
    """How many workers said they serve (each logs "serving" once its models are loaded)."""
    return server.logs().count("bastion.serve: serving")


def _every_worker_ready(server: ServerProcess, workers: int = 2) -> None:
    """ServerProcess returns once one worker answers ready. The others listen only once
    their models are loaded (a connection the kernel hands a loading worker would get a
    503 or a 404); each logs "serving" when it does."""
    wait_until(lambda: _serving(server) >= workers, 60, 0.05, what=f"{workers} workers serving", details=server.logs)
    assert all(c == 200 for c in _ready_on_fresh_connections(server.url, "/v2/health/ready"))


def test_two_workers_serve_and_agree(onnx_demo_repo: Path) -> None:
    with ServerProcess(onnx_demo_repo, "--poll-interval", "0", "--workers", "2") as server:
        workers = _children(server.proc.pid)
        assert len(workers) >= 2
        _every_worker_ready(server)
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
        def successes() -> float | None:
            text = httpx.get(f"{server.url}/metrics").text
            return sample(text, "bastion_inference_requests_total", model="simple", outcome="success")

        wait_until(lambda: (successes() or 0) >= 41, 30, 0.1, what="41 successes summed over the workers",
                   details=server.logs)
        # an operator's unload reaches every worker: 20 fresh connections in a row all see it
        assert httpx.post(f"{server.url}/v2/repository/models/digits/unload").status_code == 200
        wait_until(lambda: all(c != 200 for c in _ready_on_fresh_connections(server.url, DIGITS_READY)), 30, 0.1,
                   what="digits unloaded on every worker", details=server.logs)
        assert httpx.post(f"{server.url}/v2/repository/models/digits/load").status_code == 200
        wait_until(lambda: all(c == 200 for c in _ready_on_fresh_connections(server.url, DIGITS_READY)), 30, 0.1,
                   what="digits loaded on every worker", details=server.logs)
        grpc.close()
        assert server.stop() == 0


def test_workers_share_one_query_budget_and_each_keeps_an_audit_chain(onnx_demo_repo: Path, tmp_path: Path) -> None:
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
    with ServerProcess(onnx_demo_repo, "--keys", str(db), "--poll-interval", "0", "--workers", "2") as server:
        assert len(_children(server.proc.pid)) >= 2
        _every_worker_ready(server)  # health is open: no query of the budget is spent
        for _ in range(45):
            with httpx.Client(headers={"authorization": f"Bearer {token}"}) as c:  # a new connection each time
                codes.append(c.post(f"{server.url}/v2/models/simple/infer", json=SIMPLE).status_code)
    assert codes.count(200) == 30 and codes.count(429) == 15, codes
    writers = {p.name.split("-")[1] for p in (tmp_path / "audit").glob("audit-*.jsonl")}
    assert writers == {"0", "1"}
    out = subprocess.run([sys.executable, "-m", "bastion.cli.main", "audit", "verify", "--keys", str(db)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "45 records from 2 writer(s)" in out.stdout, out.stdout + out.stderr


def test_a_restarted_worker_replays_the_operators_actions(onnx_demo_repo: Path) -> None:
    """A worker that dies is restarted; it loads the repository from disk, then replays the
    load/unload actions the others applied, and joins only once loaded and caught up."""
    import os
    import signal

    with ServerProcess(onnx_demo_repo, "--poll-interval", "0", "--workers", "2") as server:
        _every_worker_ready(server)
        assert httpx.post(f"{server.url}/v2/repository/models/digits/unload").status_code == 200
        wait_until(lambda: all(c != 200 for c in _ready_on_fresh_connections(server.url, DIGITS_READY)), 30, 0.1,
                   what="digits unloaded on every worker", details=server.logs)
        # a worker, not the supervisor's resource tracker (spawn starts one too)
        victim = next(p for p in _children(server.proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes())
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: "worker died; restarting" in server.logs() and _serving(server) >= 3, 60, 0.1,
                   what="the killed worker restarted and serving", details=server.logs)
        assert victim not in _children(server.proc.pid)
        # every connection, whichever worker takes it, sees digits unloaded and simple served
        assert all(c != 200 for c in _ready_on_fresh_connections(server.url, DIGITS_READY, n=30))
        for _ in range(30):
            with httpx.Client() as c:
                assert c.post(f"{server.url}/v2/models/simple/infer", json=SIMPLE).status_code == 200
        assert server.stop() == 0
