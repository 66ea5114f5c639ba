"""``bastion bench serving``: Bastion vs MLServer vs the minimal app, same model, same load.

The demo's digits classifier (``bastion demo --build-only``: an ONNX logistic regression,
a few µs per row) served three ways, one server at a time, each driven by wrk with the
same request body:

* **Bastion**: ``bastion serve REPO --model digits --poll-interval 0 --no-audit
  --insecure-no-auth [--workers N]`` (``frameworks/bastion.py``);
* **MLServer**: pinned, in its venv ``<cache>/venvs/mlserver`` with the study's custom
  ONNX runtime (``frameworks/mlserver.py``), ``parallel_workers`` 0 and 1;
* **minimal**: a bare ASGI app on uvicorn that decodes V2 JSON, calls ``session.run``
  inline and encodes V2 JSON (``frameworks/minimal.py``). The floor.

The model is tiny on purpose: what is left is the cost of serving (HTTP, parsing,
validation, scheduling, encoding), which is what differs between servers.

Two load generators (``--generators``, both by default): wrk for every row, and hey for
1-row JSON against Bastion and the minimal app. hey sends what real clients send by
default (``Accept-Encoding: gzip``, kept-alive connections; wrk sends no Accept-Encoding),
so a cost that only such clients trigger, like compressing small answers (issue 14), shows
in the hey rows' ratio and not in wrk's.

Per row: throughput of successful responses, latency percentiles, errors, the server's
CPU per request and peak RSS (its process tree, ``procstats.TreeMonitor``), wrk's own CPU
and the whole machine's busy time (``procstats.HostMonitor``), so that noise from other
processes shows. ``serving_report.py`` turns the rows into the ratios against MLServer and
the minimal app and the Markdown section of BENCHMARKS.md; ``abcompare.py`` runs two
Bastion builds against each other with the same pieces.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bastion.bench.frameworks.base import Framework, ModelSpec
from bastion.bench.frameworks.bastion import BastionFramework, bastion_python, served_from
from bastion.bench.frameworks.minimal import MinimalApp
from bastion.bench.frameworks.mlserver import MLServerFramework
from bastion.bench.frameworks.v2json import encode_v2, encode_v2_binary
from bastion.bench.launcher import Running, check_v2, free_port, serve
from bastion.bench.models import DEMO_MODEL, build_demo, demo_spec
from bastion.bench.procstats import HostMonitor, HostUsage, busy_cores
from bastion.bench.results import BenchResult, machine_info
from bastion.bench.saturation import (
    GENERATORS,
    SaturationConfig,
    hey_version,
    measure_saturation,
    require_generators,
    run_load,
    wrk_version,
)
from bastion.bench.stats import RunStats
from bastion.bench.venvs import installed_version, python_for

Say = Callable[[str], None]
SERVERS: tuple[str, ...] = ("bastion", "mlserver", "minimal")
# the servers with hey rows: the issue 14 target is Bastion against the minimal app
HEY_SERVERS: tuple[str, ...] = ("bastion", "minimal")
# No repository polling (nothing changes during a run) and no audit log: the serving core
# alone, like the peers; the guard's price is benchmarks/security_bench.py's.
BASTION_ARGS: tuple[str, ...] = ("--poll-interval", "0", "--no-audit")
DIGITS_OUTPUTS: tuple[str, ...] = ("label", "probabilities")
# another process using this much CPU before the run shows up as noise in every figure
BUSY_WARNING_CORES = 0.2


@dataclass(frozen=True)
class Load:
    """Closed-loop load: connections, measured seconds, unmeasured warm-up before each run."""

    connections: int = 16
    duration_s: float = 20.0
    warmup_s: float = 3.0


@dataclass(frozen=True, eq=False)
class Body:
    """One request body, as wrk sends it, and the rows it carries (for the answer check)."""

    key: str  # "json1" | "json64" | "bin64" | a scenario payload size
    label: str
    rows: np.ndarray
    payload: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def request_headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type, **self.headers}


def sample_rows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` digits-like rows: 64 pixel intensities in 0..16, as the model was trained on.

    Deterministic, so every server and every run get byte-identical bodies. The values do
    not change the cost of a logistic regression, so real digits would add nothing.
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, size=(n, 64)).astype(np.float32)


def make_bodies(model: ModelSpec) -> dict[str, Body]:
    """1-row and 64-row JSON, and 64 rows in the binary-tensor extension (Bastion only:
    MLServer's REST API does not implement it). The JSON bodies name no outputs, so every
    server answers with all of them, as the binary body asks for."""
    one, batch = sample_rows(1), sample_rows(64, seed=1)
    binary, headers = encode_v2_binary(model, batch, outputs=DIGITS_OUTPUTS)
    return {
        "json1": Body("json1", "1 row, JSON", one, encode_v2(model, one, request_output=False)),
        "json64": Body("json64", "64 rows, JSON", batch, encode_v2(model, batch, request_output=False)),
        "bin64": Body("bin64", "64 rows, binary", batch, binary, "application/octet-stream", headers),
    }


@dataclass(frozen=True)
class Row:
    """One measured configuration: a server, its parallelism, a request body, a load generator."""

    server: str  # "bastion" | "mlserver" | "minimal"
    workers: int  # bastion/uvicorn --workers; MLServer's parallel_workers
    body: str  # Body.key
    generator: str = "wrk"  # "wrk" | "hey"

    @property
    def key(self) -> str:
        # wrk rows keep the keys they had before hey rows existed (old results compare)
        suffix = "" if self.generator == "wrk" else f"-{self.generator}"
        return f"{self.server}-w{self.workers}-{self.body}{suffix}"

    @property
    def config(self) -> str:
        if self.server == "mlserver":
            return f"parallel_workers={self.workers}"
        return f"--workers {self.workers}"


def plan(
    servers: Sequence[str],
    workers: Sequence[int],
    mlserver_workers: Sequence[int],
    batch: bool,
    generators: Sequence[str] = ("wrk",),
) -> list[Row]:
    """The rows in the order they run: 1-row JSON for every server with wrk, then 1-row JSON
    with hey for Bastion and the minimal app, then the batch-64 rows (wrk)."""
    unknown = [g for g in generators if g not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown load generator {', '.join(unknown)}; expected some of {', '.join(GENERATORS)}")
    rows: list[Row] = []
    if "wrk" in generators:
        rows += [Row("bastion", w, "json1") for w in workers if "bastion" in servers]
        rows += [Row("mlserver", pw, "json1") for pw in mlserver_workers if "mlserver" in servers]
        rows += [Row("minimal", w, "json1") for w in workers if "minimal" in servers]
    if "hey" in generators:
        rows += [Row(s, w, "json1", "hey") for s in HEY_SERVERS if s in servers for w in workers]
    # the batch rows compare bodies, not clients: wrk alone, the cheaper client
    if batch and "wrk" in generators:
        rows += [Row("bastion", 1, b) for b in ("bin64", "json64") if "bastion" in servers]
        rows += [Row("mlserver", pw, "json64") for pw in mlserver_workers if "mlserver" in servers]
        if "minimal" in servers:
            rows.append(Row("minimal", 1, "json64"))
    return rows


def adapter(server: str) -> Framework:
    if server == "bastion":
        return BastionFramework(extra_args=BASTION_ARGS)
    if server == "mlserver":
        return MLServerFramework()
    if server == "minimal":
        return MinimalApp()
    raise ValueError(f"unknown server {server!r}; expected one of {', '.join(SERVERS)}")


@dataclass
class ServingConfig:
    out: Path
    cache: Path  # the demo build and MLServer's venv (shared with `bastion bench`)
    load: Load = field(default_factory=Load)
    servers: Sequence[str] = SERVERS
    workers: Sequence[int] = (1, 2)
    generators: Sequence[str] = GENERATORS  # "wrk" for every row, "hey" for Bastion and the minimal app's json1
    mlserver_workers: Sequence[int] = (0, 1)  # 0: inference inline; 1: MLServer's default pool
    batch: bool = True
    repeat: int = 1  # runs per row; the median-throughput run is reported
    repository: Path | None = None  # an already built demo repository (default: cache/demo)
    command: str = ""


def quick(config: ServingConfig) -> ServingConfig:
    """``--quick``: 5 s rows after a 2 s warm-up; a smoke run, not for the record."""
    config.load = dataclasses.replace(config.load, duration_s=5.0, warmup_s=2.0)
    return config


@dataclass
class ServingRun:
    """One row as measured: the generator's figures and the server tree's (``result``), the machine's."""

    row: Row
    body_label: str
    rows_per_request: int
    result: BenchResult
    host: HostUsage
    startup_s: float
    served_from: str | None = None  # Bastion's bastion/__init__.py, from its log
    runs: list[dict[str, Any]] = field(default_factory=list)  # every repeat, when there were several

    @property
    def stats(self) -> RunStats:
        return self.result.stats

    @property
    def rps(self) -> float:
        return self.stats.throughput

    @property
    def p99_ms(self) -> float:
        return self.stats.latency_ms.p99

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.row.key,
            "server": self.row.server,
            "config": self.row.config,
            "workers": self.row.workers,
            "body": self.row.body,
            "generator": self.row.generator,
            "body_label": self.body_label,
            "rows_per_request": self.rows_per_request,
            "result": self.result.to_dict(),
            "host": self.host.to_dict(),
            "startup_s": self.startup_s,
            "served_from": self.served_from,
            "runs": self.runs,
        }


def saturate(
    running: Running,
    url: str,
    body: Body,
    load: Load,
    *,
    scenario: str,
    framework: str,
    extra: dict[str, Any] | None = None,
    command: str = "",
    notes: str = "",
    generator: str = "wrk",
) -> tuple[BenchResult, HostUsage]:
    """A warm-up, then one measured run of ``generator``, with the server tree and the
    machine measured. The warm-up uses the same generator: its connections and headers are
    the ones the measured run then finds warm."""
    cfg = SaturationConfig(
        url=url,
        body=body.payload,
        connections=load.connections,
        duration_s=load.duration_s,
        content_type=body.content_type,
        headers=dict(body.headers),
        generator=generator,
    )
    if load.warmup_s > 0:  # unmeasured: allocator pools, ONNX Runtime's arenas, TCP, the CPU's caches
        run_load(dataclasses.replace(cfg, duration_s=load.warmup_s))
    info = {"payload": body.key, "rows": len(body.rows), "warmup_s": load.warmup_s, **(extra or {})}
    with HostMonitor() as host:
        result = measure_saturation(
            running.proc.pid,
            cfg,
            scenario=scenario,
            framework=framework,
            mode="saturation",
            load=info,
            command=command,
            notes=notes,
        )
    assert host.usage is not None
    return result, host.usage


def measure_bastion(framework: BastionFramework, model: ModelSpec, body: Body, duration_s: float, workdir: Path,
                    label: str, warmup_s: float = 3.0) -> dict[str, float]:
    """One Bastion server (``framework``'s flags) saturated by wrk with 16 connections: its
    req/s, p50/p99 and the server's CPU per answered request. Readiness is the server's
    (open, strict: every model loaded), since a keyed model's readiness follows the key's
    scope; any error fails the measurement, pointing at the server's log."""
    launch = framework.prepare(model, fresh_dir(workdir), bastion_python(), free_port(), 1)
    launch.ready_url = launch.infer_url.split("/v2/")[0] + "/v2/health/ready"
    with serve(launch, workdir / "server.log") as running:
        check_v2(label, model, launch.infer_url, body.payload, body.request_headers, body.rows)
        result, _ = saturate(running, launch.infer_url, body, Load(16, duration_s, warmup_s), scenario=model.name,
                             framework=f"bastion-{label}")
    stats = result.stats
    if stats.errors:
        raise RuntimeError(f"{label}: {stats.errors} errors ({stats.status_counts}); see {workdir / 'server.log'}")
    # the server's CPU per answered request (every thread): on a shared machine it moves less
    # with the neighbours' load than throughput does
    cpu = result.cpu_us_per_request
    return {"rps": stats.throughput, "p50_ms": stats.latency_ms.p50, "p99_ms": stats.latency_ms.p99,
            "cpu_us": cpu if cpu is not None else float("nan")}


def fresh_dir(path: Path) -> Path:
    """``path``, empty: a server must not start on files an earlier run left there."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def log_origin(running: Running) -> str | None:
    """Which ``bastion`` package the server imported (Bastion servers print it at start)."""
    origin = served_from(running.log_path.read_text(encoding="utf-8", errors="replace"))
    return str(origin) if origin else None


def measure_row(
    row: Row, body: Body, model: ModelSpec, config: ServingConfig, python: Path, say: Say = print
) -> ServingRun:
    """Start the row's server fresh for each repeat, check one answer, warm up, measure."""
    fw = adapter(row.server)
    runs: list[ServingRun] = []
    for attempt in range(config.repeat):
        workdir = fresh_dir(config.out / "work" / f"{row.key}-{attempt}")
        launch = fw.prepare(model, workdir, python, free_port(), row.workers)
        with serve(launch, workdir / "server.log") as running:
            # a wrong body must fail loudly here, not as 16 x N errors in the table
            check_v2(row.key, model, launch.infer_url, body.payload, body.request_headers, body.rows, retry_503_s=60)
            result, host = saturate(
                running,
                launch.infer_url,
                body,
                config.load,
                scenario=DEMO_MODEL,
                framework=row.server,
                extra={"workers": row.workers, "config": row.config},
                command=config.command,
                notes=launch.notes,
                generator=row.generator,
            )
            origin = log_origin(running) if row.server == "bastion" else None
        run = ServingRun(row, body.label, len(body.rows), result, host, running.startup_s, origin)
        runs.append(run)
        cpu = result.cpu_us_per_request
        say(
            f"  {row.key:<22} {run.rps:>9.0f} req/s  p50 {run.stats.latency_ms.p50:6.2f} ms  p99 {run.p99_ms:6.2f} ms"
            f"  errors {run.stats.errors}  cpu {cpu or 0:6.0f} µs/req  rss {result.peak_rss_mib or 0:5.0f} MiB"
        )
    # With repeats, report the run with the median throughput (a mean of percentiles is not
    # a percentile of anything) and keep every run in the JSON.
    chosen = sorted(runs, key=lambda r: r.rps)[len(runs) // 2]
    if len(runs) > 1:
        chosen.runs = [{k: v for k, v in r.to_dict().items() if k != "runs"} for r in runs]
    return chosen


def git_head(root: Path | None = None) -> str:
    """``<short sha>`` of HEAD, with ``+changes`` when ``src/`` differs from it."""
    cwd = str(root) if root else None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=cwd, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (sha or "?") + ("+changes" if dirty else "")


def environment(mlserver_python: Path | None, generators: Sequence[str] = ("wrk",)) -> dict[str, Any]:
    """The machine (``results.machine_info``) and every version a reader needs."""
    here = Path(sys.executable)
    versions = {
        "bastion": installed_version(here, "bastion-serve"),
        "mlserver": installed_version(mlserver_python, "mlserver") if mlserver_python else "not used",
        "onnxruntime": installed_version(here, "onnxruntime"),
        "onnxruntime (MLServer venv)": installed_version(mlserver_python, "onnxruntime")
        if mlserver_python
        else "not used",
        "uvicorn": installed_version(here, "uvicorn"),
    }
    # "load generator" is wrk's entry, under the name earlier reports used for it
    if "wrk" in generators:
        versions["load generator"] = wrk_version()
    if "hey" in generators:
        versions["hey"] = hey_version()
    return {**machine_info(), "versions": versions, "git": git_head()}


def run_serving(config: ServingConfig, say: Say = print) -> tuple[list[ServingRun], dict[str, Any]]:
    """Every row of the plan, one server at a time; returns the runs and the environment.

    Ctrl-C (or SIGTERM turned into KeyboardInterrupt by the CLI) stops the running server
    and returns the rows done so far.
    """
    rows = plan(config.servers, config.workers, config.mlserver_workers, config.batch, config.generators)
    if not rows:
        raise ValueError(
            f"nothing to run for server(s) {', '.join(config.servers)} with {', '.join(config.generators)} "
            f"(hey rows are for {' and '.join(HEY_SERVERS)} only)"
        )
    used = sorted({r.generator for r in rows}, key=GENERATORS.index)
    require_generators(used)  # before minutes of builds and installs, not after
    repo = config.repository or build_demo(config.cache, say=say)
    model = demo_spec(repo)
    bodies = make_bodies(model)
    # install MLServer's venv (minutes, once) before anything is measured
    pythons = {s: python_for(s, adapter(s).requirements(), config.cache, say=say) for s in {r.server for r in rows}}
    env = environment(pythons.get("mlserver"), used)
    env["busy_cores_before"] = round(busy_cores(1.0), 2)
    if env["busy_cores_before"] > BUSY_WARNING_CORES:
        say(
            f"warning: {env['busy_cores_before']:.2f} cores busy before the run: something else is using the CPU "
            "and will be measured as noise (see 'machine busy')"
        )
    config_file = repo / DEMO_MODEL / "config.yaml"
    env["bastion_model_config"] = config_file.read_text(encoding="utf-8") if config_file.exists() else None
    load = config.load
    say(f"{len(rows)} rows x {load.duration_s:.0f} s ({' and '.join(used)}, {load.connections} connections)")
    runs: list[ServingRun] = []
    try:
        for row in rows:
            runs.append(measure_row(row, bodies[row.body], model, config, pythons[row.server], say))
    except KeyboardInterrupt:
        say("interrupted; servers stopped; reporting the rows done so far")
    return runs, env
