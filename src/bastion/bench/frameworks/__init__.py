"""The frameworks the benchmark suite can run, by name.

Each adapter lives in its own module here and defines one :class:`Framework` subclass;
modules are imported only when their framework is asked for, so one adapter's import
problem cannot stop the others from running.
"""

from __future__ import annotations

import importlib
import inspect

from bastion.bench.frameworks.base import Framework

# name -> module (in this package); the order is the report's
MODULES: dict[str, str] = {
    "bastion": "bastion",
    "mlserver": "mlserver",
    "bentoml": "bentoml",
    "mlflow": "mlflow",
    "torchserve": "torchserve",
    "rayserve": "rayserve",
    "litserve": "litserve",
    "triton": "triton",
    "tfserving": "tfserving",
}
NAMES: tuple[str, ...] = tuple(MODULES)


def load(name: str) -> Framework:
    """An instance of framework ``name``'s adapter."""
    if name not in MODULES:
        raise KeyError(f"unknown framework {name!r}; expected one of {', '.join(NAMES)}")
    module = importlib.import_module(f"{__name__}.{MODULES[name]}")
    found = [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Framework) and cls is not Framework and cls.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise ImportError(f"{module.__name__} must define exactly one Framework subclass, found {len(found)}")
    return found[0]()
