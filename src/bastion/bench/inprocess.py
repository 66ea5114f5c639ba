"""The physical limit: the model called in-process by ONNX Runtime, no server, no protocol.

Same session options as the servers (one intra-op and one inter-op thread per session),
the same rows. At batch 1 it is the floor of any server's latency; at the best batch
size, times the cores, it is the ceiling of any server's rows per second on this
machine. Every server's overhead is its distance from these two figures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bastion.bench.frameworks.base import ModelSpec

BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class BatchTiming:
    batch: int
    calls: int
    p50_ms: float  # per call
    p99_ms: float
    rows_per_s: float  # one thread: batch / mean call time


@dataclass(frozen=True)
class InProcessLimit:
    scenario: str
    model: str
    timings: list[BatchTiming]
    cores: int  # sessions that can run at once (one per core, one thread each)

    @property
    def batch1(self) -> BatchTiming:
        return next(t for t in self.timings if t.batch == 1)

    @property
    def best(self) -> BatchTiming:
        return max(self.timings, key=lambda t: t.rows_per_s)

    def requests_per_s(self, rows_per_request: int) -> float:
        """The most requests of ``rows_per_request`` rows per second any server could answer
        here: the model's rows per second at that batch size, on every core."""
        timing = min(self.timings, key=lambda t: abs(t.batch - rows_per_request))
        return timing.rows_per_s / rows_per_request * self.cores

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "model": self.model,
            "cores": self.cores,
            "timings": [asdict(t) for t in self.timings],
            "batch1": asdict(self.batch1),
            "best": asdict(self.best),
        }


def rows_ceiling(limit: dict[str, Any]) -> float:
    """Rows/s the model alone answers on every core at its best batch size, from
    :meth:`InProcessLimit.to_dict` (a server may batch requests together, so the best batch
    is the fair ceiling)."""
    return float(limit["best"]["rows_per_s"]) * int(limit.get("cores", 2))


def _session(model: ModelSpec) -> Any:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # as the server does (bench/ stays client-side)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model.onnx_path), options, providers=["CPUExecutionProvider"])


def time_batch(session: Any, model: ModelSpec, rows: np.ndarray, batch: int, budget_s: float) -> BatchTiming:
    """Call the session on ``batch`` rows for about ``budget_s`` (after a short warm-up)."""
    pick = np.resize(np.arange(len(rows)), batch)
    feed = {model.input_name: rows[pick] if model.datatype == "BYTES" else np.ascontiguousarray(rows[pick])}
    names = [model.output_name]
    for _ in range(3):
        session.run(names, feed)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or len(times) < 5:
        t0 = time.perf_counter()
        session.run(names, feed)
        times.append(time.perf_counter() - t0)
    arr = np.asarray(times)
    return BatchTiming(
        batch=batch,
        calls=len(times),
        p50_ms=float(np.percentile(arr, 50) * 1e3),
        p99_ms=float(np.percentile(arr, 99) * 1e3),
        rows_per_s=float(batch / arr.mean()),
    )


def measure(
    model: ModelSpec,
    rows: np.ndarray,
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    budget_s: float = 1.0,
    cores: int = 2,
) -> InProcessLimit:
    session = _session(model)
    timings = [time_batch(session, model, rows, b, budget_s) for b in batch_sizes]
    return InProcessLimit(model.scenario, model.name, timings, cores)
