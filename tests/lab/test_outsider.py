"""The lab is an outsider (DESIGN.md): it talks to a server like any client, so it imports
the public client, the core types and the scenarios' data, never the server's internals."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import bastion.lab

# What lab/*.py may import, and why:
# - bastion.client: the public REST client (the admin client and the /metrics parser included);
# - bastion.core: the request/response types and datatypes every client shares;
# - the scenarios' data generators: the attacker's own query pools come from the same world;
# - bastion.bench.launcher, with the Launch it takes (bench.frameworks.base): starts a command
#   in its own process group, polls a URL, stops the group. A client-side tool the benchmark
#   and the lab share, so that there is one way to run a server that is being measured.
LAB_MAY_IMPORT = ("bastion.client", "bastion.core", "bastion.lab", "bastion.scenarios.image",
                  "bastion.scenarios.malware", "bastion.bench.launcher", "bastion.bench.frameworks.base")
# the client-side tools above must not reach the server either, however deep the import
CLIENT_SIDE_TOOLS = ("bastion.client", "bastion.bench.launcher", "bastion.bench.frameworks.base")
SERVER_INTERNALS = ("bastion.dataplane", "bastion.guard", "bastion.engine", "bastion.repository",
                    "bastion.transport", "bastion.runtimes", "bastion.observability", "bastion.zoo")


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _bastion_imports(source: str) -> set[str]:
    """Every ``bastion.*`` module a source imports, at any depth of the code (lazy imports in
    functions and ``TYPE_CHECKING`` blocks count as well). ``from P import n`` gives ``P`` and
    ``P.n``: ``n`` may be a submodule (``from bastion.protocol import v2_rest``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("bastion.")}


def _not_allowed_in_lab(source: str) -> list[str]:
    return sorted(m for m in _bastion_imports(source)
                  if not _under(m, LAB_MAY_IMPORT) or _under(m, SERVER_INTERNALS))


def _reachable(roots: tuple[str, ...]) -> set[str]:
    """The ``bastion`` modules that importing ``roots`` runs (their packages' ``__init__`` too)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for name in (".".join(parts[:i]) for i in range(2, len(parts) + 1)):
            if name in seen:
                continue
            try:
                spec = importlib.util.find_spec(name)
            except ModuleNotFoundError:  # a class or function imported from a module
                spec = None
            if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
                continue
            seen.add(name)
            todo.extend(_bastion_imports(Path(spec.origin).read_text(encoding="utf-8")))
    return seen


def test_lab_imports_no_server_internals() -> None:
    for path in Path(bastion.lab.__file__).parent.glob("*.py"):
        assert _not_allowed_in_lab(path.read_text(encoding="utf-8")) == [], f"{path.name} imports server code"


def test_the_client_side_tools_the_lab_uses_reach_no_server_internals() -> None:
    reached = _reachable(CLIENT_SIDE_TOOLS)
    assert "bastion.bench.launcher" in reached and "bastion.protocol.v2_rest" in reached  # the walk follows imports
    assert sorted(m for m in reached if _under(m, SERVER_INTERNALS)) == []


def test_the_rule_refuses_server_internals_and_the_rest_of_bench() -> None:
    for source in ("from bastion.dataplane import DataPlane", "import bastion.guard.keystore",
                   "from bastion.engine.batcher import Batcher", "from bastion.repository.zoos import load_zoo",
                   "from bastion.transport import rest", "from bastion.runtimes.onnx_runtime import OnnxRuntime",
                   "from bastion.bench.suite import run_study", "from bastion.cli.serve import build",
                   "def f():\n    from bastion.guard.keystore import KeyStore\n"):
        assert _not_allowed_in_lab(source), source
    assert _not_allowed_in_lab("from bastion.bench.launcher import free_port\nfrom bastion.client import Client") == []
