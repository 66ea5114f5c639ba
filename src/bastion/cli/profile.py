"""``bastion profile``: measure each variant of a zoo, through the runtime the server uses.

Quality is computed on the zoo's held-out evaluation set; latency is the runtime's own
``predict`` at batch 1 and at the variant's max batch size (p50/p95/p99), so profiles
describe the models, not the network. The result, with date, machine and command, goes
to ``<zoo>/profile.json``, which a running server picks up on its next repository poll.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bastion.core.datatypes import DATATYPE_TO_NUMPY
from bastion.core.errors import InvalidInput
from bastion.repository.config import load_model_config
from bastion.repository.zoos import PROFILE_FILE
from bastion.runtimes import create_runtime
from bastion.runtimes.base import Runtime
from bastion.zoo.profiles import (
    VariantProfile,
    ZooProfile,
    machine_description,
    measure_latency,
    quality,
    save_profile,
    utc_now_iso,
)
from bastion.zoo.spec import ZooSpec, load_zoo_spec

Progress = Callable[[str, int, int], None]


def _latest_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise InvalidInput(f"variant '{model_dir.name}' has no version directory")
    return max(versions)


def _inputs(runtime: Runtime, data: dict[str, np.ndarray], variant: str) -> dict[str, np.ndarray]:
    arrays = {}
    for spec in runtime.inputs:
        if spec.name not in data:
            raise InvalidInput(
                f"evaluation set has no array named '{spec.name}' (an input of variant '{variant}'); "
                f"it has: {', '.join(sorted(data))}"
            )
        arr = data[spec.name]
        if spec.datatype == "BYTES" and arr.dtype.kind == "U":
            # .npz holds text as fixed-width unicode (object arrays would need pickle)
            arrays[spec.name] = np.array([s.encode() for s in arr.ravel()], dtype=object).reshape(arr.shape)
            continue
        dtype = DATATYPE_TO_NUMPY[spec.datatype]
        arrays[spec.name] = arr if arr.dtype == dtype else arr.astype(dtype)
    return arrays


def predictions(runtime: Runtime, inputs: dict[str, np.ndarray], batch: int, metric: str) -> np.ndarray:
    """The variant's answer for every evaluation row, from its first output: class labels
    (argmax of scores when the output is 2-D) for accuracy, values otherwise."""
    rows = len(next(iter(inputs.values())))
    step = max(1, batch)
    first = runtime.outputs[0].name
    parts = []
    for start in range(0, rows, step):
        chunk = {k: v[start : start + step] for k, v in inputs.items()}
        parts.append(np.asarray(runtime.predict(chunk)[first]))
    out = np.concatenate(parts)
    if metric == "accuracy" and out.ndim == 2 and out.shape[1] > 1:
        return out.argmax(axis=1)
    return out.reshape(rows, -1)[:, 0] if out.ndim > 1 else out


def profile_zoo(
    repository: Path, zoo: str, *, iterations: int = 200, progress: Progress | None = None
) -> ZooProfile:
    """Measure every variant of ``zoo`` and write ``profile.json``; returns the profile."""
    zoo_dir = Path(repository) / zoo
    spec: ZooSpec = load_zoo_spec(zoo_dir)
    with np.load(zoo_dir / spec.evaluation, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    if "y" not in data:
        raise InvalidInput(f"{zoo}/{spec.evaluation}: expected an array 'y' with the true labels or targets")
    y = data.pop("y")
    measured = []
    for i, variant in enumerate(spec.variants):
        if progress is not None:
            progress(variant, i, len(spec.variants))
        model_dir = Path(repository) / variant
        config = load_model_config(model_dir)
        version = _latest_version(model_dir)
        runtime = create_runtime(config, model_dir / str(version))
        try:
            inputs = _inputs(runtime, data, variant)
            batch = config.max_batch_size or 1
            q = quality(spec.metric, y, predictions(runtime, inputs, batch, spec.metric))
            one = {k: v[:1] for k, v in inputs.items()}
            latency = {"batch1": measure_latency(lambda rt=runtime, one=one: rt.predict(one), warmup=20,
                                                 iterations=iterations)}
            if batch > 1:
                full = {k: v[:batch] for k, v in inputs.items()}
                latency["batch_max"] = measure_latency(
                    lambda rt=runtime, full=full: rt.predict(full), warmup=5, iterations=max(20, iterations // 4)
                )
        finally:
            runtime.close()
        measured.append(VariantProfile(variant, version, float(q), latency))
    if progress is not None:
        progress("done", len(spec.variants), len(spec.variants))
    profile = ZooProfile(
        zoo=zoo,
        metric=spec.metric,
        measured_at=utc_now_iso(),
        machine=machine_description(),
        command=" ".join(["bastion", *sys.argv[1:]]) if sys.argv else "bastion profile",
        variants=tuple(measured),
    )
    save_profile(zoo_dir / PROFILE_FILE, profile)
    return profile
