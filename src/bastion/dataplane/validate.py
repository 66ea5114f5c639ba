"""Validation against a model's signature, and the choice of outputs: pure functions.

``validate_inputs`` checks what a client sent (names, datatypes, shapes with -1 = any,
the batch against ``max_batch_size``, NaN/Inf unless the model allows them) and hands
the arrays to the batcher; ``select_outputs`` builds the response from what the model
returned, keeping only the outputs the client asked for. Every refusal is an
``InvalidInput`` (400) that names the field.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from bastion.core.datatypes import FLOAT_DATATYPES
from bastion.core.errors import InvalidInput
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor
from bastion.dataplane.registry import Served


def validate_inputs(served: Served, request: InferenceRequest) -> tuple[dict[str, np.ndarray], int]:
    """The input arrays by name and the request's rows along the batch dimension (1 for a
    model without batching)."""
    specs = served.inputs
    arrays: dict[str, np.ndarray] = {}
    rows = -1
    batching = served.max_batch_size > 0
    for tensor in request.inputs:
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(
                f"unknown input '{name}' for model '{request.model_name}'; expected inputs: " + ", ".join(specs)
            )
        if name in arrays:
            raise InvalidInput(f"input '{name}' appears more than once")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(f"input '{name}': datatype {tensor.datatype} does not match the model's {spec.datatype}")
        data = tensor.data
        shape = data.shape
        expected = spec.shape
        if len(shape) != len(expected) or any(e != -1 and e != d for e, d in zip(expected, shape, strict=True)):
            raise InvalidInput(
                f"input '{name}': shape {list(shape)} does not match the model's {list(expected)} (-1 = any size)"
            )
        if batching:
            n = shape[0]
            if rows == -1:
                rows = n
                if n == 0:
                    raise InvalidInput(f"input '{name}': the batch dimension (first dim) is 0")
                if n > served.max_batch_size:
                    raise InvalidInput(
                        f"input '{name}': batch size {n} exceeds the model's max_batch_size {served.max_batch_size}"
                    )
            elif n != rows:
                raise InvalidInput(f"input '{name}': batch size {n} differs from the other inputs' {rows}")
        if (
            served.check_finite
            and not tensor.finite
            and spec.datatype in FLOAT_DATATYPES
            and not np.isfinite(data).all()
        ):
            raise InvalidInput(
                f"input '{name}' contains NaN or Inf; model '{request.model_name}' accepts finite values only"
            )
        arrays[name] = data
    if len(arrays) != len(specs):
        missing = [n for n in specs if n not in arrays]
        raise InvalidInput(f"missing input(s) {', '.join(repr(m) for m in missing)} for model '{request.model_name}'")
    return arrays, max(rows, 1)


def select_outputs(served: Served, request: InferenceRequest, outputs: dict[str, np.ndarray]) -> InferenceResponse:
    """The response: the requested outputs (all when none are named), typed as the
    signature says, under the request's model name and the serving version."""
    types = served.output_types
    names: Iterable[str] = types  # all of them, in signature order
    if request.outputs:
        names = []
        for wanted in request.outputs:
            if wanted.name not in types:
                raise InvalidInput(
                    f"requested output '{wanted.name}' is not an output of model "
                    f"'{request.model_name}'; available: {', '.join(sorted(types))}"
                )
            names.append(wanted.name)
    tensors = []
    for name in names:
        arr = outputs[name]
        tensors.append(InferTensor(name, types[name], arr.shape, arr))
    return InferenceResponse(request.model_name, served.version, tensors, id=request.id)
