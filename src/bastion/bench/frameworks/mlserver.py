"""Seldon MLServer, serving the ONNX model through a small custom runtime.

MLServer has no ONNX runtime of its own; ``peer_code/mlserver_onnx_runtime.py`` is one
written the way MLServer's docs write custom runtimes (``MLModel`` with ``load`` and
``predict``, MLServer's codecs), with the same ONNX Runtime threading as Bastion's (one
intra-op, one inter-op thread). The protocol is MLServer's own: Open Inference Protocol
(V2) JSON on ``/v2/models/<name>/infer``.

Parallelism: MLServer runs one HTTP process, and with ``parallel_workers`` >= 1 (its
default is 1) hands every request to a pool of that many inference processes over IPC;
the suite's ``workers`` is that pool's size. ``workers=0`` (inference inline in the HTTP
process) is accepted too.

HTTP stack: MLServer's uvicorn on uvloop (pinned below 0.22, see ``UVLOOP_PIN``) with
httptools, the parser ``uvicorn[standard]`` brings and Bastion runs with: the same rule as
for the other uvicorn-based peers, so none is measured on uvicorn's slower fallbacks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec, pin_as_here
from bastion.bench.frameworks.v2json import decode_v2, encode_v2

MLSERVER_VERSION = "1.7.1"  # the latest on PyPI
# uvloop >= 0.22 breaks MLServer 1.7.1's parallel inference workers at start-up ("There is
# no current event loop", SeldonIO/MLServer#2286; the fix, #2285, is not released).
UVLOOP_PIN = "uvloop==0.21.0"
RUNTIME_MODULE = "mlserver_onnx_runtime"
PEER_CODE = Path(__file__).resolve().parent / "peer_code"




def _free_port() -> int:
    from bastion.bench.launcher import free_port

    return free_port()


class MLServerFramework(Framework):
    name = "mlserver"
    package = "mlserver"

    def requirements(self) -> list[str]:
        # onnxruntime: every server runs the same kernels. httptools: uvicorn's fast HTTP
        # parser, which Bastion's uvicorn has too (MLServer already brings uvloop).
        return [f"mlserver=={MLSERVER_VERSION}", UVLOOP_PIN, pin_as_here("httptools"), pin_as_here("onnxruntime")]

    def settings(self, workdir: Path, port: int, workers: int) -> dict[str, object]:
        """MLServer's ``settings.json``."""
        return {
            "host": "127.0.0.1",
            "http_port": port,
            "grpc_port": _free_port(),  # MLServer can't turn gRPC off; it idles on a free port
            "metrics_port": _free_port(),
            # debug (the default, True) turns on uvicorn's access log; Bastion runs with no
            # access log, so MLServer gets the same.
            "debug": False,
            "parallel_workers": workers,
            "environments_dir": str(workdir / ".envs"),
            "metrics_dir": str(workdir / ".metrics"),
        }

    def model_settings(self, model: ModelSpec) -> dict[str, object]:
        """``<model>/model-settings.json``: the runtime, the ONNX file, the tensors' metadata.

        The input's ``content_type`` is what MLServer's codecs go by: ``str`` decodes a BYTES
        tensor into a list of Python strings (``StringCodec``), ``np`` into an ndarray.
        """
        return {
            "name": model.name,
            "implementation": f"{RUNTIME_MODULE}.OnnxRuntime",
            "parameters": {"uri": str(model.onnx_path.resolve()), "version": "1"},
            "inputs": [
                {
                    "name": model.input_name,
                    "datatype": model.datatype,
                    "shape": [-1, *model.row_shape],
                    "parameters": {"content_type": "str" if model.datatype == "BYTES" else "np"},
                }
            ],
            "outputs": [{"name": model.output_name, "datatype": "FP32", "shape": [-1, *model.output_row_shape]}],
        }

    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        # absolute: the server runs with cwd=workdir (and a venv's python must not be resolved)
        workdir, python = workdir.resolve(), python.absolute()
        shutil.copyfile(PEER_CODE / f"{RUNTIME_MODULE}.py", workdir / f"{RUNTIME_MODULE}.py")
        (workdir / model.name).mkdir(parents=True, exist_ok=True)
        (workdir / "settings.json").write_text(
            json.dumps(self.settings(workdir, port, workers), indent=2), encoding="utf-8"
        )
        (workdir / model.name / "model-settings.json").write_text(
            json.dumps(self.model_settings(model), indent=2), encoding="utf-8"
        )
        processes = "inference in the HTTP process" if workers == 0 else f"{workers} inference process(es)"
        return Launch.v2(
            [str(python.with_name("mlserver")), "start", str(workdir)],
            port,
            model.name,
            workdir,
            env={"PYTHONPATH": str(workdir), "PYTHONUNBUFFERED": "1"},
            notes=f"parallel_workers={workers}: one HTTP process + {processes}; "
            "custom ONNX Runtime runtime (1 intra-op / 1 inter-op thread), uvloop + httptools, no access log",
        )

    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        return encode_v2(model, rows)

    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        return decode_v2(model, body)
