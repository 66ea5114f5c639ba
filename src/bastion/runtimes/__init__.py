"""Model runtimes: one ``Runtime`` protocol, one factory keyed by ``config.runtime``.

Runtime modules are imported lazily by the factory, so serving ONNX models never
imports scikit-learn or torch, and a missing optional extra only matters for the
models that need it.

This module also holds what every runtime shares: the load error, the refusal of
unsafe (pickle-based) files and the check of a declared signature against the
model's own. It must not import its runtime submodules at import time: they
import these helpers from here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bastion.core.errors import BastionError
from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.runtimes.base import ModelFiles, Runtime, RuntimeFactory

__all__ = [
    "RUNTIME_NAMES",
    "ModelFiles",
    "ModelLoadError",
    "Runtime",
    "RuntimeFactory",
    "UnsafeModelFormat",
    "check_parameters",
    "check_signature",
    "create_runtime",
    "merge_shape",
    "model_bytes",
    "model_file",
    "param",
]


class ModelLoadError(BastionError):
    """A model version cannot be loaded: bad files, or files that disagree with config.yaml.

    A 400 because it is the operator's input that is wrong (as Triton answers a failed
    repository load), never a bug in Bastion.
    """

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class UnsafeModelFormat(ModelLoadError):
    """The model file is in a format whose loading can run arbitrary code (pickle)."""


# Canonical runtime name -> "module:class"; aliases map onto canonical names.
_RUNTIMES: dict[str, str] = {
    "onnx": "bastion.runtimes.onnx_runtime:OnnxRuntime",
    "skops": "bastion.runtimes.skops_runtime:SkopsRuntime",
    "torch": "bastion.runtimes.torch_runtime:TorchRuntime",
}
_ALIASES: dict[str, str] = {
    "onnxruntime": "onnx",
    "sklearn": "skops",
    "torchscript": "torch",
    "torch_export": "torch",
}
RUNTIME_NAMES: frozenset[str] = frozenset(_RUNTIMES) | frozenset(_ALIASES)


# Extensions of formats that unpickle on load. Unpickling executes code chosen by
# whoever wrote the file, so a model repository (often writable by CI, or mounted
# from a bucket) must never be a path to code execution.
_PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".sav", ".dill", ".cloudpickle"})
_SAFE_ALTERNATIVES = (
    "export scikit-learn models to ONNX (bastion.runtimes.export.sklearn_to_onnx) or save them "
    "with skops.io.dump as model.skops; save PyTorch models with torch.jit.save or torch.export.save"
)


def create_runtime(config: ModelConfig, version_dir: Path, files: ModelFiles | None = None) -> Runtime:
    """Load the model version in ``version_dir`` (or held in ``files``, from a sealed bundle)
    with the runtime named by ``config.runtime``; a confidential model's version is loaded
    by the trusted worker instead (runtimes.worker_runtime)."""
    if config.confidential is not None:
        from bastion.runtimes.worker_runtime import WorkerRuntime

        return WorkerRuntime(config, Path(version_dir), files)
    if config.placement is not None:  # batches run on replicas in a Ray cluster
        from bastion.runtimes.ray_runtime import RayRuntime

        return RayRuntime(config, Path(version_dir), files)
    canonical = _ALIASES.get(config.runtime, config.runtime)
    target = _RUNTIMES.get(canonical)
    if target is None:
        raise ModelLoadError(
            f"{config.name}: unknown runtime {config.runtime!r}; expected one of {', '.join(sorted(RUNTIME_NAMES))}"
        )
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config, Path(version_dir), files)


def model_file(config: ModelConfig, version_dir: Path, default: str) -> Path:
    """Path of the model file (``parameters.file`` or ``default``) inside ``version_dir``.

    Refuses pickle-based files with the reason, and names that escape the version
    directory (``file: ../../secret``), since config.yaml may come from a less trusted
    source than the server's own filesystem.
    """
    path = version_dir / _file_name(config, default)
    _refuse_pickle(config.name, path)
    if not path.is_file():
        # A missing model file next to a pickle is the classic "I saved it with joblib"
        # mistake: name the pickle and say why it is ignored rather than "file not found".
        for other in sorted(version_dir.iterdir()) if version_dir.is_dir() else ():
            _refuse_pickle(config.name, other)
        raise ModelLoadError(f"{config.name}: model file {path.name!r} not found in {version_dir}")
    return path


def model_bytes(config: ModelConfig, files: ModelFiles, version_dir: Path, default: str) -> tuple[str, bytes]:
    """``model_file`` for a version held in memory: (file name, content), same checks and messages."""
    name = _file_name(config, default).replace(os.sep, "/")
    _refuse_pickle(config.name, Path(name))
    data = files.get(name)
    if data is None:
        for other in sorted(files):
            _refuse_pickle(config.name, Path(other))
        names = sorted(files)
        held = ", ".join(names[:10]) + (f", ... ({len(names)} files)" if len(names) > 10 else "") or "no files"
        raise ModelLoadError(f"{config.name}: model file {name!r} not found in {version_dir} (it holds {held})")
    return name, data


def _file_name(config: ModelConfig, default: str) -> str:
    name = config.parameters.get("file", default)
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"{config.name}: parameters.file: expected a file name, got {name!r}")
    # Checked on the name, not the resolved path: a symlink the operator placed in the
    # version directory (e.g. to shared storage) is theirs to make.
    relative = os.path.normpath(name)
    if os.path.isabs(relative) or relative == ".." or relative.startswith(".." + os.sep):
        raise ModelLoadError(f"{config.name}: parameters.file: {name!r} is outside the version directory")
    return relative


def _refuse_pickle(model: str, path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise UnsafeModelFormat(
            f"{model}: refusing to load {path.name}: pickle/joblib files run arbitrary code when "
            f"loaded, so Bastion never loads them; {_SAFE_ALTERNATIVES}"
        )


def check_parameters(config: ModelConfig, allowed: Iterable[str]) -> None:
    """Refuse unknown ``parameters`` keys, so a typo never silently drops a setting."""
    allowed = frozenset(allowed)
    unknown = sorted(set(config.parameters) - allowed)
    if unknown:
        raise ModelLoadError(
            f"{config.name}: parameters: unknown key(s) {', '.join(map(repr, unknown))} for runtime "
            f"{config.runtime!r}; expected some of {', '.join(sorted(allowed))}"
        )


def check_signature(
    config: ModelConfig, kind: str, declared: tuple[TensorSpec, ...], actual: Mapping[str, TensorSpec]
) -> None:
    """Check the tensors ``declared`` in config.yaml against the model's own (``actual``).

    Declared tensors must exist with the same datatype and rank; a fixed dim on both
    sides must agree. ``kind`` is "inputs" or "outputs", used in messages.
    """
    for i, spec in enumerate(declared):
        where = f"{config.name}: {kind}[{i}] ({spec.name})"
        model = actual.get(spec.name)
        if model is None:
            raise ModelLoadError(
                f"{where}: the model has no {kind[:-1]} named {spec.name!r}; "
                f"its {kind} are {', '.join(actual) or 'none'}"
            )
        if model.datatype != spec.datatype:
            raise ModelLoadError(f"{where}: config says {spec.datatype}, the model has {model.datatype}")
        # An empty model shape may be a scalar or an unknown rank (ONNX Runtime reports
        # both as []); the declared shape is then the only information there is.
        if model.shape and len(model.shape) != len(spec.shape):
            raise ModelLoadError(
                f"{where}: config shape {list(spec.shape)} has rank {len(spec.shape)}, "
                f"the model's {list(model.shape)} has rank {len(model.shape)}"
            )
        for d, (want, have) in enumerate(zip(spec.shape, model.shape or spec.shape, strict=True)):
            if want >= 0 and have >= 0 and want != have:
                raise ModelLoadError(
                    f"{where}: dim {d} is {want} in config but {have} in the model "
                    f"(config {list(spec.shape)}, model {list(model.shape)})"
                )


def merge_shape(declared: tuple[int, ...], model: tuple[int, ...]) -> tuple[int, ...]:
    """The most specific shape known from both sides (they were checked compatible)."""
    if len(declared) != len(model):  # the model's rank is unknown
        return declared
    return tuple(d if d >= 0 else m for d, m in zip(declared, model, strict=True))


def param(config: ModelConfig, key: str, default: Any, kinds: type | tuple[type, ...]) -> Any:
    """A typed runtime parameter, or a ModelLoadError naming it."""
    value = config.parameters.get(key, default)
    # bool is an int subclass; "threads: true" is a typo, not 1 thread.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        raise ModelLoadError(f"{config.name}: parameters.{key}: expected {_kind_names(kinds)}, got {value!r}")
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kinds))
