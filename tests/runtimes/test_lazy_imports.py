"""A runtime's framework is imported when the first model needing it loads, and nothing more.

Each check runs in a fresh interpreter (``python -c``): the test process itself has long
imported everything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bastion.runtimes.export import sklearn_to_skops
from tests.runtimes.onnx_models import affine_model

HEAVY = ("onnxruntime", "skops", "sklearn", "scipy", "torch", "matplotlib", "pandas")
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _run(code: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_PRELUDE = """
import json, sys
from pathlib import Path
from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.runtimes import create_runtime

HEAVY = {heavy!r}

def imported():
    return sorted(p for p in HEAVY if any(m == p or m.startswith(p + ".") for m in sys.modules))
"""


def _repo(tmp_path: Path) -> Path:
    (tmp_path / "affine" / "1").mkdir(parents=True)
    (tmp_path / "affine" / "1" / "model.onnx").write_bytes(affine_model())
    x, y = load_iris(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    (tmp_path / "iris" / "1").mkdir(parents=True)
    (tmp_path / "iris" / "1" / "model.skops").write_bytes(sklearn_to_skops(model))
    return tmp_path


def test_frameworks_are_imported_only_by_the_models_that_need_them(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    code = (
        _PRELUDE.format(heavy=HEAVY)
        + f"""
import bastion.cli.main, bastion.cli.serve, bastion.dataplane, bastion.repository.store  # the server's import path
steps = {{"server modules": imported()}}

onnx = create_runtime(ModelConfig("affine", "onnx"), Path({str(repo / "affine" / "1")!r}))
steps["onnx model"] = imported()

spec = lambda name, dt, shape: TensorSpec(name, dt, shape)
config = ModelConfig(
    "iris", "skops", (spec("x", "FP64", (-1, 4)),), (spec("label", "INT64", (-1,)), spec("p", "FP64", (-1, 3))),
    max_batch_size=8,
)
skops = create_runtime(config, Path({str(repo / "iris" / "1")!r}))
import numpy as np
skops.predict({{"x": np.ones((2, 4))}})
steps["skops model"] = imported()
print(json.dumps(steps))
"""
    )
    steps = _run(code)
    assert steps["server modules"] == []
    assert steps["onnx model"] == ["onnxruntime"]
    # skops needs scikit-learn, which needs scipy (and imports pandas when installed);
    # torch must stay out even though it is installed for the torch runtime
    assert "torch" not in steps["skops model"]
    assert {"onnxruntime", "skops", "sklearn", "scipy"} <= set(steps["skops model"])


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed: nothing could pull it in")
def test_skops_import_keeps_its_default_trust_list_without_torch() -> None:
    # skops builds its default trust list from scikit-learn's estimators when imported; the
    # import that declines the array-API shims must yield the very same list.
    code = """
import json, sys
from bastion.runtimes.skops_runtime import import_skops_io
import_skops_io()
from skops.io._trusted_types import SKLEARN_ESTIMATOR_TYPE_NAMES
print(json.dumps({"torch": "torch" in sys.modules, "trusted": sorted(SKLEARN_ESTIMATOR_TYPE_NAMES)}))
"""
    child = _run(code)
    assert child["torch"] is False

    from sklearn.utils import all_estimators
    from skops.io._utils import get_type_name

    expected = sorted(get_type_name(cls) for _, cls in all_estimators() if get_type_name(cls).startswith("sklearn."))
    assert child["trusted"] == expected
    assert len(expected) > 100


def test_onnx_runtime_does_not_phone_home_by_default(tmp_path: Path) -> None:
    # onnxruntime >= 1.29 keeps a device id and an upload queue under ~/.cache/Microsoft
    # unless ORT_DISABLE_TELEMETRY=1 is set before it is imported.
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(affine_model())
    code = f"""
import json, os
from pathlib import Path
from bastion.core.metadata import ModelConfig
from bastion.runtimes import create_runtime
create_runtime(ModelConfig("m", "onnx"), Path({str(tmp_path / "m")!r}))
print(json.dumps({{"env": os.environ.get("ORT_DISABLE_TELEMETRY")}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "home" / ".cache"))
    assert _run(code, env=env) == {"env": "1"}
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*"))
    # an operator's explicit choice stands
    assert _run(code, env={**env, "ORT_DISABLE_TELEMETRY": "0"}) == {"env": "0"}
