"""ONNX Runtime: the default, fastest and safest way to serve a model.

Threading. ``intra_op_threads`` defaults to 1, unlike ONNX Runtime's default of one
thread per core. Bastion runs several batches at once from its executor threads and
scales out with worker processes; a per-session pool of N threads on top of that
oversubscribes the cores (executors x N threads), and ORT's pool threads spin-wait
between batches, burning CPU that other requests need. For small models (a few
microseconds per row) splitting one operator across threads also costs more in
synchronisation than it saves. Raise it for large models served with few requests
in flight.

Telemetry. ONNX Runtime (1.29 and later, on Linux) records usage events, keeps a device
id and an event queue under ~/.cache/Microsoft and uploads them to Microsoft, unless
``ORT_DISABLE_TELEMETRY=1`` is set before onnxruntime is imported. A model server must
not phone home by default, so this module sets it when the operator has not set the
variable either way; it is the one place the server imports onnxruntime (lazily, with
the first ONNX model), and other code that needs onnxruntime imports ``ort`` from here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # read once, when onnxruntime initialises

import onnxruntime as ort

from bastion.core.errors import InvalidInput, ModelNotReady
from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.runtimes import (
    ModelLoadError,
    check_parameters,
    check_signature,
    merge_shape,
    model_bytes,
    model_file,
    param,
)
from bastion.runtimes.base import ModelFiles

log = logging.getLogger("bastion.runtimes")

_ORT_TO_DATATYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_EXECUTION_MODE = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}
PARAMETERS = (
    "file",
    "intra_op_threads",
    "inter_op_threads",
    "graph_optimization",
    "execution_mode",
    "providers",
    "allow_spinning",
    "ort_extensions",
)

try:  # ORT's pybind exception for bad feeds (wrong shape/dtype): the client's mistake, a 400
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as _OrtInvalidArgument
except ImportError:  # pragma: no cover - layout of a future ORT
    _OrtInvalidArgument = ValueError  # type: ignore[assignment,misc]


class OnnxRuntime:
    """One ONNX model version in one ``onnxruntime.InferenceSession`` (thread-safe ``run``)."""

    platform = "onnxruntime_onnx"

    def __init__(self, config: ModelConfig, version_dir: Path, files: ModelFiles | None = None) -> None:
        check_parameters(config, PARAMETERS)
        source: str | bytes
        if files is None:
            path = model_file(config, version_dir, "model.onnx")
            source, label = str(path), path.name
        else:  # a sealed bundle: ORT parses the bytes, nothing touches the disk
            label, source = model_bytes(config, files, version_dir, "model.onnx")
        options = session_options(config)
        providers = _providers(config)
        try:
            session = ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises several unrelated pybind types (Fail, InvalidGraph, ...)
            raise ModelLoadError(f"{config.name}: ONNX Runtime cannot load {label}: {exc}") from exc

        model_inputs = {a.name: _spec(config, a, "input") for a in session.get_inputs()}
        model_outputs = {a.name: _spec(config, a, "output") for a in session.get_outputs()}
        check_signature(config, "inputs", config.inputs, model_inputs)
        check_signature(config, "outputs", config.outputs, model_outputs)
        if config.inputs:
            missing = sorted(set(model_inputs) - {s.name for s in config.inputs})
            if missing:
                raise ModelLoadError(
                    f"{config.name}: inputs: the model also needs {', '.join(missing)}, "
                    "which config.yaml does not declare"
                )
        self._inputs = _resolve(config.inputs, model_inputs)
        # Declared outputs may be a subset: only those are computed and returned.
        self._outputs = _resolve(config.outputs, model_outputs)
        if config.max_batch_size > 0:
            _check_batch_dim(config, self._inputs + self._outputs)

        self.name = config.name
        self._session: ort.InferenceSession | None = session
        # what ONNX Runtime actually uses (a requested provider can fail to initialise)
        self.providers: list[str] = list(session.get_providers())
        self._output_names = [s.name for s in self._outputs]
        self._bytes_inputs = tuple(s.name for s in self._inputs if s.datatype == "BYTES")
        self._bytes_outputs = tuple(s.name for s in self._outputs if s.datatype == "BYTES")

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Hot path: one session.run, no copies of numeric tensors. The local reference
        # keeps the session alive for a call in flight while close() runs.
        session = self._session
        if session is None:
            raise ModelNotReady(f"{self.name}: this model version was unloaded")
        if self._bytes_inputs:
            inputs = dict(inputs)
            for name in self._bytes_inputs:
                inputs[name] = _to_str_array(name, inputs[name])
        try:
            results = session.run(self._output_names, inputs)
        except _OrtInvalidArgument as exc:
            raise InvalidInput(f"{self.name}: {exc}") from None
        outputs = dict(zip(self._output_names, results, strict=True))
        for name in self._bytes_outputs:
            outputs[name] = _to_bytes_array(outputs[name])
        return outputs

    def close(self) -> None:
        # Dropping the reference frees the session once calls in flight return.
        self._session = None


def session_options(config: ModelConfig) -> ort.SessionOptions:
    """``onnxruntime.SessionOptions`` from ``config.parameters`` (see the module doc on threads)."""
    options = ort.SessionOptions()
    intra = param(config, "intra_op_threads", 1, int)
    inter = param(config, "inter_op_threads", 1, int)
    for key, value in (("intra_op_threads", intra), ("inter_op_threads", inter)):
        if value < 0:
            raise ModelLoadError(f"{config.name}: parameters.{key}: expected >= 0 (0 = one per core)")
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = inter
    options.graph_optimization_level = _choice(config, "graph_optimization", "all", _GRAPH_OPTIMIZATION)
    options.execution_mode = _choice(config, "execution_mode", "sequential", _EXECUTION_MODE)
    if "allow_spinning" in config.parameters:
        spin = param(config, "allow_spinning", True, bool)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    if param(config, "ort_extensions", False, bool):
        # Custom ops (e.g. BertTokenizer, domain ai.onnx.contrib) that put tokenisation in the graph.
        try:
            import onnxruntime_extensions
        except ImportError:
            raise ModelLoadError(
                f"{config.name}: parameters.ort_extensions is true but onnxruntime-extensions is not "
                "installed: pip install onnxruntime-extensions"
            ) from None
        options.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    return options


def _choice(config: ModelConfig, key: str, default: str, choices: dict[str, object]) -> object:
    value = config.parameters.get(key, default)
    if value not in choices:
        raise ModelLoadError(f"{config.name}: parameters.{key}: expected one of {', '.join(choices)}, got {value!r}")
    return choices[value]


def _providers(config: ModelConfig) -> list[str]:
    requested = param(config, "providers", ["CPUExecutionProvider"], list)
    available = set(ort.get_available_providers())
    chosen = [p for p in requested if p in available]
    skipped = [p for p in requested if p not in available]
    if skipped:
        log.warning(
            "execution providers not available, skipped",
            extra={"model": config.name, "skipped": skipped, "available": sorted(available)},
        )
    return chosen or ["CPUExecutionProvider"]


def _spec(config: ModelConfig, arg: ort.NodeArg, kind: str) -> TensorSpec:
    datatype = _ORT_TO_DATATYPE.get(arg.type)
    if datatype is None:
        hint = (
            " (a scikit-learn classifier exported with zipmap? export with zipmap disabled)"
            if (arg.type.startswith(("seq(", "map(")))
            else ""
        )
        raise ModelLoadError(
            f"{config.name}: {kind} {arg.name!r} has type {arg.type}, which has no Open Inference "
            f"Protocol datatype{hint}"
        )
    # Symbolic ("batch") and unknown (None) dims are variable: -1.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


def _resolve(declared: tuple[TensorSpec, ...], model: dict[str, TensorSpec]) -> tuple[TensorSpec, ...]:
    if not declared:
        return tuple(model.values())
    return tuple(TensorSpec(s.name, s.datatype, merge_shape(s.shape, model[s.name].shape)) for s in declared)


def _check_batch_dim(config: ModelConfig, specs: tuple[TensorSpec, ...]) -> None:
    for spec in specs:
        if not spec.shape or spec.shape[0] != -1:
            raise ModelLoadError(
                f"{config.name}: max_batch_size is {config.max_batch_size}, so the first dim of every "
                f"tensor is the batch dim and must be variable, but {spec.name!r} has shape "
                f"{list(spec.shape)}; export the model with a dynamic first axis, declare the tensor in "
                "config.yaml if its shape is unknown to the model, or set max_batch_size: 0"
            )


def _to_str_array(name: str, array: np.ndarray) -> np.ndarray:
    # ORT string tensors take Python str; it would silently str() a bytes object ("b'x'").
    if array.dtype.kind == "U":
        return array
    out = np.empty(array.shape, dtype=object)
    try:
        out.reshape(-1)[:] = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in array.flat]
    except UnicodeDecodeError:
        raise InvalidInput(f"{name}: BYTES element is not valid UTF-8; ONNX string tensors are text") from None
    return out


def _to_bytes_array(array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    out.reshape(-1)[:] = [x.encode("utf-8") if isinstance(x, str) else x for x in array.flat]
    return out
