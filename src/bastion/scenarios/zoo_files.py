"""What every scenario writes the same way: byte-stable .npz files and the zoo definition."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from bastion.runtimes.export import write_bytes_atomic


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An .npz like ``np.savez``, but with fixed member timestamps (``np.savez`` stamps the
    current time), so the bytes depend on the arrays only: builds are reproducible per seed."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def write_zoo(
    out: Path, zoo: str, *, task: str, variants: Sequence[str], metric: str, evaluation: dict[str, np.ndarray]
) -> Path:
    """``<out>/<zoo>/eval.npz`` (held-out arrays per input name + ``y``) and ``zoo.yaml``
    with the scenarios' common serving choices; returns the zoo directory."""
    zoo_dir = Path(out) / zoo
    zoo_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(zoo_dir / "eval.npz", npz_bytes(**evaluation))
    spec = {
        "task": task,
        "variants": list(variants),
        "evaluation": "eval.npz",
        "metric": metric,
        "latency_percentile": "p50",
        "policy": "uniform-feasible",
        "on_infeasible": "reject",
    }
    write_bytes_atomic(zoo_dir / "zoo.yaml", yaml.safe_dump(spec, sort_keys=False).encode("utf-8"))
    return zoo_dir
