from __future__ import annotations

import ast
import sys
from pathlib import Path

import bastion.zoo

ALLOWED_THIRD_PARTY = {"numpy", "yaml"}


def test_zoo_imports_only_core_numpy_yaml_and_stdlib() -> None:
    # The zoo sits below the data plane; importing engine/guard/runtimes would invert the layers.
    root = Path(bastion.zoo.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                ok = (
                    module.startswith(("bastion.core", "bastion.zoo"))
                    or top in ALLOWED_THIRD_PARTY
                    or top in sys.stdlib_module_names
                    or top == "__future__"
                )
                assert ok, f"{path.name} imports {module}"
