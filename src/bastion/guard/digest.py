"""Digests of tensors for the audit log: what was asked and answered, without the data."""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

import numpy as np

from bastion.core.tensors import InferTensor

# name + datatype, encoded once per tensor signature: hashed as one piece they give the
# same digest as hashed one after the other, for one call instead of four. Names come
# from clients (a refused request is digested too), so the table stops growing.
_LABELS: dict[tuple[str, str], bytes] = {}
_MAX_LABELS = 4096


def tensors_digest(tensors: Iterable[InferTensor]) -> str:
    """BLAKE2b-128 over each tensor's name, datatype and values (in row-major order).

    Equal requests give equal digests whatever the wire format (JSON, binary, gRPC),
    because it hashes the decoded values, so an auditor can match a query seen in a
    client's logs to its record. The shape is left out: it costs a formatting step per
    tensor on the hot path, and the values with the model's signature pin it down.
    BYTES elements are each preceded by their length (4 bytes, little-endian).
    """
    h = blake2b(digest_size=16)
    update = h.update
    labels = _LABELS
    for t in tensors:
        data = t.data
        key = (t.name, t.datatype)
        label = labels.get(key)
        if label is None:
            label = t.name.encode() + t.datatype.encode()
            if len(labels) < _MAX_LABELS:
                labels[key] = label
        update(label)
        if data.dtype.hasobject:
            for item in data.ravel():
                b = item if isinstance(item, bytes) else str(item).encode()
                update(len(b).to_bytes(4, "little"))
                update(b)
        else:
            # the buffer protocol: no copy. Asking numpy first whether the array is
            # C-contiguous costs more than the rare refusal (a transposed or sliced array)
            try:
                update(data)
            except (BufferError, ValueError):
                update(np.ascontiguousarray(data))
    return h.hexdigest()
