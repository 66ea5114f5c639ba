"""A plain model directory → a partitioned confidential one, in one step.

Each version's ``model.onnx`` is split at the same cut and checked (tail(head(x)) equals the
model on sample rows, or nothing is written); the heads are sealed for the trusted worker
(``confidential.package.package_confidential`` with ``tails``), the tails stay plain beside
them, and both configs name the tail.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.confidential.package import package_confidential
from bastion.confidential.partition.graph import Cut, PartitionError, Split, random_samples, split_and_check
from bastion.guard.keyproviders import KeyProvider

__all__ = ["package_partitioned"]


def package_partitioned(model_dir: Path, out_dir: Path, cut: str | int | Cut, *, key_id: str,
                        signing_key: Ed25519PrivateKey, key_provider: KeyProvider, e2e: str = "required",
                        rows: int = 32, seed: int = 0, model_file: str = "model.onnx") -> dict[int, Split]:
    """Split every version of ``model_dir`` at ``cut``; seal the heads, keep the tails plain."""
    import onnx

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise PartitionError(f"{model_dir}: no version directories to split")
    splits: dict[int, Split] = {}
    config = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / out_dir.name
        staged.mkdir()
        # the head's config: the model's inputs, but its outputs are the features, and the
        # hardening of the answer belongs to the tail (applied by the front, where it runs)
        head_config = {k: v for k, v in config.items() if k not in ("outputs", "hardening")}
        (staged / "config.yaml").write_text(yaml.safe_dump(head_config, sort_keys=False), encoding="utf-8")
        tails: dict[int, Path] = {}
        for version in versions:
            source = model_dir / str(version) / model_file
            if not source.is_file():
                raise PartitionError(f"{source}: not found; only ONNX models can be partitioned")
            model = onnx.load(str(source))
            split = split_and_check(model, cut, random_samples(model, rows, seed))
            (staged / str(version)).mkdir()
            onnx.save(split.head, str(staged / str(version) / "model.onnx"))
            tails[version] = Path(tmp) / f"tail-{version}.onnx"
            onnx.save(split.tail, str(tails[version]))
            splits[version] = split
        package_confidential(staged, out_dir, key_id=key_id, signing_key=signing_key, key_provider=key_provider,
                             e2e=e2e, tails=tails)
    # the public config keeps the whole model's outputs and hardening: they are the tail's
    written = yaml.safe_load((out_dir / "config.yaml").read_text(encoding="utf-8"))
    public = {k: v for k, v in config.items() if k not in ("parameters", "name")}
    public["confidential"] = written["confidential"]
    (out_dir / "config.yaml").write_text(yaml.safe_dump(public, sort_keys=False), encoding="utf-8")
    return splits
