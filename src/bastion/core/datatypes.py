"""Open Inference Protocol datatypes and their numpy equivalents."""

from __future__ import annotations

import numpy as np

from bastion.core.errors import InvalidInput

# BF16 has no numpy dtype; it is refused with a clear message rather than guessed.
# NumPy 1 supports 32 dimensions, NumPy 2 64; the lower bound keeps both safe.
MAX_DIMS = 32

DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

NUMPY_TO_DATATYPE: dict[np.dtype, str] = {v: k for k, v in DATATYPE_TO_NUMPY.items()}

DATATYPES = frozenset(DATATYPE_TO_NUMPY)

FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})


def numpy_dtype(datatype: str, field: str = "datatype") -> np.dtype:
    """Numpy dtype of a V2 datatype, or an InvalidInput naming the field."""
    try:
        return DATATYPE_TO_NUMPY[datatype]
    except (KeyError, TypeError):
        raise InvalidInput(
            f"{field}: unsupported datatype {datatype!r}; expected one of {', '.join(sorted(DATATYPES))}"
        ) from None


def datatype_of(array: np.ndarray) -> str:
    """V2 datatype of a numpy array; str/bytes/object arrays are BYTES."""
    dt = array.dtype
    if dt.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_DATATYPE[dt]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dt} has no Open Inference Protocol datatype") from None
