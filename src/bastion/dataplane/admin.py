"""What an operator may do through the plane, and the audit line each action leaves.

Every transport reaches these with an ``AdminGrant`` (admin role already checked). Each
operation writes its audit record *before* it acts, so an attempt that then fails is
still on record. The rules on repository parameters are here once, so a REST and a gRPC
load request with the same parameters get the same answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from bastion.core.errors import InternalError, InvalidInput, NotFound
from bastion.dataplane.admission import AdminGrant
from bastion.guard.audit_record import AuditRecord
from bastion.guard.gate import Gate
from bastion.repository.store import ModelRepository, ModelState

# set by a multi-worker launcher so that an operator's load/unload reaches every worker
ControlHook = Callable[[str, str], Awaitable[None]]

# the repository actions and the parameters each accepts (Triton's repository extension)
REPOSITORY_PARAMETERS: dict[str, frozenset[str]] = {
    "load": frozenset(),
    # tritonclient always sends it; Bastion has no ensembles, so there are never dependents
    "unload": frozenset({"unload_dependents"}),
}
KEY_ACTIONS = frozenset(
    {"keys.list", "keys.create", "keys.revoke", "tenants.list", "tenants.set_limits", "tenants.set_defense_class"}
)


def _q(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_repository_parameters(action: str, parameters: Mapping[str, Any]) -> None:
    """Refuse client-supplied configs and model files, and any parameter the action does not take."""
    allowed = REPOSITORY_PARAMETERS[action]
    what = "loading a model" if action == "load" else "unloading a model"
    for key in parameters:
        if key == "config" or key.startswith("file:"):
            # Triton lets a client ship a model config and model files with the load
            # request. Bastion serves only models that are in its repository (sealed,
            # checked); loading client-sent code is exactly what it must not do.
            raise InvalidInput(
                f"parameters[{_q(key)}]: {what} with a client-supplied config or model files is not "
                "supported; Bastion loads models only from its model repository"
            )
        if key not in allowed:
            raise InvalidInput(
                f"parameters[{_q(key)}]: unknown {what} parameter; "
                + (f"expected one of {', '.join(sorted(allowed))}" if allowed else "none are supported")
            )


class Operations:
    """Repository load/unload and key management for admin grants."""

    def __init__(self, repository: ModelRepository, gate: Gate) -> None:
        self._repository = repository
        self._gate = gate
        self.control_hook: ControlHook | None = None

    def _accepted(self, grant: AdminGrant) -> None:
        self._gate.record(AuditRecord.of(grant.principal, grant.transport, grant.action, grant.target,
                                         decision="accepted", status=200))

    async def repository(self, grant: AdminGrant, parameters: Mapping[str, Any]) -> None:
        """``grant.action`` is ``load`` or ``unload`` of the model ``grant.target``."""
        action, name = grant.action, grant.target
        if action not in REPOSITORY_PARAMETERS:
            raise InternalError(f"an admin grant for '{action}' was used to load or unload a model")
        if not name:
            raise InvalidInput("model_name: must not be empty")
        check_repository_parameters(action, parameters)
        self._accepted(grant)
        if action == "load":
            status = await self._repository.load(name)
            if status.state is ModelState.FAILED and not status.versions:
                raise InvalidInput(f"model '{name}' failed to load: {status.reason}")
        else:
            await self._repository.unload(name)
        if self.control_hook is not None:
            await self.control_hook(name, action)

    def keys(self, grant: AdminGrant, doc: object = None) -> Any:
        """One key-store action (``keys.create``, ``tenants.set_limits``, ...) on ``grant.target``;
        404 when the server runs without a key store."""
        from bastion.guard.admin import key_admin

        if grant.action not in KEY_ACTIONS:
            raise NotFound(f"no key-store action '{grant.action}'")
        admin = key_admin(self._gate.authenticator)
        self._accepted(grant)
        target = grant.target
        match grant.action:
            case "keys.list":
                return admin.list_keys(True)
            case "keys.create":
                return admin.create(doc)
            case "keys.revoke":
                return admin.revoke(target)
            case "tenants.list":
                return admin.tenants()
            case "tenants.set_limits":
                return admin.set_limits(target, doc)
            case _:  # tenants.set_defense_class
                return admin.set_defense_class(target, doc)
