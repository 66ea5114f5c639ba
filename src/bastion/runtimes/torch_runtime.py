"""PyTorch models as TorchScript (``model.pt``) or torch.export (``model.pt2``), on CPU.

Never ``torch.load`` of a pickled ``nn.Module``: that unpickles, i.e. runs code from
the file. TorchScript archives and exported programs are loaded by torch's own
loaders, which rebuild tensors and a graph of torch operators rather than arbitrary
Python objects. They still run the model's graph, so treat them as code you deploy.

Neither format carries V2 names and datatypes, so config.yaml must declare the
inputs (passed positionally, in declared order) and outputs (a tensor, a tuple/list
in declared order, or a dict keyed by output name).

``parameters.intra_op_threads`` calls ``torch.set_num_threads``, which is process
wide: the last model loaded sets it for all torch models in the process.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from bastion.core.datatypes import numpy_dtype
from bastion.core.errors import InternalError, ModelNotReady
from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.runtimes import ModelLoadError, check_parameters, model_bytes, model_file, param
from bastion.runtimes.base import ModelFiles

PARAMETERS = ("file", "intra_op_threads")
# Default file per runtime name; plain "torch" takes whichever format is present.
_DEFAULT_FILES = {
    "torchscript": ("model.pt",),
    "torch_export": ("model.pt2",),
    "torch": ("model.pt2", "model.pt"),
}


def _import_torch(config: ModelConfig) -> Any:
    try:
        import torch
    except ImportError:
        raise ModelLoadError(
            f"{config.name}: the torch runtime needs the 'torch' extra: pip install 'bastion-serve[torch]' "
            "(pin a CPU build of torch on CPU machines)"
        ) from None
    return torch


class TorchRuntime:
    def __init__(self, config: ModelConfig, version_dir: Path, files: ModelFiles | None = None) -> None:
        check_parameters(config, PARAMETERS)
        if not config.inputs or not config.outputs:
            raise ModelLoadError(
                f"{config.name}: the torch runtime needs config.yaml to declare inputs and outputs "
                "(TorchScript and exported programs carry no tensor names or V2 datatypes)"
            )
        for kind, specs in (("inputs", config.inputs), ("outputs", config.outputs)):
            for i, spec in enumerate(specs):
                if spec.datatype == "BYTES":
                    raise ModelLoadError(f"{config.name}: {kind}[{i}] ({spec.name}): torch has no BYTES tensors")
        # The file first: a pickle is refused for what it is, with or without torch installed.
        if files is None:
            path = _find_file(config, version_dir)
            source: Any = str(path)
        else:  # a sealed bundle: torch's loaders read from a BytesIO, nothing touches the disk
            name, data = _find_bytes(config, version_dir, files)
            path, source = Path(name), io.BytesIO(data)
        torch = _import_torch(config)
        if "intra_op_threads" in config.parameters:
            threads = param(config, "intra_op_threads", 1, int)
            if threads < 1:
                raise ModelLoadError(f"{config.name}: parameters.intra_op_threads: expected >= 1")
            torch.set_num_threads(threads)
        try:
            if path.suffix == ".pt2":
                module = torch.export.load(source).module()
                self.platform = "pytorch_export"
            else:
                module = torch.jit.load(source, map_location="cpu")
                module.eval()
                self.platform = "pytorch_libtorch"  # Triton's name for TorchScript
        except Exception as exc:
            raise ModelLoadError(
                f"{config.name}: cannot load {path.name} as a "
                f"{'torch.export program' if path.suffix == '.pt2' else 'TorchScript archive'} "
                f"(save with {'torch.export.save' if path.suffix == '.pt2' else 'torch.jit.save'}; "
                f"pickled modules from torch.save are never loaded): {exc}"
            ) from exc
        self.name = config.name
        self._torch = torch
        self._module: Any = module
        self._inputs = config.inputs
        self._outputs = config.outputs
        self._out_dtypes = tuple(numpy_dtype(s.datatype) for s in config.outputs)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        module = self._module
        if module is None:
            raise ModelNotReady(f"{self.name}: this model version was unloaded")
        torch = self._torch
        # from_numpy shares memory; read-only buffers (decoded straight from a request)
        # get a copy, since torch tensors are always writable.
        args = [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in (inputs[s.name] for s in self._inputs)]
        with torch.inference_mode():
            out = module(*args)
        if isinstance(out, dict):
            values = [out[s.name] for s in self._outputs]
        elif isinstance(out, (tuple, list)):
            values = list(out)
        else:
            values = [out]
        if len(values) != len(self._outputs):
            raise InternalError(
                f"{self.name}: the model returned {len(values)} tensor(s) but config.yaml declares "
                f"{len(self._outputs)} output(s)"
            )
        result: dict[str, np.ndarray] = {}
        for spec, dtype, value in zip(self._outputs, self._out_dtypes, values, strict=True):
            array = value.detach().cpu().numpy()
            result[spec.name] = array if array.dtype == dtype else array.astype(dtype)
        return result

    def close(self) -> None:
        self._module = None


def _find_file(config: ModelConfig, version_dir: Path) -> Path:
    if "file" in config.parameters:
        return model_file(config, version_dir, "")
    candidates = _DEFAULT_FILES.get(config.runtime, _DEFAULT_FILES["torch"])
    for name in candidates:
        if (version_dir / name).is_file():
            return model_file(config, version_dir, name)
    # Let model_file produce the error (and name a stray pickle if there is one).
    return model_file(config, version_dir, candidates[-1])


def _find_bytes(config: ModelConfig, version_dir: Path, files: ModelFiles) -> tuple[str, bytes]:
    if "file" in config.parameters:
        return model_bytes(config, files, version_dir, "")
    candidates = _DEFAULT_FILES.get(config.runtime, _DEFAULT_FILES["torch"])
    for name in candidates:
        if name in files:
            return model_bytes(config, files, version_dir, name)
    return model_bytes(config, files, version_dir, candidates[-1])
