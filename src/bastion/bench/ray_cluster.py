"""A local Ray cluster for tests and benchmarks: a head and extra worker nodes, each a
``ray start`` of its own on this machine, stopped (its processes only) on exit.

Every port Ray would otherwise pick from its fixed defaults (6379, 8265, 10001, 44217,
52365, ...) is given explicitly from ``bench.launcher.free_port()``, so two clusters (the
test suite's parallel workers) never meet, and each cluster has its own ``--temp-dir``.

Ray binds the node's routable address, not loopback: ``ray start`` and ``ray.init``
both turn ``127.0.0.1`` into the address a remote node would use (``resolve_ip_for_localhost``),
and a driver given a loopback address looks for the GCS on the routable one. So the
cluster's ``address`` is ``<this host's IP>:<gcs port>``; its gRPC servers listen on every
interface for as long as the cluster runs (Ray's own design: a Ray cluster trusts its
network). Token authentication (``RAY_AUTH_MODE=token``) is left to the operator.

Stopping never calls ``ray stop``, which stops every Ray process on the machine: each
``ray start`` runs in a session of its own, so its daemons share its process group, and
the group is signalled (SIGTERM, then SIGKILL after a grace period); workers a raylet
spawned are found by the cluster's temp dir in their command line and signalled too.

Measured on the 2-core VM (nice 10): the head's ``ray start`` takes 5-7 s, a worker node's
3-4 s, so about 10 s until both nodes are alive; the deadline is generous (120 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bastion.bench.launcher import free_port

__all__ = ["RayCluster", "ray_cluster", "ray_unavailable"]

# ports a node's Ray workers may use (one per worker process: actors, idle pool, drivers)
WORKER_PORTS_PER_NODE = 16
# object store per node: small, the tests' tensors are kilobytes (Ray's default is 30 % of RAM)
OBJECT_STORE_BYTES = 100 * 1024 * 1024


def ray_unavailable() -> str | None:
    """Why a Ray cluster cannot be started here, or None."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return f"ray is not installed ({exc}); pip install 'ray[default]'"
    if _ray_cli() is None:
        return f"the `ray` command is not beside {sys.executable}"
    return None


def _ray_cli() -> str | None:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() else shutil.which("ray")


@dataclass
class RayCluster:
    """A running local cluster. ``address``: what ``ray.init(address=...)`` and ``RAY_ADDRESS``
    take; ``start_s``: seconds from the first ``ray start`` until every node was alive."""

    address: str
    temp_dir: Path
    nodes: int
    start_s: float = 0.0
    node_start_s: list[float] = field(default_factory=list)
    _groups: list[int] = field(default_factory=list)
    _log_paths: list[Path] = field(default_factory=list)

    def alive_nodes(self, timeout_s: float = 5.0) -> int:
        """Nodes the GCS reports alive (asked directly: no driver is started for it)."""
        return len(_alive_nodes(self.address, timeout_s))

    def logs(self) -> str:
        """The ``ray start`` outputs (for a failure message)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in self._log_paths if p.exists())

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop this cluster's processes, and only them."""
        for pgid in self._groups:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._own_pids():
            time.sleep(0.1)
        for pgid in self._groups:
            _signal_group(pgid, signal.SIGKILL)
        for pid in self._own_pids():  # workers that left the group (a raylet may setsid them)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._groups.clear()

    def _own_pids(self) -> list[int]:
        """Live processes of this cluster: in one of its process groups, or naming its temp dir."""
        marker = str(self.temp_dir).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                ours = (pid != os.getpid() and os.getpgid(pid) in self._groups) or marker in (
                    entry / "cmdline").read_bytes()
                if ours and _state(entry) not in ("Z", "X"):
                    pids.append(pid)
            except (OSError, ProcessLookupError):
                continue
        return pids


@contextlib.contextmanager
def ray_cluster(nodes: int = 2, *, num_cpus: int = 1, start_timeout_s: float = 120.0,
                keep_temp: bool = False, attempts: int = 2) -> Iterator[RayCluster]:
    """A head plus ``nodes - 1`` worker nodes, ``num_cpus`` CPUs each, alive when this yields.
    A start that fails (a port taken by another process between ``free_port`` and Ray's bind)
    is stopped and tried again, ``attempts`` times in all."""
    cli = _ray_cli()
    if cli is None:
        raise RuntimeError(ray_unavailable() or "ray is not installed")
    for attempt in range(1, attempts + 1):
        # short: Ray's Unix sockets live under it and sun_path holds 107 bytes
        temp_dir = Path(tempfile.mkdtemp(prefix="bray-", dir="/tmp"))
        cluster = RayCluster(address="", temp_dir=temp_dir, nodes=nodes)
        try:
            try:
                _start_cluster(cli, cluster, num_cpus, start_timeout_s)
            except (RuntimeError, TimeoutError):
                if attempt == attempts:
                    raise
                continue  # the finally below stops what started
            yield cluster
            return
        finally:
            cluster.stop()
            if not keep_temp:
                shutil.rmtree(temp_dir, ignore_errors=True)


def _start_cluster(cli: str, cluster: RayCluster, num_cpus: int, start_timeout_s: float) -> None:
    ports = _Ports()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # `ray start --address` must not be overridden
    # the autoscaler monitor's metrics port is fixed (44217) unless set here
    env["AUTOSCALER_METRIC_PORT"] = str(ports.take())
    gcs_port = ports.take()
    t0 = time.monotonic()
    head = [
        cli, "start", "--head", "--port", str(gcs_port),
        "--ray-client-server-port", str(ports.take()),
        "--include-dashboard", "false", "--dashboard-port", str(ports.take()),
        "--temp-dir", str(cluster.temp_dir), *_node_args(ports, num_cpus),
    ]
    _start(cluster, head, env, cluster.temp_dir / "ray-start-head.log", start_timeout_s)
    cluster.address = f"{_node_ip()}:{gcs_port}"
    for i in range(1, cluster.nodes):
        t1 = time.monotonic()
        node = [cli, "start", "--address", cluster.address, *_node_args(ports, num_cpus)]
        _start(cluster, node, env, cluster.temp_dir / f"ray-start-node{i}.log", start_timeout_s)
        cluster.node_start_s.append(time.monotonic() - t1)
    deadline = t0 + start_timeout_s
    while len(_alive_nodes(cluster.address, 5.0)) < cluster.nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{cluster.nodes} Ray nodes not alive within {start_timeout_s:g} s:\n{cluster.logs()}")
        time.sleep(0.2)
    cluster.start_s = time.monotonic() - t0


class _Ports:
    """Free ports, none handed out twice: ``free_port`` checks that a port is free now, and
    the ~40 a cluster needs are all chosen before Ray binds any of them."""

    def __init__(self) -> None:
        self._given: set[int] = set()

    def take(self) -> int:
        for _ in range(1000):
            port = free_port()
            if port not in self._given:
                self._given.add(port)
                return port
        raise RuntimeError("no free port left")


def _node_args(ports: _Ports, num_cpus: int) -> list[str]:
    worker_ports = ",".join(str(ports.take()) for _ in range(WORKER_PORTS_PER_NODE))
    return [
        "--node-manager-port", str(ports.take()), "--object-manager-port", str(ports.take()),
        "--worker-port-list", worker_ports,
        "--dashboard-agent-listen-port", str(ports.take()), "--dashboard-agent-grpc-port", str(ports.take()),
        "--runtime-env-agent-port", str(ports.take()), "--metrics-export-port", str(ports.take()),
        "--num-cpus", str(num_cpus), "--num-gpus", "0", "--object-store-memory", str(OBJECT_STORE_BYTES),
        "--disable-usage-stats",
    ]


def _start(cluster: RayCluster, cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> None:
    """Run one ``ray start`` (it returns once its daemons are up) in a session of its own,
    whose process group its daemons keep."""
    cluster._log_paths.append(log)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        cluster._groups.append(proc.pid)  # the session leader's pid is the group id
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"`{' '.join(cmd[:3])}` did not return within {timeout_s:g} s:\n"
                               f"{cluster.logs()}") from None
    if rc != 0:
        raise RuntimeError(f"`{' '.join(cmd[:3])}` exited with {rc}:\n{cluster.logs()}")


def _node_ip() -> str:
    # the address Ray itself chose for the head (see the module doc): the one drivers must use
    from ray._private import services

    return str(services.get_node_ip_address())


def _alive_nodes(address: str, timeout_s: float) -> list[object]:
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    try:
        client = GcsClient(address=address)
        infos = client.get_all_node_info(timeout=timeout_s, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
    except Exception:  # the GCS is not answering yet
        return []
    return list(infos.values())


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _state(proc_dir: Path) -> str:
    try:
        stat = (proc_dir / "stat").read_text()
    except OSError:
        return "X"
    return stat.rsplit(")", 1)[-1].split()[0]


if __name__ == "__main__":  # `python -m bastion.bench.ray_cluster`: start, report, hold until Ctrl-C
    with ray_cluster() as c:
        print(f"address {c.address}  temp {c.temp_dir}  started in {c.start_s:.1f} s "
              f"(worker nodes {', '.join(f'{s:.1f}' for s in c.node_start_s)} s)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
