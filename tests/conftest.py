from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.serverproc import ServerProcess

# One BLAS thread for the tests and every server, CLI and build they start: the suite runs
# servers beside the test process on 2 cores, and OpenBLAS threads spinning for a core the
# other process holds made small scikit-learn fits up to 10x slower. An explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


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


@dataclass(frozen=True)
class BuiltScenario:
    """A scenario repository built by the CLI, with what the CLI printed."""

    repo: Path
    stdout: str
    stderr: str


def _digests(repo: Path) -> dict[str, str]:
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(repo.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def image_scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltScenario]:
    """``bastion scenario build image --small`` (which also profiles the zoo), run once per
    session: the scenario tests, the lab, the CLI test and the bench test all read it.

    Read-only: a test that changes the repository works on a ``shutil.copytree`` of it (a
    few MiB). The repository's parent folder is private to it, so servers may write their
    logs there (tests.serverproc does). At the end of the session every file must still
    have the bytes it was built with."""
    repo = tmp_path_factory.mktemp("image_scenario") / "repo"
    out = subprocess.run([sys.executable, "-m", "bastion.cli.main", "scenario", "build", "image", "--out", str(repo),
                          "--small"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    built = _digests(repo)
    yield BuiltScenario(repo, out.stdout, out.stderr)
    assert _digests(repo) == built, "a test changed the shared image scenario: copy it first (shutil.copytree)"
