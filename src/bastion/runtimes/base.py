"""The one Runtime protocol every model format implements."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from bastion.core.metadata import ModelConfig, TensorSpec


@runtime_checkable
class Runtime(Protocol):
    """A loaded model version.

    ``predict`` is called from executor threads, possibly several at once, with a
    whole batch (first dim = batch when the model batches). It must be thread-safe
    and return every output the model has, as numpy arrays keyed by output name.
    BYTES tensors are object arrays of ``bytes``.
    """

    platform: str

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


# A version's files held in memory (a decrypted sealed bundle): path inside the version
# directory ("model.onnx") -> content. Never written to disk.
ModelFiles = Mapping[str, bytes]


class RuntimeFactory(Protocol):
    """Loads one model version from ``version_dir``, or from ``files`` when given (then
    ``version_dir`` only names the version in messages and nothing is read from disk)."""

    def __call__(self, config: ModelConfig, version_dir: Path, files: ModelFiles | None = None) -> Runtime: ...
