"""How close Bastion itself comes to the in-process limit: saturation in its best request form.

The study's runs are like for like: every framework gets the same JSON payloads of 1-16
rows. At 16 rows the image and malware models cost less than the HTTP exchange and the
JSON decoding around them, so no JSON server can reach the model's in-process rows per
second there (see BENCHMARKS.md). This probe asks what is left of the server's own
overhead when the request is shaped for throughput, as a production client would send
it: the binary-tensor extension (``tritonclient``'s default), with the batch size at
which the model alone is fastest, and the largest batch the model's config accepts.

It runs Bastion only (a separate server start per scenario), proves the binary answers
equal ONNX Runtime's, and records wrk saturation runs as ``mode="limit-probe"`` results,
each with the in-process ceiling measured just before it (``load["ceiling_rows_per_s"]``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bastion.bench.frameworks.base import ModelSpec
from bastion.bench.frameworks.bastion import BastionFramework, bastion_python
from bastion.bench.frameworks.v2json import encode_v2_binary
from bastion.bench.inprocess import rows_ceiling
from bastion.bench.launcher import check_v2, free_port, serve
from bastion.bench.models import pick_rows
from bastion.bench.results import BenchResult, Mode
from bastion.bench.saturation import SaturationConfig, measure_saturation

MODE: Mode = "limit-probe"


def probe_batches(limit: dict[str, Any], max_batch: int | None) -> list[int]:
    """Rows per request to probe: the in-process best batch and the largest the model takes
    (both capped at ``max_batch``), smallest first, without repeats."""
    best = int(limit["best"]["batch"])
    largest = max_batch if max_batch is not None else max(int(t["batch"]) for t in limit["timings"])
    return sorted({min(best, largest), largest})


def probe_connections(connections: Sequence[int]) -> list[int]:
    """Saturation needs more requests in flight than workers: one connection never fills two."""
    return [c for c in connections if c > 1] or list(connections)


def check_binary(model: ModelSpec, url: str, rows: np.ndarray, atol: float = 1e-4) -> None:
    """POST ``rows`` in the binary form and compare with ONNX Runtime in-process."""
    body, headers = encode_v2_binary(model, rows)
    headers = {"Content-Type": "application/octet-stream", **headers}
    check_v2("bastion (binary)", model, url, body, headers, rows, atol=atol)


def run_limit_probe(
    model: ModelSpec,
    rows: np.ndarray,
    limit: dict[str, Any],
    *,
    workdir: Path,
    workers: int,
    connections: Sequence[int],
    duration_s: float,
    seed: int = 0,
    command: str = "",
    say: Callable[[str], None] = print,
) -> list[BenchResult]:
    """Start Bastion on ``model``, saturate it with binary requests of each probed batch size
    at each of ``connections``, and return the runs (all of them, or raise)."""
    fw = BastionFramework()
    batches = probe_batches(limit, model.max_batch_size)
    ceiling, best = rows_ceiling(limit), int(limit["best"]["batch"])
    conns = probe_connections(connections)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    launch = fw.prepare(model, workdir, bastion_python(), free_port(), workers)
    results: list[BenchResult] = []
    with serve(launch, workdir / "server.log") as running:
        check_binary(model, launch.infer_url, pick_rows(rows, 4, seed + 1))
        for batch in batches:
            body, headers = encode_v2_binary(model, pick_rows(rows, batch, seed))
            for conn in conns:
                cfg = SaturationConfig(
                    url=launch.infer_url,
                    body=body,
                    connections=conn,
                    duration_s=duration_s,
                    content_type="application/octet-stream",
                    headers=headers,
                )
                result = measure_saturation(
                    running.proc.pid,
                    cfg,
                    scenario=model.scenario,
                    framework=fw.name,
                    mode=MODE,
                    load={
                        "payload": f"binary-{batch}",
                        "rows": batch,
                        "encoding": "binary",
                        # the in-process ceiling measured just before, in the same sitting
                        "ceiling_rows_per_s": ceiling,
                        "limit_best_batch": best,
                    },
                    command=command,
                    notes=launch.notes + "; binary-tensor extension, output asked for as binary",
                )
                results.append(result)
                say(
                    f"    limit probe binary {batch:4} rows {conn:3} conn: {result.stats.throughput:9.1f} req/s = "
                    f"{result.stats.throughput * batch:10,.0f} rows/s  errors {100 * result.stats.error_rate:5.1f} %"
                )
    return results
