"""SISA training core (issue 18, first slice): exact retraining, assignment, aggregation, CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bastion.unlearn.aggregate import aggregate, certified
from bastion.unlearn.data import TrainingData, from_arrays, load_scenario
from bastion.unlearn.manifest import Manifest, ManifestError, UnknownRecordError
from bastion.unlearn.records import RecordError, content_id, set_digest
from bastion.unlearn.sisa import assign, partition, retrain_shard, train, train_shard
from bastion.unlearn.store import forget, load_manifest, verify, write_ensemble
from bastion.unlearn.trainers import load_state, predict_proba


@pytest.fixture(scope="module")
def malware() -> tuple[TrainingData, np.ndarray, np.ndarray, dict[str, object]]:
    return load_scenario("malware", seed=0, rows=1500)


def _first_id(m: Manifest, shard: int, slice_: int) -> str:
    return m.shard_list[shard].slices[slice_][0]


def test_content_id_is_stable_and_sensitive() -> None:
    x = np.arange(6, dtype=np.float32)
    assert content_id(x, 1) == content_id(x.astype(np.float64), 1)  # float32 bytes, whatever came in
    assert content_id(x, 1) != content_id(x, 0)
    assert set_digest(["b", "a"]) == set_digest(["a", "b"])


def test_assignment_is_deterministic_and_local() -> None:
    ids = [f"user-{n}" for n in range(300)]
    parts = partition(ids, seed=3, shards=5, slices=4)
    assert parts == partition(list(reversed(ids)), seed=3, shards=5, slices=4)
    # removing or adding a record moves no other record
    fewer = partition([*ids[1:], "user-new"], seed=3, shards=5, slices=4)
    for i in ids[1:]:
        k, j = assign(i, 3, 5, 4)
        assert i in parts[k][j] and i in fewer[k][j]
    assert partition(ids, seed=4, shards=5, slices=4) != parts


@pytest.mark.parametrize("family", ["logreg", "mlp"])
def test_retrain_equals_training_from_scratch_byte_for_byte(family: str, malware: tuple) -> None:
    data = malware[0]
    m, artifacts = train(data, family=family, shards=3, slices=3, seed=7, source=malware[3])
    shard = 1
    for slice_ in (0, 2):  # from the initial state, and from a checkpoint
        gone = [_first_id(m, shard, slice_), m.shard_list[shard].slices[2][-1]]
        entry, art, first = retrain_shard(m, shard, gone, data, lambda j: artifacts[shard].checkpoints[j])
        assert first == slice_
        remaining = [[i for i in s if i not in gone] for s in m.shard_list[shard].slices]
        scratch, scratch_art = train_shard(m, shard, remaining, data, version=entry.version)
        assert art.onnx == scratch_art.onnx
        assert art.checkpoints == scratch_art.checkpoints
        assert entry == scratch
        assert entry.version == 2 and entry.digest != m.shard_list[shard].digest
    # the same seed reproduces the whole ensemble
    again, artifacts2 = train(data, family=family, shards=3, slices=3, seed=7, source=malware[3])
    assert again == m and all(artifacts[k].onnx == artifacts2[k].onnx for k in range(3))


def test_forget_only_changes_affected_shards_and_verifies(malware: tuple, tmp_path: Path) -> None:
    data = malware[0]
    m, artifacts = train(data, family="logreg", shards=4, slices=3, seed=1, source=malware[3])
    write_ensemble(tmp_path, m, artifacts)
    gone = [_first_id(m, 0, 1), _first_id(m, 2, 2), m.shard_list[2].slices[0][3]]
    receipt = forget(tmp_path, gone, data)
    new = load_manifest(tmp_path)
    assert new.version == 2 and not (tmp_path / "1").exists()
    assert [s["shard"] for s in receipt["shards"]] == [0, 2]
    assert {s["shard"]: s["restarted_at_slice"] for s in receipt["shards"]} == {0: 1, 2: 0}
    for i in gone:
        with pytest.raises(UnknownRecordError):
            new.locate(i)
    for k in range(4):
        changed = k in (0, 2)
        assert (new.shard_list[k] != m.shard_list[k]) is changed
        assert new.shard_list[k].version == (2 if changed else 1)
        assert ((tmp_path / "2" / f"shard-{k}.onnx").read_bytes() == artifacts[k].onnx) is not changed
    assert verify(tmp_path, receipt, data)["verified"] is True


def test_unknown_record_id_names_it(malware: tuple, tmp_path: Path) -> None:
    data = malware[0]
    m, artifacts = train(data, family="logreg", shards=2, slices=2, seed=0, source=malware[3])
    write_ensemble(tmp_path, m, artifacts)
    missing = "f" * 64
    with pytest.raises(UnknownRecordError, match=missing):
        forget(tmp_path, [_first_id(m, 0, 0), missing], data)
    assert load_manifest(tmp_path).version == 1  # nothing was done for the known id either
    with pytest.raises(RecordError, match="malformed record id"):
        forget(tmp_path, ["../etc"], data)


def test_malformed_manifests_are_refused(malware: tuple) -> None:
    m, _ = train(malware[0], family="logreg", shards=2, slices=2, seed=0, source=malware[3])
    assert Manifest.from_bytes(m.to_bytes()) == m
    doc = m.to_dict()
    bad = [
        b"not json",
        json.dumps({**doc, "schema": 2}).encode(),
        json.dumps({**doc, "shards": True}).encode(),
        json.dumps({**doc, "slices": 3}).encode(),
        json.dumps({k: v for k, v in doc.items() if k != "seed"}).encode(),
    ]
    tampered = json.loads(json.dumps(doc))
    tampered["shard_list"][0]["slices"][0].pop()  # a record silently dropped: the digest no longer matches
    bad.append(json.dumps(tampered).encode())
    moved = json.loads(json.dumps(doc))
    moved["shard_list"][1]["slices"][0] = sorted(moved["shard_list"][1]["slices"][0]
                                                 + [moved["shard_list"][0]["slices"][0][0]])
    bad.append(json.dumps(moved).encode())
    for blob in bad:
        with pytest.raises(ManifestError):
            Manifest.from_bytes(blob)


def test_aggregate_vote_mean_and_ties() -> None:
    p = np.array([
        [[0.6, 0.4, 0.0], [0.1, 0.2, 0.7]],
        [[0.4, 0.6, 0.0], [0.1, 0.2, 0.7]],
        [[0.0, 0.1, 0.9], [0.5, 0.5, 0.0]],  # a tie inside one shard votes for class 0
    ])
    vote = aggregate(p, "vote")
    assert vote.labels.tolist() == [0, 2]  # row 0: one vote each, lowest index wins
    assert vote.votes.tolist() == [[1, 1, 1], [1, 0, 2]]
    assert vote.margin.tolist() == [0, 1]
    mean = aggregate(p, "mean")
    assert mean.labels.tolist() == [1, 2]  # row 0: means 0.33, 0.37, 0.30
    assert np.allclose(mean.scores.sum(axis=1), 1.0)
    assert aggregate(np.full((2, 1, 2), 0.5), "mean").labels.tolist() == [0]
    assert certified(np.array([3, 2, 5]), 1).tolist() == [True, False, True]
    with pytest.raises(ValueError):
        aggregate(p, "median")


def test_ensemble_accuracy_close_to_a_single_model(malware: tuple) -> None:
    data, x_ev, y_ev, source = malware
    y_true = np.searchsorted(data.classes, y_ev)
    _, single_art = train(data, family="logreg", shards=1, slices=1, seed=0, source=source)
    acc_single = float((predict_proba("logreg", load_state("logreg", single_art[0].checkpoints[-1]), x_ev)
                        .argmax(axis=1) == y_true).mean())
    _, art = train(data, family="logreg", shards=5, slices=2, seed=0, source=source)
    probs = [predict_proba("logreg", load_state("logreg", art[k].checkpoints[-1]), x_ev) for k in range(5)]
    acc_vote = float((aggregate(probs, "vote").labels == y_true).mean())
    acc_mean = float((aggregate(probs, "mean").labels == y_true).mean())
    print(f"malware 1500 rows: single {acc_single:.4f}, 5-shard vote {acc_vote:.4f}, mean {acc_mean:.4f}")
    assert acc_single > 0.75  # a constant 'benign' scores about 0.65
    assert acc_vote > acc_single - 0.08 and acc_mean > acc_single - 0.08


def test_owner_ids_and_duplicates() -> None:
    x = np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    y = np.array([0, 0, 1])
    assert len(from_arrays(x, y).ids) == 2  # identical rows share one content id
    owned = from_arrays(x, y, ids=["alice", "bob", "carol"])
    assert owned.id_kind == "owner" and owned.rows(["carol"])[1].tolist() == [1]
    with pytest.raises(RecordError, match="more than once"):
        from_arrays(x, y, ids=["alice", "alice", "carol"])


def test_cli_train_forget_verify(tmp_path: Path) -> None:
    from bastion.cli.main import cli

    out = tmp_path / "ens"
    runner = CliRunner()
    t0 = time.perf_counter()
    r = runner.invoke(cli, ["unlearn", "train", "image", "--shards", "3", "--slices", "2", "--seed", "2",
                            "--family", "mlp", "--rows", "600", "--out", str(out)])
    assert r.exit_code == 0, r.output
    # 200 rows a shard and 6 passes underfit 10 digit classes; chance is 0.1
    assert json.loads(r.output)["eval_accuracy_vote"] > 0.5
    m = load_manifest(out)
    gone = _first_id(m, 1, 1)
    receipt = tmp_path / "receipt.json"
    r = runner.invoke(cli, ["unlearn", "forget", str(out), "--record-id", gone, "--receipt", str(receipt)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["record_ids"] == [gone] and doc["shards"][0]["new_version"] == 2
    assert json.loads(receipt.read_text()) == doc
    r = runner.invoke(cli, ["unlearn", "verify", str(out), "--receipt", str(receipt)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["verified"] is True
    r = runner.invoke(cli, ["unlearn", "forget", str(out), "--record-id", gone])
    assert r.exit_code != 0 and gone in r.output
    (out / "2" / "manifest.json").write_text("{}")
    r = runner.invoke(cli, ["unlearn", "verify", str(out), "--receipt", str(receipt)])
    assert r.exit_code != 0 and "bastion.unlearn.manifest" in r.output
    print(f"cli round trip {time.perf_counter() - t0:.1f}s")
