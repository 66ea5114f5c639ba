"""NVIDIA Triton Inference Server, from the ``tritonserver`` binary inside the ``nvidia-pytriton`` wheel.

No Docker engine runs here and NVIDIA's server images and tarballs are out of reach; the
one Triton build a package registry offers is the x86-64 Linux ``tritonserver`` that
PyTriton bundles. That build carries the **python backend only** (no onnxruntime, TensorRT
or other backend), so the model is a Triton python-backend model
(``peer_code/triton_model.py``) that runs the ONNX file with ONNX Runtime, with Bastion's
threading. Everything else is stock Triton: a model repository with ``config.pbtxt``,
``instance_group`` of ``KIND_CPU`` instances (one python-backend stub process each), and
the KServe V2 HTTP/REST protocol (``POST /v2/models/<name>/infer``, readiness at
``GET /v2/models/<name>/ready``).

PyTriton's own Python API (``Triton().bind(...)``) is not used: it puts a ZeroMQ proxy
between the server and a Python callable in the client's process. The suite starts the
binary directly, the way PyTriton itself starts it (``peer_code/triton_launch.py``).
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import numpy as np

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec
from bastion.bench.frameworks.v2json import decode_v2, encode_v2

PEER_CODE = Path(__file__).with_name("peer_code")
PYTRITON_VERSION = "0.7.0"

_TRITON_TYPES = {"FP32": "TYPE_FP32", "BYTES": "TYPE_STRING"}


def _dims(shape: tuple[int, ...]) -> str:
    # max_batch_size 0: the batch dimension is part of the dims, variable (-1)
    return "[ " + ", ".join(str(d) for d in (-1, *shape)) + " ]"


def model_config(model: ModelSpec, workers: int) -> str:
    """``config.pbtxt`` (protobuf text) of the python-backend model serving ``model``."""
    params = {"input_name": model.input_name, "output_name": model.output_name, "datatype": model.datatype}
    parameters = "\n".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
    return (
        f'name: "{model.name}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        f'input [ {{ name: "{model.input_name}" data_type: {_TRITON_TYPES[model.datatype]} '
        f"dims: {_dims(model.row_shape)} }} ]\n"
        f'output [ {{ name: "{model.output_name}" data_type: TYPE_FP32 dims: {_dims(model.output_row_shape)} }} ]\n'
        f"instance_group [ {{ count: {workers} kind: KIND_CPU }} ]\n"
        f"{parameters}\n"
    )


class Triton(Framework):
    name = "triton"
    package = "nvidia-pytriton"

    def requirements(self) -> list[str]:
        # nvidia-pytriton requires numpy<2, so numpy is pinned to the last 1.x, not Bastion's 2.x.
        return [f"nvidia-pytriton=={PYTRITON_VERSION}", "onnxruntime==1.31.1", "numpy==1.26.4"]

    def unavailable(self) -> str | None:
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            return (
                f"nvidia-pytriton ships tritonserver for x86-64 Linux only (this is "
                f"{platform.system()} {platform.machine()})"
            )
        return None

    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        repository = workdir / "repository"
        version_dir = repository / model.name / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model.onnx_path, version_dir / "model.onnx")
        shutil.copyfile(PEER_CODE / "triton_model.py", version_dir / "model.py")
        (repository / model.name / "config.pbtxt").write_text(model_config(model, workers), encoding="utf-8")
        shutil.copyfile(PEER_CODE / "triton_launch.py", workdir / "triton_launch.py")
        argv = [
            str(python),
            str(workdir / "triton_launch.py"),
            str(workdir / "backends"),
            f"--model-repository={repository}",
            "--http-address=127.0.0.1",
            f"--http-port={port}",
            "--allow-grpc=false",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--log-verbose=0",
        ]
        return Launch.v2(
            argv,
            port,
            model.name,
            workdir,
            notes=(
                f"tritonserver from nvidia-pytriton {PYTRITON_VERSION} (that build has only the python backend, "
                "no onnxruntime backend): a python-backend model runs the ONNX file with ONNX Runtime "
                f"(1 intra-op, 1 inter-op thread); instance_group {workers} x KIND_CPU ({workers} stub "
                "process(es)); no dynamic batching (max_batch_size 0); HTTP frontend default threads; "
                "gRPC and metrics endpoints off; KServe V2 JSON; numpy 1.26.4 (pytriton needs numpy<2)"
            ),
        )

    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        return encode_v2(model, rows)

    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        return decode_v2(model, body)
