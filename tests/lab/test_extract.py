"""Extraction against a live zoo: real answers, exact query counts, fair comparisons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bastion.client import Client
from bastion.guard.keystore import KeyStore
from bastion.guard.principal import Limits
from bastion.lab.extract import (
    ExtractionResult,
    TrainConfig,
    collect,
    evaluate,
    run_extraction,
    train_surrogate,
    victim_answers,
)
from bastion.lab.oracle import BudgetExhausted, Oracle
from bastion.lab.pools import image_pool
from tests.lab.conftest import LabServer

BUDGET = 200


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return image_pool(0).ordered(0)


@pytest.fixture(scope="module")
def eval_set(lab_server: LabServer) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(lab_server.repo / "image" / "eval.npz")
    return data["image"], data["y"]


@pytest.fixture(scope="module")
def victim_probs(lab_server: LabServer, eval_set: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return victim_answers(lab_server.url, lab_server.victim, lab_server.experimenter_key, eval_set[0])


def _attack(lab_server: LabServer, rows: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray],
            victim_probs: np.ndarray, attacker: str, **kwargs: Any) -> ExtractionResult:
    """The explicit attacker needs a key that may name the victim; the others only the zoo's."""
    key = lab_server.experimenter_key if attacker == "explicit" else lab_server.attacker_key
    return run_extraction(lab_server.url, "image", key, rows, attacker=attacker, budget=BUDGET,
                          victim_model=lab_server.victim, eval_x=eval_set[0], eval_y=eval_set[1],
                          victim_probs=victim_probs, **kwargs)


def test_pool_is_the_digits_outside_the_eval_split() -> None:
    from sklearn.datasets import load_digits

    pool = image_pool(0)
    x, _ = load_digits(return_X_y=True)
    assert pool.x.shape == (1347, 1, 8, 8) and len(x) == 1347 + 450
    assert np.array_equal(pool.ordered(3), pool.ordered(3)) and not np.array_equal(pool.ordered(3), pool.ordered(4))


def test_malware_pool_is_the_builds_world_with_fresh_apps() -> None:
    from bastion.lab.pools import malware_pool
    from bastion.scenarios.malware import generate

    pool = malware_pool(0, rows=500)
    built = generate(6_000, 0).x  # the small build's train + eval rows
    seen = {row.tobytes() for row in built.astype(np.uint8)}
    assert pool.x.shape == (500, 1000)
    assert not any(row.tobytes() in seen for row in pool.x.astype(np.uint8))
    # the same world: the features common to every app are as frequent as in the build
    common = generate(10, 0).common
    assert abs(pool.x[:, common].mean() - built[:, common].mean()) < 0.03


def test_collect_refuses_a_budget_beyond_the_pool() -> None:
    with pytest.raises(ValueError, match="larger than the query pool"):
        collect(None, np.zeros((10, 4), np.float32), 11)  # type: ignore[arg-type]


@pytest.mark.slow
def test_explicit_extraction_spends_its_budget_and_learns_the_victim(
        lab_server: LabServer, rows: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray],
        victim_probs: np.ndarray) -> None:
    x_eval, y_eval = eval_set
    result = _attack(lab_server, rows, eval_set, victim_probs, "explicit", batch_size=32)
    assert result.queried == lab_server.victim
    assert result.queries == BUDGET == result.rows_answered
    assert result.requests == -(-BUDGET // 32)
    # the reference answers are the served victim's: its accuracy is what the repository profiled
    profiled = next(v["quality"] for v in lab_server.front if v["variant"] == lab_server.victim)
    assert result.victim_accuracy == pytest.approx(profiled, abs=1e-9)
    assert result.accuracy >= 0.85
    # the same rows with random labels teach nothing: ~10 % on ten classes
    rng = np.random.default_rng(0)
    noise = train_surrogate(rows[:BUDGET], np.eye(10)[rng.integers(0, 10, BUDGET)], seed=0)
    assert evaluate(noise, x_eval, y_eval, victim_probs)["accuracy"] < 0.25
    # fidelity is agreement with the victim's top-1 as served: rebuild the same surrogate by hand
    with Oracle(lab_server.url, lab_server.victim, api_key=lab_server.experimenter_key, budget=BUDGET) as oracle:
        got = collect(oracle, rows, BUDGET)
        assert oracle.queries == BUDGET
    surrogate = train_surrogate(got.x, got.probs, seed=0)
    pred = surrogate.predict(x_eval)
    assert result.accuracy == float((pred == y_eval).mean())  # deterministic for a seed
    assert result.fidelity == float((pred == victim_probs.argmax(axis=1)).mean())
    other = victim_answers(lab_server.url, lab_server.front[0]["variant"], lab_server.experimenter_key, x_eval)
    assert evaluate(surrogate, x_eval, y_eval, other)["fidelity"] != result.fidelity  # another variant disagrees


@pytest.mark.slow
def test_fingerprinted_attacker_matches_explicit_and_naive_pays_for_the_mixture(
        lab_server: LabServer, rows: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray],
        victim_probs: np.ndarray) -> None:
    explicit = _attack(lab_server, rows, eval_set, victim_probs, "explicit")
    fingerprinted = _attack(lab_server, rows, eval_set, victim_probs, "fingerprinted", fingerprint_budget=2000)
    naive = _attack(lab_server, rows, eval_set, victim_probs, "naive")
    assert fingerprinted.queried == naive.queried == "image"
    assert fingerprinted.queries == naive.queries == explicit.queries == BUDGET
    assert 0 < fingerprinted.fingerprint_queries <= 2000
    assert fingerprinted.fingerprint is not None and fingerprinted.targets == fingerprinted.fingerprint[
        "victim_trigger"]
    assert abs(fingerprinted.accuracy - explicit.accuracy) <= 0.02
    assert abs(fingerprinted.fidelity - explicit.fidelity) <= 0.02
    assert naive.accuracy >= 0.8 and naive.targets is None


@pytest.mark.slow
def test_oracle_waits_out_rate_limits_and_stops_at_a_spent_quota(lab_server: LabServer, rows: np.ndarray) -> None:
    with KeyStore(lab_server.keys_db) as store:
        slow, _ = store.create_key("slow-attacker", models=["image"], limits=Limits(rate_per_s=20.0, burst=2))
        capped, _ = store.create_key("capped-attacker", models=["image"], limits=Limits(quota=3, quota_period="total"))
    assert slow is not None and capped is not None
    with Client(lab_server.url, api_key=slow) as client:  # a running server sees new keys within a second
        client.wait_until_accepted("image", timeout_s=5.0)
    with Oracle(lab_server.url, "image", api_key=slow) as oracle:
        got = collect(oracle, rows, 64, batch_size=16)  # 4 requests against a burst of 2
    assert got.queries == 64 and len(got.x) == 64 and oracle.retries > 0
    with Oracle(lab_server.url, "image", api_key=capped) as oracle:
        with pytest.raises(BudgetExhausted, match="quota"):
            collect(oracle, rows, 64, batch_size=16)
        assert oracle.requests == 3  # metadata is free; three inferences, then the quota


@pytest.mark.slow
def test_extract_cli_runs_the_three_attackers_on_the_same_rows(lab_server: LabServer, tmp_path: Path) -> None:
    env = dict(os.environ, BASTION_API_KEY=lab_server.experimenter_key)
    run = subprocess.run([sys.executable, "-m", "bastion.cli.main", "lab", "extract", "--url", lab_server.url,
                          "--zoo", "image", "--budget", "96", "--attacker", "all", "--victim-model", lab_server.victim,
                          "--eval", str(lab_server.repo / "image" / "eval.npz"), "--steps", "200",
                          "--fingerprint-budget", "1500", "--json"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["kind"] == "extract" and doc["seed"] == 0 and doc["machine"]["cores"]
    assert doc["config"]["train"] == {"hidden": [128], "steps": 200}
    attacks = {a["attacker"]: a for a in doc["result"]["attacks"]}
    assert set(attacks) == {"explicit", "naive", "fingerprinted"}
    for attack in attacks.values():
        assert attack["queries"] == 96 and attack["eval_rows"] == 450
        assert 0.5 < attack["accuracy"] <= 1.0 and 0.5 < attack["fidelity"] <= 1.0
    assert attacks["fingerprinted"]["fingerprint_queries"] > 0
    assert attacks["explicit"]["train"]["steps"] == 200 != TrainConfig().steps
