from __future__ import annotations

import hashlib
import json
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

# Parallel workers (pytest-xdist, `make test`) start servers side by side: each takes its
# ports from a range of its own (bastion.bench.launcher.free_port), below the kernel's
# ephemeral range, so a port one worker picked is never picked by another before its server
# binds it (with SO_REUSEPORT the two servers would silently share it).
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and _worker[2:].isdigit():
    _first = 10_000 + 1_000 * (int(_worker[2:]) % 22)
    os.environ["BASTION_PORT_RANGE"] = f"{_first}-{_first + 999}"


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
def image_scenario(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Iterator[BuiltScenario]:
    """``bastion scenario build image --small`` (which also profiles the zoo), run once per
    test run: the scenario tests, the lab, the CLI test and the bench test all read it.
    Under pytest-xdist the workers share one build (the first builds it under a file lock,
    the others wait and read it).

    Read-only: a test that changes the repository works on a ``shutil.copytree`` of it (a
    few MiB). Servers may write their logs beside it (tests.serverproc does; each names its
    log by its port). At the end of the session every file must still have the bytes it
    was built with."""
    from filelock import FileLock

    # the run's base folder is shared by the workers; a lone process uses its own
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    folder = root / "image_scenario"
    repo = folder / "repo"
    with FileLock(str(root / "image_scenario.lock")):
        if not (folder / "built.json").is_file():
            folder.mkdir(exist_ok=True)
            out = subprocess.run([sys.executable, "-m", "bastion.cli.main", "scenario", "build", "image",
                                  "--out", str(repo), "--small"], capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr
            (folder / "built.json").write_text(json.dumps({"stdout": out.stdout, "stderr": out.stderr}))
    printed = json.loads((folder / "built.json").read_text())
    built = _digests(repo)
    yield BuiltScenario(repo, printed["stdout"], printed["stderr"])
    assert _digests(repo) == built, "a test changed the shared image scenario: copy it first (shutil.copytree)"
