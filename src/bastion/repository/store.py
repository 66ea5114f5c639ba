"""The model repository: what is on disk, what is loaded, and hot reload between the two.

Layout (Triton's): ``<root>/<model>/config.yaml`` and ``<root>/<model>/<version>/<files>``,
versions being positive integer directory names without leading zeros. Other entries
(``metrics.json``, test data, hidden temp files) are ignored.

A sealed bundle ``<root>/<model>.bundle`` (``bastion bundle seal``) stands for model
``<model>``: its config.yaml and versions are inside, encrypted and signed. It is
verified against ``trusted_signers`` before anything is decrypted, its data key is
unwrapped by ``key_provider``, and its files are decrypted into memory only and handed
to the runtime as bytes. A bundle whose file name disagrees with the model name sealed
inside it is refused (so a signed bundle cannot be served under another name), and so
is a model present both as a directory and as a bundle. Replace a bundle atomically
(``seal --out`` writes a hidden temp file and renames it): its file stamp changing
reloads it; versions whose content (SHA-256 in the signed manifest) did not change are
not reloaded.

Threading: every state change and every listener call happens on the event loop
thread; only disk scans, config parsing and runtime creation run in worker threads.
Listeners therefore never race each other or the repository.

Reload semantics (what operators can rely on):

* A changed version directory or config.yaml reloads the affected versions; the old
  runtime keeps serving until the new one is loaded, then listeners get
  ``version_unloaded(old)`` immediately followed by ``version_loaded(new)`` with no
  await in between, so no request sees the gap. LoadedVersion objects are distinct per
  load, so listeners may compare them by identity. The old runtime is closed once the
  listeners have drained it (see RepositoryListener).
* A load that fails is not retried until its files or config change (or ``load()``).
  If a reload fails, the previous runtime keeps serving and ``reason`` says so; if
  none of the versions the policy selects can be loaded, older loaded versions that
  still exist on disk keep serving rather than leaving the model empty.
* An invalid config.yaml keeps the loaded versions serving with the previous config; so
  does a replacement bundle that is refused (bad signature, wrong key, ...).
* ``unload()`` sticks: the poller leaves the model alone until ``load()``.
* A repository root that cannot be read during a poll changes nothing (an unmounted
  volume must not unload every model); a model directory that disappears is unloaded.
* Write new versions atomically (copy to a hidden temp dir, then rename): a
  half-copied version simply fails to load and is retried once its files change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from bastion.core.errors import BastionError, NotFound
from bastion.core.metadata import ModelConfig, VersionPolicy
from bastion.guard.bundles import BUNDLE_SUFFIX, CONFIG_PATH, BundleError, OpenBundle, load_public_key, verify_bundle
from bastion.guard.keyproviders import KeyProvider, load_key_provider
from bastion.repository.config import CONFIG_FILE, ConfigError, load_model_config, parse_model_config_yaml
from bastion.repository.stamps import Stamp, file_stamp
from bastion.repository.zoos import ZOO_FILE, ZooCatalog
from bastion.runtimes import ModelLoadError, create_runtime
from bastion.runtimes.base import Runtime, RuntimeFactory

__all__ = ["LoadedVersion", "ModelRepository", "ModelState", "ModelStatus", "RepositoryListener"]

log = logging.getLogger("bastion.repository")

# Runtime creation is mostly native code that releases the GIL (ORT graph
# optimisation, file reads); a few in parallel shorten startup without
# oversubscribing the cores the server itself needs.
_LOAD_CONCURRENCY = max(1, min(4, os.cpu_count() or 1))

# Longest wait for listeners to drain an unloaded version before its runtime is closed.
DRAIN_LIMIT_S = 60.0



class ModelState(str, Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"
    FAILED = "FAILED"


@dataclass(frozen=True)
class LoadedVersion:
    """A loaded, ready model version.

    ``config`` is the effective config: inputs, outputs and platform come from the
    runtime (so an ONNX model whose config.yaml declares no tensors still has them).
    """

    model: str
    version: int
    config: ModelConfig
    runtime: Runtime


@dataclass
class ModelStatus:
    """A snapshot of one model. ``config`` is the effective config of the newest loaded
    version, or the parsed config.yaml when nothing is loaded (None if it is invalid)."""

    name: str
    state: ModelState
    reason: str
    config: ModelConfig | None
    versions: dict[int, LoadedVersion]  # loaded, ready versions


class RepositoryListener(Protocol):
    """Told about every version that starts or stops serving, on the event loop thread.

    ``version_unloaded`` may return an awaitable (e.g. the task draining that
    version's queue): the runtime is closed only once every such awaitable is done
    (or after ``DRAIN_LIMIT_S``), so requests already queued still get an answer.
    """

    def version_loaded(self, loaded: LoadedVersion) -> None: ...

    def version_unloaded(self, loaded: LoadedVersion) -> Awaitable[None] | None: ...


@dataclass
class _DiskModel:
    """What one scan saw of a model directory, or of a sealed bundle (``bundle`` set; its
    versions are only known once it is opened, so ``versions`` is empty then)."""

    config_stamp: Stamp | None
    versions: dict[int, Stamp]
    bundle: Path | None = None
    conflict: str | None = None  # why this model cannot be served as it stands on disk


@dataclass
class _Slot:
    """A loaded version and what it was loaded from (to tell when it is stale)."""

    loaded: LoadedVersion
    stamp: Stamp
    source: ModelConfig


@dataclass
class _Failure:
    stamp: Stamp
    source: ModelConfig
    error: str


@dataclass
class _Entry:
    name: str
    wanted: bool
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = ""
    config: ModelConfig | None = None  # last valid parsed config.yaml
    config_read: bool = False
    config_stamp: Stamp | None = None
    config_error: str | None = None
    slots: dict[int, _Slot] = field(default_factory=dict)
    failed: dict[int, _Failure] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # versions of the last bundle opened, stamped with their files' manifest digests
    bundle_versions: dict[int, Stamp] = field(default_factory=dict)


class ModelRepository:
    """Loads the models of a repository directory and keeps them in sync with it.

    ``explicit=True`` is Triton's explicit model control: only models loaded with
    ``load()`` or named in ``initial_models`` are served, the rest are listed as
    UNAVAILABLE. The poller keeps loaded models in sync in both modes. Without
    ``explicit``, ``initial_models`` limits what ``start()`` loads; directories that
    appear later are loaded by the poller.

    ``trusted_signers`` (Ed25519 public key PEM files) and ``key_provider`` (a provider,
    or its spec such as ``env:VAR``) are needed only to serve sealed bundles; without
    them a bundle's model is FAILED with a reason saying what to configure.
    """

    def __init__(
        self,
        root: Path,
        *,
        poll_interval_s: float | None = 5.0,
        runtime_factory: RuntimeFactory = create_runtime,
        explicit: bool = False,
        initial_models: list[str] | None = None,
        trusted_signers: list[Path] | None = None,
        key_provider: KeyProvider | str | None = None,
    ) -> None:
        self.root = Path(root)
        # Read now, so a bad key file or an unset key variable stops the server at start
        # rather than failing every bundle.
        self._trusted = [load_public_key(Path(p)) for p in trusted_signers or []]
        self._key_provider = load_key_provider(key_provider) if isinstance(key_provider, str) else key_provider
        self._poll_interval_s = poll_interval_s
        self._factory = _hardening_checked(runtime_factory)
        self._explicit = explicit
        self._initial = None if initial_models is None else list(initial_models)
        self._models: dict[str, _Entry] = {}
        self._listeners: list[RepositoryListener] = []
        self._poller: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # runtimes waiting for listeners to drain
        self.zoos = ZooCatalog(self.root)

    # ----------------------------------------------------------------- lifecycle

    def add_listener(self, listener: RepositoryListener) -> None:
        """Subscribe to version (un)loads; versions loaded already are replayed to it at once."""
        self._listeners.append(listener)
        for entry in self._models.values():
            for slot in entry.slots.values():
                _call(listener, "version_loaded", slot.loaded)

    async def start(self, progress: Callable[[str, int, int], None] | None = None) -> None:
        """Scan the root, load the models to serve, then start polling (if an interval is set).

        ``progress(model, done, total)`` is called as each model finishes loading.
        """
        try:
            disk = await asyncio.to_thread(_scan_root, self.root)
        except OSError as exc:
            raise NotFound(f"model repository {self.root} cannot be read: {exc}") from None
        if self._initial is not None:
            unknown = sorted(set(self._initial) - set(disk))
            if unknown:
                raise NotFound(f"initial model(s) {', '.join(unknown)} not found in repository {self.root}")
        for name in sorted(disk):
            if name not in self._models:
                wanted = name in self._initial if self._initial is not None else not self._explicit
                self._models[name] = _new_entry(name, wanted)
        todo = [e for e in self._models.values() if e.wanted and e.name in disk]
        done = 0
        gate = asyncio.Semaphore(_LOAD_CONCURRENCY)

        async def load_one(entry: _Entry) -> None:
            nonlocal done
            async with gate:
                await self._sync(entry, disk[entry.name], force=False)
            done += 1
            if progress is not None:
                try:
                    progress(entry.name, done, len(todo))
                except Exception:
                    log.exception("progress callback failed")

        await asyncio.gather(*(load_one(e) for e in todo))
        await asyncio.to_thread(self.zoos.refresh)
        log.info(
            "model repository loaded",
            extra={"root": str(self.root), "models": len(self._models), "ready": self._ready_count()},
        )
        if self._poll_interval_s and self._poller is None:
            self._poller = asyncio.create_task(self._poll_forever(self._poll_interval_s), name="bastion-repo-poll")

    async def stop(self) -> None:
        """Stop polling and unload everything (listeners are told, runtimes closed)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for entry in list(self._models.values()):
            async with entry.lock:
                self._retire(entry, list(entry.slots))
                entry.state, entry.reason = ModelState.UNAVAILABLE, "repository stopped"
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # ------------------------------------------------------------------- control

    async def poll_once(self) -> None:
        """Bring the served state in line with the disk: new, changed and removed models/versions."""
        try:
            disk = await asyncio.to_thread(_scan_root, self.root)
        except OSError as exc:
            log.error("cannot scan model repository; keeping current models", extra={"error": str(exc)})
            return
        for name in [n for n in self._models if n not in disk]:
            await self._remove(name)
        for name in sorted(disk):
            if name not in self._models:
                self._models[name] = _new_entry(name, wanted=not self._explicit)
        for name in sorted(disk):
            entry = self._models[name]
            if entry.wanted:
                await self._sync(entry, disk[name], force=False)
        await asyncio.to_thread(self.zoos.refresh)

    async def load(self, name: str) -> ModelStatus:
        """Load, or reload from disk, one model; it is served (and polled) from now on."""
        snapshot = await asyncio.to_thread(_scan_named, self.root, name) if _plain_name(name) else None
        if snapshot is None:
            if name in self._models:
                await self._remove(name)
            raise NotFound(f"model {name!r} not found in repository {self.root}")
        entry = self._models.setdefault(name, _new_entry(name, wanted=True))
        entry.wanted = True
        await self._sync(entry, snapshot, force=True)
        return self.get(name)

    async def unload(self, name: str) -> None:
        """Unload every version of ``name``; it stays unloaded until ``load(name)``."""
        entry = self._entry(name)
        async with entry.lock:
            entry.wanted = False
            self._retire(entry, list(entry.slots))
            entry.failed.clear()
            entry.config_read = False
            entry.state, entry.reason = ModelState.UNAVAILABLE, "unloaded"
        log.info("model unloaded", extra={"model": name})

    def get(self, name: str) -> ModelStatus:
        return _status(self._entry(name))

    def index(self) -> list[ModelStatus]:
        return [_status(self._models[n]) for n in sorted(self._models)]

    # ------------------------------------------------------------------ internals

    def _entry(self, name: str) -> _Entry:
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"unknown model {name!r}")
        return entry

    def _ready_count(self) -> int:
        return sum(1 for e in self._models.values() if e.state is ModelState.READY)

    async def _poll_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll_once()
            except Exception:  # the poller must outlive any one bad scan
                log.exception("model repository poll failed")

    async def _remove(self, name: str) -> None:
        entry = self._models.get(name)
        if entry is None:
            return
        async with entry.lock:
            self._retire(entry, list(entry.slots))
        if self._models.get(name) is entry:
            del self._models[name]
        log.info("model directory removed; model unloaded", extra={"model": name})

    async def _sync(self, entry: _Entry, disk: _DiskModel, *, force: bool) -> None:
        """Sync one model, keeping any failure inside it: other models keep serving."""
        async with entry.lock:
            if not entry.wanted:  # unloaded while this sync waited for the lock
                return
            try:
                await self._sync_locked(entry, disk, force=force)
            except Exception as exc:
                log.exception("model sync failed", extra={"model": entry.name})
                entry.reason = f"internal error while loading: {exc!r}"
                entry.state = ModelState.READY if entry.slots else ModelState.FAILED

    async def _sync_locked(self, entry: _Entry, disk: _DiskModel, *, force: bool) -> None:
        name = entry.name
        opened: OpenBundle | None = None  # a bundle's plaintext stays in memory for this sync only
        if force or not entry.config_read or disk.config_stamp != entry.config_stamp:
            entry.config_read, entry.config_stamp = True, disk.config_stamp
            try:
                if disk.conflict is not None:
                    raise ConfigError(disk.conflict)
                if disk.bundle is None:
                    entry.config = await asyncio.to_thread(load_model_config, self.root / name)
                else:
                    opened, entry.config = await asyncio.to_thread(self._open_bundle, name, disk.bundle)
                    entry.bundle_versions = _bundle_versions(opened)
                entry.config_error = None
            except (ConfigError, BundleError) as exc:
                entry.config_error = str(exc)
                log.error("invalid model config", extra={"model": name, "error": entry.config_error})
        if entry.config_error is not None:
            if entry.slots:
                entry.state = ModelState.READY
                previous = "the previously loaded bundle" if disk.bundle is not None else "the previous config"
                entry.reason = (
                    f"{entry.config_error}; still serving version(s) {_versions(entry.slots)} with {previous}"
                )
            else:
                entry.state, entry.reason = ModelState.FAILED, entry.config_error
            return
        config = entry.config
        assert config is not None  # read successfully above, now or earlier
        if disk.bundle is not None:
            disk = dataclasses.replace(disk, versions=dict(entry.bundle_versions))

        wanted = _select(config.version_policy, disk.versions)
        to_load = [v for v in wanted if force or self._stale(entry, v, disk.versions[v], config)]
        if to_load and not entry.slots:
            entry.state, entry.reason = ModelState.LOADING, ""

        loaded: dict[int, Runtime] = {}
        for version in to_load:
            try:
                if disk.bundle is None:
                    loaded[version] = await asyncio.to_thread(self._factory, config, self.root / name / str(version))
                else:
                    if opened is None:  # the bundle is unchanged but a version still has to load
                        opened, _ = await asyncio.to_thread(self._open_bundle, name, disk.bundle)
                    loaded[version] = await asyncio.to_thread(self._load_sealed, config, opened, disk.bundle, version)
                entry.failed.pop(version, None)
            except Exception as exc:  # any runtime's failure is this version's, not the server's
                error = str(exc) or repr(exc)
                entry.failed[version] = _Failure(disk.versions[version], config, error)
                log.error("model version failed to load", extra={"model": name, "version": version, "error": error})

        for version, runtime in sorted(loaded.items()):
            new = LoadedVersion(name, version, _effective(config, runtime), runtime)
            old = entry.slots.get(version)
            entry.slots[version] = _Slot(new, disk.versions[version], config)
            drains = self._notify_unloaded(old.loaded) if old is not None else []
            for listener in list(self._listeners):
                _call(listener, "version_loaded", new)
            if old is not None:
                self._close_after(old.loaded, drains)
            log.info("model version loaded", extra={"model": name, "version": version, "reload": old is not None})

        if any(v in entry.slots for v in wanted):
            retire = [v for v in entry.slots if v not in wanted]
            fallback: list[int] = []
        else:
            # Nothing the policy selects could be loaded: keep what still exists on disk.
            retire = [v for v in entry.slots if v not in disk.versions]
            fallback = [v for v in entry.slots if v in disk.versions]
        self._retire(entry, retire)
        entry.failed = {v: f for v, f in entry.failed.items() if v in disk.versions}
        entry.state = ModelState.READY if entry.slots else ModelState.FAILED
        entry.reason = _reason(entry, config, wanted, disk, fallback)

    def _open_bundle(self, name: str, path: Path) -> tuple[OpenBundle, ModelConfig]:
        """Verify (signature first), unwrap and read the config of a sealed bundle. Worker thread."""
        source = path.name
        missing = [
            what
            for what, present in (
                ("trusted signers (--trusted-signer PUBLIC_KEY.pem)", self._trusted),
                ("key provider (--bundle-key-provider env:VAR, file:PATH or module:pkg.mod:factory)",
                 self._key_provider is not None),
            )
            if not present
        ]
        if missing:
            raise BundleError(f"{source}: a sealed bundle, but the server has no {' and no '.join(missing)}")
        assert self._key_provider is not None
        try:
            data = path.read_bytes()  # once: what is verified is exactly what is decrypted
        except OSError as exc:
            raise BundleError(f"{source}: cannot read: {exc.strerror or exc}") from None
        opened = verify_bundle(data, self._trusted, source=source).unseal(self._key_provider)
        if opened.header.model != name:
            raise BundleError(
                f"{source}: sealed for model {opened.header.model!r}; a bundle is served under the name "
                f"it was sealed with, so name the file {opened.header.model}{BUNDLE_SUFFIX}"
            )
        config = parse_model_config_yaml(name, opened.read(CONFIG_PATH), source=f"{source}:{CONFIG_FILE}")
        return opened, config

    def _load_sealed(self, config: ModelConfig, opened: OpenBundle, path: Path, version: int) -> Runtime:
        # version_dir names the version in messages only: the runtime gets the bytes.
        return self._factory(config, path / str(version), files=opened.read_version(version))

    @staticmethod
    def _stale(entry: _Entry, version: int, stamp: Stamp, config: ModelConfig) -> bool:
        slot = entry.slots.get(version)
        if slot is not None and slot.stamp == stamp and slot.source == config:
            return False
        failure = entry.failed.get(version)
        # An unchanged failure would fail again: wait for the files or config to change.
        return not (failure is not None and failure.stamp == stamp and failure.source == config)

    def _retire(self, entry: _Entry, versions: Iterable[int]) -> None:
        for version in sorted(versions):
            slot = entry.slots.pop(version)
            self._close_after(slot.loaded, self._notify_unloaded(slot.loaded))
            log.info("model version unloaded", extra={"model": entry.name, "version": version})

    def _notify_unloaded(self, loaded: LoadedVersion) -> list[Awaitable[Any]]:
        """Tell every listener; collect what they ask the close to wait for."""
        drains = []
        for listener in list(self._listeners):
            result = _call(listener, "version_unloaded", loaded)
            if inspect.isawaitable(result):
                drains.append(result)
        return drains

    def _close_after(self, loaded: LoadedVersion, drains: list[Awaitable[Any]]) -> None:
        if not drains:
            _close(loaded)
            return
        task = asyncio.get_running_loop().create_task(_close_when_drained(loaded, drains))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


# ---------------------------------------------------------------------- helpers


def _new_entry(name: str, wanted: bool) -> _Entry:
    entry = _Entry(name, wanted)
    if not wanted:
        entry.reason = "not loaded (explicit model control); load it to serve it"
    return entry


def _call(listener: RepositoryListener, event: str, loaded: LoadedVersion) -> Any:
    try:
        return getattr(listener, event)(loaded)
    except Exception:  # one broken listener must not stop the others or the repository
        log.exception("repository listener failed", extra={"model": loaded.model, "version": loaded.version})
        return None


async def _close_when_drained(loaded: LoadedVersion, drains: list[Awaitable[Any]]) -> None:
    # asyncio.wait, not wait_for(gather): a timeout must not cancel the listeners' own tasks.
    futures = [asyncio.ensure_future(d) for d in drains]
    _, pending = await asyncio.wait(futures, timeout=DRAIN_LIMIT_S)
    if pending:
        log.warning(
            "closing a model version that listeners have not drained",
            extra={"model": loaded.model, "version": loaded.version, "limit_s": DRAIN_LIMIT_S},
        )
    _close(loaded)


def _close(loaded: LoadedVersion) -> None:
    try:
        loaded.runtime.close()
    except Exception:
        log.exception("runtime close failed", extra={"model": loaded.model, "version": loaded.version})


def _effective(config: ModelConfig, runtime: Runtime) -> ModelConfig:
    return dataclasses.replace(
        config, inputs=tuple(runtime.inputs), outputs=tuple(runtime.outputs), platform=runtime.platform
    )


def _status(entry: _Entry) -> ModelStatus:
    versions = {v: s.loaded for v, s in sorted(entry.slots.items())}
    config = versions[max(versions)].config if versions else entry.config
    return ModelStatus(entry.name, entry.state, entry.reason, config, versions)


def _select(policy: VersionPolicy, on_disk: dict[int, Stamp]) -> list[int]:
    versions = sorted(on_disk)
    if policy.kind == "all":
        return versions
    if policy.kind == "specific":
        return [v for v in versions if v in policy.versions]
    return versions[-policy.num_versions :]


def _reason(entry: _Entry, config: ModelConfig, wanted: list[int], disk: _DiskModel, fallback: list[int]) -> str:
    parts: list[str] = []
    if not disk.versions:
        where = disk.bundle.name if disk.bundle is not None else f"{entry.name}/"
        parts.append(f"no version directories (positive integers such as 1/) in {where}")
    elif not wanted:
        parts.append(f"no version on disk ({_versions(disk.versions)}) matches the version policy")
    if config.version_policy.kind == "specific":
        missing = [v for v in config.version_policy.versions if v not in disk.versions]
        if missing:
            parts.append(f"version(s) {_versions(missing)} of version_policy.specific not on disk")
    for version in wanted:
        failure = entry.failed.get(version)
        if failure is None:
            continue
        if version in entry.slots:
            parts.append(f"version {version} failed to reload, still serving the previous one: {failure.error}")
        else:
            parts.append(f"version {version} failed to load: {failure.error}")
    if fallback:
        parts.append(f"serving older version(s) {_versions(fallback)} because none selected by the policy loaded")
    return "; ".join(parts)


def _versions(versions: Iterable[int]) -> str:
    return ", ".join(str(v) for v in sorted(versions))


def _hardening_checked(factory: RuntimeFactory) -> RuntimeFactory:
    """Load, then make sure the model's outputs fit its ``hardening`` (probability and label
    outputs exist, float, >= 2 classes): a model that cannot be hardened as configured must
    fail to load rather than serve unhardened answers."""

    def load(config: ModelConfig, version_dir: Path, **kwargs: Any) -> Runtime:
        runtime = factory(config, version_dir, **kwargs)
        if config.hardening is not None:
            from bastion.guard.hardening import check_against

            try:
                check_against(config.hardening, config.outputs or runtime.outputs,  # type: ignore[arg-type]
                              where=f"{config.name}/config.yaml: hardening")
            except BastionError as err:
                runtime.close()
                raise ModelLoadError(err.message) from None
        return runtime

    return load  # type: ignore[return-value]


def _plain_name(name: str) -> bool:
    """A model name that is one directory inside the root (no path tricks)."""
    # 200 bytes leaves room for the ".bundle" suffix under the usual 255-byte name limit;
    # a longer name cannot be on disk, and asking the file system would be an OSError
    return (
        bool(name) and len(name.encode()) <= 200 and not name.startswith(".") and not any(c in name for c in "/\\\0")
    )


# Disk scans run in worker threads: stat only, nothing is read.


def _scan_root(root: Path) -> dict[str, _DiskModel]:
    models: dict[str, _DiskModel] = {}
    bundles: dict[str, Path] = {}
    with os.scandir(root) as it:
        for item in it:
            if item.name.startswith("."):
                continue
            if item.is_dir():
                snapshot = _scan_model(Path(item.path))
                if snapshot is not None:
                    models[item.name] = snapshot
            elif item.name.endswith(BUNDLE_SUFFIX) and item.is_file():
                bundles[item.name[: -len(BUNDLE_SUFFIX)]] = Path(item.path)
    for name, path in bundles.items():
        models[name] = _bundle_model(name, path, models.get(name))
    return models


def _scan_named(root: Path, name: str) -> _DiskModel | None:
    """One model of the root, as ``_scan_root`` would see it."""
    plain = _scan_model(root / name)
    path = root / f"{name}{BUNDLE_SUFFIX}"
    return _bundle_model(name, path, plain) if path.is_file() else plain


def _bundle_model(name: str, path: Path, plain: _DiskModel | None) -> _DiskModel:
    stamp = file_stamp(path)
    if plain is None:
        return _DiskModel(stamp, {}, bundle=path)
    return _DiskModel(
        (stamp, plain.config_stamp, tuple(sorted(plain.versions.items()))),
        {},
        bundle=path,
        conflict=f"both {name}/ and {path.name} exist; remove one of them (which to serve is ambiguous)",
    )


def _bundle_versions(opened: OpenBundle) -> dict[int, Stamp]:
    """Each version of a bundle stamped by its files' manifest digests (config.yaml is compared apart)."""
    stamps: dict[int, list[tuple[str, str]]] = {}
    for f in opened.header.files:
        if f.version is not None:
            stamps.setdefault(f.version, []).append((f.path, f.sha256))
    return {v: tuple(sorted(items)) for v, items in stamps.items()}


def _scan_model(model_dir: Path) -> _DiskModel | None:
    try:
        items = list(os.scandir(model_dir))
    except (FileNotFoundError, NotADirectoryError):
        return None
    if any(item.name == ZOO_FILE for item in items) and not any(item.name == CONFIG_FILE for item in items):
        return None  # a zoo, not a model: bastion.repository.zoos serves it
    versions: dict[int, Stamp] = {}
    for item in items:
        if item.name.isdigit() and not item.name.startswith("0") and item.is_dir():
            versions[int(item.name)] = _tree_stamp(item.path)
    return _DiskModel(file_stamp(model_dir / CONFIG_FILE), versions)


def _tree_stamp(path: str) -> Stamp:
    """Name, size and mtime of every file under a version directory, hidden files aside
    (temporary files of atomic writes must not trigger reloads)."""
    entries: list[tuple[Any, ...]] = []
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            items = list(os.scandir(current))
        except OSError:
            continue
        for item in items:
            if item.name.startswith("."):
                continue
            if item.is_dir():
                stack.append(item.path)
                continue
            try:
                st = item.stat()
            except OSError:  # deleted between listing and stat
                continue
            entries.append((os.path.relpath(item.path, path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))
