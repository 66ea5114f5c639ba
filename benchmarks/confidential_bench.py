"""What confidential serving costs: plain vs confidential vs confidential+E2E vs partitioned, side by side.

    .venv/bin/python benchmarks/confidential_bench.py [--duration 5] [--rounds 2] [--out FILE.json]
        [--partition image_cnn=2,image_mobilenet=3,malware_mlp=2 | --partition none]

Each model (default: image_cnn, image_mobilenet, malware_mlp, from ``.bench/scenarios``)
goes into one temporary repository twice: as is (``NAME``) and packaged confidential
(``NAME_conf``: sealed bundles, ``e2e: optional``), and a third time partitioned (below).
ONE ``bastion serve`` serves them all, supervising a trusted worker (``attestation: dev``:
an ordinary process, no TEE). Three modes per model, five when it is partitioned:

* **plain**: plaintext V2 binary-tensor request to ``NAME`` (the front runs ONNX Runtime);
* **confidential**: plaintext request to ``NAME_conf``: the front batches it and sends it
  over the attested, AES-GCM channel to the worker, which runs the model;
* **confidential+E2E**: ``Client.infer_confidential`` on ``NAME_conf``: the client seals
  the inputs with HPKE to the attested worker key, the front forwards the ciphertext, the
  worker opens it, runs the model and seals the answer back. Timed client to client, so the
  client's sealing and opening are part of the figure.

Each model named by ``--partition MODEL=CUT`` (CUT: a cut point's number K, as ``bastion
partition list`` counts them, or a tensor name; default: early cuts, little compute in the
worker) is also split there and served as ``NAME_part`` (``package_partitioned``: the head
sealed for the worker, the tail plain in the front, ``e2e: optional``), with two more modes:

* **partitioned**: plaintext request to ``NAME_part``: the front batches it, the worker runs
  the head over the channel and returns the cut tensor, the front runs the tail;
* **partitioned+E2E**: ``Client.infer_confidential`` on ``NAME_part``: the client seals the
  inputs, the worker opens them and runs the head, the front runs the tail on the features
  and answers the tail's outputs in the clear.

For these the head's FLOP share at the cut is reported, the head and tail times per batch as
the server measured them (``bastion_partition_part_seconds`` sums and counts from
``/metrics``, before and after each measurement), and the head, the tail and the whole model
timed in-process (ONNX Runtime, one thread) at batch 1 and at the throughput batch.

Per round and model, the modes run one after another in an order that rotates with the
round, so drift on this shared machine hits all alike: latency at batch 1 (sequential
requests after a warm-up), then throughput at batch 64 (``--concurrency`` client threads
for ``--duration`` seconds). Figures are medians over rounds; the ratios to plain are
medians of the per-round ratios (each round's modes ran next to each other). The CPU the
front process, the worker and this client used per request is recorded with each
measurement, and an in-process micro-benchmark times the E2E crypto (HPKE seal/open,
CBOR, AES-GCM) without any server, to say where the E2E overhead goes.

The client runs on the same cores as the server: on a 2-core machine its own work (and
the E2E sealing it does) competes with the server's, as it would not on a separate host.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import yaml

from bastion.bench.launcher import child_env, free_port, http_request, stop_process_group
from bastion.bench.procstats import find_child, parse_proc_stat
from bastion.bench.results import machine_info
from bastion.client import Client, ClientError

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / ".bench" / "scenarios"
DEFAULT_MODELS = ("image_cnn", "image_mobilenet", "malware_mlp")
MODES = ("plain", "confidential", "confidential+E2E")
PART_MODES = ("partitioned", "partitioned+E2E")
ALL_MODES = MODES + PART_MODES
CONF_SUFFIX = "_conf"
PART_SUFFIX = "_part"
# early cuts: the kind the partitioning literature recommends (little compute in the TEE)
DEFAULT_PARTITION = "image_cnn=2,image_mobilenet=3,malware_mlp=2"
TARGET_PART_THROUGHPUT_RATIO = 0.9  # partitioned rows/s >= 0.9 x plain at batch 64 (issue 16)
TARGET_E2E_THROUGHPUT_RATIO = 0.8  # confidential+E2E rows/s >= 0.8 x plain at batch 64
TARGET_E2E_ADDED_P50_MS = 1.0  # and <= 1 ms added p50 at batch 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the repository and the server ------------------------------------------------------------------
def find_model(name: str) -> Path:
    """A plain model directory ``.bench/scenarios/<scenario>/<name>`` (config.yaml + versions)."""
    hits = sorted(p.parent for p in SCENARIOS.glob(f"*/{name}/config.yaml"))
    if not hits:
        raise SystemExit(f"no model {name!r} under {SCENARIOS} (build the scenarios first: `bastion bench ...`)")
    return hits[0]


def parse_partition(text: str, models: list[str]) -> dict[str, str | int]:
    """``MODEL=CUT[,MODEL=CUT...]`` -> {model: K or tensor name}; ``none`` or empty: no partitioned
    models. Models not in ``models`` are dropped (so the default names all three)."""
    if text.strip().lower() in ("", "none"):
        return {}
    cuts: dict[str, str | int] = {}
    for item in text.split(","):
        name, sep, cut = item.strip().partition("=")
        if not sep or not name.strip() or not cut.strip():
            raise SystemExit(f"--partition: {item!r} is not MODEL=CUT (CUT: a layer number K or a tensor name)")
        cut = cut.strip()
        cuts[name.strip()] = int(cut) if cut.isdigit() else cut
    return {m: c for m, c in cuts.items() if m in models}


def build_repository(
    scratch: Path, models: list[str], instance_count: int = 0, partitions: dict[str, str | int] | None = None
) -> tuple[Path, Path, str, dict[str, dict[str, Any]]]:
    """(repository, worker.yaml, the dev worker's measurement hex, the cuts): each model plain and
    confidential, and partitioned at ``partitions[model]`` where given (the cut's description,
    with the head's and tail's paths for the in-process timing). ``instance_count`` > 0 overrides
    the models' own (batches in flight at once, in the front)."""
    import onnx

    from bastion.confidential.package import TAIL_FILE, package_confidential
    from bastion.confidential.partition.package import package_partitioned
    from bastion.confidential.worker import dev_measurement
    from bastion.confidential.worker_config import load_worker_config
    from bastion.guard.bundles import generate_signing_key, write_public_key
    from bastion.guard.keyproviders import generate_master_key, load_key_provider, write_master_key

    repo = scratch / "repo"
    repo.mkdir()
    master = scratch / "master.key"
    write_master_key(master, generate_master_key())
    signing_key = generate_signing_key()
    write_public_key(signing_key.public_key(), scratch / "signer.pub")
    provider = load_key_provider(f"file:{master}")
    cuts: dict[str, dict[str, Any]] = {}
    for name in models:
        source = scratch / "source" / name
        shutil.copytree(find_model(name), source, ignore=shutil.ignore_patterns("*.npz", "*.json", "zoo.yaml"))
        if instance_count > 0:
            config = yaml.safe_load((source / "config.yaml").read_text(encoding="utf-8"))
            config["instance_count"] = instance_count
            (source / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        shutil.copytree(source, repo / name)
        package_confidential(
            source,
            repo / f"{name}{CONF_SUFFIX}",
            key_id="bench",
            signing_key=signing_key,
            key_provider=provider,
            e2e="optional",
        )
        if partitions and name in partitions:
            # the sealed config is checked against the HEAD in the worker, so it must not declare the
            # whole model's outputs (package_partitioned copies config.yaml as is): drop them; the
            # served signature then comes from the head's inputs and the tail's outputs
            part_source = scratch / "source_part" / name
            shutil.copytree(source, part_source)
            config = yaml.safe_load((part_source / "config.yaml").read_text(encoding="utf-8"))
            config.pop("outputs", None)
            (part_source / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            part_dir = repo / f"{name}{PART_SUFFIX}"
            splits = package_partitioned(
                part_source,
                part_dir,
                partitions[name],
                key_id="bench",
                signing_key=signing_key,
                key_provider=provider,
                e2e="optional",
            )
            version = min(splits)
            split = splits[version]
            head_path = scratch / "heads" / f"{name}.onnx"  # for the in-process timing only
            head_path.parent.mkdir(exist_ok=True)
            onnx.save(split.head, str(head_path))
            cuts[name] = {
                **split.cut.to_dict(),
                "requested": partitions[name],
                "composition_max_abs_diff": split.report.max_abs_diff,
                "whole_path": str(source / str(version) / "model.onnx"),
                "head_path": str(head_path),
                "tail_path": str(part_dir / str(version) / TAIL_FILE),
            }
    worker_yaml = scratch / "worker.yaml"
    worker_yaml.write_text(
        yaml.safe_dump(
            {"attestation": "dev", "key_provider": f"file:{master}", "trusted_signers": [str(scratch / "signer.pub")]}
        ),
        encoding="utf-8",
    )
    measurement = dev_measurement(load_worker_config(worker_yaml)).hex()
    return repo, worker_yaml, measurement, cuts


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    worker_pid: int = 0

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        return ""


@contextlib.contextmanager
def serve(scratch: Path, repo: Path, worker_yaml: Path, served: list[str]) -> Iterator[Server]:
    """One ``bastion serve`` (loopback only) with its supervised worker, stopped (whole
    process group) when the block ends, whatever ends it."""
    port = free_port()
    argv = [
        sys.executable,
        "-c",
        "from bastion.cli.main import main; main()",
        "serve",
        str(repo),
        "--host",
        "127.0.0.1",
        "--http-port",
        str(port),
        "--grpc-port",
        "-1",
        "--insecure-no-auth",
        "--no-audit",
        "--poll-interval",
        "0",
        "--log-level",
        "warning",
        "--log-format",
        "text",
        "--worker-socket",
        str(scratch / "worker.sock"),
        "--worker-config",
        str(worker_yaml),
    ]
    log_path = scratch / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=scratch,
            env=child_env({}),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_ready(server, served)
        server.worker_pid = find_child(proc.pid, b"worker", b"serve", timeout_s=10)
        yield server
    finally:
        stop_process_group(proc)


def wait_ready(server: Server, names: list[str], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending:
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {server.proc.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"models not ready after {timeout_s:.0f} s: {pending}\n{server.log_tail()}")
        try:
            while pending and http_request("GET", f"{server.url}/v2/models/{pending[0]}/ready", timeout=2)[0] == 200:
                pending.pop(0)
        except OSError:
            pass
        if pending:
            time.sleep(0.25)






# ---- CPU accounting -----------------------------------------------------------------------------------
def process_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` itself, every thread (not its children)."""
    try:
        stat = parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (stat.utime + stat.stime) / CLK_TCK


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuSpan:
    """CPU seconds of the front, the worker and this client over a span."""

    server: Server
    start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    used: dict[str, float] = field(default_factory=dict)

    def __enter__(self) -> CpuSpan:
        self.start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        self.used = {k: e - s for k, s, e in zip(("front", "worker", "client"), self.start, end, strict=True)}

    def _read(self) -> tuple[float, float, float]:
        return process_cpu_s(self.server.proc.pid), process_cpu_s(self.server.worker_pid), self_cpu_s()


# ---- requests -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInput:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]  # one row, without the batch dimension

    def batch(self, rows: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {self.name: rng.random((rows, *self.shape), dtype=np.float32).astype(self.dtype)}


def model_input(name: str) -> ModelInput:
    config = yaml.safe_load((find_model(name) / "config.yaml").read_text(encoding="utf-8"))
    (spec,) = config["inputs"]
    if spec["datatype"] != "FP32":
        raise SystemExit(f"{name}: input datatype {spec['datatype']}; this benchmark feeds FP32")
    return ModelInput(spec["name"], np.dtype(np.float32), tuple(int(d) for d in spec["shape"][1:]))


Call = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def target_of(model: str, mode: str) -> str:
    """The served name ``mode`` sends to."""
    if mode == "plain":
        return model
    return model + (PART_SUFFIX if mode.startswith("partitioned") else CONF_SUFFIX)


def modes_of(model: str, cuts: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    return ALL_MODES if model in cuts else MODES


def caller(client: Client, model: str, mode: str, measurement: str) -> Call:
    """One request of ``mode`` to ``model``; returns the outputs (opened, for E2E; a partitioned
    model's E2E answer is the tail's outputs, in the clear)."""
    target = target_of(model, mode)
    if mode.endswith("+E2E"):
        session = client.confidential(target, expect=measurement, allow_dev=True)
        session.attest()  # once, outside any timing (re-attested every 60 s, as a real client would)
        return lambda inputs: client.infer_confidential(session, inputs)

    def call(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t.name: t.data for t in client.infer(target, inputs).outputs}

    return call


def check_modes_agree(url: str, model: str, spec: ModelInput, measurement: str, modes: tuple[str, ...]) -> None:
    """Every mode gives the same answer to the same rows (else nothing here means anything)."""
    inputs = spec.batch(5, seed=7)
    with Client(url) as client:
        answers = {mode: caller(client, model, mode, measurement)(inputs) for mode in modes}
    want = answers["plain"]
    for mode, got in answers.items():
        for name, array in want.items():
            if name not in got or not np.allclose(np.asarray(got[name]), np.asarray(array), rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"{model}: {mode} answers {name!r} differently from plain")


def measure_latency(
    server: Server, model: str, mode: str, spec: ModelInput, measurement: str, requests: int, warmup: int
) -> dict[str, Any]:
    """Sequential batch-1 requests on one connection; per-request latency, client to client."""
    inputs = spec.batch(1, seed=1)
    times: list[float] = []
    with Client(server.url) as client:
        call = caller(client, model, mode, measurement)
        for _ in range(warmup):
            call(inputs)
        with CpuSpan(server) as cpu:
            for _ in range(requests):
                t0 = time.perf_counter()
                call(inputs)
                times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "requests": requests,
        "cpu_us_per_request": {k: v / requests * 1e6 for k, v in cpu.used.items()},
        "latencies_ms": [round(float(x), 4) for x in ms],
    }


def measure_throughput(
    server: Server, model: str, mode: str, spec: ModelInput, measurement: str, batch: int, threads: int, duration: float
) -> dict[str, Any]:
    """``threads`` clients, each sending ``batch``-row requests back to back for ``duration`` s."""
    inputs = [spec.batch(batch, seed=100 + i) for i in range(threads)]
    ready = threading.Barrier(threads + 1)
    go = threading.Event()
    stop_at = [0.0]
    counts = [0] * threads
    errors: list[str] = []
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def run(i: int) -> None:
        with Client(server.url) as client:
            try:
                call = caller(client, model, mode, measurement)
                for _ in range(3):  # warm-up: connection, session, caches
                    call(inputs[i])
            except (ClientError, OSError) as err:
                errors.append(str(err))
            ready.wait()
            go.wait()
            while not errors and time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    call(inputs[i])
                except (ClientError, OSError) as err:
                    errors.append(str(err))
                    break
                latencies[i].append(time.perf_counter() - t0)
                counts[i] += 1

    pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    ready.wait()
    with CpuSpan(server) as cpu:
        t0 = time.perf_counter()
        stop_at[0] = t0 + duration
        go.set()
        for t in pool:
            t.join()
        elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{model} {mode}: {errors[0]}\n{server.log_tail()}")
    requests = sum(counts)
    ms = np.asarray([x for lat in latencies for x in lat]) * 1e3
    return {
        "rows_per_s": requests * batch / elapsed,
        "requests": requests,
        "elapsed_s": elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "cpu_us_per_row": {k: v / (requests * batch) * 1e6 for k, v in cpu.used.items()},
    }


# ---- the head/tail split, as the server measures it ---------------------------------------------------
PART_METRIC = "bastion_partition_part_seconds"
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def part_counters(url: str, served: str) -> dict[str, tuple[float, float]]:
    """{"head"|"tail": (sum of seconds, count of batches)} of ``served`` (all versions) from ``/metrics``."""
    status, body = http_request("GET", f"{url}/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics: HTTP {status}")
    text = body.decode("utf-8", errors="replace")
    out: dict[str, list[float]] = {"head": [0.0, 0.0], "tail": [0.0, 0.0]}
    for line in text.splitlines():
        if not line.startswith(PART_METRIC):
            continue
        m = _SAMPLE.match(line)
        if m is None or m["name"] not in (PART_METRIC + "_sum", PART_METRIC + "_count"):
            continue
        labels = dict(_LABEL.findall(m["labels"]))
        if labels.get("model") != served or labels.get("part") not in out:
            continue
        out[labels["part"]][0 if m["name"].endswith("_sum") else 1] += float(m["value"])
    return {part: (v[0], v[1]) for part, v in out.items()}


def part_split(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], requests: int
) -> dict[str, float]:
    """ms per batch of the head (worker + channel round trip) and of the tail (front) between two
    scrapes, and batches per request (below 1 where the front merged requests into one batch)."""
    out: dict[str, float] = {}
    for part in ("head", "tail"):
        seconds = after[part][0] - before[part][0]
        batches = after[part][1] - before[part][1]
        out[f"{part}_ms_per_batch"] = seconds / batches * 1e3 if batches else float("nan")
        out[f"{part}_batches"] = batches
    out["batches_per_request"] = out["head_batches"] / requests if requests else float("nan")
    return out


# ---- the E2E crypto alone -----------------------------------------------------------------------------
def crypto_costs(
    url: str, model: str, spec: ModelInput, batches: tuple[int, ...], budget_s: float = 0.4
) -> dict[str, dict[str, float]]:
    """µs per call of each E2E step, in this process, no server: what sealing costs wherever it runs."""
    from bastion.confidential.dev_evidence import DevEvidenceProducer
    from bastion.confidential.identity import WorkerIdentity

    identity = WorkerIdentity.generate(DevEvidenceProducer(b"\0" * 32))
    name = model + CONF_SUFFIX
    out: dict[str, dict[str, float]] = {}
    with Client(url) as client:
        for batch in batches:
            inputs = spec.batch(batch, seed=3)
            outputs = {t.name: t.data for t in client.infer(model, inputs).outputs}
            out[f"batch{batch}"] = _time_crypto(identity, name, inputs, outputs, budget_s)
    return out


def _time_crypto(
    identity: Any, name: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], budget_s: float
) -> dict[str, float]:
    from bastion.confidential.sealing import ReplayCache, open_request, open_response, seal_request, seal_response

    replay = ReplayCache(max_entries=1 << 20)

    def seal() -> tuple[bytes, Any]:
        return seal_request(identity.public_key, name, inputs)

    envelope, secret = seal()
    opened = open_request(identity, envelope, model=name, replay=replay)
    answer = seal_response(opened, outputs)
    steps: dict[str, Callable[[], object]] = {
        "client_seal_request": seal,
        "worker_open_request": lambda: open_request(identity, seal()[0], model=name, replay=replay),
        "worker_seal_response": lambda: seal_response(opened, outputs),
        "client_open_response": lambda: open_response(secret, answer),
    }
    timed: dict[str, float] = {}
    for step, fn in steps.items():
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < budget_s:
            fn()
            n += 1
        timed[step] = (time.perf_counter() - t0) / n * 1e6
    # the worker's open was timed with a fresh seal in each call (a replay is refused): take the seal out
    timed["worker_open_request"] -= timed["client_seal_request"]
    timed["total"] = sum(timed.values())
    timed["request_bytes"] = float(len(envelope))
    timed["response_bytes"] = float(len(answer))
    return timed


# ---- the extra hop alone ------------------------------------------------------------------------------
def hop_costs(
    server: Server,
    scratch: Path,
    models: list[str],
    specs: dict[str, ModelInput],
    cuts: dict[str, dict[str, Any]] | None = None,
    batch: int = 64,
    calls: int = 300,
) -> dict[str, Any]:
    """p50 µs of the pieces of the confidential path, measured apart: the model in-process
    (ONNX Runtime, one thread, as the servers run it), and round trips over the attested
    channel to the running worker from a second :class:`WorkerClient` in this process (the
    front's own path: caller thread -> channel thread -> AES-GCM + CBOR -> Unix socket ->
    worker loop [-> predict thread -> ONNX Runtime] -> back), without HTTP. For a partitioned
    model, also its whole model, head and tail in-process at batch 1 and ``batch``, and the
    head over the channel."""
    import onnxruntime as ort

    from bastion.confidential.tensor_codec import decode_tensors, encode_tensors
    from bastion.confidential.worker_client import WorkerClient

    cuts = cuts or {}

    def p50_us(fn: Callable[[], object]) -> float:
        for _ in range(20):
            fn()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.percentile(times, 50) * 1e6)

    def session_of(path: str) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    out: dict[str, Any] = {}
    channel = WorkerClient(str(scratch / "worker.sock"))
    channel.start()
    try:
        channel.wait_connected(30)
        out["channel_health_roundtrip"] = p50_us(lambda: channel.call({"op": "health"}))
        for model in models:
            session = session_of(str(scratch / "repo" / model / "1" / "model.onnx"))
            inputs = specs[model].batch(1, seed=1)
            message = {"op": "infer", "model": model + CONF_SUFFIX, "version": 1}

            def infer(inputs: dict[str, np.ndarray] = inputs, message: dict[str, Any] = message) -> object:
                reply = channel.call({**message, "inputs": encode_tensors(inputs)})
                return decode_tensors(reply["outputs"])

            out[model] = {
                "onnxruntime_b1": p50_us(lambda session=session, inputs=inputs: session.run(None, inputs)),
                "channel_infer_b1": p50_us(infer),
            }
            if model in cuts:
                out[model]["partition"] = partition_hops(
                    channel,
                    session,
                    session_of(cuts[model]["head_path"]),
                    session_of(cuts[model]["tail_path"]),
                    model,
                    specs[model],
                    batch,
                    p50_us,
                )
    finally:
        # WorkerClient.close stops its loop with the reader task pending; asyncio then logs
        # "Task was destroyed but it is pending" when that loop is collected: expected here
        logging.getLogger("asyncio").addFilter(lambda r: not r.getMessage().startswith("Task was destroyed"))
        channel.close()
    return out


def partition_hops(
    channel: Any,
    whole: Any,
    head: Any,
    tail: Any,
    model: str,
    spec: ModelInput,
    batch: int,
    p50_us: Callable[[Callable[[], object]], float],
) -> dict[str, float]:
    """p50 µs in-process of the whole model, its head and its tail (ONNX Runtime, one thread) at
    batch 1 and ``batch``, and of the head over the attested channel at batch 1."""
    from bastion.confidential.tensor_codec import decode_tensors, encode_tensors

    (feature,) = (o.name for o in head.get_outputs())
    out: dict[str, float] = {}
    for rows in (1, batch):
        inputs = spec.batch(rows, seed=1)
        features = {feature: head.run(None, inputs)[0]}
        out[f"whole_b{rows}"] = p50_us(lambda inputs=inputs: whole.run(None, inputs))
        out[f"head_b{rows}"] = p50_us(lambda inputs=inputs: head.run(None, inputs))
        out[f"tail_b{rows}"] = p50_us(lambda features=features: tail.run(None, features))
    message = {"op": "infer", "model": model + PART_SUFFIX, "version": 1}
    inputs = spec.batch(1, seed=1)

    def infer() -> object:
        return decode_tensors(channel.call({**message, "inputs": encode_tensors(inputs)})["outputs"])

    out["channel_head_infer_b1"] = p50_us(infer)
    return out


# ---- the run ------------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def _median(values: list[float]) -> float:
    finite = [v for v in values if v == v]  # NaN: a part that ran no batch in that measurement
    return statistics.median(finite) if finite else float("nan")


def summarize(rounds: list[dict[str, dict[str, dict[str, Any]]]], models: list[str]) -> dict[str, Any]:
    """Medians over rounds; ratios and differences to plain are medians of per-round pairs."""
    summary: dict[str, Any] = {}
    for model in models:
        per_mode: dict[str, Any] = {}
        for mode in (m for m in ALL_MODES if m in rounds[0][model]):
            runs = [r[model][mode] for r in rounds]
            base = [r[model]["plain"] for r in rounds]
            conf = [r[model]["confidential"] for r in rounds]
            lat = [x["latency"] for x in runs]
            thr = [x["throughput"] for x in runs]
            per_mode[mode] = {
                "p50_ms": statistics.median(x["p50_ms"] for x in lat),
                "p99_ms": statistics.median(x["p99_ms"] for x in lat),
                "rows_per_s": statistics.median(x["rows_per_s"] for x in thr),
                "throughput_ratio": statistics.median(
                    x["throughput"]["rows_per_s"] / b["throughput"]["rows_per_s"]
                    for x, b in zip(runs, base, strict=True)
                ),
                "throughput_ratio_to_confidential": statistics.median(
                    x["throughput"]["rows_per_s"] / c["throughput"]["rows_per_s"]
                    for x, c in zip(runs, conf, strict=True)
                ),
                "added_p50_ms": statistics.median(
                    x["latency"]["p50_ms"] - b["latency"]["p50_ms"] for x, b in zip(runs, base, strict=True)
                ),
                "cpu_us_per_request_b1": {
                    k: statistics.median(x["cpu_us_per_request"][k] for x in lat) for k in ("front", "worker", "client")
                },
                "cpu_us_per_row_b64": {
                    k: statistics.median(x["cpu_us_per_row"][k] for x in thr) for k in ("front", "worker", "client")
                },
            }
            if mode in PART_MODES:
                per_mode[mode]["parts"] = {
                    f"{key}_{at}": _median([x[at]["parts"][key] for x in runs])
                    for at in ("latency", "throughput")
                    for key in ("head_ms_per_batch", "tail_ms_per_batch", "batches_per_request")
                }
        e2e = per_mode["confidential+E2E"]
        per_mode["targets"] = {
            "e2e_throughput_ratio_ok": e2e["throughput_ratio"] >= TARGET_E2E_THROUGHPUT_RATIO,
            "e2e_added_p50_ok": e2e["added_p50_ms"] <= TARGET_E2E_ADDED_P50_MS,
        }
        if "partitioned" in per_mode:
            per_mode["targets"]["partitioned_throughput_ratio_ok"] = (
                per_mode["partitioned"]["throughput_ratio"] >= TARGET_PART_THROUGHPUT_RATIO
            )
        summary[model] = per_mode
    return summary


def _modes(per_mode: dict[str, Any]) -> list[str]:
    return [m for m in ALL_MODES if m in per_mode]


def markdown(report: dict[str, Any]) -> str:
    args = report["parameters"]
    lines = [
        f"{report['date']}, {report['machine']['cpu']}, {report['machine']['logical_cpus']} cores "
        f"(load average before: {', '.join(f'{x:.2f}' for x in report['machine']['loadavg_before'] or [])}). "
        f"Commit {report['git_commit']}.",
        f"Command: `{report['command']}`. Batch 1: {args['requests']} sequential requests after "
        f"{args['warmup']} warm-up; batch {args['batch']}: {args['concurrency']} client threads for "
        f"{args['duration']:g} s; median of {args['rounds']} rounds, modes interleaved; "
        f"instance_count {args['instance_count']}.",
        "",
        f"| model | mode | p50 ms (b1) | p99 ms (b1) | rows/s (b{args['batch']}) | x plain (b{args['batch']}) "
        "| added p50 vs plain |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, per_mode in report["summary"].items():
        for mode in _modes(per_mode):
            m = per_mode[mode]
            ratio = "1.00" if mode == "plain" else f"{m['throughput_ratio']:.2f}"
            added = "—" if mode == "plain" else f"{m['added_p50_ms']:+.2f} ms"
            lines.append(
                f"| {model} | {mode} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['rows_per_s']:,.0f} | "
                f"{ratio} | {added} |"
            )
    lines += [
        "",
        "CPU per request at batch 1 / per row at batch 64, µs (front process, worker, this client):",
        "",
        "| model | mode | front b1 | worker b1 | client b1 | front b64/row | worker b64/row | client b64/row |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, per_mode in report["summary"].items():
        for mode in _modes(per_mode):
            b1, b64 = per_mode[mode]["cpu_us_per_request_b1"], per_mode[mode]["cpu_us_per_row_b64"]
            lines.append(
                f"| {model} | {mode} | {b1['front']:.0f} | {b1['worker']:.0f} | {b1['client']:.0f} | "
                f"{b64['front']:.1f} | {b64['worker']:.1f} | {b64['client']:.1f} |"
            )
    lines += [
        "",
        "E2E crypto alone, in-process (HPKE seal + CBOR on the client, open + AES-GCM answer in the worker), "
        "µs per request:",
        "",
        "| model | batch | client seal | worker open | worker seal answer | client open | total | request bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, by_batch in report["crypto_us"].items():
        for batch, c in by_batch.items():
            lines.append(
                f"| {model} | {batch.removeprefix('batch')} | {c['client_seal_request']:.0f} | "
                f"{c['worker_open_request']:.0f} | {c['worker_seal_response']:.0f} | "
                f"{c['client_open_response']:.0f} | {c['total']:.0f} | {c['request_bytes']:,.0f} |"
            )
    hops = report["hop_p50_us"]
    lines += [
        "",
        "The pieces apart, p50 µs at batch 1: the model in-process (ONNX Runtime, 1 thread); a round trip over the "
        "attested channel from a second channel client to the running worker, empty (`health`) and with the model "
        f"(`infer`); no HTTP. Empty round trip: **{hops['channel_health_roundtrip']:.0f} µs**.",
        "",
        "| model | ONNX Runtime in-process | channel infer round trip | channel minus model |",
        "|---|---:|---:|---:|",
    ]
    for model in report["summary"]:
        h = hops[model]
        lines.append(
            f"| {model} | {h['onnxruntime_b1']:.0f} | {h['channel_infer_b1']:.0f} | "
            f"{h['channel_infer_b1'] - h['onnxruntime_b1']:.0f} |"
        )
    lines += markdown_partition(report)
    lines += [
        "",
        "Targets (confidential+E2E vs plain: ≥ "
        f"{TARGET_E2E_THROUGHPUT_RATIO:g}x rows/s at batch 64, ≤ {TARGET_E2E_ADDED_P50_MS:g} ms added p50 "
        f"at batch 1; partitioned vs plain: ≥ {TARGET_PART_THROUGHPUT_RATIO:g}x rows/s at batch 64):",
        "",
    ]
    for model, per_mode in report["summary"].items():
        e2e, ok = per_mode["confidential+E2E"], per_mode["targets"]
        line = (
            f"- {model}: E2E throughput {e2e['throughput_ratio']:.2f}x "
            f"({'holds' if ok['e2e_throughput_ratio_ok'] else 'MISSED'}), added p50 "
            f"{e2e['added_p50_ms']:+.2f} ms ({'holds' if ok['e2e_added_p50_ok'] else 'MISSED'})"
        )
        if "partitioned" in per_mode:
            line += (
                f"; partitioned throughput {per_mode['partitioned']['throughput_ratio']:.2f}x "
                f"({'holds' if ok['partitioned_throughput_ratio_ok'] else 'MISSED'})"
            )
        lines.append(line)
    return "\n".join(lines)


def markdown_partition(report: dict[str, Any]) -> list[str]:
    """The cut of each partitioned model, where its time goes (server metrics and in-process)."""
    cuts: dict[str, dict[str, Any]] = report.get("cuts") or {}
    if not cuts:
        return []
    batch = report["parameters"]["batch"]
    hops = report["hop_p50_us"]
    lines = [
        "",
        "Partitioned models: the cut (K as `bastion partition list` counts them), the head's share of the "
        f"model's FLOPs, the cut tensor's bytes per row; the whole model, head and tail in-process "
        f"(ONNX Runtime, 1 thread), p50 µs at batch 1 / {batch}; the head over the channel at batch 1:",
        "",
        f"| model | cut | head FLOPs | features/row | whole b1 | head b1 | tail b1 | whole b{batch} | "
        f"head b{batch} | tail b{batch} | channel head b1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, cut in cuts.items():
        h = hops[model]["partition"]
        size = "?" if cut["feature_bytes"] is None else f"{cut['feature_bytes']:,} B"
        lines.append(
            f"| {model} | K={cut['index']} `{cut['tensor']}` ({cut['op_type']}) | {cut['flop_share']:.1%} | {size} | "
            f"{h['whole_b1']:.0f} | {h['head_b1']:.0f} | {h['tail_b1']:.0f} | {h[f'whole_b{batch}']:.0f} | "
            f"{h[f'head_b{batch}']:.0f} | {h[f'tail_b{batch}']:.0f} | {h['channel_head_infer_b1']:.0f} |"
        )
    lines += [
        "",
        "Head and tail per batch as the server timed them (`bastion_partition_part_seconds` sum / count over "
        "each measurement, warm-up included; head = worker + channel round trip, tail = the front's ONNX "
        "Runtime call with its thread hop), ms; batches per request below 1 where the front merged requests:",
        "",
        f"| model | mode | head b1 | tail b1 | head b{batch} | tail b{batch} | batches/request b{batch} | "
        f"x plain b{batch} | x confidential b{batch} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in cuts:
        for mode in PART_MODES:
            m = report["summary"][model][mode]
            p = m["parts"]
            lines.append(
                f"| {model} | {mode} | {p['head_ms_per_batch_latency']:.3f} | {p['tail_ms_per_batch_latency']:.3f} | "
                f"{p['head_ms_per_batch_throughput']:.3f} | {p['tail_ms_per_batch_throughput']:.3f} | "
                f"{p['batches_per_request_throughput']:.2f} | {m['throughput_ratio']:.2f} | "
                f"{m['throughput_ratio_to_confidential']:.2f} |"
            )
    return lines


def install_signal_handlers() -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop the server and remove the files."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def measure(
    server: Server, model: str, mode: str, spec: ModelInput, measurement: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Latency at batch 1, then throughput at ``args.batch``; for a partitioned mode, each with
    the head/tail split the server measured meanwhile."""
    part = mode in PART_MODES
    served = target_of(model, mode)
    before = part_counters(server.url, served) if part else {}
    lat = measure_latency(server, model, mode, spec, measurement, args.requests, args.warmup)
    middle = part_counters(server.url, served) if part else {}
    thr = measure_throughput(server, model, mode, spec, measurement, args.batch, args.concurrency, args.duration)
    if part:
        after = part_counters(server.url, served)
        lat["parts"] = part_split(before, middle, args.requests + args.warmup)
        thr["parts"] = part_split(middle, after, thr["requests"] + 3 * args.concurrency)
    return {"latency": lat, "throughput": thr}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated scenario models")
    p.add_argument(
        "--partition",
        default=DEFAULT_PARTITION,
        help="MODEL=CUT[,MODEL=CUT...]: also serve MODEL split at CUT (a layer number K or a tensor name, "
        "see `bastion partition list`) as MODEL_part, with the modes partitioned and partitioned+E2E; "
        f"'none': no partitioned models (default: {DEFAULT_PARTITION}; models not in --models are skipped)",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds of batch-64 load per measurement")
    p.add_argument("--rounds", type=int, default=2, help="rounds over every model and mode, interleaved")
    p.add_argument("--requests", type=int, default=200, help="sequential batch-1 requests per latency measurement")
    p.add_argument("--warmup", type=int, default=30, help="batch-1 warm-up requests before each measurement")
    p.add_argument("--concurrency", type=int, default=4, help="client threads for the batch-64 throughput")
    p.add_argument("--batch", type=int, default=64, help="rows per request for the throughput")
    p.add_argument(
        "--instance-count",
        type=int,
        default=0,
        help="override the models' instance_count (batches the front runs at once; 0: as the scenario built them)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the raw figures here (JSON)")
    p.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="after the rounds, keep the server up this many seconds under load on the first model "
        "(--hold-mode, --hold-batch; to attach py-spy to the pids printed)",
    )
    p.add_argument("--hold-mode", choices=ALL_MODES, default="confidential+E2E", help="the mode of the --hold load")
    p.add_argument(
        "--hold-batch", type=int, default=1, help="rows per request of the --hold load (--concurrency threads)"
    )
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    partitions = parse_partition(args.partition, models)
    if args.hold > 0 and args.hold_mode in PART_MODES and models[0] not in partitions:
        raise SystemExit(f"--hold-mode {args.hold_mode}: {models[0]} is not partitioned (--partition)")
    specs = {m: model_input(m) for m in models}
    install_signal_handlers()
    # every E2E client accepts the dev worker's self-signed evidence (there is no TEE here): say it once
    print(
        "note: E2E clients accept DEV attestation (allow_dev=True): the worker is an ordinary process, not a TEE",
        file=sys.stderr,
    )
    logging.getLogger("bastion.client").setLevel(logging.ERROR)
    started = dt.datetime.now(dt.UTC)
    machine = machine_info()
    scratch = Path(tempfile.mkdtemp(prefix="bastion-conf-bench-"))
    try:
        repo, worker_yaml, measurement, cuts = build_repository(scratch, models, args.instance_count, partitions)
        for model, cut in cuts.items():
            print(
                f"{model}: cut K={cut['index']} {cut['tensor']!r} ({cut['op_type']}), head {cut['flop_share']:.1%} "
                f"of the FLOPs, features {cut['feature_bytes']} B/row",
                file=sys.stderr,
            )
        served = [target_of(m, mode) for m in models for mode in ("plain", "confidential")]
        served += [m + PART_SUFFIX for m in cuts]
        with serve(scratch, repo, worker_yaml, served) as server:
            print(
                f"server pid {server.proc.pid} (front), worker pid {server.worker_pid}; {server.url}", file=sys.stderr
            )
            for model in models:
                check_modes_agree(server.url, model, specs[model], measurement, modes_of(model, cuts))
            crypto = {m: crypto_costs(server.url, m, specs[m], (1, args.batch)) for m in models}
            hops = hop_costs(server, scratch, models, specs, cuts, args.batch)
            rounds: list[dict[str, dict[str, dict[str, Any]]]] = []
            for r in range(args.rounds):
                this: dict[str, dict[str, dict[str, Any]]] = {}
                for model in models:
                    modes = modes_of(model, cuts)
                    order = modes[r % len(modes) :] + modes[: r % len(modes)]
                    this[model] = {}
                    for mode in order:
                        this[model][mode] = got = measure(server, model, mode, specs[model], measurement, args)
                        lat, thr = got["latency"], got["throughput"]
                        print(
                            f"round {r + 1} {model:16s} {mode:17s} p50 {lat['p50_ms']:6.2f} ms  "
                            f"p99 {lat['p99_ms']:6.2f} ms  {thr['rows_per_s']:9,.0f} rows/s",
                            file=sys.stderr,
                        )
                rounds.append(this)
            if args.hold > 0:
                hold_load(server, models[0], specs[models[0]], measurement, args)
        report = {
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine,
            "command": "python benchmarks/confidential_bench.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "git_commit": git_commit(),
            "parameters": {
                "models": models,
                "partition": {m: c for m, c in partitions.items()},
                "duration": args.duration,
                "rounds": args.rounds,
                "requests": args.requests,
                "warmup": args.warmup,
                "concurrency": args.concurrency,
                "batch": args.batch,
                "instance_count": args.instance_count or "as built",
            },
            "worker": "attestation dev: an ordinary process on a Unix socket (no TEE)",
            "cuts": {m: {k: v for k, v in c.items() if not k.endswith("_path")} for m, c in cuts.items()},
            "summary": summarize(rounds, models),
            "crypto_us": crypto,
            "hop_p50_us": hops,
            "rounds": rounds,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(markdown(report))
    ok = all(all(m["targets"].values()) for m in report["summary"].values())
    return 0 if ok else 1


def hold_load(server: Server, model: str, spec: ModelInput, measurement: str, args: argparse.Namespace) -> None:
    """``args.hold`` seconds of ``args.hold_mode`` load at ``args.hold_batch`` rows (one thread at
    batch 1, ``args.concurrency`` threads otherwise), for a profiler to attach to."""
    threads = 1 if args.hold_batch == 1 else args.concurrency
    print(
        f"holding {args.hold:g} s under {args.hold_mode} batch-{args.hold_batch} load ({threads} threads) on "
        f"{model}: front pid {server.proc.pid}, worker pid {server.worker_pid}, client pid {os.getpid()}",
        file=sys.stderr,
        flush=True,
    )
    deadline = time.monotonic() + args.hold

    def run(seed: int) -> None:
        inputs = spec.batch(args.hold_batch, seed=seed)
        with Client(server.url) as client:
            call = caller(client, model, args.hold_mode, measurement)
            while time.monotonic() < deadline:
                call(inputs)

    pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # the server and the temporary files are gone already (finally blocks)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
