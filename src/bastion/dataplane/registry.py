"""Which model versions serve now: one ``Served`` per loaded version, each with its batcher.

The registry listens to the repository (``version_loaded`` / ``version_unloaded`` on the
event loop thread) and answers the routing question of the hot path: which loaded
version serves ``name`` (the newest unless a version is named), in one dict lookup.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from bastion.core.errors import InvalidInput, ModelNotReady, NotFound
from bastion.core.limits import RequestLimits
from bastion.core.metadata import TensorSpec
from bastion.engine.batcher import Batcher
from bastion.engine.predict_pool import PredictPool
from bastion.guard.hardening import HardeningSpec, served_outputs
from bastion.observability.metrics import Metrics, VersionMetrics
from bastion.repository.store import LoadedVersion, ModelRepository, ModelState

log = logging.getLogger("bastion.dataplane")


@dataclass(slots=True)
class Served:
    """What the hot path needs about one loaded model version, computed once at load."""

    loaded: LoadedVersion
    version: str
    batcher: Batcher
    metrics: VersionMetrics
    inputs: dict[str, TensorSpec]
    outputs: tuple[TensorSpec, ...]
    output_types: dict[str, str]  # name → datatype, the contract the encoder casts to
    max_batch_size: int
    check_finite: bool
    hardening: HardeningSpec | None
    # the outputs the extraction monitor reads a predicted class from (the hardening
    # block names them when a model calls them otherwise)
    label_output: str | None
    probabilities_output: str

    @property
    def platform(self) -> str:
        return self.loaded.config.platform or self.loaded.runtime.platform


def version_number(version: str) -> int:
    """A version named by a client: digits only (int() would also take "+1", " 1", "1_0"
    and non-ASCII digits)."""
    if not (version.isascii() and version.isdigit()):
        raise InvalidInput(f"model version must be a non-negative integer (digits only), got {version!r}")
    return int(version)


class Registry:
    """Loaded versions by model, their batchers, and the executor the batches run on."""

    def __init__(
        self, repository: ModelRepository, metrics: Metrics, limits: RequestLimits, executor_threads: int | None
    ) -> None:
        self.repository = repository
        self._metrics = metrics
        self._timeout_s = limits.request_timeout_s
        self._executor = PredictPool(executor_threads or 4)
        self._served: dict[str, dict[int, Served]] = {}
        self.latest: dict[str, Served] = {}  # the newest loaded version of each model
        self._draining: set[asyncio.Task[None]] = set()
        repository.add_listener(self)

    # ---- repository listener --------------------------------------------------------
    def version_loaded(self, loaded: LoadedVersion) -> None:
        cfg = loaded.config
        version = str(loaded.version)
        vm = self._metrics.for_version(loaded.model, version)
        if hasattr(loaded.runtime, "part_observer"):  # a partitioned model times its head and tail
            loaded.runtime.part_observer = vm.observe_part
        inputs = cfg.inputs or loaded.runtime.inputs
        hardening: HardeningSpec | None = cfg.hardening  # type: ignore[assignment]
        outputs = served_outputs(cfg.outputs or loaded.runtime.outputs, hardening)
        names = hardening or HardeningSpec()
        served = Served(
            loaded=loaded,
            version=version,
            batcher=Batcher(
                loaded.runtime,
                self._executor,
                max_batch_size=cfg.max_batch_size,
                batching=cfg.batching,
                instance_count=cfg.instance_count,
                observer=vm,
                uniform_inputs=all(-1 not in t.shape[1:] for t in inputs),
                timeout_s=self._timeout_s,
            ),
            metrics=vm,
            inputs={t.name: t for t in inputs},
            outputs=outputs,
            output_types={t.name: t.datatype for t in outputs},
            max_batch_size=cfg.max_batch_size,
            check_finite=not cfg.allow_non_finite,
            hardening=hardening if hardening is not None and hardening.enabled else None,
            label_output=names.label_output,
            probabilities_output=names.probabilities_output,
        )
        self._served.setdefault(loaded.model, {})[loaded.version] = served
        self._refresh_latest(loaded.model)
        vm.set_ready(True)
        log.info("model version loaded", extra={"model": loaded.model, "version": version})

    def version_unloaded(self, loaded: LoadedVersion) -> asyncio.Task[None] | None:
        """Stop routing to the version; the returned drain task tells the repository when
        it may close the runtime (queued requests still finish on it)."""
        versions = self._served.get(loaded.model, {})
        served = versions.pop(loaded.version, None)
        if not versions:
            self._served.pop(loaded.model, None)
        self._refresh_latest(loaded.model)
        if served is None:
            return None
        served.metrics.set_ready(False)
        task = asyncio.get_running_loop().create_task(served.batcher.close())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)
        log.info("model version unloaded", extra={"model": loaded.model, "version": served.version})
        return task

    def _refresh_latest(self, model: str) -> None:
        versions = self._served.get(model)
        if versions:
            self.latest[model] = versions[max(versions)]
        else:
            self.latest.pop(model, None)

    # ---- lookups ----------------------------------------------------------------------
    def versions(self, name: str) -> list[int]:
        return sorted(self._served.get(name, {}))

    def resolve(self, name: str, version: str | None) -> Served:
        """The version that serves ``name``: the named one, else the newest loaded.
        ``NotFound`` for an unknown model or version, ``ModelNotReady`` (503) while none is loaded."""
        if version:
            versions = self._served.get(name)
            if versions is not None:
                served = versions.get(version_number(version))
                if served is not None:
                    return served
                available = ", ".join(str(v) for v in sorted(versions))
                raise NotFound(f"model '{name}' has no version {version}; available: {available}")
        else:
            served = self.latest.get(name)
            if served is not None:
                return served
        status = self.repository.get(name)  # raises NotFound for unknown models
        if version and status.state is ModelState.READY:
            raise NotFound(f"model '{name}' has no version {version}")
        reason = f": {status.reason}" if status.reason else ""
        raise ModelNotReady(f"model '{name}' is not ready ({status.state.value}){reason}", retry_after=1)

    # ---- shutdown ---------------------------------------------------------------------
    async def close(self) -> None:
        """After the repository unloaded everything: wait for the drains, stop the threads."""
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)
        self._executor.shutdown(wait=True)
