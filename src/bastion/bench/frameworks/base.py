"""What every framework adapter of the benchmark suite provides.

An adapter knows how to serve one ONNX model (a scenario's export) with its framework,
inside the framework's own virtual environment, and how to speak that framework's
natural HTTP protocol: the request body for a batch of rows, and how to read the
model's first output back from the response (the suite checks it against ONNX Runtime
in-process before it measures anything, so every framework is proven to serve the same
model with the same answers).

Adapters run in Bastion's process and only *write files and build command lines*; the
framework's code runs in the child process, under the venv's interpreter. Nothing here
imports a peer framework.
"""

from __future__ import annotations

import abc
import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """One scenario model as every framework serves it."""

    scenario: str  # malware | crypto | image | sentiment
    name: str  # the model's name in URLs (the zoo variant's name, e.g. "image_cnn")
    onnx_path: Path  # absolute
    input_name: str
    datatype: str  # "FP32" or "BYTES" (then the rows are Python str)
    row_shape: tuple[int, ...]  # one row, without the batch dimension; () for BYTES
    output_name: str  # the output checked and returned (probabilities or forecast)
    output_row_shape: tuple[int, ...]  # one row of that output
    max_batch_size: int | None = None  # the most rows one request may carry (config.yaml); None: unset


@dataclass
class Launch:
    """How to start a prepared server and talk to it."""

    argv: list[str]
    port: int
    ready_url: str  # GET answers 200 once the model can be called
    infer_url: str  # POST the body from ``Framework.encode`` here
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)  # added to a clean copy of os.environ
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 180.0
    # ready answers in a row before the server counts as ready: each poll is a new connection
    # that the kernel may hand to any worker, so several workers need a longer streak
    ready_streak: int = 5
    stop_argv: list[str] | None = None  # run before signalling (e.g. `torchserve --stop`)
    notes: str = ""  # anything a reader of the results must know (worker counts, ...)

    @classmethod
    def local(cls, argv: list[str], port: int, ready_path: str, infer_path: str, cwd: Path, **options: Any) -> Launch:
        """A server on ``127.0.0.1:port``, its URLs given by their paths; ``options`` are the
        other fields."""
        base = f"http://127.0.0.1:{port}"
        return cls(argv=argv, port=port, ready_url=base + ready_path, infer_url=base + infer_path, cwd=cwd, **options)

    @classmethod
    def v2(cls, argv: list[str], port: int, model: str, cwd: Path, **options: Any) -> Launch:
        """An Open Inference Protocol (V2) server: the model's own ready and infer URLs."""
        return cls.local(argv, port, f"/v2/models/{model}/ready", f"/v2/models/{model}/infer", cwd, **options)


class Framework(abc.ABC):
    """A peer serving framework (or Bastion itself) as the suite drives it."""

    name: str = ""
    # The distribution whose version the report shows (``importlib.metadata`` name).
    package: str = ""

    @abc.abstractmethod
    def requirements(self) -> list[str]:
        """Exact pins for the framework's venv, installed in this order of groups:
        a ``torch==`` pin (if any) is installed first, alone, so nothing pulls a CUDA build."""

    def unavailable(self) -> str | None:
        """Why this framework cannot run on this machine (missing Java, no wheel...), or None."""
        return None

    @abc.abstractmethod
    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        """Write whatever the framework needs under ``workdir`` (empty, owned by the adapter)
        and return how to start it. ``python`` is the venv's interpreter; ``workers`` the
        number of serving processes the suite asks for (frameworks that cannot, say so in
        ``Launch.notes``)."""

    @abc.abstractmethod
    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        """The request body for ``rows`` (shape ``(n, *row_shape)``; dtype float32, or
        object holding str for BYTES), in the framework's usual JSON form."""

    @abc.abstractmethod
    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        """``model.output_name`` from a response body, shape ``(n, *output_row_shape)``."""


def rows_json(model: ModelSpec, rows: np.ndarray) -> list:
    """Rows as nested JSON lists (strings for a text model), as every JSON API takes them."""
    if model.datatype == "BYTES":
        return [str(t) for t in rows]
    return np.asarray(rows, dtype=np.float32).tolist()


def spec_json(model: ModelSpec, **extra: object) -> str:
    """The model as the server-side code reads it from a JSON file (it cannot import Bastion)."""
    doc: dict[str, object] = {
        "name": model.name,
        "onnx_path": str(model.onnx_path),
        "input_name": model.input_name,
        "datatype": model.datatype,
        "row_shape": list(model.row_shape),
        "output_name": model.output_name,
        **extra,
    }
    return json.dumps(doc, indent=2)


def pin_as_here(distribution: str) -> str:
    """``distribution`` pinned at the version in Bastion's own venv (ONNX Runtime: every
    server runs the same kernels; uvloop/httptools: the same HTTP stack)."""
    return f"{distribution}=={importlib.metadata.version(distribution)}"


def venv_env(python: Path) -> dict[str, str]:
    """What an activated venv gives a server: its ``bin`` first on ``PATH`` (servers that
    start tools by name, like ``uvicorn``), and unbuffered output for the log."""
    return {"PYTHONUNBUFFERED": "1", "PATH": os.pathsep.join([str(python.parent), os.environ.get("PATH", os.defpath)])}
