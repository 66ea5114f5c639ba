"""A small real zoo for tests: three scikit-learn classifiers of scikit-learn's digits,
exported to ONNX, with a held-out evaluation set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.tree import DecisionTreeClassifier

from bastion.runtimes.export import sklearn_to_onnx, write_model_config

VARIANTS = ("digits_tree", "digits_logreg", "digits_mlp")


def build_digits_zoo(repo: Path, *, name: str = "digits_zoo", **spec_overrides: object) -> Path:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    models = {
        "digits_tree": DecisionTreeClassifier(max_depth=6, random_state=0),
        "digits_logreg": LogisticRegression(max_iter=300),
        "digits_mlp": MLPClassifier(hidden_layer_sizes=(256, 256), max_iter=200, random_state=0),
    }
    for variant, model in models.items():
        model.fit(x_tr, y_tr)
        (repo / variant / "1").mkdir(parents=True, exist_ok=True)
        (repo / variant / "1" / "model.onnx").write_bytes(sklearn_to_onnx(model, 64, name="input"))
        write_model_config(repo / variant, {"runtime": "onnx", "max_batch_size": 64})
    zoo_dir = repo / name
    zoo_dir.mkdir(parents=True, exist_ok=True)
    np.savez(zoo_dir / "eval.npz", input=x_te, y=y_te)
    spec = {
        "task": "digit-classification",
        "variants": list(VARIANTS),
        "evaluation": "eval.npz",
        "metric": "accuracy",
        "latency_percentile": "p50",
        "policy": "uniform-feasible",
        "on_infeasible": "reject",
        **spec_overrides,
    }
    (zoo_dir / "zoo.yaml").write_text(yaml.safe_dump(spec))
    return zoo_dir
