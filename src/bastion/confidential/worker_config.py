"""``worker.yaml``: everything the trusted worker trusts, and therefore what it measures.

The file is part of the worker's identity: its canonical form goes into the dev
measurement (on Nitro it is baked into the enclave image, so into the PCRs). A worker
started with another key provider, other trusted signers or other model pins has
another measurement, and a key-release service that expects the original refuses it.

Example::

    attestation: dev                      # dev | nitro
    key_provider: module:bastion.confidential.kms_client:from_env
    trusted_signers: [signer.pub.pem]     # Ed25519 bundle signers (paths; measured by fingerprint)
    models:                               # optional pins: only these bundles (SHA-256) may load
      secret_cnn: [3f0c...]
    mirror:                               # optional fast-recovery mirror (mirror.py)
      dir: mirror                         # relative to this file; the host's disk, holds ciphertext only
      key_id: worker-mirror               # a KMS key id of its own (bastion kms add-key), never imported
    max_frame_bytes: 268435456
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bastion.core.errors import BastionError
from bastion.guard.keyproviders import KeyProviderError, check_key_id

__all__ = ["MirrorConfig", "WorkerConfig", "WorkerConfigError", "load_worker_config"]

_KEYS = ("attestation", "key_provider", "trusted_signers", "models", "zoos", "mirror", "max_frame_bytes",
         "max_sealed_bytes")
_MIRROR_KEYS = ("dir", "key_id")
_ATTESTATION = ("dev", "nitro")
_MAX_CONFIG_BYTES = 1 << 20


class WorkerConfigError(BastionError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class MirrorConfig:
    """Where the fast-recovery mirror lives and which KMS key id keys it."""

    dir: Path  # resolved against worker.yaml's directory
    key_id: str
    spec: str = ""  # ``dir`` as worker.yaml wrote it: what is measured (see ``canonical``)


@dataclass(frozen=True)
class WorkerConfig:
    attestation: str = "dev"
    key_provider: str | None = None
    trusted_signers: tuple[Path, ...] = ()
    # model name -> accepted bundle SHA-256 digests; empty = any bundle from a trusted signer
    models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    max_frame_bytes: int = 256 * 1024 * 1024
    max_sealed_bytes: int = 64 * 1024 * 1024
    mirror: MirrorConfig | None = None
    # zoo name -> its variants: a request sealed for the zoo may run on any of them (the
    # host picks the variant); a request sealed for one model runs on that model only
    zoos: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def canonical(self) -> dict[str, Any]:
        """What is measured: signers by the SHA-256 of their key file, not by path (a path is
        where the host put it, the key is what the worker trusts). The mirror by its key id
        and its ``dir`` as written (not resolved: the same file measures the same wherever
        it is installed), and only when set, so a worker without one keeps the measurement
        it had before the key existed."""
        canonical: dict[str, Any] = {
            "attestation": self.attestation,
            "key_provider": self.key_provider,
            "trusted_signers": sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in self.trusted_signers),
            "models": {name: sorted(digests) for name, digests in sorted(self.models.items())},
            "max_frame_bytes": self.max_frame_bytes,
            "max_sealed_bytes": self.max_sealed_bytes,
        }
        if self.zoos:  # only when set, like the mirror: existing measurements stay as they were
            canonical["zoos"] = {name: sorted(variants) for name, variants in sorted(self.zoos.items())}
        if self.mirror is not None:
            canonical["mirror"] = {"dir": self.mirror.spec or str(self.mirror.dir), "key_id": self.mirror.key_id}
        return canonical


def load_worker_config(path: Path) -> WorkerConfig:
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise WorkerConfigError(f"{path}: larger than {_MAX_CONFIG_BYTES} bytes")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WorkerConfigError(f"{path}: cannot read: {exc}") from None
    return parse_worker_config(data, base=path.parent, source=str(path))


def parse_worker_config(data: Any, *, base: Path, source: str = "worker.yaml") -> WorkerConfig:
    def fail(where: str, what: str) -> WorkerConfigError:
        return WorkerConfigError(f"{source}: {where}: {what}")

    if not isinstance(data, Mapping):
        raise fail("top", f"expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in _KEYS:
            raise fail(str(key), f"unknown key; expected one of {', '.join(_KEYS)}")
    attestation = data.get("attestation", "dev")
    if attestation not in _ATTESTATION:
        raise fail("attestation", f"expected one of {', '.join(_ATTESTATION)}, got {attestation!r}")
    provider = data.get("key_provider")
    if provider is not None and (not isinstance(provider, str) or not provider):
        raise fail("key_provider", f"expected env:VAR, file:PATH or module:pkg.mod:factory, got {provider!r}")
    signers = data.get("trusted_signers", [])
    if not isinstance(signers, list) or not all(isinstance(s, str) and s for s in signers):
        raise fail("trusted_signers", "expected a list of public key file paths")
    paths = tuple((base / s) if not Path(s).is_absolute() else Path(s) for s in signers)
    for p in paths:
        if not p.is_file():
            raise fail("trusted_signers", f"{p}: not a file")
    models = data.get("models", {}) or {}
    if not isinstance(models, Mapping):
        raise fail("models", "expected a mapping of model name -> list of bundle SHA-256 digests")
    pins: dict[str, tuple[str, ...]] = {}
    for name, digests in models.items():
        if isinstance(digests, str):
            digests = [digests]
        if (
            not isinstance(digests, list)
            or not digests
            or not all(
                isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d.lower()) for d in digests
            )
        ):
            raise fail(f"models.{name}", "expected a list of SHA-256 hex digests of sealed bundles")
        pins[str(name)] = tuple(d.lower() for d in digests)
    sizes = {}
    for key, default in (("max_frame_bytes", 256 << 20), ("max_sealed_bytes", 64 << 20)):
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not 4096 <= value <= 1 << 31:
            raise fail(key, f"expected an integer between 4096 and {1 << 31}, got {value!r}")
        sizes[key] = value
    mirror = _parse_mirror(data.get("mirror"), base, fail)
    zoos = data.get("zoos", {}) or {}
    if not isinstance(zoos, Mapping):
        raise fail("zoos", "expected a mapping of zoo name -> list of its variants")
    for name, variants in zoos.items():
        if not isinstance(variants, list) or not variants or not all(isinstance(v, str) and v for v in variants):
            raise fail(f"zoos.{name}", "expected a non-empty list of variant model names")
    return WorkerConfig(
        attestation=attestation, key_provider=provider, trusted_signers=paths, models=pins, mirror=mirror,
        zoos={str(k): tuple(v) for k, v in zoos.items()}, **sizes
    )


def _parse_mirror(value: Any, base: Path, fail: Callable[[str, str], WorkerConfigError]) -> MirrorConfig | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise fail("mirror", "expected a mapping {dir: PATH, key_id: KEY_ID}")
    for key in value:
        if key not in _MIRROR_KEYS:
            raise fail(f"mirror.{key}", f"unknown key; expected one of {', '.join(_MIRROR_KEYS)}")
    directory = value.get("dir")
    if not isinstance(directory, str) or not directory.strip() or "\0" in directory:
        raise fail("mirror.dir", f"expected a directory path (relative to worker.yaml), got {directory!r}")
    key_id = value.get("key_id")
    if not isinstance(key_id, str):
        raise fail("mirror.key_id", f"expected a key id of the key-release service, got {key_id!r}")
    try:
        check_key_id(key_id)
    except KeyProviderError as exc:
        raise fail("mirror.key_id", exc.message) from None
    path = Path(directory).expanduser()
    return MirrorConfig(dir=path if path.is_absolute() else base / path, key_id=key_id, spec=directory)
