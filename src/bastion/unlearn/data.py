"""Training data for SISA: records with ids, and the scenarios' data sets as sources.

A manifest names its data by a *source* (``{"scenario": "malware", "seed": 0, "rows": 4000}``)
rather than copying the rows: ``forget`` and ``verify`` reload the source and pick rows by
record id, so a forgotten record is never trained on again even though the source still
holds it (deleting it from the source is the data owner's side of the job).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bastion.unlearn.records import RecordError, content_ids, validate_ids

__all__ = ["SCENARIOS", "TrainingData", "from_arrays", "load_scenario", "load_source"]

SCENARIOS = ("malware", "image")
_MAX_ROWS = {"malware": 20_000}


@dataclass(frozen=True)
class TrainingData:
    """Rows ``x`` (float32 [n, d]) with class indices ``y`` (int64 [n], into ``classes``) and unique ids."""

    ids: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    classes: np.ndarray
    id_kind: str

    def rows(self, ids: list[str] | tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``ids``, in that order; RecordError names an id the data lacks."""
        index = self._index()
        try:
            rows = np.fromiter((index[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as err:
            raise RecordError(f"record id {err.args[0]} is not in the training data source") from None
        return self.x[rows], self.y[rows]

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {i: n for n, i in enumerate(self.ids)}
            object.__setattr__(self, "_index_cache", cached)
        return cached


def from_arrays(x: np.ndarray, y: np.ndarray, ids: list[str] | None = None) -> TrainingData:
    """Records from arrays; content ids unless ``ids`` (owner ids, unique) are given.

    Rows with the same content share one content id: only the first is kept, since a copy
    adds no information a deletion could leave behind, and deleting the content must
    remove every copy anyway."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(len(x), -1))
    labels = np.asarray(y, dtype=np.int64)
    if ids is None:
        kind = "content"
        all_ids = content_ids(x, labels)
        first: dict[str, int] = {}
        for n, i in enumerate(all_ids):
            first.setdefault(i, n)
        keep = np.fromiter(sorted(first.values()), dtype=np.int64)
        x, labels, ids = x[keep], labels[keep], [all_ids[n] for n in keep]
    else:
        kind = "owner"
        if len(ids) != len(x):
            raise RecordError(f"{len(ids)} ids for {len(x)} rows")
        ids = validate_ids(list(ids))
    if not np.all(np.isfinite(x)):
        raise RecordError("features must be finite")
    classes, y_idx = np.unique(labels, return_inverse=True)
    return TrainingData(ids=tuple(ids), x=x, y=y_idx.astype(np.int64), classes=classes, id_kind=kind)


def load_scenario(name: str, seed: int = 0, rows: int | None = None
                  ) -> tuple[TrainingData, np.ndarray, np.ndarray, dict[str, Any]]:
    """A scenario's training records, its evaluation rows (x, y) and the source naming them.

    malware: ``bastion.scenarios.malware.generate`` with the SMALL split (4,000 training and
    2,000 evaluation apps; ``rows`` takes fewer or more training rows, up to 20,000), 1,000
    features. image: the digits split of ``bastion.scenarios.image`` (1,347 training and 450
    evaluation images; ``rows`` takes the first ones), flattened to 64 features.
    """
    if name == "malware":
        from bastion.scenarios.malware import SMALL, generate

        n = SMALL.train_rows if rows is None else rows
        if not 1 <= n <= _MAX_ROWS["malware"]:
            raise ValueError(f"malware rows must be 1..{_MAX_ROWS['malware']}, got {n}")
        # train and eval come from one call (one world), as the scenario builds them
        d = generate(n + SMALL.eval_rows, seed)
        x_tr, y_tr, x_ev, y_ev = d.x[:n], d.y[:n], d.x[n:], d.y[n:]
    elif name == "image":
        from bastion.scenarios.image import _load_data

        x_tr, x_ev, y_tr, y_ev = _load_data(seed)
        if rows is not None:
            if not 1 <= rows <= len(x_tr):
                raise ValueError(f"image rows must be 1..{len(x_tr)}, got {rows}")
            x_tr, y_tr = x_tr[:rows], y_tr[:rows]
        x_tr, x_ev = x_tr.reshape(len(x_tr), -1), x_ev.reshape(len(x_ev), -1)
    else:
        raise ValueError(f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}")
    source = {"scenario": name, "seed": seed, "rows": rows}
    return from_arrays(x_tr, y_tr), np.ascontiguousarray(x_ev, dtype=np.float32), y_ev, source


def load_source(source: dict[str, Any]) -> TrainingData:
    """The training records a manifest's ``source`` names."""
    if set(source) != {"scenario", "seed", "rows"}:
        raise ValueError(f"unsupported data source {source!r}: only scenario sources are loadable")
    seed, rows = source["seed"], source["rows"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not (rows is None or isinstance(rows, int)):
        raise ValueError(f"bad data source {source!r}")
    return load_scenario(str(source["scenario"]), seed, rows)[0]
