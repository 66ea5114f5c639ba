"""Plain request/response types shared by every transport, the data plane and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class InferTensor:
    """One named tensor. ``data`` is a numpy array of the datatype's dtype and ``shape``.

    BYTES tensors hold an object array of ``bytes`` elements.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)
    # set by a codec that has proven every value finite (JSON numbers always are), so the
    # data plane can skip its NaN/Inf scan
    finite: bool = False


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceRequest:
    model_name: str
    model_version: str | None
    inputs: list[InferTensor]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceResponse:
    model_name: str
    model_version: str | None
    outputs: list[InferTensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
