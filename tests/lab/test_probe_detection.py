"""The zoo-probing detector on a live server: the lab's fingerprint gets its tenant flagged,
audited and blocked early, while a benign tenant with fixed (and even infeasible) service
levels and another with the lab's reachable workload keep being served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bastion.guard.keystore import KeyStore
from bastion.lab.benign import reachable_workload
from bastion.lab.fingerprint import fingerprint
from bastion.lab.oracle import Oracle, OracleError
from bastion.lab.pools import image_pool
from tests.lab.conftest import LabServer
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow


def test_fingerprinting_is_flagged_and_blocked_benign_tenants_are_not(
    lab_server: LabServer, tmp_path: Path
) -> None:
    db = tmp_path / "keys.db"
    with KeyStore(db) as store:
        keys = {t: store.create_key(t, models=["image"])[0] for t in ("eve", "fixed", "workload")}
    settings = tmp_path / "serve.yaml"
    settings.write_text(yaml.safe_dump({"probe_monitor": {"max_refused": 8, "action": "block"}}))
    rows = image_pool(0).ordered(0)
    front = lab_server.front
    with ServerProcess(lab_server.repo, "--keys", str(db), "--config", str(settings), "--poll-interval", "0",
                       "--grpc-port", "-1") as server:
        # benign: one service level no variant meets, asked 30 times (the same 422 each time) ...
        best = max(v["quality"] for v in front)
        with Oracle(server.url, "image", api_key=keys["fixed"]) as app:
            answers = [app.ask(rows[i : i + 1], {"accuracy": min(1.0, best + 0.001)}) for i in range(30)]
            assert {a.status for a in answers} == {422}
            assert app.ask(rows[:1], {"accuracy": front[0]["quality"]}).status == 200
        # ... and 80 reachable random targets (the tradeoff sweep's goodput tenant)
        workload = reachable_workload(front, 80, 0, (1.0, 50.0))
        with Oracle(server.url, "image", api_key=keys["workload"]) as benign:
            statuses = [benign.ask(rows[i : i + 1], t).status for i, t in enumerate(workload)]
        assert statuses.count(200) == len(workload)

        with Oracle(server.url, "image", api_key=keys["eve"], budget=2000) as oracle:
            with pytest.raises(OracleError) as caught:
                fingerprint(oracle, rows, probes=4, repeats=10)
            assert caught.value.status == 403
            # flagged after a fraction of what a full fingerprint costs (~130 requests here)
            assert oracle.rejected >= 8  # refusals of one target repeated count once
            assert oracle.requests < 60
        with Oracle(server.url, "image", api_key=keys["fixed"]) as app:
            assert app.ask(rows[:4], {"accuracy": front[0]["quality"]}).status == 200
    log = db.parent / "audit"
    records = [json.loads(line) for f in sorted(log.glob("*.jsonl")) for line in f.read_text().splitlines()]
    alerts = [r for r in records if r.get("action") == "extraction_alert"]
    assert [(r["tenant"], r["decision"]) for r in alerts] == [("eve", "block")]
    assert "8 distinct refused targets" in alerts[0]["reason"]
