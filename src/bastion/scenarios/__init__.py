"""The reference workloads: a demo repository and the four scenario zoos of the
model-serving literature (image classification, sentiment analysis, malware detection,
crypto-price forecasting). Each scenario module has ``ZOO`` and
``build(out, *, small=False, seed=0, progress=None, sizes=None) -> list[str]``, where
``sizes`` (the module's ``Sizes``: rows, epochs, trees) overrides what ``small`` picks
(``SMALL`` or ``FULL``); each module's ``TINY`` builds in seconds, for tests of what does
not depend on the sizes (files, determinism)."""

from __future__ import annotations

import importlib
from types import ModuleType

SCENARIOS = ("image", "sentiment", "malware", "crypto")


def scenario(name: str) -> ModuleType:
    """The scenario module ``name``; ValueError for unknown names."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}")
    return importlib.import_module(f"bastion.scenarios.{name}")
