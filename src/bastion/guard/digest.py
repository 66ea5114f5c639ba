"""Digests of tensors for the audit log: what was asked and answered, without the data."""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

import numpy as np

from bastion.core.tensors import InferTensor


def tensors_digest(tensors: Iterable[InferTensor]) -> str:
    """BLAKE2b-128 over each tensor's name, datatype and values (in row-major order).

    Equal requests give equal digests whatever the wire format (JSON, binary, gRPC),
    because it hashes the decoded values, so an auditor can match a query seen in a
    client's logs to its record. The shape is left out: it costs a formatting step per
    tensor on the hot path, and the values with the model's signature pin it down.
    """
    h = blake2b(digest_size=16)
    update = h.update
    for t in tensors:
        data = t.data
        update(t.name.encode())
        update(t.datatype.encode())
        if data.dtype == object:
            for item in data.ravel():
                b = item if isinstance(item, bytes) else str(item).encode()
                update(len(b).to_bytes(4, "little"))
                update(b)
        elif data.flags.c_contiguous:
            update(data)  # the buffer protocol: no copy
        else:
            update(np.ascontiguousarray(data))
    return h.hexdigest()
