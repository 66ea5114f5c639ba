from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serverproc import ServerProcess


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bastion.scenarios.demo import build_demo_repository

    out = tmp_path_factory.mktemp("demo") / "repo"
    build_demo_repository(out, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_server(demo_repo: Path) -> Iterator[ServerProcess]:
    """One server on the demo repository shared by the read-only integration tests."""
    server = ServerProcess(demo_repo, "--poll-interval", "0")
    yield server
    code = server.stop()
    assert code == 0, server.logs()
