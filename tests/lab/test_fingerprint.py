"""Fingerprinting a live zoo through the public API: variants, triggers, consistency, cost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bastion.lab.fingerprint import Signatures, choose_probes, fingerprint
from bastion.lab.oracle import Oracle
from bastion.lab.pools import image_pool
from tests.lab.conftest import LabServer
from tests.serverproc import ServerProcess


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return image_pool(0).ordered(0)


def test_signatures_cluster_within_tolerance_and_split_beyond() -> None:
    sigs = Signatures(decimals=6, tolerance=1e-4)
    a = np.array([[0.7, 0.2, 0.1]])
    assert sigs.assign(a) == 0
    assert sigs.assign(a + 3e-5) == 0  # float noise from another batch composition
    assert sigs.assign(np.array([[0.6, 0.3, 0.1]])) == 1
    assert len(sigs) == 2 and sigs.counts == [2, 1]


def test_probes_prefer_rows_where_answers_disagree() -> None:
    agree = np.tile([[0.9, 0.1]], (6, 1))
    other = agree.copy()
    other[4] = [0.2, 0.8]  # top-1 flips on row 4
    other[1] = [0.6, 0.4]  # same top-1, large spread on row 1
    assert list(choose_probes([agree, other], 2)) == [1, 4]


@pytest.mark.slow
def test_fingerprint_finds_every_pareto_variant_and_a_consistent_trigger_for_the_best(
        lab_server: LabServer, rows: np.ndarray) -> None:
    with Oracle(lab_server.url, "image", api_key=lab_server.attacker_key, budget=2000) as oracle:
        result = fingerprint(oracle, rows, probes=4, repeats=10)
        assert result.queries == oracle.queries <= 2000
    front = lab_server.front
    assert result.complete and result.method == "staircase"
    assert len(result.variants) == len(front) == result.signatures_seen  # 4 on the small image zoo
    assert result.victim == len(front) - 1
    victim = result.variants[result.victim]
    assert victim.consistency >= 0.9
    assert all(v.consistency >= 0.9 for v in result.variants)
    assert set(victim.trigger) == {"accuracy"}  # alone above its floor: no latency target needed
    # the walk bounds each variant's profiled quality and latency (fastest first, like the front)
    for found, truth in zip(result.variants, front, strict=True):
        lo, hi = found.quality_range
        assert lo <= truth["quality"] < hi
        lat_lo, lat_hi = found.latency_range_ms
        assert lat_lo < truth["latency_ms"] <= lat_hi
    # a few hundred rows, far from a grid's thousands
    assert result.queries < 1000 and result.rejected > 0

    # the trigger really reaches the most accurate variant: the zoo's answers are the victim's own
    probe = rows[:8]
    with Oracle(lab_server.url, "image", api_key=lab_server.attacker_key) as zoo, \
            Oracle(lab_server.url, lab_server.victim, api_key=lab_server.experimenter_key) as by_name:
        via_trigger = zoo.predict(probe, result.victim_trigger)
        own = by_name.predict(probe)
    np.testing.assert_allclose(via_trigger, own, atol=1e-5)


@pytest.mark.slow
def test_fingerprint_stops_at_its_budget_without_naming_a_victim(lab_server: LabServer, rows: np.ndarray) -> None:
    with Oracle(lab_server.url, "image", api_key=lab_server.attacker_key, budget=150) as oracle:
        result = fingerprint(oracle, rows)
    assert not result.complete and result.victim is None
    assert result.queries <= 150
    assert any("stopped early" in n for n in result.notes)


@pytest.mark.slow
def test_fingerprint_cli_records_configuration_seed_and_machine(lab_server: LabServer, tmp_path: Path) -> None:
    out = tmp_path / "fp.json"
    env = dict(os.environ, BASTION_API_KEY=lab_server.attacker_key)
    run = subprocess.run([sys.executable, "-m", "bastion.cli.main", "lab", "fingerprint", "--url", lab_server.url,
                          "--zoo", "image", "--budget", "1500", "--probes", "2", "--repeats", "5", "--json",
                          "--out", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc == json.loads(out.read_text())
    assert doc["kind"] == "fingerprint" and doc["seed"] == 0
    assert doc["config"]["zoo"] == "image" and doc["config"]["budget"] == 1500
    assert doc["config"]["pool"]["rows"] == 1347  # digits outside the 450-row eval split
    assert doc["machine"]["cores"] and doc["machine"]["python"]
    assert doc["result"]["variants_found"] == len(lab_server.front)
    assert doc["result"]["victim_trigger"]["accuracy"] > sorted(v["quality"] for v in lab_server.front)[-2]


@pytest.mark.slow
def test_fingerprint_falls_back_to_a_grid_when_the_zoo_never_refuses(lab_server: LabServer, rows: np.ndarray,
                                                                      tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(lab_server.repo, repo)
    spec_path = repo / "image" / "zoo.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["on_infeasible"] = "closest"  # no 422 to bisect on
    spec_path.write_text(yaml.safe_dump(spec))
    # same key store, its own audit chain (a writer id belongs to one process)
    with ServerProcess(repo, *lab_server.server_args(), "--audit-dir", str(tmp_path / "audit")) as server, \
            Oracle(server.url, "image", api_key=lab_server.attacker_key, budget=2000) as oracle:
        result = fingerprint(oracle, rows, probes=2, repeats=5)
    assert result.method == "grid" and result.rejected == 0
    assert len(result.variants) == len(lab_server.front)
    assert result.victim is not None
    assert result.variants[result.victim].consistency >= 0.9
