"""An ensemble's files on disk, and the ``forget`` / ``verify`` operations on them.

Layout of an output directory::

    OUT/CURRENT                              the current ensemble version ("1\\n"), replaced atomically
    OUT/<version>/manifest.json
    OUT/<version>/shard-<k>.onnx
    OUT/<version>/checkpoints/shard-<k>/slice-<j>.npz

A new version is written complete into a temporary directory, renamed to ``OUT/<version>``,
and only then does ``CURRENT`` move to it: a reader of ``CURRENT`` sees a whole old or a
whole new ensemble. After a ``forget`` the previous version's directory is deleted, since its
affected shards and checkpoints were trained on the forgotten records.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bastion.runtimes.export import write_bytes_atomic
from bastion.unlearn.data import TrainingData
from bastion.unlearn.manifest import Manifest, ManifestError, ShardEntry
from bastion.unlearn.records import set_digest, validate_id
from bastion.unlearn.sisa import ShardArtifacts, retrain_shard, train_shard

__all__ = ["RECEIPT_FORMAT", "VerificationError", "current_version", "forget", "load_manifest", "verify",
           "write_ensemble"]

RECEIPT_FORMAT = "bastion.unlearn.receipt"
MAX_FORGET = 10_000  # ids per forget call: a bound on one request's work, not on the data


class VerificationError(Exception):
    """A receipt's claims do not hold for the ensemble on disk."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def current_version(out: Path) -> int:
    try:
        text = (Path(out) / "CURRENT").read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ManifestError(f"{out} holds no ensemble (no CURRENT file)") from None
    if not text.isdigit() or len(text) > 12:
        raise ManifestError(f"{out}/CURRENT is malformed: {text[:40]!r}")
    return int(text)


def load_manifest(out: Path) -> Manifest:
    """The current manifest of ``out``; checks it names the version its directory has."""
    version = current_version(out)
    m = Manifest.from_bytes((Path(out) / str(version) / "manifest.json").read_bytes())
    if m.version != version:
        raise ManifestError(f"{out}/{version}/manifest.json says version {m.version}")
    return m


def _shard_files(m: Manifest, artifacts: dict[int, ShardArtifacts]) -> dict[str, bytes]:
    files = {"manifest.json": m.to_bytes()}
    for k, a in artifacts.items():
        files[f"shard-{k}.onnx"] = a.onnx
        for j, c in enumerate(a.checkpoints):
            files[f"checkpoints/shard-{k}/slice-{j}.npz"] = c
    return files


def write_ensemble(out: Path, m: Manifest, artifacts: dict[int, ShardArtifacts],
                   keep_from: Path | None = None) -> Path:
    """Write version ``m.version`` (shards not in ``artifacts`` are copied from ``keep_from``) and
    point CURRENT at it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / str(m.version)
    if final.exists():
        if (out / "CURRENT").exists() and current_version(out) == m.version:
            raise FileExistsError(f"{final} is the current version")
        shutil.rmtree(final)  # left by a run that died before moving CURRENT: never served
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{m.version}."))
    try:
        for name, data in _shard_files(m, artifacts).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        for e in m.shard_list:
            if e.shard in artifacts:
                continue
            if keep_from is None:
                raise ValueError(f"no files for shard {e.shard}")
            names = [f"shard-{e.shard}.onnx", *(f"checkpoints/shard-{e.shard}/slice-{j}.npz"
                                                for j in range(m.slices))]
            for name in names:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(keep_from / name, tmp / name)
            if _sha256((tmp / names[0]).read_bytes()) != e.onnx_sha256:
                raise ValueError(f"{keep_from / names[0]} does not match the manifest")
        for root, _dirs, files in os.walk(tmp):
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_bytes_atomic(out / "CURRENT", f"{m.version}\n".encode("ascii"))
    return final


def forget(out: Path, record_ids: Iterable[str], data: TrainingData) -> dict[str, Any]:
    """Retrain the shards holding ``record_ids``, write the next version, return the receipt.

    Every id is checked before any work: an unknown id fails the whole call (UnknownRecordError
    naming it), so a receipt never covers part of a request."""
    out = Path(out)
    ids = sorted(set(validate_id(i) for i in record_ids))
    if not ids:
        raise ValueError("no record ids to forget")
    if len(ids) > MAX_FORGET:
        raise ValueError(f"{len(ids)} ids exceed the limit of {MAX_FORGET} per call")
    m = load_manifest(out)
    old_dir = out / str(m.version)
    by_shard: dict[int, list[str]] = {}
    for i in ids:
        by_shard.setdefault(m.locate(i)[0], []).append(i)
    entries: dict[int, ShardEntry] = {}
    artifacts: dict[int, ShardArtifacts] = {}
    shards = []
    for k in sorted(by_shard):
        t0 = time.perf_counter()
        entry, art, first = retrain_shard(
            m, k, by_shard[k], data,
            lambda j, k=k: (old_dir / f"checkpoints/shard-{k}/slice-{j}.npz").read_bytes(),
        )
        entries[k], artifacts[k] = entry, art
        old = m.shard_list[k]
        shards.append({
            "shard": k, "old_version": old.version, "new_version": entry.version,
            "old_digest": old.digest, "new_digest": entry.digest, "onnx_sha256": entry.onnx_sha256,
            "forgotten": len(by_shard[k]), "restarted_at_slice": first,
            "retrain_seconds": round(time.perf_counter() - t0, 4),
        })
    new = m.with_shards(entries)
    write_ensemble(out, new, artifacts, keep_from=old_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    return {
        "format": RECEIPT_FORMAT, "schema": 1, "record_ids": ids,
        "ensemble_version": {"old": m.version, "new": new.version},
        "manifest_sha256": _sha256(new.to_bytes()), "shards": shards,
    }


def verify(out: Path, receipt: dict[str, Any], data: TrainingData) -> dict[str, Any]:
    """Check a receipt against the current ensemble; VerificationError on the first failure.

    The ids are in no shard's training set; each retrained shard's digest and files match the
    manifest; training that shard from scratch (same seed, its current records) gives the
    same ONNX bytes."""
    if not isinstance(receipt, dict) or receipt.get("format") != RECEIPT_FORMAT or receipt.get("schema") != 1:
        raise VerificationError("not a bastion.unlearn receipt (schema 1)")
    try:
        ids = [validate_id(i) for i in receipt["record_ids"]]
        shards = [int(s["shard"]) for s in receipt["shards"]]
        new_version = int(receipt["ensemble_version"]["new"])
        claimed = {int(s["shard"]): str(s["new_digest"]) for s in receipt["shards"]}
    except (KeyError, TypeError, ValueError) as err:
        raise VerificationError(f"malformed receipt: {err}") from None
    m = load_manifest(out)
    if m.version < new_version:
        raise VerificationError(f"ensemble is at version {m.version}, older than the receipt's {new_version}")
    for i in ids:
        try:
            where = m.locate(i)
        except KeyError:
            continue
        raise VerificationError(f"record {i} is still in shard {where[0]}, slice {where[1]}")
    vdir = Path(out) / str(m.version)
    checked = []
    for k in shards:
        if not 0 <= k < m.shards:
            raise VerificationError(f"receipt names shard {k}; the ensemble has {m.shards}")
        e = m.shard_list[k]
        if set_digest(e.record_ids) != e.digest:
            raise VerificationError(f"shard {k}: digest does not match its record ids")
        if m.version == new_version and claimed[k] != e.digest:
            raise VerificationError(f"shard {k}: the receipt's digest is not the manifest's")
        on_disk = _sha256((vdir / f"shard-{k}.onnx").read_bytes())
        if on_disk != e.onnx_sha256:
            raise VerificationError(f"shard {k}: shard-{k}.onnx does not match the manifest")
        scratch, _ = train_shard(m, k, [list(s) for s in e.slices], data, version=e.version)
        if scratch.onnx_sha256 != e.onnx_sha256:
            raise VerificationError(f"shard {k}: training from scratch gives ONNX {scratch.onnx_sha256}, "
                                    f"the ensemble holds {e.onnx_sha256}")
        if scratch.checkpoints != e.checkpoints:
            raise VerificationError(f"shard {k}: training from scratch gives other checkpoints")
        checked.append({"shard": k, "version": e.version, "digest": e.digest, "onnx_sha256": e.onnx_sha256})
    return {"verified": True, "ensemble_version": m.version, "absent": len(ids), "shards": checked}
