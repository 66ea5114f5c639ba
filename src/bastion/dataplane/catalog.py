"""What the server offers, in protocol-neutral terms: model and zoo metadata, per-model
readiness, version states and the repository index. The codecs turn these into V2 JSON,
gRPC messages or TF-Serving's status document; scope checks happen in the plane before."""

from __future__ import annotations

from typing import Any

from bastion.core.errors import ModelNotReady, NotFound
from bastion.core.metadata import ModelMetadata, VersionStatus
from bastion.dataplane.registry import Registry, version_number
from bastion.dataplane.zoo_router import ZooRouter
from bastion.repository.store import ModelState

ZOO_PLATFORM = "bastion_zoo"


class Catalog:
    def __init__(self, registry: Registry, zoos: ZooRouter) -> None:
        self._registry = registry
        self._zoos = zoos
        self._repository = registry.repository

    def model_ready(self, name: str, version: str | None) -> bool:
        zoo = self._zoos.zoo_named(name)
        if zoo is not None:
            try:
                self._zoos.front(zoo)
            except ModelNotReady:
                return False
            return not version
        try:
            self._registry.resolve(name, version)
        except ModelNotReady:
            return False
        except NotFound:
            if version:
                self._repository.get(name)  # unknown model → NotFound, unknown version → not ready
                return False
            raise
        return True

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        """The signature; a model that is not serving says its state and why."""
        zoo = self._zoos.zoo_named(name)
        if zoo is not None:
            if version:
                raise NotFound(f"'{name}' is a zoo and has no versions")
            first = self._zoos.first_variant(zoo)
            return ModelMetadata(name, (), ZOO_PLATFORM, tuple(first.inputs.values()), first.outputs)
        try:
            served = self._registry.resolve(name, version)
        except ModelNotReady:
            status = self._repository.get(name)
            cfg = status.config
            return ModelMetadata(
                name=name,
                versions=(),
                platform=cfg.platform or cfg.runtime if cfg else "",
                inputs=cfg.inputs if cfg else (),
                outputs=cfg.outputs if cfg else (),
                state=status.state.value,
                reason=status.reason,
            )
        versions = (served.version,) if version else tuple(str(v) for v in self._registry.versions(name))
        return ModelMetadata(name, versions, served.platform, tuple(served.inputs.values()), served.outputs)

    def version_states(self, name: str, version: str | None) -> list[VersionStatus]:
        zoo = self._zoos.zoo_named(name)
        if zoo is not None:
            if version:
                raise NotFound(f"'{name}' is a zoo and has no versions")
            try:
                self._zoos.front(zoo)
            except ModelNotReady as err:
                return [VersionStatus("", ModelState.UNAVAILABLE.value, err.message)]
            return [VersionStatus("", ModelState.READY.value)]
        status = self._repository.get(name)
        if version:
            if version_number(version) in status.versions:
                return [VersionStatus(version, ModelState.READY.value)]
            return [VersionStatus(version, ModelState.UNAVAILABLE.value, f"version {version} is not loaded")]
        if status.versions:
            return [VersionStatus(str(v), ModelState.READY.value) for v in sorted(status.versions)]
        return [VersionStatus("", status.state.value, status.reason)]

    def index(self) -> list[dict[str, Any]]:
        """Every model version and zoo with its state (the repository extension's index)."""
        rows: list[dict[str, Any]] = []
        for status in self._repository.index():
            if status.versions:
                rows.extend(
                    {"name": status.name, "version": str(v), "state": "READY", "reason": ""}
                    for v in sorted(status.versions)
                )
            else:
                rows.append({"name": status.name, "version": "", "state": status.state.value, "reason": status.reason})
        for zoo in self._zoos.all():
            try:
                self._zoos.front(zoo)
                state, reason = "READY", ""
            except ModelNotReady as err:
                state, reason = "UNAVAILABLE", err.message
            rows.append({"name": zoo.name, "version": "", "state": state, "reason": reason, "kind": "zoo"})
        return rows

    def ready(self, strict: bool) -> bool:
        """Every model that should serve has a loaded version (``strict``: failed ones count too)."""
        for status in self._repository.index():
            if status.versions:
                continue
            if status.state is ModelState.UNAVAILABLE:
                continue  # deliberately not loaded (explicit mode or unloaded by an operator)
            if status.state is ModelState.LOADING or strict:
                return False
        return True
