from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import load_iris
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.runtimes import ModelLoadError, UnsafeModelFormat, create_runtime
from bastion.runtimes.export import sklearn_to_skops

X, Y = load_iris(return_X_y=True)
X32 = X.astype(np.float32)
FEATURES = (TensorSpec("features", "FP32", (-1, 4)),)
LABEL = TensorSpec("label", "INT64", (-1,))
PROBS = TensorSpec("probabilities", "FP32", (-1, 3))


def _write(tmp_path: Path, data: bytes) -> Path:
    vdir = tmp_path / "iris" / "1"
    vdir.mkdir(parents=True)
    (vdir / "model.skops").write_bytes(data)
    return vdir


def _config(outputs: tuple[TensorSpec, ...], **parameters: object) -> ModelConfig:
    return ModelConfig("iris", "skops", FEATURES, outputs, max_batch_size=16, parameters=dict(parameters))


def test_classifier_label_and_probabilities(tmp_path: Path) -> None:
    model = LogisticRegression(max_iter=500).fit(X, Y)
    runtime = create_runtime(_config((LABEL, PROBS)), _write(tmp_path, sklearn_to_skops(model)))
    assert runtime.platform == "sklearn_skops"
    out = runtime.predict({"features": X32[:7]})
    assert out["label"].dtype == np.int64 and out["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(out["label"], model.predict(X32[:7]))
    np.testing.assert_allclose(out["probabilities"], model.predict_proba(X32[:7]), rtol=1e-6)


def test_single_output_defaults_to_predict_proba_or_predict(tmp_path: Path) -> None:
    clf = create_runtime(
        _config((PROBS,)), _write(tmp_path / "a", sio.dumps(LogisticRegression(max_iter=500).fit(X, Y)))
    )
    assert clf.predict({"features": X32[:2]})["probabilities"].shape == (2, 3)
    reg = LinearRegression().fit(X, Y)
    runtime = create_runtime(_config((TensorSpec("y", "FP64", (-1, 1)),)), _write(tmp_path / "b", sio.dumps(reg)))
    out = runtime.predict({"features": X32[:3]})["y"]
    assert out.shape == (3, 1)
    np.testing.assert_allclose(out[:, 0], reg.predict(X32[:3]))


def test_untrusted_types_are_refused_and_can_be_trusted_explicitly(tmp_path: Path) -> None:
    vdir = _write(tmp_path, sio.dumps(DecisionTreeClassifier(random_state=0).fit(X, Y)))
    with pytest.raises(UnsafeModelFormat, match=r"sklearn\.tree\._tree\.Tree") as err:
        create_runtime(_config((LABEL, PROBS)), vdir)
    assert "parameters.trusted_types" in str(err.value)
    runtime = create_runtime(_config((LABEL, PROBS), trusted_types=["sklearn.tree._tree.Tree"]), vdir)
    assert runtime.predict({"features": X32[:1]})["label"].tolist() == [0]


def test_signature_must_be_declared(tmp_path: Path) -> None:
    vdir = _write(tmp_path, sio.dumps(LogisticRegression(max_iter=500).fit(X, Y)))
    with pytest.raises(ModelLoadError, match="exactly one input"):
        create_runtime(ModelConfig("iris", "skops"), vdir)
    with pytest.raises(ModelLoadError, match="has no method 'transform'"):
        create_runtime(_config((PROBS,), method="transform"), vdir)


def test_not_a_skops_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a readable skops file"):
        create_runtime(_config((PROBS,)), _write(tmp_path, b"PK but not really"))
