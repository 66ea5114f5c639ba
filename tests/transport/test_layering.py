"""Transports are thin: they import the data plane's public face, the codecs and core types.

A transport that reached below the plane (the guard's gate, the engine, the repository, a
runtime, the zoo) could decide a rule itself or skip one, which is how limits once ran on
one path and not another. Every import counts, also those inside functions: a lazy import
is still a dependency. The one exception is ``bastion.guard.tls``: TLS is the wire's own
business (handshakes, client-certificate fingerprints), not a rule about requests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bastion.transport

TRANSPORT_DIR = Path(bastion.transport.__file__).parent
ALLOWED_PREFIXES = ("bastion.core", "bastion.protocol")
ALLOWED_EXACT = frozenset({"bastion.dataplane", "bastion.guard.tls"})


def _imported_modules(source: str) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative: from .rest import x, inside bastion.transport
                found.append(f"bastion.transport.{node.module}")
            elif node.module == "bastion":  # from bastion import dataplane
                found.extend(f"bastion.{alias.name}" for alias in node.names)
            else:
                found.append(node.module)
    return found


def violations(source: str) -> list[str]:
    """The Bastion modules ``source`` imports that a transport may not."""
    bad = []
    for module in _imported_modules(source):
        if not module.startswith("bastion.") and module != "bastion":
            continue  # stdlib and third-party (grpc, httptools, orjson, ...)
        if module in ALLOWED_EXACT or module.startswith(ALLOWED_PREFIXES) or module.startswith("bastion.transport"):
            continue
        bad.append(module)
    return bad


def test_transports_import_only_the_plane_codecs_and_core() -> None:
    files = sorted(TRANSPORT_DIR.glob("*.py"))
    assert {p.stem for p in files} >= {"rest", "grpc_server", "http_server"}
    found = {p.name: violations(p.read_text(encoding="utf-8")) for p in files}
    assert not {name: bad for name, bad in found.items() if bad}, found


def test_the_rule_catches_what_reaches_below_the_plane() -> None:
    source = """
from bastion.dataplane import DataPlane, Credentials
from bastion.protocol import v2_rest
from bastion.core.errors import NotFound
import grpc

def handler():
    from bastion.guard.gate import Gate
    from bastion.dataplane.registry import Registry
    import bastion.engine.batcher
    from bastion import repository
"""
    assert violations(source) == [
        "bastion.guard.gate", "bastion.dataplane.registry", "bastion.engine.batcher", "bastion.repository",
    ]
