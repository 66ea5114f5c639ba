"""The cli modules import each other in one direction only (no cycles).

serve.py and workers.py once imported each other; a cycle makes the import order matter
and hides which module owns what. Every import counts here, also those inside functions
and under TYPE_CHECKING: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bastion.cli

CLI_DIR = Path(bastion.cli.__file__).parent
PACKAGE = "bastion.cli"


def _cli_imports(path: Path) -> set[str]:
    """The sibling cli modules one file imports, by short name ("serve", "workers", ...)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name.split(".")[2])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import x / from .x import y
                module = f"{PACKAGE}.{node.module}" if node.module else PACKAGE
            elif node.level == 0 and node.module:
                module = node.module
            else:
                continue
            if module == PACKAGE:  # from bastion.cli import serve
                found.update(alias.name for alias in node.names)
            elif module.startswith(PACKAGE + "."):
                found.add(module.split(".")[2])
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in CLI_DIR.glob("*.py") if p.stem != "__init__"}
    return {name: _cli_imports(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_cli_modules_import_each_other_without_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in bastion.cli: " + " -> ".join(cycle or [])


def test_one_server_process_does_not_know_the_supervisor() -> None:
    graph = import_graph()
    assert "serve" in graph["workers"]  # the supervisor runs serve_async in each worker
    assert not graph["serve"] & {"workers", "launch", "main"}
    assert not graph["serve_options"] & {"serve", "workers", "launch", "main"}


def test_the_cycle_finder_finds_a_cycle() -> None:
    # the guard above is only worth something if it can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_are_read_in_every_form(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "import bastion.cli.a\n"
        "from bastion.cli import b\n"
        "from bastion.cli.c import x\n"
        "from .d import y\n"
        "from . import e\n"
        "def f():\n    from bastion.cli.g import z\n"
        "import bastion.core\n"
    )
    assert _cli_imports(src) == {"a", "b", "c", "d", "e", "g"}
