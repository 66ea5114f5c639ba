"""Goodput of a zoo on a live server: replay (accuracy, latency) targets, then read the
server's own records of which requests were served by a variant that met both.

Client side only: it talks to the server through the public REST API and ``/metrics``,
like any operator tool. Goodput = met / all zoo requests the server counted during the
replay (``bastion_zoo_requests_total``), so a run is only exact when nothing else calls
the zoo at the same time; the report also says what the client itself saw.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bastion.client import ZOO_OUTCOMES as OUTCOMES
from bastion.client import zoo_counters


@dataclass
class GoodputReport:
    zoo: str
    requests: int
    server_outcomes: dict[str, int]
    client_statuses: dict[int, int]
    client_latency_ms: dict[str, float]
    seconds: float
    workload: dict[str, Any] = field(default_factory=dict)

    @property
    def goodput(self) -> float:
        total = sum(self.server_outcomes.values())
        return self.server_outcomes.get("met", 0) / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "zoo": self.zoo,
            "requests": self.requests,
            "goodput": self.goodput,
            "server_outcomes": self.server_outcomes,
            "client_statuses": {str(k): v for k, v in sorted(self.client_statuses.items())},
            "client_latency_ms": self.client_latency_ms,
            "seconds": self.seconds,
            "workload": self.workload,
        }


def load_workload(path: Path) -> list[dict[str, float]]:
    """JSON lines of {"accuracy": a, "latency_ms": l} (either may be absent)."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = orjson.loads(line)
        if not isinstance(row, dict) or not set(row) <= {"accuracy", "latency_ms"}:
            raise ValueError(f"{path}:{i}: expected an object with 'accuracy' and/or 'latency_ms'")
        rows.append(row)
    return rows


def random_workload(n: int, accuracy: tuple[float, float], latency_ms: tuple[float, float],
                    seed: int) -> list[dict[str, float]]:
    """Targets drawn uniformly (latency log-uniformly: targets span orders of magnitude)."""
    rng = random.Random(seed)
    lo, hi = np.log(latency_ms[0]), np.log(latency_ms[1])
    return [
        {"accuracy": round(rng.uniform(*accuracy), 4), "latency_ms": round(float(np.exp(rng.uniform(lo, hi))), 4)}
        for _ in range(n)
    ]


def _inputs_from_metadata(meta: dict[str, Any], sample: Path | None, rng: np.random.Generator) -> list[dict]:
    """Request inputs (V2 JSON) for one row: from a sample .npz when given, else random."""
    data = None
    if sample is not None:
        with np.load(sample, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    inputs = []
    for spec in meta["inputs"]:
        shape = [1 if d == -1 else d for d in spec["shape"]]
        if data is not None and spec["name"] in data:
            arr = data[spec["name"]]
            row = arr[rng.integers(len(arr))]
            values = row.reshape(-1).tolist()
        elif spec["datatype"] == "BYTES":
            values = ["sample text " + str(rng.integers(1000)) for _ in range(int(np.prod(shape)))]
        elif spec["datatype"].startswith("FP"):
            values = rng.random(int(np.prod(shape))).round(4).tolist()
        else:
            values = rng.integers(0, 2, int(np.prod(shape))).tolist()
        inputs.append({"name": spec["name"], "datatype": spec["datatype"], "shape": shape, "data": values})
    return inputs


async def run_goodput(
    url: str, zoo: str, workload: list[dict[str, float]], *, sample: Path | None = None,
    concurrency: int = 4, seed: int = 0, headers: dict[str, str] | None = None,
) -> GoodputReport:
    rng = np.random.default_rng(seed)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=60, headers=headers or {}) as client:
        meta = (await client.get(f"/v2/models/{zoo}")).raise_for_status().json()
        before = zoo_counters((await client.get("/metrics")).text, zoo).requests
        bodies = [
            orjson.dumps({"inputs": _inputs_from_metadata(meta, sample, rng), "parameters": targets})
            for targets in workload
        ]
        statuses: Counter[int] = Counter()
        latencies: list[float] = []
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for body in bodies:
            queue.put_nowait(body)

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                t0 = time.perf_counter()
                r = await client.post(f"/v2/models/{zoo}/infer", content=body,
                                      headers={"content-type": "application/json"})
                latencies.append((time.perf_counter() - t0) * 1000)
                statuses[r.status_code] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        seconds = time.perf_counter() - started
        after = zoo_counters((await client.get("/metrics")).text, zoo).requests
    lat = np.array(latencies) if latencies else np.zeros(1)
    return GoodputReport(
        zoo=zoo,
        requests=len(workload),
        server_outcomes={k: round(after[k] - before[k]) for k in OUTCOMES},
        client_statuses=dict(statuses),
        client_latency_ms={"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))},
        seconds=seconds,
    )
