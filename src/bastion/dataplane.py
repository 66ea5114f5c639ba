"""The data plane: the single entry point every transport calls.

REST, gRPC and TF-Serving REST differ only in their codecs; everything a rule applies to
(validation against the model's signature, version choice, batching, metrics, and later
auth, zoo selection and audit) happens here, once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

import bastion
from bastion.core.datatypes import FLOAT_DATATYPES
from bastion.core.errors import (
    BastionError,
    InternalError,
    InvalidInput,
    ModelNotReady,
    NotFound,
    Unauthenticated,
    Unprocessable,
)
from bastion.core.limits import RequestLimits
from bastion.core.metadata import ModelMetadata, TensorSpec
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor
from bastion.engine.batcher import Batcher
from bastion.guard.digest import tensors_digest
from bastion.guard.gate import Gate
from bastion.guard.hardening import harden
from bastion.guard.principal import ANONYMOUS, Principal
from bastion.observability.metrics import Metrics, VersionMetrics
from bastion.repository.store import LoadedVersion, ModelRepository, ModelState
from bastion.repository.zoos import LoadedZoo
from bastion.zoo.defenses import build_policy
from bastion.zoo.pareto import Point, pareto_front
from bastion.zoo.policy import SelectionPolicy, make_policy, parse_targets

# request parameters that address the zoo, not the variant
ZOO_PARAMETERS = frozenset({"accuracy", "latency_ms"})
_OUTCOME = {
    (False, False): "met",
    (True, False): "missed_accuracy",
    (False, True): "missed_latency",
    (True, True): "missed_both",
}

log = logging.getLogger("bastion.dataplane")

SERVER_NAME = "bastion"
EXTENSIONS = ("binary_tensor_data", "model_repository")


@dataclass(slots=True)
class _Served:
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
    hardening: Any  # guard.hardening.HardeningSpec or None


ControlHook = Callable[[str, str], Awaitable[None]]


@dataclass(slots=True)
class _ZooState:
    """Per zoo definition: its policy and the Pareto fronts of the variant sets seen loaded."""

    loaded: LoadedZoo
    points: dict[str, Point]
    policies: dict[str, SelectionPolicy]  # by tenant defense class; always has "default"
    fronts: dict[frozenset[str], list[Point]]


def _version_number(version: str) -> int:
    # digits only: int() would also take "+1", " 1", "1_0" and non-ASCII digits
    if not (version.isascii() and version.isdigit()):
        raise InvalidInput(f"model version must be a non-negative integer (digits only), got {version!r}")
    return int(version)


def _query_and_label(
    request: InferenceRequest, response: InferenceResponse
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """What the extraction monitor needs: the query rows, flattened, and the predicted class
    of each (the ``label`` output, else the argmax of ``probabilities``)."""
    numeric = [t.data for t in request.inputs if t.data.dtype != object]
    if not numeric:
        return None, None
    data = numeric[0]
    x = data.reshape(data.shape[0], -1) if data.ndim > 1 else data.reshape(1, -1)
    outputs = {t.name: t.data for t in response.outputs}
    label = outputs.get("label")
    if label is None and "probabilities" in outputs:
        label = np.asarray(outputs["probabilities"]).argmax(axis=-1)
    if label is None:
        return None, None
    label = np.asarray(label).reshape(-1)
    if label.shape[0] != x.shape[0]:
        return None, None
    return x, label


class DataPlane:
    """Orchestrates one inference: validate → batch → runtime → select outputs.

    It listens to the repository: each loaded model version gets its own batcher.
    """

    def __init__(
        self,
        repository: ModelRepository,
        *,
        metrics: Metrics | None = None,
        executor_threads: int | None = None,
        strict_readiness: bool = True,
        gate: Gate | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        self.repository = repository
        self.metrics = metrics or Metrics()
        # no gate: auth off (every caller is ANONYMOUS), no limits, no audit
        self.gate = gate or Gate(authenticator=None, metrics=self.metrics)
        if self.gate.metrics is None:
            self.gate.metrics = self.metrics
        self.limits = limits or RequestLimits()
        self._timeout_s = self.limits.request_timeout_s
        self._executor = ThreadPoolExecutor(
            max_workers=executor_threads or 4, thread_name_prefix="bastion-predict"
        )
        self._served: dict[str, dict[int, _Served]] = {}
        self._latest: dict[str, _Served] = {}
        self._strict_readiness = strict_readiness
        self._started = False
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()
        # set by a multi-worker launcher so an operator's load/unload reaches every worker
        self.control_hook: ControlHook | None = None
        self._zoo_states: dict[str, _ZooState] = {}
        # zoo choices are randomised from a per-process secret, so a client cannot replay them
        self._rng = random.Random(secrets.randbits(256))
        repository.add_listener(self)

    # ---- lifecycle ----------------------------------------------------------------
    async def start(self, progress: Callable[[str, int, int], None] | None = None) -> None:
        await self.repository.start(progress)
        self._started = True

    async def stop(self) -> None:
        """Drain: refuse new work, finish queued batches, unload models, stop threads."""
        self._closing = True
        await self.repository.stop()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self.gate.close()

    # ---- repository listener --------------------------------------------------------
    def version_loaded(self, loaded: LoadedVersion) -> None:
        cfg = loaded.config
        version = str(loaded.version)
        vm = self.metrics.for_version(loaded.model, version)
        runtime = loaded.runtime
        inputs = cfg.inputs or runtime.inputs
        outputs = cfg.outputs or runtime.outputs
        hardening = cfg.hardening
        if hardening is not None and hardening.label_only and any(t.name == hardening.label_output for t in outputs):
            # label-only answers drop the probabilities: the signature says so too
            outputs = tuple(t for t in outputs if t.name != hardening.probabilities_output)
        served = _Served(
            loaded=loaded,
            version=version,
            batcher=Batcher(
                runtime,
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
            outputs=tuple(outputs),
            output_types={t.name: t.datatype for t in outputs},
            max_batch_size=cfg.max_batch_size,
            check_finite=not cfg.allow_non_finite,
            hardening=hardening,
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
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        log.info("model version unloaded", extra={"model": loaded.model, "version": served.version})
        return task

    def _refresh_latest(self, model: str) -> None:
        versions = self._served.get(model)
        if versions:
            self._latest[model] = versions[max(versions)]
        else:
            self._latest.pop(model, None)

    # ---- the gate ------------------------------------------------------------------------
    def admit(
        self, authorization: str | bytes | None, cert_fp: str | None, model: str, *, transport: str
    ) -> Principal:
        """Before an inference body is decoded: who is calling, may they use ``model``, and
        are they within their rate and budget. 401 / 403 / 429 otherwise."""
        gate = self.gate
        if gate.authenticator is None:
            return ANONYMOUS  # auth off: no scope and no limits to check
        principal = gate.authenticate(authorization, cert_fp, transport=transport, action="infer", model=model)
        gate.authorize(principal, model, transport=transport)
        return principal

    def authenticate(
        self, authorization: str | bytes | None, cert_fp: str | None, *, transport: str, action: str, model: str = ""
    ) -> Principal:
        """For the routes other than inference (metadata, readiness, repository, metrics)."""
        return self.gate.authenticate(authorization, cert_fp, transport=transport, action=action, model=model)

    def require_admin(self, principal: Principal | None, *, transport: str, action: str) -> None:
        self.gate.require_admin(self._who(principal), transport=transport, action=action)

    def _who(self, principal: Principal | None) -> Principal:
        if principal is not None:
            return principal
        if self.gate.auth_enabled:
            raise Unauthenticated("missing API key: send the header 'Authorization: Bearer <key>'")
        return ANONYMOUS

    def _scoped(self, principal: Principal | None, name: str, action: str) -> None:
        who = self._who(principal)
        if who.models is not None:
            self.gate.check_scope(who, name, transport="", action=action)

    # ---- health and metadata ------------------------------------------------------------
    def live(self) -> bool:
        return not self._closing

    def ready(self) -> bool:
        if not self._started or self._closing:
            return False
        for status in self.repository.index():
            if status.versions:
                continue
            if status.state is ModelState.UNAVAILABLE:
                continue  # deliberately not loaded (explicit mode or unloaded by an operator)
            if status.state is ModelState.LOADING or self._strict_readiness:
                return False
        return True

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": bastion.__version__, "extensions": list(EXTENSIONS)}

    def _resolve(self, name: str, version: str | None) -> _Served:
        if version:
            versions = self._served.get(name)
            if versions is not None:
                served = versions.get(_version_number(version))
                if served is not None:
                    return served
                available = ", ".join(str(v) for v in sorted(versions))
                raise NotFound(f"model '{name}' has no version {version}; available: {available}")
        else:
            served = self._latest.get(name)
            if served is not None:
                return served
        status = self.repository.get(name)  # raises NotFound for unknown models
        if version and status.state is ModelState.READY:
            raise NotFound(f"model '{name}' has no version {version}")
        reason = f": {status.reason}" if status.reason else ""
        raise ModelNotReady(f"model '{name}' is not ready ({status.state.value}){reason}", retry_after=1)

    def model_ready(self, name: str, version: str | None, *, principal: Principal | None = None) -> bool:
        self._scoped(principal, name, "ready")
        zoo = self._zoo_named(name)
        if zoo is not None:
            try:
                self._zoo_front(zoo)
            except ModelNotReady:
                return False
            return not version
        try:
            self._resolve(name, version)
        except ModelNotReady:
            return False
        except NotFound:
            if version:
                self.repository.get(name)  # unknown model → NotFound, unknown version → not ready
                return False
            raise
        return True

    def model_metadata(
        self, name: str, version: str | None, *, principal: Principal | None = None
    ) -> ModelMetadata:
        self._scoped(principal, name, "metadata")
        zoo = self._zoo_named(name)
        if zoo is not None:
            if version:
                raise NotFound(f"'{name}' is a zoo and has no versions")
            return self._zoo_metadata(zoo)
        try:
            served = self._resolve(name, version)
        except ModelNotReady:
            status = self.repository.get(name)
            cfg = status.config
            return ModelMetadata(
                name=name,
                versions=(),
                platform=cfg.platform or cfg.runtime if cfg else "",
                inputs=cfg.inputs if cfg else (),
                outputs=cfg.outputs if cfg else (),
            )
        versions = (
            (served.version,) if version else tuple(str(v) for v in sorted(self._served.get(name, {})))
        )
        return ModelMetadata(
            name=name,
            versions=versions,
            platform=served.loaded.config.platform or served.loaded.runtime.platform,
            inputs=tuple(served.inputs.values()),
            outputs=served.outputs,
        )

    def model_metadata_doc(
        self, name: str, version: str | None, *, principal: Principal | None = None
    ) -> dict[str, Any]:
        """V2 model metadata as JSON; a model that is not serving also says why (state, reason)."""
        doc = self.model_metadata(name, version, principal=principal).as_dict()
        if not doc["versions"] and doc["platform"] != "bastion_zoo":
            status = self.repository.get(name)
            doc["state"] = status.state.value
            doc["reason"] = status.reason
        return doc

    def version_states(
        self, name: str, version: str | None, *, principal: Principal | None = None
    ) -> list[tuple[str, str, str]]:
        """(version, state, message) rows in TF-Serving's vocabulary (AVAILABLE, LOADING, …)."""
        self._scoped(principal, name, "metadata")
        zoo = self._zoo_named(name)
        if zoo is not None:
            if version:
                raise NotFound(f"'{name}' is a zoo and has no versions")
            try:
                self._zoo_front(zoo)
            except ModelNotReady as err:
                return [("", "UNAVAILABLE", err.message)]
            return [("", "AVAILABLE", "")]
        status = self.repository.get(name)
        if version:
            loaded = _version_number(version) in status.versions
            if loaded:
                return [(version, "AVAILABLE", "")]
            return [(version, "UNAVAILABLE", f"version {version} is not loaded")]
        if status.versions:
            return [(str(v), "AVAILABLE", "") for v in sorted(status.versions)]
        state = "LOADING" if status.state is ModelState.LOADING else "UNAVAILABLE"
        return [("", state, status.reason)]

    def repository_index(self, *, principal: Principal | None = None) -> list[dict[str, Any]]:
        """Every model and zoo, or, for a key with a model scope, the ones it may use."""
        who = self._who(principal)
        rows = self._index_rows()
        if who.models is not None:
            rows = [r for r in rows if r["name"] in who.models]
        return rows

    def _index_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for status in self.repository.index():
            if status.versions:
                rows.extend(
                    {"name": status.name, "version": str(v), "state": "READY", "reason": ""}
                    for v in sorted(status.versions)
                )
            else:
                rows.append(
                    {"name": status.name, "version": "", "state": status.state.value, "reason": status.reason}
                )
        for zoo in self.repository.zoos.all():
            try:
                self._zoo_front(zoo)
                state, reason = "READY", ""
            except ModelNotReady as err:
                state, reason = "UNAVAILABLE", err.message
            rows.append({"name": zoo.name, "version": "", "state": state, "reason": reason, "kind": "zoo"})
        return rows

    async def load_model(self, name: str, *, principal: Principal | None = None, transport: str = "") -> None:
        self.admin_action(principal, transport, "load", name)
        status = await self.repository.load(name)
        if status.state is ModelState.FAILED and not status.versions:
            raise InvalidInput(f"model '{name}' failed to load: {status.reason}")
        if self.control_hook is not None:
            await self.control_hook(name, "load")

    async def unload_model(self, name: str, *, principal: Principal | None = None, transport: str = "") -> None:
        self.admin_action(principal, transport, "unload", name)
        await self.repository.unload(name)
        if self.control_hook is not None:
            await self.control_hook(name, "unload")

    def admin_action(self, principal: Principal | None, transport: str, action: str, name: str) -> None:
        """Refuse unless the caller is an admin, then audit the action (before it happens:
        an attempt that then fails is still on record)."""
        who = self._who(principal)
        self.gate.require_admin(who, transport=transport, action=action, model=name)
        self.gate.record(
            {"ts": time.time(), "tenant": who.tenant, "key_id": who.key_id, "transport": transport,
             "action": action, "model": name, "decision": "accepted", "status": 200, "reason": ""}
        )

    # ---- inference ------------------------------------------------------------------------
    async def infer(
        self, request: InferenceRequest, *, transport: str = "rest", principal: Principal | None = None
    ) -> InferenceResponse:
        """Serve one request of an admitted principal (``admit`` checked its credentials and
        limits); every failure is a BastionError with its status. Writes the audit record
        before returning, so a response a client received is always in the log."""
        who = self._who(principal)
        if who.models is not None and request.model_name not in who.models:
            self.gate.check_scope(who, request.model_name, transport=transport, action="infer")
        monitor = self.gate.monitor
        if monitor is not None:
            response = await self._infer_audited(request, transport, who)
            self._watch(monitor, who, request, response)
            return response
        if self.gate.audit is None and self._zoo_named(request.model_name) is None:
            return await self._infer_model(request)  # one coroutine less on the common path
        return await self._infer_audited(request, transport, who)

    async def _infer_audited(self, request: InferenceRequest, transport: str, who: Principal) -> InferenceResponse:
        audit = self.gate.audit
        if audit is None:
            return (await self._infer_any(request, transport, who))[0]
        ts = time.time()
        started = time.perf_counter()
        try:
            response, variant, version = await self._infer_any(request, transport, who)
        except BastionError as err:
            audit.append(self._audit_fields(who, transport, request, ts, started, None, None, None, err))
            raise
        audit.append(self._audit_fields(who, transport, request, ts, started, response, variant, version, None))
        return response

    def _watch(self, monitor: Any, who: Principal, request: InferenceRequest, response: InferenceResponse) -> None:
        """An answered query feeds the tenant's PRADA state for this model or zoo."""
        x, predicted = _query_and_label(request, response)
        if x is not None and predicted is not None:
            try:
                alert = monitor.observe(f"{who.tenant}/{request.model_name}", x, predicted)
            except (TypeError, ValueError) as err:  # e.g. another input size than this tenant's earlier queries
                log.debug("extraction monitor skipped a query: %s", err)
                alert = None
            if alert is not None:
                self.gate.extraction_alert(who, request.model_name, alert)

    @staticmethod
    def _audit_fields(
        who: Principal,
        transport: str,
        request: InferenceRequest,
        ts: float,
        started: float,
        response: InferenceResponse | None,
        variant: str | None,
        version: str | None,
        err: BastionError | None,
    ) -> dict[str, Any]:
        return {
            "ts": ts,
            "tenant": who.tenant,
            "key_id": who.key_id,
            "transport": transport,
            "action": "infer",
            # client-chosen strings are capped: a record must not grow with what a client sends
            "model": request.model_name[:200],
            "variant": variant,
            "version": version,
            "request_id": request.id[:200] if request.id else request.id,
            "input_digest": tensors_digest(request.inputs),
            "output_digest": tensors_digest(response.outputs) if response is not None else None,
            "decision": "served" if err is None else "rejected",
            "status": 200 if err is None else err.http_status,
            "reason": "" if err is None else f"{type(err).__name__}: {err.message}"[:300],
            "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
        }

    async def _infer_any(
        self, request: InferenceRequest, transport: str, who: Principal
    ) -> tuple[InferenceResponse, str, str | None]:
        """(response, the model that served, its version): a zoo picks a variant first."""
        zoo = self._zoo_named(request.model_name)
        if zoo is not None:
            return await self._infer_zoo(zoo, request, transport, who)
        response = await self._infer_model(request)
        return response, request.model_name, response.model_version

    async def _infer_model(self, request: InferenceRequest) -> InferenceResponse:
        served = self._resolve(request.model_name, request.model_version)
        vm = served.metrics
        started = time.perf_counter()
        try:
            arrays, rows = self._validate(served, request)
            outputs = await served.batcher.submit(arrays, rows)
            if served.hardening is not None:
                outputs = harden(outputs, served.hardening)
            response = self._response(served, request, outputs)
        except BastionError as err:
            status = err.http_status
            outcome = "client_error" if status < 500 else ("server_error" if status == 500 else "rejected")
            vm.count(outcome)
            raise
        except Exception as err:
            vm.count("server_error")
            log.exception("inference failed", extra={"model": request.model_name, "version": served.version})
            raise InternalError(f"internal error while serving model '{request.model_name}'") from err
        vm.outcomes["success"] += 1
        vm.request_latency.observe(time.perf_counter() - started)
        return response

    # ---- zoos ---------------------------------------------------------------------------------
    def _zoo_named(self, name: str) -> LoadedZoo | None:
        """The zoo called ``name``; a loaded model of that name wins (one dict lookup on
        the model path)."""
        return None if name in self._latest else self.repository.zoos.get(name)

    def _zoo_state(self, zoo: LoadedZoo) -> _ZooState:
        state = self._zoo_states.get(zoo.name)
        if state is None or state.loaded is not zoo:
            spec, profile = zoo.spec, zoo.profile
            assert spec is not None and profile is not None  # callers check zoo.error first
            points = {p.name: p for p in profile.points(spec.latency_percentile) if p.name in spec.variants}
            base = make_policy(spec.policy, spec.on_infeasible, zoo=zoo.name)
            policies = {cls: build_policy(base, defense) for cls, defense in spec.defenses.items()}
            state = _ZooState(zoo, points, policies, {})
            self._zoo_states[zoo.name] = state
        return state

    def _zoo_front(self, zoo: LoadedZoo) -> tuple[_ZooState, list[Point]]:
        """The Pareto front over the variants loaded right now (an unloaded variant can
        leave a variant it dominated on the front)."""
        if zoo.error:
            raise ModelNotReady(f"zoo '{zoo.name}' cannot serve: {zoo.error}", retry_after=5)
        state = self._zoo_state(zoo)
        loaded = frozenset(n for n in state.points if n in self._latest)
        if not loaded:
            raise ModelNotReady(f"no variant of zoo '{zoo.name}' is loaded", retry_after=1)
        front = state.fronts.get(loaded)
        if front is None:
            front = state.fronts[loaded] = pareto_front(state.points[n] for n in loaded)
        return state, front

    async def _infer_zoo(
        self, zoo: LoadedZoo, request: InferenceRequest, transport: str, who: Principal
    ) -> tuple[InferenceResponse, str, str | None]:
        if request.model_version:
            raise InvalidInput(f"'{zoo.name}' is a zoo and has no versions; call /v2/models/{zoo.name}/infer")
        started = time.perf_counter()
        state, front = self._zoo_front(zoo)
        targets = parse_targets(request.parameters)
        waits = {p.name: self._latest[p.name].batcher.estimated_wait_ms() for p in front}
        probes = self.gate.probe_monitor
        try:
            # the tenant's defense class picks the zoo's defense (zoo.yaml `defenses`)
            policy = state.policies.get(who.defense_class) or state.policies["default"]
            choice = policy.choose(front, targets, waits, self._rng)
        except Unprocessable:
            self.metrics.zoo_selection(zoo.name, "none", feasible=False)
            self.metrics.zoo_outcome(zoo.name, "rejected")
            if probes is not None:
                self._probed(probes, who, zoo.name, targets, refused=True)
            raise
        if probes is not None:
            self._probed(probes, who, zoo.name, targets, refused=False)
        self.metrics.zoo_selection(zoo.name, choice.variant, choice.feasible)
        params = {k: v for k, v in request.parameters.items() if k not in ZOO_PARAMETERS}
        variant_request = InferenceRequest(
            choice.variant, None, request.inputs, request.id, request.outputs, params
        )
        response = await self._infer_model(variant_request)
        version = response.model_version
        # goodput, judged by the server: the chosen variant's measured quality against the
        # accuracy target, and this request's own time in the server against the latency one
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        missed_accuracy = targets.accuracy is not None and state.points[choice.variant].quality < targets.accuracy
        missed_latency = targets.latency_ms is not None and elapsed_ms > targets.latency_ms
        self.metrics.zoo_outcome(zoo.name, _OUTCOME[missed_accuracy, missed_latency])
        # the abstraction holds: the answer names the zoo, never the variant or its version
        response.model_name = zoo.name
        response.model_version = None
        if zoo.spec is not None and zoo.spec.expose_variant:
            response.parameters = {**response.parameters, "variant": choice.variant, "selection": choice.reason}
        return response, choice.variant, version

    def _probed(self, probes: Any, who: Principal, zoo: str, targets: Any, *, refused: bool) -> None:
        """A zoo request with targets feeds the zoo-probing detector (guard/probes.py)."""
        if targets.accuracy is None and targets.latency_ms is None:
            return
        alert = probes.observe(f"{who.tenant}/{zoo}", targets.accuracy, targets.latency_ms, refused)
        if alert is not None:
            self.gate.extraction_alert(who, zoo, alert)

    def _zoo_metadata(self, zoo: LoadedZoo) -> ModelMetadata:
        """A zoo's signature is its variants' (they must share one); no versions."""
        _, front = self._zoo_front(zoo)
        first = self._latest[front[0].name]
        return ModelMetadata(
            name=zoo.name, versions=(), platform="bastion_zoo",
            inputs=tuple(first.inputs.values()), outputs=first.outputs,
        )

    @staticmethod
    def _validate(served: _Served, request: InferenceRequest) -> tuple[dict[str, np.ndarray], int]:
        specs = served.inputs
        arrays: dict[str, np.ndarray] = {}
        rows = -1
        batching = served.max_batch_size > 0
        for tensor in request.inputs:
            name = tensor.name
            spec = specs.get(name)
            if spec is None:
                raise InvalidInput(
                    f"unknown input '{name}' for model '{request.model_name}'; expected inputs: "
                    + ", ".join(specs)
                )
            if name in arrays:
                raise InvalidInput(f"input '{name}' appears more than once")
            if tensor.datatype != spec.datatype:
                raise InvalidInput(
                    f"input '{name}': datatype {tensor.datatype} does not match the model's {spec.datatype}"
                )
            data = tensor.data
            shape = data.shape
            expected = spec.shape
            if len(shape) != len(expected) or any(
                e != -1 and e != d for e, d in zip(expected, shape, strict=True)
            ):
                raise InvalidInput(
                    f"input '{name}': shape {list(shape)} does not match the model's {list(expected)}"
                    " (-1 = any size)"
                )
            if batching:
                n = shape[0]
                if rows == -1:
                    rows = n
                    if n == 0:
                        raise InvalidInput(f"input '{name}': the batch dimension (first dim) is 0")
                    if n > served.max_batch_size:
                        raise InvalidInput(
                            f"input '{name}': batch size {n} exceeds the model's max_batch_size "
                            f"{served.max_batch_size}"
                        )
                elif n != rows:
                    raise InvalidInput(
                        f"input '{name}': batch size {n} differs from the other inputs' {rows}"
                    )
            if (
                served.check_finite
                and not tensor.finite
                and spec.datatype in FLOAT_DATATYPES
                and not np.isfinite(data).all()
            ):
                raise InvalidInput(
                    f"input '{name}' contains NaN or Inf; model '{request.model_name}' accepts finite values only"
                )
            arrays[name] = data
        if len(arrays) != len(specs):
            missing = [n for n in specs if n not in arrays]
            raise InvalidInput(
                f"missing input(s) {', '.join(repr(m) for m in missing)} for model '{request.model_name}'"
            )
        return arrays, max(rows, 1)

    @staticmethod
    def _response(
        served: _Served, request: InferenceRequest, outputs: dict[str, np.ndarray]
    ) -> InferenceResponse:
        types = served.output_types
        if request.outputs:
            names = []
            for wanted in request.outputs:
                if wanted.name not in types:
                    raise InvalidInput(
                        f"requested output '{wanted.name}' is not an output of model "
                        f"'{request.model_name}'; available: {', '.join(sorted(types))}"
                    )
                names.append(wanted.name)
        else:
            names = types
        tensors = []
        for name in names:
            arr = outputs[name]
            tensors.append(InferTensor(name, types[name], arr.shape, arr))
        return InferenceResponse(
            model_name=request.model_name,
            model_version=served.version,
            outputs=tensors,
            id=request.id,
        )
