"""SISA training (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021): Sharded, Isolated,
Sliced, Aggregated.

The records are split into K shards, each shard into R slices; one model per shard, trained
in R steps where step ``j`` continues from step ``j - 1``'s weights on slices ``0..j`` (the
paper's cumulative schedule), with a checkpoint of the weights after each step. Forgetting a
record of slice ``j`` of shard ``k`` touches that shard only: restore the checkpoint after
step ``j - 1`` and redo steps ``j..R-1`` without the record.

Assignment: a record's shard and slice come from ``sha256(seed, record id)`` alone, so
adding or removing one record never moves another.

Exactness: every step is a deterministic function of (weights before it, the step's rows
in canonical order, ``(seed, shard, step)``); see ``trainers``. Slices before ``j`` are
unchanged by a deletion in slice ``j``, so the restored checkpoint equals what training from
scratch without the record reaches after step ``j - 1``, and the rest is the same
computation: ``retrain_shard`` gives the same weights, bit for bit, and so the same ONNX
bytes, as ``train_shard`` on the remaining records (tests/unlearn check it). Model families:
``trainers.FAMILIES`` (logistic regression and a one-hidden-layer MLP).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np

from bastion.unlearn.data import TrainingData
from bastion.unlearn.manifest import MAX_SHARDS, MAX_SLICES, Manifest, ShardEntry
from bastion.unlearn.records import set_digest
from bastion.unlearn.trainers import (
    DEFAULTS,
    FAMILIES,
    Hyper,
    export_onnx,
    init_state,
    load_state,
    save_state,
    train_step,
)

__all__ = ["ShardArtifacts", "assign", "partition", "retrain_shard", "train", "train_shard"]


@dataclass(frozen=True)
class ShardArtifacts:
    """What training one shard produces besides its manifest entry: the files' bytes."""

    checkpoints: tuple[bytes, ...]  # the weights after each step (.npz)
    onnx: bytes


def assign(record_id: str, seed: int, shards: int, slices: int) -> tuple[int, int]:
    """(shard, slice) of a record: from a hash of the seed and the id only."""
    h = hashlib.sha256(f"bastion.unlearn.assign.v1\0{seed}\0{record_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") % shards, int.from_bytes(h[8:16], "big") % slices


def partition(ids: Iterable[str], seed: int, shards: int, slices: int) -> list[list[list[str]]]:
    """``[shard][slice] -> sorted ids``."""
    if not 1 <= shards <= MAX_SHARDS or not 1 <= slices <= MAX_SLICES:
        raise ValueError(f"shards must be 1..{MAX_SHARDS} and slices 1..{MAX_SLICES}, got {shards} and {slices}")
    out: list[list[list[str]]] = [[[] for _ in range(slices)] for _ in range(shards)]
    for i in ids:
        k, j = assign(i, seed, shards, slices)
        out[k][j].append(i)
    for shard in out:
        for s in shard:
            s.sort()  # the canonical order every step sees its rows in
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run_steps(m: Manifest, shard: int, slices: list[list[str]], data: TrainingData, first_step: int,
               state: dict[str, np.ndarray]) -> tuple[list[bytes], dict[str, np.ndarray]]:
    checkpoints = []
    for j in range(first_step, m.slices):
        ids = [i for s in slices[: j + 1] for i in s]
        x, y = data.rows(ids)
        rng = np.random.default_rng([m.seed, shard, j + 1])
        state = train_step(m.family, state, x, y, len(m.classes), m.hyper, rng)
        checkpoints.append(save_state(state))
    return checkpoints, state


def train_shard(m: Manifest, shard: int, slices: list[list[str]], data: TrainingData, version: int = 1
                ) -> tuple[ShardEntry, ShardArtifacts]:
    """Train shard ``shard`` from scratch on ``slices`` (sorted ids per slice) with ``m``'s settings."""
    state = init_state(m.family, m.n_features, len(m.classes), m.hyper, m.seed, shard)
    checkpoints, state = _run_steps(m, shard, slices, data, 0, state)
    return _finish(m, shard, slices, version, checkpoints, state)


def _finish(m: Manifest, shard: int, slices: list[list[str]], version: int, checkpoints: list[bytes],
            state: dict[str, np.ndarray]) -> tuple[ShardEntry, ShardArtifacts]:
    onnx = export_onnx(m.family, state, np.asarray(m.classes))
    entry = ShardEntry(
        shard=shard, version=version, slices=tuple(tuple(s) for s in slices),
        digest=set_digest(i for s in slices for i in s), onnx_sha256=_sha256(onnx),
        checkpoints=tuple(_sha256(c) for c in checkpoints),
    )
    return entry, ShardArtifacts(checkpoints=tuple(checkpoints), onnx=onnx)


def train(data: TrainingData, *, family: str, shards: int, slices: int, seed: int, source: dict[str, object],
          hyper: Hyper | None = None) -> tuple[Manifest, dict[int, ShardArtifacts]]:
    """Train all K shards; the manifest (version 1) and each shard's files."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be 0..2**63-1, got {seed!r}")
    hyper = hyper or DEFAULTS[family]
    hyper.check()
    parts = partition(data.ids, seed, shards, slices)
    empty = [k for k, p in enumerate(parts) if not any(p)]
    if empty:
        raise ValueError(f"{len(data.ids)} records leave shards {empty} empty; use fewer shards")
    # A placeholder manifest carries the settings into train_shard; its entries are replaced below.
    placeholder = tuple(
        ShardEntry(k, 1, tuple(tuple(s) for s in parts[k]), set_digest(i for s in parts[k] for i in s), "0" * 64,
                   ("0" * 64,) * slices)
        for k in range(shards)
    )
    m = Manifest(version=1, family=family, shards=shards, slices=slices, seed=seed, hyper=hyper,
                 n_features=int(data.x.shape[1]), classes=tuple(int(c) for c in data.classes),
                 id_kind=data.id_kind, source=dict(source), shard_list=placeholder)
    entries, artifacts = {}, {}
    for k in range(shards):
        entries[k], artifacts[k] = train_shard(m, k, parts[k], data)
    return replace(m, shard_list=tuple(entries[k] for k in range(shards)), _index={}), artifacts


def retrain_shard(m: Manifest, shard: int, deleted_ids: Iterable[str], data: TrainingData,
                  load_checkpoint: Callable[[int], bytes]) -> tuple[ShardEntry, ShardArtifacts, int]:
    """Shard ``shard`` without ``deleted_ids``: (new entry, its files, first retrained step).

    Restarts from the checkpoint after the step before the earliest slice holding a deleted
    id (``load_checkpoint(j)`` gives step ``j``'s .npz bytes, checked against the manifest's
    hash) and redoes the steps from there. The entry's version is the old one plus one."""
    entry = m.shard_list[shard]
    deleted = set(deleted_ids)
    hits = [j for j, s in enumerate(entry.slices) if deleted.intersection(s)]
    missing = deleted.difference(*entry.slices) if deleted else set()
    if missing:
        raise ValueError(f"shard {shard} does not hold {sorted(missing)[0]}")
    slices = [[i for i in s if i not in deleted] for s in entry.slices]
    if not hits:
        raise ValueError(f"shard {shard}: nothing to forget")
    first = hits[0]
    old_checkpoints: list[bytes] = []
    if first == 0:
        state = init_state(m.family, m.n_features, len(m.classes), m.hyper, m.seed, shard)
    else:
        for j in range(first):
            blob = load_checkpoint(j)
            if _sha256(blob) != entry.checkpoints[j]:
                raise ValueError(f"shard {shard}: checkpoint of slice {j} does not match the manifest's hash")
            old_checkpoints.append(blob)
        state = load_state(m.family, old_checkpoints[-1])
    new_checkpoints, state = _run_steps(m, shard, slices, data, first, state)
    new_entry, artifacts = _finish(m, shard, slices, entry.version + 1, old_checkpoints + new_checkpoints, state)
    return new_entry, artifacts, first
