"""Stable ids of training records and digests of training sets.

A record id names one training example by its content, so that a data owner who holds
the example can compute its id without asking the server, and so that the id does not
depend on the row's position in some file (positions shift when rows are deleted).

Content id (``content_id``): ``sha256`` over a domain tag, the feature count, the
features as little-endian float32 in C order, and the label as little-endian int64;
64 lowercase hex characters. An owner may instead supply ids of its own (a user or
document id): 1-128 characters of ``[A-Za-z0-9._:-]``. One training set uses one kind
(the manifest says which); ids are compared as strings only.

The digest of a training set is ``sha256`` over its sorted ids, one per line: it names
the set, not an order, so retraining from a checkpoint and training from scratch on the
same records give the same digest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_RECORDS",
    "RecordError",
    "content_id",
    "content_ids",
    "set_digest",
    "validate_id",
    "validate_ids",
]

MAX_RECORDS = 1_000_000  # bounds a manifest to ~70 MB of ids; larger sets need another store
MAX_ID_LENGTH = 128
_DOMAIN = b"bastion.unlearn.record.v1\0"
_CONTENT_ID = re.compile(r"[0-9a-f]{64}")
_OWNER_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RecordError(ValueError):
    """A record id or a set of records is not acceptable."""


def content_id(features: np.ndarray, label: int) -> str:
    """The content id of one record (see the module docstring for the exact bytes)."""
    row = np.ascontiguousarray(np.asarray(features, dtype="<f4").reshape(-1))
    h = hashlib.sha256(_DOMAIN)
    h.update(np.int64(row.size).astype("<i8").tobytes())
    h.update(row.tobytes())
    h.update(np.int64(label).astype("<i8").tobytes())
    return h.hexdigest()


def content_ids(x: np.ndarray, y: np.ndarray) -> list[str]:
    """Content ids of the rows of ``x`` (any shape ``[n, ...]``) with labels ``y``."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2 or x.shape[0] != y.shape[0] or y.ndim != 1:
        raise RecordError(f"expected x [n, ...] and y [n], got {x.shape} and {y.shape}")
    if x.shape[0] > MAX_RECORDS:
        raise RecordError(f"{x.shape[0]} records exceed the limit of {MAX_RECORDS}")
    flat = x.reshape(x.shape[0], -1)
    return [content_id(flat[i], int(y[i])) for i in range(flat.shape[0])]


def validate_id(record_id: str) -> str:
    """``record_id`` if it is a content id or an acceptable owner id; RecordError otherwise."""
    if not isinstance(record_id, str):
        raise RecordError(f"record id must be a string, got {type(record_id).__name__}")
    if _CONTENT_ID.fullmatch(record_id) or _OWNER_ID.fullmatch(record_id):
        return record_id
    shown = record_id if len(record_id) <= 80 else record_id[:80] + "..."
    raise RecordError(
        f"malformed record id {shown!r}: expected 64 lowercase hex characters (a content id) "
        f"or 1-{MAX_ID_LENGTH} characters of [A-Za-z0-9._:-]"
    )


def validate_ids(ids: Sequence[str]) -> list[str]:
    """Every id valid and none repeated (a repeated id would make deletion ambiguous)."""
    if len(ids) > MAX_RECORDS:
        raise RecordError(f"{len(ids)} records exceed the limit of {MAX_RECORDS}")
    out = [validate_id(i) for i in ids]
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = next(i for i in out if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise RecordError(f"record id {dup} appears more than once")
    return out


def set_digest(ids: Iterable[str]) -> str:
    """sha256 over the sorted ids, newline-terminated: names a set of records, not an order."""
    h = hashlib.sha256(b"bastion.unlearn.set.v1\0")
    for record_id in sorted(ids):
        h.update(record_id.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()
