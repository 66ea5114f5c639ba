"""Admission cannot be skipped: ``infer`` takes only a ticket ``admit`` made, once, for its model.

A real plane (repository on disk, ONNX Runtime, the SQLite key store, the limiter and the
audit log); no server around it, so each rule is seen where it is decided.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import orjson
import pytest

from bastion.core.errors import InternalError, PermissionDenied, RateLimited, Unauthenticated
from bastion.core.tensors import InferenceRequest, InferTensor
from bastion.dataplane import Admission, Credentials, DataPlane
from bastion.guard.audit import AuditLog
from bastion.guard.gate import Gate
from bastion.guard.keystore import KeyStore
from bastion.guard.limits import Limiter, SqliteLedger
from bastion.guard.principal import Limits
from bastion.guard.secrets import derive_key
from bastion.repository.store import ModelRepository
from tests.runtimes.onnx_models import affine_model, write_model


def _request(model: str) -> InferenceRequest:
    x = np.ones((1, 4), dtype=np.float32)
    return InferenceRequest(model, None, [InferTensor("x", "FP32", x.shape, x)])


class Plane:
    def __init__(self, plane: DataPlane, keys: dict[str, str], audit_dir: Path) -> None:
        self.plane, self.keys, self.audit_dir = plane, keys, audit_dir

    def creds(self, who: str) -> Credentials:
        return Credentials(f"Bearer {self.keys[who]}".encode(), None)

    def audit_lines(self) -> list[dict]:
        self.plane.gate.audit.flush()
        files = sorted(self.audit_dir.glob("*.jsonl"))
        return [orjson.loads(line) for p in files for line in p.read_bytes().splitlines()]


async def _with_plane(tmp_path: Path, body: Callable[[Plane], Awaitable[None]]) -> None:
    repo = tmp_path / "repo"
    for name in ("a", "b"):
        write_model(repo, name, {1: affine_model()}, {"runtime": "onnx", "max_batch_size": 8})
    store = KeyStore(tmp_path / "keys.db")
    keys = {
        "all": store.create_key("acme")[0],
        "only_a": store.create_key("scoped", models=["a"])[0],
        "one_per_hour": store.create_key("slow", limits=Limits(rate_per_s=1 / 3600, burst=1))[0],
        "admin": store.create_key("ops", role="admin")[0],
    }
    audit = AuditLog(tmp_path / "audit", derive_key(store.master_secret, "audit-chain"), writer_id="0")
    gate = Gate(authenticator=store, limiter=Limiter(SqliteLedger(store.connect)), audit=audit)
    plane = DataPlane(ModelRepository(repo, poll_interval_s=None), gate=gate)
    await plane.start()
    try:
        await body(Plane(plane, keys, tmp_path / "audit"))  # type: ignore[arg-type]
    finally:
        await plane.stop()
        store.close()


def on_plane(body: Callable[[Plane], Awaitable[None]]) -> Callable[[Path], None]:
    """A test that runs ``body`` against a fresh guarded plane on its own event loop."""

    def test(tmp_path: Path) -> None:
        asyncio.run(_with_plane(tmp_path, body))

    test.__name__ = body.__name__
    test.__doc__ = body.__doc__
    return test


@on_plane
async def test_an_admitted_request_is_served_and_audited(guarded: Plane) -> None:
    plane = guarded.plane
    ticket = plane.admit(guarded.creds("all"), "a", transport="rest")
    response = await plane.infer(ticket, _request("a"))
    assert response.model_name == "a" and response.model_version == "1"
    np.testing.assert_allclose(response.outputs[0].data, np.full((1, 4), 3.0))  # 2x + 1
    served = [r for r in guarded.audit_lines() if r["action"] == "infer"]
    assert [(r["tenant"], r["decision"], r["status"], r["variant"]) for r in served] == [("acme", "served", 200, "a")]


@on_plane
async def test_a_ticket_serves_one_request_of_its_model_only(guarded: Plane) -> None:
    plane = guarded.plane
    ticket = plane.admit(guarded.creds("all"), "a", transport="grpc")
    with pytest.raises(InternalError, match="admitted for model 'a', not 'b'"):
        await plane.infer(ticket, _request("b"))
    ticket = plane.admit(guarded.creds("all"), "a", transport="grpc")
    await plane.infer(ticket, _request("a"))
    with pytest.raises(InternalError, match="used twice"):
        await plane.infer(ticket, _request("a"))  # a reused ticket would skip the rate limit


def test_tickets_cannot_be_made_outside_admit() -> None:
    with pytest.raises(TypeError, match=r"DataPlane\.admit only"):
        Admission(object(), "a", "rest", object())  # type: ignore[arg-type]


@on_plane
async def test_admit_decides_identity_scope_and_rate_before_any_body(guarded: Plane) -> None:
    plane = guarded.plane
    with pytest.raises(Unauthenticated):
        plane.admit(Credentials(), "a", transport="rest")
    with pytest.raises(Unauthenticated):
        plane.admit(Credentials(b"Bearer not-a-key"), "a", transport="rest")
    with pytest.raises(PermissionDenied):
        plane.admit(guarded.creds("only_a"), "b", transport="tfserving")
    plane.admit(guarded.creds("one_per_hour"), "a", transport="rest")
    with pytest.raises(RateLimited) as err:
        plane.admit(guarded.creds("one_per_hour"), "a", transport="grpc")
    assert err.value.retry_after_s is not None and err.value.retry_after_s >= 1
    refused = [(r["transport"], r["status"]) for r in guarded.audit_lines() if r["decision"] == "rejected"]
    assert refused == [("rest", 401), ("rest", 401), ("tfserving", 403), ("grpc", 429)]


@on_plane
async def test_admin_actions_need_the_role_and_are_each_audited(guarded: Plane) -> None:
    plane = guarded.plane
    with pytest.raises(PermissionDenied):
        plane.admin(guarded.creds("all"), transport="rest", action="unload", target="b")
    grant = plane.admin(guarded.creds("admin"), transport="grpc", action="unload", target="b")
    await plane.repository_action(grant, {"unload_dependents": False})
    assert not plane.model_ready(guarded.creds("admin"), "b", None, transport="rest")
    listed = plane.key_action(plane.admin(guarded.creds("admin"), transport="rest", action="tenants.list"))
    assert {t["name"] for t in listed} >= {"acme", "ops"}
    with pytest.raises(InternalError):  # a grant names its action
        await plane.repository_action(plane.admin(guarded.creds("admin"), transport="rest", action="keys.list"))
    lines = guarded.audit_lines()
    admin = [(r["action"], r["decision"], r["transport"]) for r in lines if r["tenant"] in ("ops", "acme")]
    assert admin == [
        ("unload", "rejected", "rest"), ("unload", "accepted", "grpc"), ("tenants.list", "accepted", "rest"),
    ]


@on_plane
async def test_metrics_are_for_admins_unless_opened(guarded: Plane) -> None:
    plane = guarded.plane
    with pytest.raises(PermissionDenied):
        plane.metrics_text(guarded.creds("all"), transport="rest")
    assert b"bastion_" in plane.metrics_text(guarded.creds("admin"), transport="rest")
