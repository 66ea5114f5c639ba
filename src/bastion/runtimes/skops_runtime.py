"""scikit-learn models saved with skops: the safe alternative to pickle/joblib.

skops stores the object tree as data and only instantiates types it trusts; any other
type in the file is refused before anything is constructed. Operators extend the trust
per model with ``parameters.trusted_types`` after reviewing the types named in the
refusal message.

Signature convention. config.yaml declares exactly one input and one or two outputs:

* one output: ``parameters.method`` (default ``predict_proba`` when the estimator has
  it, else ``predict``);
* two outputs (classifiers): ``outputs[0]`` is the label from ``predict`` and
  ``outputs[1]`` the scores from ``parameters.method`` (default ``predict_proba``).
  Both methods are called, so the label is exactly what scikit-learn predicts, even
  for estimators whose ``predict`` is not the argmax of their probabilities (SVC).

Numeric inputs are 2-D ``[batch, features]``; a BYTES input is text (a batch of UTF-8
strings, e.g. for a TfidfVectorizer pipeline). Outputs are cast to the declared
datatypes.

Import cost. ``skops.io`` builds its default trust list at import time from
``sklearn.utils.all_estimators()``, which walks and imports every scikit-learn
package, including the vendored array-API shims under
``sklearn.externals.array_api_compat`` (``torch``, ``cupy``, ``dask``) whose
``__init__`` imports the framework itself. With torch installed (the torch runtime's
extra), loading one skops model used to import all of torch: +180 MiB and ~2 s. Those
shims hold no estimator (``all_estimators`` skips ``externals``), so ``import_skops_io``
declines them for the duration of that one import, in the importing thread only; the
trust list comes out identical (checked in tests/runtimes/test_lazy_imports.py).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from bastion.core.datatypes import numpy_dtype
from bastion.core.errors import InvalidInput, ModelNotReady
from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.runtimes import ModelLoadError, UnsafeModelFormat, check_parameters, model_bytes, model_file, param
from bastion.runtimes.base import ModelFiles

PARAMETERS = ("file", "method", "trusted_types")


class SkopsRuntime:
    platform = "sklearn_skops"

    def __init__(self, config: ModelConfig, version_dir: Path, files: ModelFiles | None = None) -> None:
        check_parameters(config, PARAMETERS)
        if len(config.inputs) != 1 or len(config.outputs) not in (1, 2):
            raise ModelLoadError(
                f"{config.name}: the skops runtime needs config.yaml to declare exactly one input and "
                f"one or two outputs (label, probabilities); got {len(config.inputs)} input(s) and "
                f"{len(config.outputs)} output(s)"
            )
        (spec,) = config.inputs
        if spec.datatype != "BYTES" and len(spec.shape) != 2:
            raise ModelLoadError(
                f"{config.name}: inputs[0] ({spec.name}): scikit-learn takes [batch, features]; "
                f"got shape {list(spec.shape)}"
            )
        if files is None:
            model = load_trusted(config, model_file(config, version_dir, "model.skops"))
        else:  # a sealed bundle: skops reads the zip from memory
            name, data = model_bytes(config, files, version_dir, "model.skops")
            model = load_trusted(config, data, name=name)

        methods = ["predict"] if len(config.outputs) == 2 else []
        default = "predict_proba" if hasattr(model, "predict_proba") else "predict"
        methods.append(param(config, "method", default, str))
        for method in methods:
            if not callable(getattr(model, method, None)):
                raise ModelLoadError(
                    f"{config.name}: {type(model).__name__} has no method {method!r} "
                    f"(outputs {', '.join(s.name for s in config.outputs)} need {', '.join(methods)})"
                )
        self.name = config.name
        self._model: Any = model
        self._methods = tuple(methods)
        self._inputs = config.inputs
        self._outputs = config.outputs
        self._input_name = spec.name
        self._text_input = spec.datatype == "BYTES"
        self._out_dtypes = tuple(numpy_dtype(s.datatype) for s in config.outputs)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model = self._model
        if model is None:
            raise ModelNotReady(f"{self.name}: this model version was unloaded")
        x = inputs[self._input_name]
        if self._text_input:
            try:
                x = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in x.reshape(-1)]
            except UnicodeDecodeError:
                raise InvalidInput(f"{self._input_name}: BYTES element is not valid UTF-8 text") from None
        result: dict[str, np.ndarray] = {}
        for spec, dtype, method in zip(self._outputs, self._out_dtypes, self._methods, strict=True):
            result[spec.name] = _cast(np.asarray(getattr(model, method)(x)), spec, dtype)
        return result

    def close(self) -> None:
        self._model = None


def load_trusted(config: ModelConfig, source: Path | bytes, *, name: str | None = None) -> Any:
    """Load a skops file (a path, or its bytes named ``name``), trusting skops' defaults plus
    ``parameters.trusted_types`` only."""
    try:
        sio = import_skops_io()
    except ImportError:
        raise ModelLoadError(
            f"{config.name}: the skops runtime needs the 'sklearn' extra: pip install 'bastion-serve[sklearn]'"
        ) from None
    trusted = param(config, "trusted_types", [], list)
    if not all(isinstance(t, str) for t in trusted):
        raise ModelLoadError(f"{config.name}: parameters.trusted_types: expected a list of type names")
    in_memory = isinstance(source, bytes)
    label = name or (source.name if isinstance(source, Path) else "model.skops")
    try:
        untrusted = sio.get_untrusted_types(data=source) if in_memory else sio.get_untrusted_types(file=source)
    except Exception as exc:  # a zip that is not a skops dump, a newer protocol, ...
        raise ModelLoadError(f"{config.name}: {label} is not a readable skops file: {exc}") from exc
    refused = sorted(set(untrusted) - set(trusted))
    if refused:
        raise UnsafeModelFormat(
            f"{config.name}: refusing to load {label}: it contains types skops does not trust by "
            f"default: {', '.join(refused)}. Review them; if you trust this file, list them in "
            "config.yaml parameters.trusted_types"
        )
    try:
        return sio.loads(source, trusted=trusted) if in_memory else sio.load(source, trusted=trusted)
    except Exception as exc:
        raise ModelLoadError(f"{config.name}: skops cannot load {label}: {exc}") from exc


# scikit-learn's vendored array-API wrappers of other array libraries; each one imports
# its library. "numpy" and "common" are what scikit-learn itself uses.
_ARRAY_API_SHIMS = "sklearn.externals.array_api_compat."
_SHIMS_SKLEARN_NEEDS = frozenset({"numpy", "common", "_internal"})
_import_lock = threading.Lock()


class _DeclineArrayApiShims(importlib.abc.MetaPathFinder):
    """Makes ``sklearn.externals.array_api_compat.<library>`` unimportable in one thread
    while ``skops.io`` is first imported, unless ``<library>`` is already loaded (then
    the shim costs nothing and is left alone)."""

    def __init__(self, thread: int) -> None:
        self.thread = thread

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if threading.get_ident() != self.thread or not fullname.startswith(_ARRAY_API_SHIMS):
            return None
        library = fullname[len(_ARRAY_API_SHIMS) :].partition(".")[0]
        if library in _SHIMS_SKLEARN_NEEDS or library in sys.modules:
            return None
        # pkgutil.walk_packages (inside all_estimators) skips packages that raise ImportError.
        raise ModuleNotFoundError(f"{fullname} is not needed to load skops files", name=fullname)


def import_skops_io() -> ModuleType:
    """``skops.io``, imported without dragging in torch/cupy/dask (see the module doc)."""
    with _import_lock:
        if "skops.io" in sys.modules:  # imported before (or elsewhere, now: this waits for it)
            import skops.io

            return skops.io
        finder = _DeclineArrayApiShims(threading.get_ident())
        sys.meta_path.insert(0, finder)
        try:
            import skops.io
        finally:
            sys.meta_path.remove(finder)
        return skops.io


def _cast(values: np.ndarray, spec: TensorSpec, dtype: np.dtype) -> np.ndarray:
    if spec.datatype == "BYTES":
        out = np.empty(values.shape, dtype=object)
        out.reshape(-1)[:] = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values.flat]
        values = out
    elif values.dtype != dtype:
        values = values.astype(dtype)
    # predict gives [batch]; a declared [batch, 1] (or the reverse) only differs in layout.
    if values.ndim != len(spec.shape) and values.ndim in (1, 2) and len(spec.shape) in (1, 2):
        values = values.reshape(len(values), -1) if len(spec.shape) == 2 else values.reshape(-1)
    return values
