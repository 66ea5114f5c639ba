"""Helpers that write models in the formats Bastion serves (used by scenarios and users).

Every writer here is deterministic: the same fitted model gives the same bytes, so a
repository built twice can be compared byte for byte and signed.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["sklearn_to_onnx", "sklearn_to_skops", "write_bytes_atomic", "write_model_config"]

# Opset 17 / ai.onnx.ml 3: everything scikit-learn's common estimators need, and
# loadable by every onnxruntime since 1.13, so exported files are not tied to the
# versions installed here.
DEFAULT_OPSET = 17
DEFAULT_ML_OPSET = 3

_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def sklearn_to_onnx(
    model: Any,
    n_features: int,
    *,
    dtype: type | np.dtype = np.float32,
    name: str = "input",
    target_opset: int = DEFAULT_OPSET,
    ml_opset: int = DEFAULT_ML_OPSET,
    graph_name: str = "bastion",
) -> bytes:
    """Serialized ONNX model of a fitted scikit-learn estimator or pipeline.

    ``name`` is the input tensor's name, of shape ``[batch, n_features]``. Classifiers
    are exported without ZipMap, so ``probabilities`` is a plain ``[batch, classes]``
    tensor (a list of dicts has no Open Inference Protocol datatype) next to ``label``.
    """
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType, Int64TensorType
    except ImportError:
        raise ImportError("sklearn_to_onnx needs the 'sklearn' extra: pip install 'bastion-serve[sklearn]'") from None
    tensor_types = {
        np.dtype(np.float32): FloatTensorType,
        np.dtype(np.float64): DoubleTensorType,
        np.dtype(np.int64): Int64TensorType,
    }
    tensor_type = tensor_types.get(np.dtype(dtype))
    if tensor_type is None:
        raise ValueError(f"dtype {np.dtype(dtype)} is not supported; use float32, float64 or int64")
    options = {id(est): {"zipmap": False} for est in _classifiers(model)}
    onx = convert_sklearn(
        model,
        # skl2onnx names the graph with a random uuid unless told; a fixed name keeps bytes stable.
        name=graph_name,
        initial_types=[(name, tensor_type([None, n_features]))],
        target_opset={"": target_opset, "ai.onnx.ml": ml_opset},
        options=options or None,
    )
    return onx.SerializeToString()


def _classifiers(model: Any) -> list[Any]:
    """The classifiers inside ``model`` (itself, pipeline steps, and so on down)."""
    from sklearn.base import is_classifier

    found = [model] if is_classifier(model) else []
    for attr in ("steps", "transformer_list"):
        for _, step in getattr(model, attr, None) or ():
            found.extend(_classifiers(step))
    return found


def sklearn_to_skops(model: Any) -> bytes:
    """A skops dump of ``model`` with stable bytes.

    skops keys objects by their ``id()`` (``__id__`` in the schema, which only matters
    as an identity for shared objects, and array member names) and stamps members with
    the current time; all three are rewritten in schema order, with a fixed time.
    """
    from bastion.runtimes.skops_runtime import import_skops_io

    sio = import_skops_io()  # without torch, as the server imports it

    with zipfile.ZipFile(io.BytesIO(sio.dumps(model))) as src:
        schema = json.loads(src.read("schema.json"))
        members = {n for n in src.namelist() if n != "schema.json"}
        renames: dict[str, str] = {}
        _canonicalize(schema, members, renames, {})
        if set(renames) != members:
            raise RuntimeError(f"skops dump has members the schema does not reference: {members - set(renames)}")
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
            _write_member(dst, "schema.json", json.dumps(schema, indent=2).encode())
            for old, new in renames.items():
                _write_member(dst, new, src.read(old))
    return out.getvalue()


def _canonicalize(node: Any, members: set[str], renames: dict[str, str], ids: dict[int, int]) -> None:
    if isinstance(node, dict):
        ref = node.get("file")
        if isinstance(ref, str) and ref in members:
            if ref not in renames:
                renames[ref] = f"{len(renames)}{Path(ref).suffix}"
            node["file"] = renames[ref]
        obj_id = node.get("__id__")
        if isinstance(obj_id, int):
            node["__id__"] = ids.setdefault(obj_id, len(ids) + 1)
        for value in node.values():
            _canonicalize(value, members, renames, ids)
    elif isinstance(node, list):
        for value in node:
            _canonicalize(value, members, renames, ids)


def _write_member(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_FIXED_ZIP_TIME)
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def write_model_config(model_dir: Path, config: dict[str, Any]) -> None:
    """Write ``config`` as ``model_dir/config.yaml`` (atomically: a polling server never reads half)."""
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    write_bytes_atomic(Path(model_dir) / "config.yaml", text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
