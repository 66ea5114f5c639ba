"""Zoos in the model repository: ``<root>/<zoo>/zoo.yaml`` (+ ``profile.json`` once measured).

A zoo's variants are ordinary models of the same repository, loaded by the model
store; this catalog only keeps each zoo's definition and measured profile current.
Files are re-read only when their stat stamp changes, so polling stays cheap.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from bastion.core.errors import BastionError
from bastion.repository.stamps import Stamp, file_stamp
from bastion.zoo.profiles import ZooProfile, load_profile
from bastion.zoo.spec import ZooSpec, check_profile, load_zoo_spec

log = logging.getLogger("bastion.repository")

ZOO_FILE = "zoo.yaml"
PROFILE_FILE = "profile.json"

@dataclass(frozen=True)
class LoadedZoo:
    name: str
    directory: Path
    spec: ZooSpec | None
    profile: ZooProfile | None
    error: str  # why the zoo cannot serve ("" when it can, given loaded variants)


def load_zoo(zoo_dir: Path) -> LoadedZoo:
    """Read one zoo's definition and profile; problems become ``error``, never exceptions."""
    name = zoo_dir.name
    try:
        spec = load_zoo_spec(zoo_dir)
    except (BastionError, OSError) as err:
        return LoadedZoo(name, zoo_dir, None, None, str(err))
    profile_path = zoo_dir / PROFILE_FILE
    if not profile_path.exists():
        return LoadedZoo(
            name, zoo_dir, spec, None,
            f"zoo '{name}' has no measured profile; run `bastion profile <repository> --zoo {name}`",
        )
    try:
        profile = load_profile(profile_path)
    except (BastionError, OSError) as err:
        return LoadedZoo(name, zoo_dir, spec, None, str(err))
    try:
        check_profile(spec, profile, source=f"{name}/{PROFILE_FILE}")
    except BastionError as err:
        return LoadedZoo(name, zoo_dir, spec, profile, f"{err}; measure it again with `bastion profile`")
    return LoadedZoo(name, zoo_dir, spec, profile, "")


class ZooCatalog:
    """The zoos of a repository root. ``refresh`` runs in a worker thread; readers on the
    event loop see either the old or the new mapping, never a half-built one."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._zoos: dict[str, LoadedZoo] = {}
        self._stamps: dict[str, tuple[Stamp | None, Stamp | None]] = {}

    def refresh(self) -> None:
        zoos: dict[str, LoadedZoo] = {}
        stamps: dict[str, tuple[Stamp | None, Stamp | None]] = {}
        try:
            entries = list(os.scandir(self.root))
        except OSError as err:
            log.error("cannot scan repository for zoos", extra={"error": str(err)})
            return
        for item in entries:
            if item.name.startswith(".") or not item.is_dir():
                continue
            zoo_dir = Path(item.path)
            stamp = (file_stamp(zoo_dir / ZOO_FILE), file_stamp(zoo_dir / PROFILE_FILE))
            if stamp[0] is None:
                continue
            stamps[item.name] = stamp
            old = self._zoos.get(item.name)
            if old is not None and self._stamps.get(item.name) == stamp:
                zoos[item.name] = old
                continue
            zoos[item.name] = loaded = load_zoo(zoo_dir)
            if loaded.error:
                log.warning("zoo not serving", extra={"zoo": item.name, "reason": loaded.error})
            else:
                log.info("zoo loaded", extra={"zoo": item.name, "variants": list(loaded.spec.variants)})  # type: ignore[union-attr]
        self._zoos = zoos
        self._stamps = stamps

    def get(self, name: str) -> LoadedZoo | None:
        return self._zoos.get(name)

    def all(self) -> list[LoadedZoo]:
        return [self._zoos[n] for n in sorted(self._zoos)]
