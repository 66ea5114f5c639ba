"""The SISA manifest: which records each shard and slice trained on, and what came out.

JSON, one file per ensemble version (``<version>/manifest.json``)::

    {"format": "bastion.unlearn.manifest", "schema": 1, "version": 3,
     "family": "mlp", "shards": 5, "slices": 4, "seed": 0,
     "hyper": {...}, "n_features": 1000, "classes": [0, 1],
     "id_kind": "content", "source": {"scenario": "malware", "seed": 0, "rows": 4000},
     "shard_list": [{"shard": 0, "version": 2, "digest": "<sha256>", "onnx_sha256": "<sha256>",
                     "slices": [[id, ...], ...], "checkpoints": ["<sha256 of slice-j.npz>", ...]}, ...]}

``version`` counts ensemble versions (every ``forget`` adds one); a shard's ``version``
counts that shard's retrains, so a server can tell which members changed. The manifest
keeps no list of deleted ids: the ids are hashes of the records' content, and a list of
them would tell anyone holding a record that it was once trained on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from bastion.unlearn.records import MAX_RECORDS, RecordError, set_digest, validate_id
from bastion.unlearn.trainers import FAMILIES, Hyper

__all__ = ["FORMAT", "MAX_MANIFEST_BYTES", "MAX_SHARDS", "MAX_SLICES", "SCHEMA", "Manifest", "ManifestError",
           "ShardEntry", "UnknownRecordError"]

FORMAT = "bastion.unlearn.manifest"
SCHEMA = 1
MAX_SHARDS = 256
MAX_SLICES = 64
MAX_MANIFEST_BYTES = 128 << 20  # ~1M ids of 64 hex characters, with room for the rest
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest that is malformed, out of bounds or inconsistent."""


class UnknownRecordError(KeyError):
    """A record id no shard trained on (never did, or was already forgotten)."""

    def __init__(self, record_id: str) -> None:
        super().__init__(record_id)
        self.record_id = record_id

    def __str__(self) -> str:
        return f"record id {self.record_id} is not in any shard's training set (unknown or already forgotten)"


@dataclass(frozen=True)
class ShardEntry:
    shard: int
    version: int
    slices: tuple[tuple[str, ...], ...]
    digest: str
    onnx_sha256: str
    checkpoints: tuple[str, ...]

    @property
    def record_ids(self) -> list[str]:
        return [i for s in self.slices for i in s]


@dataclass(frozen=True)
class Manifest:
    version: int
    family: str
    shards: int
    slices: int
    seed: int
    hyper: Hyper
    n_features: int
    classes: tuple[int, ...]
    id_kind: str
    source: dict[str, Any]
    shard_list: tuple[ShardEntry, ...]
    _index: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(self)

    def locate(self, record_id: str) -> tuple[int, int]:
        """(shard, slice) that trained on ``record_id``; UnknownRecordError if none did."""
        if not self._index:
            for e in self.shard_list:
                for j, ids in enumerate(e.slices):
                    for i in ids:
                        self._index[i] = (e.shard, j)
        try:
            return self._index[record_id]
        except KeyError:
            raise UnknownRecordError(record_id) from None

    def with_shards(self, entries: dict[int, ShardEntry]) -> Manifest:
        """The next ensemble version, with ``entries`` replacing those shards."""
        shard_list = tuple(entries.get(e.shard, e) for e in self.shard_list)
        return replace(self, version=self.version + 1, shard_list=shard_list, _index={})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "schema": SCHEMA, "version": self.version,
            "family": self.family, "shards": self.shards, "slices": self.slices, "seed": self.seed,
            "hyper": self.hyper.to_dict(), "n_features": self.n_features, "classes": list(self.classes),
            "id_kind": self.id_kind, "source": self.source,
            "shard_list": [
                {"shard": e.shard, "version": e.version, "digest": e.digest, "onnx_sha256": e.onnx_sha256,
                 "slices": [list(s) for s in e.slices], "checkpoints": list(e.checkpoints)}
                for e in self.shard_list
            ],
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest of {len(data)} bytes exceeds the limit of {MAX_MANIFEST_BYTES}")
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ManifestError(f"manifest is not JSON: {err}") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> Manifest:
        if not isinstance(doc, dict):
            raise ManifestError("manifest must be a JSON object")
        if doc.get("format") != FORMAT or doc.get("schema") != SCHEMA:
            raise ManifestError(f"not a {FORMAT} schema {SCHEMA} manifest "
                                f"(format {doc.get('format')!r}, schema {doc.get('schema')!r})")
        try:
            entries = tuple(
                ShardEntry(
                    shard=_int(e["shard"]), version=_int(e["version"]), digest=str(e["digest"]),
                    onnx_sha256=str(e["onnx_sha256"]),
                    slices=tuple(tuple(_list(s)) for s in _list(e["slices"])),
                    checkpoints=tuple(str(c) for c in _list(e["checkpoints"])),
                )
                for e in _list(doc["shard_list"])
            )
            source = doc["source"]
            if not isinstance(source, dict):
                raise ManifestError("source must be an object")
            return cls(
                version=_int(doc["version"]), family=str(doc["family"]), shards=_int(doc["shards"]),
                slices=_int(doc["slices"]), seed=_int(doc["seed"]), hyper=Hyper.from_dict(doc["hyper"]),
                n_features=_int(doc["n_features"]), classes=tuple(_int(c) for c in _list(doc["classes"])),
                id_kind=str(doc["id_kind"]), source=source, shard_list=entries,
            )
        except KeyError as err:
            raise ManifestError(f"manifest lacks the field {err}") from None
        except (TypeError, ValueError) as err:
            if isinstance(err, ManifestError):
                raise
            raise ManifestError(f"malformed manifest: {err}") from None


def _int(v: Any) -> int:
    # bool is an int in Python; a manifest saying "shards": true is malformed, not 1
    if isinstance(v, bool) or not isinstance(v, int):
        raise ManifestError(f"expected an integer, got {v!r}")
    return v


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise ManifestError(f"expected a list, got {type(v).__name__}")
    return v


def _check(m: Manifest) -> None:
    if m.family not in FAMILIES:
        raise ManifestError(f"unknown family {m.family!r}")
    if not 1 <= m.shards <= MAX_SHARDS or not 1 <= m.slices <= MAX_SLICES:
        raise ManifestError(f"shards must be 1..{MAX_SHARDS} and slices 1..{MAX_SLICES}, "
                            f"got {m.shards} and {m.slices}")
    if m.version < 1 or not 0 <= m.seed < 2**63:
        raise ManifestError(f"bad version {m.version} or seed {m.seed}")
    if not 1 <= m.n_features <= 1_000_000 or not 2 <= len(m.classes) <= 10_000:
        raise ManifestError(f"bad n_features {m.n_features} or {len(m.classes)} classes")
    if list(m.classes) != sorted(set(m.classes)):
        raise ManifestError("classes must be distinct and sorted")
    if m.id_kind not in ("content", "owner"):
        raise ManifestError(f"id_kind must be 'content' or 'owner', got {m.id_kind!r}")
    if [e.shard for e in m.shard_list] != list(range(m.shards)):
        raise ManifestError(f"shard_list must list shards 0..{m.shards - 1} in order")
    total = 0
    seen: set[str] = set()
    for e in m.shard_list:
        if e.version < 1 or len(e.slices) != m.slices or len(e.checkpoints) != m.slices:
            raise ManifestError(f"shard {e.shard}: needs version >= 1 and {m.slices} slices and checkpoints")
        if not _SHA256.fullmatch(e.onnx_sha256) or not all(_SHA256.fullmatch(c) for c in e.checkpoints):
            raise ManifestError(f"shard {e.shard}: hashes must be 64 lowercase hex characters")
        for ids in e.slices:
            total += len(ids)
            if total > MAX_RECORDS:
                raise ManifestError(f"more than {MAX_RECORDS} records")
            if list(ids) != sorted(ids):
                raise ManifestError(f"shard {e.shard}: slice ids must be sorted")
            for i in ids:
                try:
                    validate_id(i)
                except RecordError as err:
                    raise ManifestError(f"shard {e.shard}: {err}") from None
                if i in seen:
                    raise ManifestError(f"record id {i} is in more than one slice")
                seen.add(i)
        if set_digest(e.record_ids) != e.digest:
            raise ManifestError(f"shard {e.shard}: digest does not match its record ids")
