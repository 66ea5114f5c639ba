"""Selection defenses per tenant defense class on a live server: the same fingerprinting
query is answered by the most accurate variant every time for a trusted tenant, and by
a randomised variant for a tenant under a DP defense; moving a tenant between classes
takes effect without a restart."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bastion.guard.keystore import KeyStore
from tests.polling import wait_until
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, make_digits_zoo
) -> Iterator[tuple[ServerProcess, dict[str, str], Path, dict]]:
    d = tmp_path_factory.mktemp("zoo-defenses")
    repo = d / "repo"
    repo.mkdir()
    make_digits_zoo(repo, expose_variant=True, on_infeasible="closest", defenses={
        "default": {"kind": "permute-and-flip", "epsilon": 0.5},
        "trusted": {"kind": "none"},
    })
    out = subprocess.run([sys.executable, "-m", "bastion.cli.main", "profile", str(repo), "--zoo", "digits_zoo",
                          "--iterations", "30", "--json"], capture_output=True, text=True, check=True, timeout=300)
    quality = {v["variant"]: v["quality"] for v in json.loads(out.stdout)["variants"]}
    db = d / "keys.db"
    with KeyStore(db) as store:
        tokens = {name: store.create_key(name)[0] for name in ("plain", "vip")}
        store.set_defense_class("vip", "trusted")
    with ServerProcess(repo, "--keys", str(db), "--poll-interval", "0", "--grpc-port", "-1") as server:
        yield server, tokens, db, quality  # type: ignore[misc]


def _variants(server: ServerProcess, token: str, accuracy: float, n: int) -> collections.Counter[str]:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}],
            "parameters": {"accuracy": accuracy}}
    seen: collections.Counter[str] = collections.Counter()
    with httpx.Client(headers={"authorization": f"Bearer {token}"}) as http:
        for _ in range(n):
            r = http.post(f"{server.url}/v2/models/digits_zoo/infer", json=body)
            assert r.status_code == 200, r.text
            seen[r.json()["parameters"]["variant"]] += 1
    return seen


def test_the_defense_class_decides_how_the_variant_is_chosen(served) -> None:  # type: ignore[no-untyped-def]
    server, tokens, db, quality = served
    best = max(quality, key=quality.get)
    target = quality[best]  # the fingerprinting query: only the most accurate variant meets it
    trusted = _variants(server, tokens["vip"], target, 40)
    assert trusted == {best: 40}
    defended = _variants(server, tokens["plain"], target, 60)
    assert defended[best] < 60 and len(defended) >= 2, defended
    # escalate "plain" to the trusted class: no restart, same answer as vip within a second
    # (the wait allows five, for a loaded machine)
    with KeyStore(db) as store:
        store.set_defense_class("plain", "trusted")
    wait_until(lambda: _variants(server, tokens["plain"], target, 20) == {best: 20}, 5, 0.05,
               what="the new defense class to reach the server", details=server.logs)
