"""The session's small image scenario (tests/conftest.py: built and profiled once), served with auth for the lab."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.serverproc import ServerProcess

if TYPE_CHECKING:
    from tests.conftest import BuiltScenario


@dataclass(frozen=True)
class LabServer:
    repo: Path
    url: str
    attacker_key: str  # scoped to the zoo only: all an outside attacker gets
    experimenter_key: str  # may call the variants by name (explicit attacker, victim reference)
    keys_db: Path
    front: list[dict]  # the repository's own view: Pareto variants, fastest first
    victim: str  # the most accurate variant

    def server_args(self) -> tuple[str, ...]:
        return ("--keys", str(self.keys_db), "--poll-interval", "0", "--grpc-port", "-1")


def pareto_front(repo: Path, zoo: str = "image") -> list[dict]:
    """What `bastion zoo show --json` says (the test may read the repository; the lab may not)."""
    out = subprocess.run([sys.executable, "-m", "bastion.cli.main", "zoo", "show", zoo, "--repository", str(repo),
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    variants = [v for v in json.loads(out.stdout)["variants"] if v["pareto"]]
    return sorted(variants, key=lambda v: v["latency_ms"])


@pytest.fixture(scope="package")
def image_repo(image_scenario: BuiltScenario) -> Path:
    """Read-only (shared with other packages): a test that changes it works on a copy."""
    return image_scenario.repo


@pytest.fixture(scope="package")
def lab_server(image_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    from bastion.guard.keystore import KeyStore

    # the keys and the audit chain beside them live outside the shared repository's folder
    db = tmp_path_factory.mktemp("lab_keys") / "keys.db"
    with KeyStore(db) as store:
        attacker, _ = store.create_key("attacker", models=["image"], description="lab attacker")
        experimenter, _ = store.create_key("experimenter", description="lab experimenter")
    assert attacker is not None and experimenter is not None
    front = pareto_front(image_repo)
    victim = max(front, key=lambda v: v["quality"])["variant"]
    info = LabServer(image_repo, "", attacker, experimenter, db, front, victim)
    with ServerProcess(image_repo, *info.server_args()) as server:
        yield LabServer(image_repo, server.url, attacker, experimenter, db, front, victim)
