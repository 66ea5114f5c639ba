"""TorchServe: a custom ``BaseHandler`` running ONNX Runtime, from a ``.mar`` archive.

``prepare`` packs ``model.onnx``, the handler (``peer_code/torchserve_handler.py``) and the
model's spec into ``<name>.mar`` with ``torch-model-archiver`` (TorchServe's venv), writes
``config.properties`` (every listener on 127.0.0.1, token auth off, ``workers`` backend
workers) and starts ``torchserve --foreground``. The body is the handler's JSON:
``{"data": rows}`` in, the output rows out.

``torchserve --start --foreground`` runs under ``peer_code/torchserve_launch.py``, which only
adds a readiness endpoint: TorchServe's own ``/ping`` reports "Healthy" before the workers
have loaded the model.

TorchServe keeps its pid file in Python's temp dir and its worker sockets in Java's; both
point to ``workdir/tmp`` (``TMPDIR`` / ``TEMP``) so that ``torchserve --stop`` and the
sockets only ever concern this run's server.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import orjson

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec, rows_json, spec_json
from bastion.bench.launcher import free_port

PEER_CODE = Path(__file__).with_name("peer_code")
HANDLER_FILE = "torchserve_handler.py"
LAUNCH_FILE = "torchserve_launch.py"
SPEC_FILE = "bench_model.json"
CONFIG_FILE = "config.properties"
MODEL_STORE = "model-store"
ARCHIVE_TIMEOUT_S = 300




def config_properties(
    workdir: Path, port: int, management_port: int, metrics_port: int, grpc_ports: tuple[int, int], workers: int
) -> str:
    """TorchServe's ``config.properties``: loopback listeners, no token auth, ``workers`` workers."""
    lines = [
        f"inference_address=http://127.0.0.1:{port}",
        f"management_address=http://127.0.0.1:{management_port}",
        f"metrics_address=http://127.0.0.1:{metrics_port}",
        "grpc_inference_address=127.0.0.1",
        f"grpc_inference_port={grpc_ports[0]}",
        "grpc_management_address=127.0.0.1",
        f"grpc_management_port={grpc_ports[1]}",
        f"model_store={workdir / MODEL_STORE}",
        f"default_workers_per_model={workers}",
        "disable_token_authorization=true",
        "enable_model_api=false",
        "install_py_dep_per_model=false",
    ]
    return "\n".join(lines) + "\n"


def archiver_argv(model: ModelSpec, workdir: Path, python: Path) -> list[str]:
    """``torch-model-archiver`` command line that writes ``workdir/model-store/<name>.mar``."""
    return [
        str(python.with_name("torch-model-archiver")),
        "--model-name",
        model.name,
        "--version",
        "1.0",
        "--serialized-file",
        str(model.onnx_path),
        "--handler",
        str(workdir / HANDLER_FILE),
        "--extra-files",
        str(workdir / SPEC_FILE),
        "--export-path",
        str(workdir / MODEL_STORE),
        "--force",
    ]


def run_archiver(argv: list[str], cwd: Path) -> None:
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=ARCHIVE_TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({out.returncode}): {out.stderr[-2000:]}")


class TorchServe(Framework):
    name = "torchserve"
    package = "torchserve"

    def requirements(self) -> list[str]:
        return [
            "torch==2.13.0",
            "torchserve==0.12.0",
            "torch-model-archiver==0.12.0",
            "pyyaml==6.0.3",  # imported by TorchServe's backend worker but not declared by it
            "onnxruntime==1.31.1",
            "numpy==2.4.6",
        ]

    def unavailable(self) -> str | None:
        if shutil.which("java") is None:
            return "TorchServe's frontend needs Java (11 or newer) on PATH; no `java` found"
        return None

    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        workdir.mkdir(parents=True, exist_ok=True)
        for sub in (MODEL_STORE, "tmp", "logs"):
            (workdir / sub).mkdir(exist_ok=True)
        for file in (HANDLER_FILE, LAUNCH_FILE):
            shutil.copyfile(PEER_CODE / file, workdir / file)
        (workdir / SPEC_FILE).write_text(spec_json(model), encoding="utf-8")
        management_port, metrics_port, ready_port = free_port(), free_port(), free_port()
        grpc_ports = (free_port(), free_port())
        (workdir / CONFIG_FILE).write_text(
            config_properties(workdir, port, management_port, metrics_port, grpc_ports, workers), encoding="utf-8"
        )
        run_archiver(archiver_argv(model, workdir, python), workdir)

        torchserve = str(python.with_name("torchserve"))
        base = f"http://127.0.0.1:{port}"
        env = {
            "TMPDIR": str(workdir / "tmp"),  # Python's temp dir: TorchServe's pid file
            "TEMP": str(workdir / "tmp"),  # -> java.io.tmpdir: worker sockets, unpacked models
            "LOG_LOCATION": str(workdir / "logs"),
            "METRICS_LOCATION": str(workdir / "logs"),
            "PYTHONUNBUFFERED": "1",
        }
        return Launch(
            argv=[
                str(python),
                LAUNCH_FILE,
                "--ready-port",
                str(ready_port),
                "--management-port",
                str(management_port),
                "--model",
                model.name,
                "--workers",
                str(workers),
                "--",
                torchserve,
                "--start",
                "--foreground",
                "--ncs",
                "--disable-token-auth",
                "--model-store",
                str(workdir / MODEL_STORE),
                "--models",
                f"{model.name}={model.name}.mar",
                "--ts-config",
                str(workdir / CONFIG_FILE),
            ],
            port=port,
            # TorchServe's /ping says "Healthy" while workers are still starting (or failing):
            # the launcher's /ready asks the management API for `workers` READY workers
            ready_url=f"http://127.0.0.1:{ready_port}/ready",
            infer_url=f"{base}/predictions/{model.name}",
            cwd=workdir,
            env=env,
            ready_timeout_s=240.0,
            stop_argv=[torchserve, "--stop", "--foreground"],
            notes=(
                f"TorchServe: Java frontend + {workers} Python backend worker(s) "
                f"(default_workers_per_model={workers}); batch_size=1 (no server-side batching), "
                "default netty threads, job_queue_size and metrics (log mode, system metrics every 60 s); "
                "custom BaseHandler with ONNX Runtime, 1 intra-op and 1 inter-op thread per worker"
            ),
        )

    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        return orjson.dumps({"data": rows_json(model, rows)})

    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        return np.asarray(orjson.loads(body), dtype=np.float32).reshape((-1, *model.output_row_shape))
