"""Turn a plain model directory into a confidential one: a sealed bundle per version.

``<out>/config.yaml`` is the public part (signature, batching, the ``confidential:``
block): the front process reads it to route, validate and batch. Each
``<out>/<version>/model.bundle`` is the whole model sealed (encrypted under a data key
wrapped by the master key ``key_id``, signed), holding that one version: the trusted
worker opens it with the key the key-release service gives only to an attested worker.
The weights never sit in the clear in the repository the host serves from.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.guard.bundles import BundleHeader, seal_bundle
from bastion.guard.keyproviders import KeyProvider

__all__ = ["TAIL_FILE", "package_confidential"]

TAIL_FILE = "tail.onnx"


def package_confidential(model_dir: Path, out_dir: Path, *, key_id: str, signing_key: Ed25519PrivateKey,
                         key_provider: KeyProvider, e2e: str = "required",
                         tails: dict[int, Path] | None = None) -> dict[int, BundleHeader]:
    """Seal each version of ``model_dir`` into ``out_dir/<v>/model.bundle``; write the public config.

    ``tails``: a partitioned model: ``model_dir`` holds the head, and each version's tail
    ONNX file (plain: it runs in the front process) is copied to ``out_dir/<v>/tail.onnx``.
    Both configs then name the tail, and the sealed one is what lets the worker release the
    head's features."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    name = out_dir.name
    config: dict[str, Any] = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ValueError(f"{model_dir}: no version directories to seal")
    headers: dict[int, BundleHeader] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    block: dict[str, Any] = {"e2e": e2e}
    if tails is not None:
        missing = sorted(set(versions) - set(tails))
        if missing:
            raise ValueError(f"{model_dir}: no tail given for version(s) {missing}")
        block["tail"] = TAIL_FILE
    sealed_config = {**config, "confidential": block}  # the worker enforces its own copy
    for version in versions:
        with tempfile.TemporaryDirectory() as tmp:
            # one version per bundle: a version's bundle changes (and reloads) alone
            staged = Path(tmp) / name
            staged.mkdir()
            (staged / "config.yaml").write_text(yaml.safe_dump(sealed_config, sort_keys=False), encoding="utf-8")
            shutil.copytree(model_dir / str(version), staged / str(version))
            (out_dir / str(version)).mkdir(exist_ok=True)
            headers[version] = seal_bundle(staged, out_dir / str(version) / "model.bundle", key_id=key_id,
                                           signing_key=signing_key, key_provider=key_provider, model_name=name)
            if tails is not None:
                shutil.copyfile(tails[version], out_dir / str(version) / TAIL_FILE)
    public = {k: v for k, v in config.items() if k not in ("parameters", "name")}
    public["confidential"] = block
    (out_dir / "config.yaml").write_text(yaml.safe_dump(public, sort_keys=False), encoding="utf-8")
    return headers
