"""TensorFlow Serving: its REST predict API, and why the suite cannot run its server here.

TensorFlow Serving's server is the C++ binary ``tensorflow_model_server``. It is
distributed as Docker images and through Google's own apt repository; neither is
reachable from this machine (only PyPI, Debian's archive and npm are), no Docker engine
runs here, Debian 12 packages no TensorFlow at all, PyPI's ``tensorflow-serving-api`` is
the *client* API (protobuf stubs, no server, and it requires ``tensorflow``), and no PyPI
wheel or npm package bundles the server. So :meth:`TFServing.unavailable` always gives a
reason and the suite skips it; the adapter still implements the protocol (request body,
response reading, the command line the server would get) so that it is tested and ready.

The model would have to be a TensorFlow SavedModel: TF Serving does not load ONNX. The
ONNX → SavedModel export is deliberately not implemented while no server can run it.

Protocol: ``POST /v1/models/<name>:predict`` with ``{"instances": [...]}`` (row form),
answered by ``{"predictions": [...]}``; readiness ``GET /v1/models/<name>`` (TF Serving
opens its REST port only after the initial models are loaded).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec

SERVER_BINARY = "tensorflow_model_server"

NOT_INSTALLABLE = (
    "TensorFlow Serving's server (tensorflow_model_server) cannot be installed on this machine: it ships only "
    "as Docker images (no Docker engine here) and from Google's own apt repository (not reachable; only PyPI, "
    "Debian and npm are); Debian 12 has no TensorFlow package ('apt-cache search tensorflow' finds nothing); "
    "PyPI's tensorflow-serving-api 2.21.0 is the client API only (protobuf stubs, no server binary, requires "
    "tensorflow) and no PyPI wheel or npm package bundles the server"
)


def model_server_config(model: ModelSpec, base_path: Path) -> str:
    """``--model_config_file`` content (ModelServerConfig, protobuf text) serving ``model``."""
    return (
        "model_config_list {\n"
        "  config {\n"
        f'    name: "{model.name}"\n'
        f'    base_path: "{base_path}"\n'
        '    model_platform: "tensorflow"\n'
        "  }\n"
        "}\n"
    )


class TFServing(Framework):
    name = "tfserving"
    package = "tensorflow-serving-api"

    def requirements(self) -> list[str]:
        return []  # the server is a native binary no reachable registry provides

    def unavailable(self) -> str | None:
        found = shutil.which(SERVER_BINARY)
        if found:
            return (
                f"{found} exists, but the suite has no ONNX -> TensorFlow SavedModel export for TF Serving to load "
                "(not implemented: the server was not installable when the adapter was written)"
            )
        return NOT_INSTALLABLE

    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        base_path = workdir / "models" / model.name  # <base_path>/1/saved_model.pb would be the export
        base_path.mkdir(parents=True, exist_ok=True)
        config = workdir / "models.config"
        config.write_text(model_server_config(model, base_path), encoding="utf-8")
        argv = [
            SERVER_BINARY,
            "--port=0",  # no gRPC on TCP: gRPC goes to a UNIX socket in workdir
            f"--grpc_socket_path={workdir / 'grpc.sock'}",
            f"--rest_api_port={port}",
            f"--model_config_file={config}",
            "--file_system_poll_wait_seconds=0",
            "--tensorflow_intra_op_parallelism=1",
            "--tensorflow_inter_op_parallelism=1",
        ]
        base = f"http://127.0.0.1:{port}/v1/models/{model.name}"
        return Launch(
            argv=argv,
            port=port,
            ready_url=base,
            infer_url=f"{base}:predict",
            cwd=workdir,
            notes=(
                f"one tensorflow_model_server process (TF Serving has no worker processes; {workers} asked); "
                "TF session 1 intra-op, 1 inter-op thread; REST threads auto (number of CPUs); no batching; "
                "its REST port has no bind-address flag (listens on all interfaces)"
            ),
        )

    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        if model.datatype == "BYTES":
            instances: list[str] | np.ndarray = [str(v) for v in rows.reshape(-1)]
        else:
            instances = np.ascontiguousarray(rows, dtype=np.float32)
        return orjson.dumps(
            {"signature_name": "serving_default", "instances": instances}, option=orjson.OPT_SERIALIZE_NUMPY
        )

    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        response = orjson.loads(body)
        if "predictions" in response:  # row form: one entry per instance
            rows = response["predictions"]
            if rows and isinstance(rows[0], dict):  # a signature with several outputs: dicts by name
                rows = [row[model.output_name] for row in rows]
            out = np.asarray(rows, dtype=np.float32)
        elif "outputs" in response:  # columnar form (a request with "inputs")
            outputs = response["outputs"]
            out = np.asarray(outputs[model.output_name] if isinstance(outputs, dict) else outputs, dtype=np.float32)
        else:
            raise ValueError(f"no predictions in the response: {body[:200]!r}")
        return out.reshape((-1, *model.output_row_shape))
