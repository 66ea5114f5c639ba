"""Combining the shards' answers: majority vote or mean probability, and the vote margin.

The vote margin (votes for the winner minus the most votes any other class got) is what
certified consistency needs later: while ``p`` shards have deletions pending, each of them
can move its vote from the winner to the runner-up, closing the gap by 2, so the ensemble's
answer is certainly the one it would give after the deletions when ``margin > 2 * p``
(``certified``). A shard moving its vote elsewhere closes it by 1 only; the bound covers both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Aggregate", "aggregate", "certified"]


@dataclass(frozen=True)
class Aggregate:
    labels: np.ndarray  # int64 [n]: class index
    scores: np.ndarray  # float64 [n, C]: vote fractions ("vote") or mean probabilities ("mean")
    votes: np.ndarray  # int64 [n, C]: how many shards' argmax is each class
    margin: np.ndarray  # int64 [n]: votes of the vote winner minus the runner-up's


def _argmax_lowest(a: np.ndarray) -> np.ndarray:
    # np.argmax already returns the first (lowest) index among equal maxima; named for the tie rule
    return np.argmax(a, axis=1).astype(np.int64)


def aggregate(probabilities_per_shard: Sequence[np.ndarray] | np.ndarray, mode: str = "vote") -> Aggregate:
    """Combine ``[K, n, C]`` per-shard probabilities.

    ``vote``: each shard votes for its argmax (ties inside a shard: lowest class index); the
    label is the class with most votes, ties going to the lowest class index. ``mean``: the
    argmax of the mean probability (same tie rule). ``votes`` and ``margin`` are the vote's
    in both modes (the margin is what certification uses)."""
    p = np.asarray(probabilities_per_shard, dtype=np.float64)
    if p.ndim != 3 or p.shape[0] < 1 or p.shape[2] < 2:
        raise ValueError(f"expected probabilities [shards, rows, classes >= 2], got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities must be finite")
    k, n, c = p.shape
    shard_votes = np.argmax(p, axis=2)  # [K, n]
    votes = np.zeros((n, c), dtype=np.int64)
    for s in range(k):
        votes[np.arange(n), shard_votes[s]] += 1
    if mode == "vote":
        scores = votes / k
        labels = _argmax_lowest(votes)
    elif mode == "mean":
        scores = p.mean(axis=0)
        labels = _argmax_lowest(scores)
    else:
        raise ValueError(f"mode must be 'vote' or 'mean', got {mode!r}")
    top = np.sort(votes, axis=1)
    margin = (top[:, -1] - top[:, -2]).astype(np.int64)
    return Aggregate(labels=labels, scores=scores, votes=votes, margin=margin)


def certified(margin: np.ndarray | int, pending_shards: int) -> np.ndarray:
    """Whether each vote answer survives any change of the ``pending_shards`` shards' votes."""
    if pending_shards < 0:
        raise ValueError("pending_shards must be >= 0")
    return np.asarray(margin) > 2 * pending_shards
