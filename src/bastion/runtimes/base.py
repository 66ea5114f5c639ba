"""The one Runtime protocol every model format implements."""

from __future__ import annotations

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


class RuntimeFactory(Protocol):
    def __call__(self, config: ModelConfig, version_dir: Path) -> Runtime: ...
