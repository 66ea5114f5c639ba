"""Ray Serve: a ``@serve.deployment`` running ONNX Runtime behind Ray Serve's HTTP proxy.

The application and its launcher are ``peer_code/rayserve_app.py``; it runs under Ray's
venv, starts a private single-node Ray cluster (no dashboard, loopback only, its own temp
dir) and deploys the model with ``num_replicas = workers``. The body is the deployment's
own JSON: ``{"instances": rows}`` in, ``{"predictions": rows}`` out.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

import numpy as np
import orjson

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec, rows_json, spec_json

PEER_CODE = Path(__file__).with_name("peer_code")
APP_FILE = "rayserve_app.py"
STOP_FILE = "rayserve_stop.py"
PID_FILE = "rayserve_driver.pid"
READY_FILE = "rayserve.ready"  # written by the launcher once serve.run returned
SPEC_FILE = "bench_model.json"
# Ray puts unix sockets under <temp dir>/session_<date>_<pid>/sockets/: AF_UNIX paths are
# limited to 107 bytes, so a temp dir longer than this moves to a short one under /tmp.
MAX_TEMP_DIR_LEN = 40




def ray_temp_dir(workdir: Path) -> Path:
    """Ray's temp dir for this run: ``workdir/ray``, or a short private one if that is too long."""
    inside = workdir.resolve() / "ray"
    if len(str(inside)) <= MAX_TEMP_DIR_LEN:
        return inside
    digest = hashlib.sha1(str(inside).encode()).hexdigest()[:12]
    return Path("/tmp") / f"bench-ray-{digest}"


class RayServe(Framework):
    name = "rayserve"
    package = "ray"

    def requirements(self) -> list[str]:
        return ["ray[serve]==2.60.0", "onnxruntime==1.31.1", "numpy==2.4.6"]

    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        workdir.mkdir(parents=True, exist_ok=True)
        for file in (APP_FILE, STOP_FILE):
            shutil.copyfile(PEER_CODE / file, workdir / file)
        (workdir / SPEC_FILE).write_text(spec_json(model), encoding="utf-8")
        temp_dir = ray_temp_dir(workdir)
        temp_dir.mkdir(parents=True, exist_ok=True)
        if temp_dir != workdir.resolve() / "ray":
            (workdir / "ray").symlink_to(temp_dir, target_is_directory=True)
        base = f"http://127.0.0.1:{port}"
        return Launch(
            argv=[
                str(python),
                APP_FILE,
                SPEC_FILE,
                "--port",
                str(port),
                "--replicas",
                str(workers),
                "--temp-dir",
                str(temp_dir),
                "--pid-file",
                PID_FILE,
                "--ready-file",
                READY_FILE,
            ],
            port=port,
            ready_url=f"{base}/",
            infer_url=f"{base}/",
            cwd=workdir,
            env={
                "PYTHONUNBUFFERED": "1",
                "RAY_USAGE_STATS_ENABLED": "0",  # no usage-stats reporting
                "RAY_ADDRESS": "",  # never join another cluster
                # single-node mode: the node address is 127.0.0.1, not the machine's IP
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                # marks this run's processes: Ray's workers leave the launcher's process
                # group, so rayserve_stop.py finds them by this variable instead
                "BENCH_RAY_TAG": uuid.uuid4().hex,
            },
            ready_timeout_s=240.0,
            stop_argv=[str(python), STOP_FILE, PID_FILE],
            notes=(
                f"Ray Serve: {workers} replica(s) (num_replicas={workers}, num_cpus=1 each) on a private "
                "single-node Ray cluster (num_cpus=max(replicas, cores), no dashboard); one HTTP proxy actor "
                "(Ray Serve's default), default max_ongoing_requests, no @serve.batch; ONNX Runtime with "
                "1 intra-op and 1 inter-op thread per replica. Ray's GCS, raylet and controller also run "
                "on the same cores."
            ),
        )

    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        return orjson.dumps({"instances": rows_json(model, rows)})

    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        out = orjson.loads(body)["predictions"]
        return np.asarray(out, dtype=np.float32).reshape((-1, *model.output_row_shape))
