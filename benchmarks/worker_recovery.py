"""How long confidential models are down after the trusted worker is SIGKILLed: cold vs the mirror.

    .venv/bin/python benchmarks/worker_recovery.py [--kills 5] [--small 4] [--kms-latency-ms 0] [--out FILE.json]

Two ``bastion serve`` fronts (loopback only, no auth, no audit) serve the same confidential
repository, each supervising its own trusted worker (``attestation: dev``: an ordinary
process, no TEE), with one key-release service (``bastion kms serve``) for both:

* **cold**: ``worker.yaml`` without ``mirror:``. A restarted worker gets every bundle's key
  released by the KMS and decrypts every bundle;
* **mirror**: the same plus ``mirror: {dir, key_id}``. The restarted worker has one key
  (the mirror key) released and reads each version from its encrypted mirror.

The repository: image_cnn and image_mobilenet (and image_cnn_small, image_logreg) from
``.bench/scenarios/image``, plus ``--small`` tiny affine ONNX models, each packaged with
``package_confidential`` (one sealed, signed bundle per version, ``e2e: optional``).

Each measurement SIGKILLs one front's worker and polls a confidential model (plaintext V2
infer, every 5 ms, a new connection each) until the first 200: the front answers 503 until
its supervisor has restarted the worker, it has reconnected, attested the worker and
reloaded every version (``worker_client._reload``, one at a time). Kills alternate between
the modes, the first mode rotating each round; before each kill the worker must have lived
11 s, so the supervisor's back-off is its minimum (0.1 s) every time.

The breakdown comes from the log lines the worker writes (``--log-level info``; wall-clock
stamps with millisecond resolution): its process age when it listens (10 ms resolution),
``channel up (handshake ...)``, and one ``loaded ...`` line per version with its phases.
``--kms-latency-ms`` puts a proxy adding that round-trip time before the KMS (a remote KMS;
loopback has none).

The servers run a snapshot of ``src/bastion`` taken at the start (``PYTHONPATH``): the dev
measurement hashes the code each time a worker starts, so an edit to the working tree during
the run would otherwise give the restarted workers a measurement the KMS refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from bastion.bench.launcher import child_env, free_port, http_request, stop_process_group
from bastion.bench.procstats import find_child
from bastion.bench.results import machine_info

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / ".bench" / "scenarios" / "image"
DEFAULT_MODELS = ("image_cnn", "image_mobilenet", "image_cnn_small", "image_logreg")
MODES = ("cold", "mirror")
BUNDLE_KEY_ID = "bench"
MIRROR_KEY_ID = "bench-mirror"
MIN_WORKER_AGE_S = 11.0  # the supervisor restarts at once (0.1 s) only a worker that lived over 10 s
POLL_S = 0.005
CLK_TCK = os.sysconf("SC_CLK_TCK")
PYTHON = [sys.executable, "-c", "from bastion.cli.main import main; main()"]


# ---- the repository, the KMS and the servers ----------------------------------------------------------
def tiny_model(width: int, offset: float) -> bytes:
    """x FP32 [batch, width] -> y = 2x + offset: a model whose load is all fixed costs."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "offset"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.full(width, offset, np.float32), "offset"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def snapshot_code(scratch: Path) -> dict[str, str]:
    """Copy the ``bastion`` package the servers will run; the environment that makes them run it."""
    import bastion

    shutil.copytree(
        Path(bastion.__file__).resolve().parent,
        scratch / "src" / "bastion",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return {"PYTHONPATH": str(scratch / "src")}


def measure(config: Path, env: dict[str, str]) -> str:
    """The dev measurement of a worker with ``config`` running the snapshot."""
    done = subprocess.run(
        [*PYTHON, "worker", "measure", "--config", str(config)],
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bastion worker measure failed: {done.stderr}")
    return done.stdout.strip()


@dataclass
class Built:
    repo: Path
    worker_yaml: dict[str, Path]
    measurement: dict[str, str]
    versions: int
    bundle_bytes: int
    probe_model: str
    probe_body: bytes


def build(scratch: Path, models: list[str], small: int, env: dict[str, str]) -> Built:
    from bastion.confidential.package import package_confidential
    from bastion.guard.bundles import generate_signing_key, write_public_key
    from bastion.guard.keyproviders import generate_master_key, load_key_provider, write_master_key

    master = scratch / "master.key"
    write_master_key(master, generate_master_key())
    signer = generate_signing_key()
    write_public_key(signer.public_key(), scratch / "signer.pub")
    provider = load_key_provider(f"file:{master}")
    sources: list[Path] = []
    for name in models:
        source = SCENARIOS / name
        if not (source / "config.yaml").is_file():
            raise SystemExit(f"no model {name!r} under {SCENARIOS} (build the scenarios first: `bastion bench ...`)")
        sources.append(source)
    for i in range(small):
        source = scratch / "small" / f"small_{i}"
        (source / "1").mkdir(parents=True)
        (source / "1" / "model.onnx").write_bytes(tiny_model(16, float(i)))
        (source / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx", "max_batch_size": 8}))
        sources.append(source)
    repo = scratch / "repo"
    versions = 0
    for source in sources:
        staged = scratch / "staged" / source.name
        shutil.copytree(source, staged, ignore=shutil.ignore_patterns("*.npz", "*.json", "zoo.yaml"))
        headers = package_confidential(
            staged, repo / source.name, key_id=BUNDLE_KEY_ID, signing_key=signer, key_provider=provider, e2e="optional"
        )
        versions += len(headers)
    bundle_bytes = sum(p.stat().st_size for p in repo.rglob("*.bundle"))
    base = {
        "attestation": "dev",
        "key_provider": "module:bastion.confidential.kms_client:from_env",
        "trusted_signers": ["signer.pub"],
    }
    worker_yaml, measurement = {}, {}
    for mode in MODES:
        config = dict(base)
        if mode == "mirror":
            config["mirror"] = {"dir": "mirror", "key_id": MIRROR_KEY_ID}
        path = scratch / f"worker-{mode}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        worker_yaml[mode] = path
        measurement[mode] = measure(path, env)
    # the probe: the first model's first input, one row of zeros
    probe = yaml.safe_load((sources[0] / "config.yaml").read_text(encoding="utf-8"))
    spec = probe["inputs"][0]
    shape = [1 if d == -1 else int(d) for d in spec["shape"]]
    count = 1
    for d in shape:
        count *= d
    body = json.dumps(
        {"inputs": [{"name": spec["name"], "datatype": spec["datatype"], "shape": shape, "data": [0] * count}]}
    ).encode()
    return Built(repo, worker_yaml, measurement, versions, bundle_bytes, sources[0].name, body)


def setup_kms(scratch: Path, built: Built) -> Path:
    """The store: the bundles' key imported (they were sealed with its file), the mirror's key
    generated inside (generate serves only those), each with a policy for its workers."""
    from bastion.confidential.kms_store import KmsStore, check_policy

    db = scratch / "kms.db"
    with KmsStore(db) as store:
        store.import_key_file(BUNDLE_KEY_ID, scratch / "master.key")
        store.set_policy(
            BUNDLE_KEY_ID, check_policy([{"measurement": m} for m in built.measurement.values()], allow_dev=True)
        )
        store.add_key(MIRROR_KEY_ID)
        store.set_policy(MIRROR_KEY_ID, check_policy([{"measurement": built.measurement["mirror"]}], allow_dev=True))
    return db


class LatencyProxy:
    """TCP proxy on loopback delaying each direction by half of ``rtt_s`` (order kept)."""

    def __init__(self, upstream_port: int, rtt_s: float) -> None:
        self.upstream_port = upstream_port
        self.delay_s = rtt_s / 2
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._stop: asyncio.Event | None = None

    def start(self) -> int:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the latency proxy did not start")
        return self.port

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        task = loop.create_task(deliver())
        try:
            while True:
                data = await reader.read(1 << 16)
                queue.put_nowait((loop.time() + self.delay_s, data))
                if not data:
                    break
            await task
        finally:
            task.cancel()


@contextlib.contextmanager
def kms_service(scratch: Path, db: Path, latency_ms: float, env: dict[str, str]) -> Iterator[str]:
    port_file = scratch / "kms.port"
    log = (scratch / "kms.log").open("wb")
    proc = subprocess.Popen(
        [
            *PYTHON,
            "kms",
            "serve",
            "--db",
            str(db),
            "--audit-dir",
            str(scratch / "kms-audit"),
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ],
        cwd=scratch,
        env=child_env(env),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    proxy = None
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bastion kms serve did not start:\n{(scratch / 'kms.log').read_text()}")
            time.sleep(0.05)
        port = int(port_file.read_text())
        if latency_ms > 0:
            proxy = LatencyProxy(port, latency_ms / 1e3)
            port = proxy.start()
        yield f"http://127.0.0.1:{port}"
    finally:
        if proxy is not None:
            proxy.close()
        stop_process_group(proc)
        log.close()


@dataclass
class Front:
    mode: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    kills: list[dict[str, Any]] = field(default_factory=list)

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        return ""


@contextlib.contextmanager
def fronts(scratch: Path, built: Built, kms_url: str, env: dict[str, str]) -> Iterator[dict[str, Front]]:
    started: dict[str, Front] = {}
    try:
        for mode in MODES:
            port = free_port()
            log_path = scratch / f"front-{mode}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [
                        *PYTHON,
                        "serve",
                        str(built.repo),
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
                        "info",
                        "--log-format",
                        "text",
                        "--worker-socket",
                        str(scratch / f"worker-{mode}.sock"),
                        "--worker-config",
                        str(built.worker_yaml[mode]),
                    ],
                    cwd=scratch,
                    env=child_env({**env, "BASTION_KMS_URL": kms_url, "PYTHONUNBUFFERED": "1"}),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            started[mode] = Front(mode, proc, f"http://127.0.0.1:{port}", log_path)
        for front in started.values():
            wait_ready(front, built)
        yield started
    finally:
        for front in started.values():
            stop_process_group(front.proc)


def wait_ready(front: Front, built: Built, timeout_s: float = 180.0) -> None:
    names = sorted(p.name for p in built.repo.iterdir())
    deadline = time.monotonic() + timeout_s
    while names:
        if front.proc.poll() is not None:
            raise RuntimeError(f"the {front.mode} front exited with {front.proc.returncode}:\n{front.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{front.mode}: models not ready after {timeout_s:.0f} s: {names}\n{front.log_tail()}")
        with contextlib.suppress(OSError):
            while names and http_request("GET", f"{front.url}/v2/models/{names[0]}/ready", timeout=2)[0] == 200:
                names.pop(0)
        if names:
            time.sleep(0.2)




def process_age_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / CLK_TCK




# ---- one kill ------------------------------------------------------------------------------------------
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
_LISTENING = re.compile(
    _STAMP + r"WARNING bastion\.confidential\.worker: trusted worker listening on .*; (\d+) ms after"
)
_CHANNEL = re.compile(_STAMP + r"INFO bastion\.confidential\.worker: channel up \(handshake ([\d.]+) ms\)")
_LOADED = re.compile(
    _STAMP + r"INFO bastion\.confidential\.worker: loaded (\S+)/(\d+) \(bundle sha256 \w+\) from (\w+) in ([\d.]+) ms: "
    r"verify ([\d.]+), mirror read ([\d.]+), key release ([\d.]+), decrypt ([\d.]+), session ([\d.]+), "
    r"mirror write ([\d.]+)"
)
_UNLOCKED = re.compile(
    _STAMP + r"INFO bastion\.confidential\.mirror: fast-recovery mirror .*: key (\w+) .* in ([\d.]+) ms"
)
PHASES = ("verify", "mirror_read", "key_release", "decrypt", "session", "mirror_write")


def _wall(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logging writes it


def kill_once(front: Front, built: Built, timeout_s: float = 120.0) -> dict[str, Any]:
    pid = find_child(front.proc.pid, b"worker", b"serve", timeout_s=30)
    while (age := process_age_s(pid)) < MIN_WORKER_AGE_S:
        time.sleep(MIN_WORKER_AGE_S - age + 0.05)
    url = f"{front.url}/v2/models/{built.probe_model}/infer"
    headers = {"content-type": "application/json"}
    status, data = http_request("POST", url, built.probe_body, headers, timeout=10)
    if status != 200:
        raise RuntimeError(f"{front.mode}: the probe fails before the kill: {status} {data[:300]!r}")
    offset = front.log_path.stat().st_size
    killed_wall = time.time()
    os.kill(pid, signal.SIGKILL)
    statuses: dict[int, int] = {}
    while True:
        try:
            status, _ = http_request("POST", url, built.probe_body, headers, timeout=10)
        except OSError:
            status = 0
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            up_wall = time.time()
            break
        if time.time() - killed_wall > timeout_s:
            raise TimeoutError(
                f"{front.mode}: no 200 {timeout_s:.0f} s after the kill ({statuses})\n{front.log_tail()}"
            )
        time.sleep(POLL_S)
    time.sleep(0.2)  # the worker's lines are flushed already (logging flushes each record); the front's, by now
    with front.log_path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", "replace").splitlines()
    return {"killed": killed_wall, "up": up_wall, "statuses": statuses, **parse_recovery(lines, killed_wall, up_wall)}


def parse_recovery(lines: list[str], killed: float, up: float) -> dict[str, Any]:
    listening = channel = None
    age_ms = handshake_ms = 0.0
    loads: list[dict[str, Any]] = []
    unlock: dict[str, Any] | None = None
    for line in lines:
        if m := _LISTENING.match(line):
            listening, age_ms = _wall(m[1]), float(m[2])
        elif m := _CHANNEL.match(line):
            channel, handshake_ms = _wall(m[1]), float(m[2])
        elif m := _LOADED.match(line):
            loads.append(
                {
                    "at": _wall(m[1]),
                    "model": m[2],
                    "source": m[4],
                    "total": float(m[5]),
                    **{k: float(v) for k, v in zip(PHASES, m.groups()[5:], strict=True)},
                }
            )
        elif m := _UNLOCKED.match(line):
            unlock = {"how": m[2], "ms": float(m[3])}
    if listening is None or channel is None or not loads:
        raise RuntimeError(
            "the worker's log lines are missing (is the front at --log-level info?):\n" + "\n".join(lines[-30:])
        )
    last = max(load["at"] for load in loads)
    loads_ms = (last - channel) * 1e3
    phases = {k: sum(load[k] for load in loads) for k in PHASES}
    return {
        "total_ms": (up - killed) * 1e3,
        "spawn_ms": (listening - age_ms / 1e3 - killed) * 1e3,
        "start_ms": age_ms,
        "reconnect_ms": (channel - listening) * 1e3 - handshake_ms,
        "handshake_ms": handshake_ms,
        "loads_ms": loads_ms,
        **{f"{k}_ms": v for k, v in phases.items()},
        "front_ms": loads_ms - sum(load["total"] for load in loads),
        "ready_ms": (up - last) * 1e3,
        "key_releases": sum(1 for load in loads if load["source"] == "bundle") + (unlock is not None),
        "from_mirror": sum(1 for load in loads if load["source"] == "mirror"),
        "versions": len(loads),
        "unlock": unlock,
    }


# ---- the report ----------------------------------------------------------------------------------------
ROWS = (
    ("SIGKILL → new worker process (supervisor notices, 0.1 s back-off, spawn)", "spawn_ms"),
    ("process start → listening (interpreter, imports, identity, key provider)", "start_ms"),
    ("listening → front connects (its reconnect back-off, 0.05 s doubling to 1 s)", "reconnect_ms"),
    ("attestation handshake", "handshake_ms"),
    ("reload of every version (front: one at a time)", "loads_ms"),
    ("  bundle SHA-256 + signature check", "verify_ms"),
    ("  key release by the KMS (one per version)", "key_release_ms"),
    ("  bundle decryption", "decrypt_ms"),
    ("  mirror read (wait for the mirror key, decrypt, decode)", "mirror_read_ms"),
    ("  session build (ONNX Runtime)", "session_ms"),
    ("  mirror write (cold loads with a mirror only)", "mirror_write_ms"),
    ("  front side (bundle file read, frames, CBOR)", "front_ms"),
    ("last version loaded → first 200", "ready_ms"),
    ("**SIGKILL → first 200**", "total_ms"),
)


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for mode, kills in results.items():
        keys = [k for _, k in ROWS] + ["key_releases", "from_mirror", "versions"]
        out[mode] = {k: statistics.median(kill[k] for kill in kills) for k in keys}
        out[mode]["total_min_ms"] = min(kill["total_ms"] for kill in kills)
        out[mode]["total_max_ms"] = max(kill["total_ms"] for kill in kills)
        unlocks = [kill["unlock"]["ms"] for kill in kills if kill.get("unlock")]
        out[mode]["unlock_ms"] = statistics.median(unlocks) if unlocks else float("nan")
    return out


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    n = report["kills"]
    lines = [
        f"| median of {n} SIGKILLs, ms | cold | mirror |",
        "|---|---:|---:|",
    ]
    for label, key in ROWS:
        cold, mirror = s["cold"][key], s["mirror"][key]
        if key == "total_ms":
            lines.append(f"| {label} | **{cold:,.0f}** | **{mirror:,.0f}** |")
        else:
            lines.append(f"| {label} | {cold:,.1f} | {mirror:,.1f} |")
    lines.append(
        f"| SIGKILL → first 200, min to max | {s['cold']['total_min_ms']:,.0f} to {s['cold']['total_max_ms']:,.0f} "
        f"| {s['mirror']['total_min_ms']:,.0f} to {s['mirror']['total_max_ms']:,.0f} |"
    )
    lines.append(
        f"| key releases by the KMS per recovery | {s['cold']['key_releases']:.0f} | {s['mirror']['key_releases']:.0f} "
        f"(the mirror key, {s['mirror']['unlock_ms']:.1f} ms, in the background) |"
    )
    lines.append(
        f"| versions loaded from the mirror | {s['cold']['from_mirror']:.0f} | {s['mirror']['from_mirror']:.0f} |"
    )
    return "\n".join(lines)


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes" if dirty else "")


def install_signal_handlers() -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop the servers and remove the files."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="models from .bench/scenarios/image")
    p.add_argument("--small", type=int, default=4, help="tiny affine models added to the repository")
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs per mode, alternating")
    p.add_argument("--kms-latency-ms", type=float, default=0.0, help="round-trip time added before the KMS")
    p.add_argument("--out", type=Path, default=None, help="write the raw figures here (JSON)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, mirror, audit)")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    install_signal_handlers()
    started = dt.datetime.now(dt.timezone.utc)
    machine = machine_info()
    scratch = Path(tempfile.mkdtemp(prefix="bastion-recovery-"))
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    try:
        env = snapshot_code(scratch)
        built = build(scratch, models, args.small, env)
        print(
            f"{built.versions} confidential versions, {built.bundle_bytes / 1e6:.2f} MB of bundles; scratch {scratch}",
            file=sys.stderr,
        )
        with (
            kms_service(scratch, setup_kms(scratch, built), args.kms_latency_ms, env) as kms_url,
            fronts(scratch, built, kms_url, env) as running,
        ):
            mirrored = sorted((scratch / "mirror").glob("*/*.mirror"))
            print(f"fronts up; {len(mirrored)} versions mirrored", file=sys.stderr)
            for r in range(args.kills):
                order = MODES if r % 2 == 0 else MODES[::-1]
                for mode in order:
                    kill = kill_once(running[mode], built)
                    results[mode].append(kill)
                    print(
                        f"kill {r + 1} {mode:6s} {kill['total_ms']:7.0f} ms to the first 200 "
                        f"(start {kill['start_ms']:.0f}, reconnect {kill['reconnect_ms']:.0f}, "
                        f"loads {kill['loads_ms']:.0f}, key releases {kill['key_releases']}, "
                        f"from mirror {kill['from_mirror']})",
                        file=sys.stderr,
                    )
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "started": started.isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {**machine, "loadavg_after": list(os.getloadavg())},
        "command": " ".join([".venv/bin/python", "benchmarks/worker_recovery.py", *(argv or sys.argv[1:])]),
        "models": models,
        "small": args.small,
        "versions": built.versions,
        "bundle_bytes": built.bundle_bytes,
        "kms_latency_ms": args.kms_latency_ms,
        "kills": args.kills,
        "summary": summarize(results),
        "raw": results,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
