"""The dev worker's measurement: one SHA-384 over what decides its behaviour.

A TEE measures what it runs; a dev worker has no TEE, so it measures itself: the code
of the installed ``bastion`` package, the versions of the libraries that execute models
and handle keys (onnxruntime, numpy, cryptography), its configuration, and the digest
of every model it serves. Two workers with the same measurement run the same code on
the same models with the same settings; any change to one of them changes it. The
value goes into dev evidence (:mod:`bastion.confidential.dev_evidence`), where it is
self-reported: it detects drift and mistakes, it does not resist a malicious host.

On AWS Nitro Enclaves this module is not used: the measurement is the enclave image's
PCRs (PCR0 the image, PCR1 the kernel and boot ramfs, PCR2 the application), computed
by ``nitro-cli build-enclave`` and attested by the Nitro hypervisor, so clients pin
``pcr0=...`` etc. instead of ``measurement=...``.

Every input is encoded unambiguously before hashing: a domain tag, then each item as an
8-byte big-endian length and its bytes, lists preceded by their count, so no two
different inputs can produce the same byte stream.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MEASURED_DISTRIBUTIONS", "code_digest", "worker_measurement"]

# Distributions whose version is part of the code digest, with the names the same
# import can be installed under (onnxruntime ships CPU and GPU builds).
MEASURED_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "numpy": ("numpy",),
    "cryptography": ("cryptography",),
}
_CODE_TAG = b"bastion/code-digest/v1\x00"
_WORKER_TAG = b"bastion/worker-measurement/v1\x00"
_SHA384_BYTES = 48
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def code_digest(root: Path | None = None) -> bytes:
    """SHA-384 over every ``.py`` file of the ``bastion`` package (sorted relative path and
    content) and the versions of onnxruntime, numpy and cryptography.

    ``root`` is the package directory to hash, by default the installed ``bastion``.
    Only ``.py`` sources count: bytecode caches, data files and certificates do not (the
    pinned AWS root is checked against its own fingerprint by the Nitro verifier)."""
    if root is None:
        import bastion

        root = Path(bastion.__file__).resolve().parent
    files = sorted(
        (path.relative_to(root).as_posix().encode("utf-8"), path)
        for path in root.rglob("*.py")
        if path.is_file() and "__pycache__" not in path.parts
    )
    h = hashlib.sha384(_CODE_TAG)
    _count(h, len(files))
    for rel, path in files:
        _item(h, rel)
        _item(h, path.read_bytes())
    versions = sorted((name, _version(dists)) for name, dists in MEASURED_DISTRIBUTIONS.items())
    _count(h, len(versions))
    for name, version in versions:
        _item(h, name.encode("utf-8"))
        _item(h, version.encode("utf-8"))
    return h.digest()


def worker_measurement(code: bytes, config: Mapping[str, Any], model_digests: Mapping[str, str]) -> bytes:
    """SHA-384 over the code digest, the canonical JSON of ``config`` (sorted keys, no
    whitespace, UTF-8) and the models as sorted ``name -> SHA-256`` pairs."""
    if not isinstance(code, bytes) or len(code) != _SHA384_BYTES:
        raise ValueError(f"code digest: expected {_SHA384_BYTES} bytes (SHA-384, see code_digest())")
    try:
        config_json = json.dumps(
            dict(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config: cannot be encoded as canonical JSON ({exc})") from None
    models: list[tuple[bytes, bytes]] = []
    for name, digest in model_digests.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"model digests: model name {name!r}: expected non-empty text")
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest.lower()):
            raise ValueError(f"model digests: {name}: expected 64 hex digits (SHA-256), got {digest!r:.80}")
        models.append((name.encode("utf-8"), bytes.fromhex(digest)))
    models.sort()
    h = hashlib.sha384(_WORKER_TAG)
    _item(h, code)
    _item(h, config_json)
    _count(h, len(models))
    for name_bytes, digest_bytes in models:
        _item(h, name_bytes)
        _item(h, digest_bytes)
    return h.digest()


def _version(dists: tuple[str, ...]) -> str:
    for dist in dists:
        try:
            return f"{dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def _count(h: Any, n: int) -> None:
    h.update(n.to_bytes(8, "big"))


def _item(h: Any, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)
