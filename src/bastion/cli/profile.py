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
    measure_latencies,
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
    repository: Path,
    zoo: str,
    *,
    iterations: int = 200,
    batch_iterations: int | None = None,
    progress: Progress | None = None,
) -> ZooProfile:
    """Measure every variant of ``zoo`` and write ``profile.json``; returns the profile.

    ``iterations`` latency samples at batch 1; ``batch_iterations`` at the model's largest
    batch (default: a quarter as many, at least 20 — a batch of a large model costs
    seconds, and its tail needs fewer samples than batch 1's)."""
    if batch_iterations is None:
        batch_iterations = max(20, iterations // 4)
    zoo_dir = Path(repository) / zoo
    spec: ZooSpec = load_zoo_spec(zoo_dir)
    with np.load(zoo_dir / spec.evaluation, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    if "y" not in data:
        raise InvalidInput(f"{zoo}/{spec.evaluation}: expected an array 'y' with the true labels or targets")
    y = data.pop("y")
    # every variant loaded at once: their latencies are measured interleaved (one call of each
    # per round), so a busy moment of the machine does not reorder them
    runtimes: dict[str, Runtime] = {}
    qualities: dict[str, float] = {}
    one: dict[str, Callable[[], object]] = {}
    full: dict[str, Callable[[], object]] = {}
    versions: dict[str, int] = {}
    try:
        for i, variant in enumerate(spec.variants):
            if progress is not None:
                progress(variant, i, len(spec.variants))
            model_dir = Path(repository) / variant
            config = load_model_config(model_dir)
            versions[variant] = _latest_version(model_dir)
            runtime = runtimes[variant] = create_runtime(config, model_dir / str(versions[variant]))
            inputs = _inputs(runtime, data, variant)
            batch = config.max_batch_size or 1
            qualities[variant] = float(quality(spec.metric, y, predictions(runtime, inputs, batch, spec.metric)))
            first = {k: v[:1] for k, v in inputs.items()}
            one[variant] = lambda rt=runtime, x=first: rt.predict(x)
            if batch > 1:
                rows = {k: v[:batch] for k, v in inputs.items()}
                full[variant] = lambda rt=runtime, x=rows: rt.predict(x)
        batch1 = measure_latencies(one, warmup=20, iterations=iterations)
        batch_max = measure_latencies(full, warmup=5, iterations=batch_iterations) if full else {}
    finally:
        for runtime in runtimes.values():
            runtime.close()
    measured = []
    for variant in spec.variants:
        latency = {"batch1": batch1[variant]}
        if variant in batch_max:
            latency["batch_max"] = batch_max[variant]
        measured.append(VariantProfile(variant, versions[variant], qualities[variant], latency))
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
