"""The data plane facade: the one entry point of every transport.

REST, gRPC and TF-Serving REST differ only in their codecs. Each stage of a request is a
module of this package, and ``DataPlane.infer`` calls them in order, explicitly (no
middleware list: the hot path is measured in microseconds):

    admission.py    who is calling; scope, rate limit, query budget     (``admit``, before the body)
    registry.py     routing: which loaded version serves the model
    zoo_router.py   selection: a zoo's variant, by policy and the tenant's defense class
    validate.py     the inputs against the signature; the outputs the client asked for
    engine/         batching → runtime (``Batcher.submit``)
    guard/          hardening, the extraction and probing monitors, the audit record

Health, metadata and the repository index (``catalog.py``) and the admin operations
(``admin.py``) go through the same admission rules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import bastion
from bastion.core.errors import BastionError, InternalError, InvalidInput
from bastion.core.limits import RequestLimits
from bastion.core.metadata import ModelMetadata, VersionStatus
from bastion.core.tensors import InferenceRequest, InferenceResponse
from bastion.dataplane import admission
from bastion.dataplane.admin import ControlHook, Operations
from bastion.dataplane.admission import AdminGrant, Admission, Credentials
from bastion.dataplane.catalog import Catalog
from bastion.dataplane.registry import Registry, Served
from bastion.dataplane.sealed import PARAMETER as SEALED_PARAMETER
from bastion.dataplane.sealed import SealedError, attestation_document, is_sealed, run_sealed
from bastion.dataplane.validate import select_outputs, validate_inputs
from bastion.dataplane.zoo_router import ZooChoice, ZooRouter
from bastion.guard.audit_record import inference_record
from bastion.guard.gate import Gate
from bastion.guard.hardening import harden
from bastion.guard.principal import Principal
from bastion.observability.metrics import Metrics
from bastion.repository.store import ModelRepository

log = logging.getLogger("bastion.dataplane")

SERVER_NAME = "bastion"
EXTENSIONS = ("binary_tensor_data", "model_repository")


class DataPlane:
    """One server process's plane: the repository's loaded versions, their batchers, the
    guard (auth, limits, monitors, audit) and the zoos."""

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
        # the one set of request limits of this process: the transports read theirs here
        self.limits = limits or RequestLimits()
        self._registry = Registry(repository, self.metrics, self.limits, executor_threads)
        self._zoos = ZooRouter(repository.zoos, self._registry, self.gate, self.metrics)
        self._catalog = Catalog(self._registry, self._zoos)
        self._ops = Operations(repository, self.gate)
        self._strict_readiness = strict_readiness
        self._started = False
        self._closing = False

    @property
    def control_hook(self) -> ControlHook | None:
        return self._ops.control_hook

    @control_hook.setter
    def control_hook(self, hook: ControlHook | None) -> None:
        self._ops.control_hook = hook

    # ---- lifecycle ----------------------------------------------------------------
    async def start(self, progress: Callable[[str, int, int], None] | None = None) -> None:
        await self.repository.start(progress)
        self._started = True

    async def stop(self) -> None:
        """Drain: refuse new work, finish queued batches, unload models, stop threads."""
        self._closing = True
        await self.repository.stop()
        await self._registry.close()
        self.gate.close()

    # ---- inference ------------------------------------------------------------------------
    def admit(self, credentials: Credentials, model: str, *, transport: str) -> Admission:
        """Before an inference body is read or decoded: authenticate, then scope, rate limit
        and query budget for ``model`` (401 / 403 / 429). ``infer`` requires the result."""
        return admission.admit(self.gate, credentials, model, transport)

    def authenticate(self, credentials: Credentials, *, transport: str, action: str = "infer") -> None:
        """Only who is calling (401), before a request is read whose model the transport
        cannot know yet (gRPC: the name is inside the message). ``admit`` still follows."""
        admission.caller(self.gate, credentials, transport, action)  # no model: no scope yet

    def signature(self, ticket: Admission, version: str | None) -> ModelMetadata:
        """The admitted model's signature, for codecs that decode against it (TF-Serving)."""
        return self._catalog.model_metadata(ticket.model, version)

    async def infer(self, ticket: Admission, request: InferenceRequest) -> InferenceResponse:
        """Serve one admitted request. Every failure is a BastionError with its status; the
        audit record is written before this returns, so an answer a client got is on record."""
        who = ticket.spend(request.model_name)  # 1. admission: admit() checked it before the body
        ts, started = time.time(), time.perf_counter()
        served: Served | None = None
        choice: ZooChoice | None = None
        try:
            zoo = self._zoos.zoo_named(request.model_name)  # 2. routing: a model, or a zoo
            if zoo is None:
                served = self._registry.resolve(request.model_name, request.model_version)
            else:
                choice = self._zoos.select(zoo, request, who)  # 3. selection: policy + the tenant's defense
                served = choice.served
            confidential = served.loaded.config.confidential
            status = 200
            if request.parameters and is_sealed(request):  # 4-6 in the trusted worker: the host sees ciphertext
                if confidential is not None and confidential.e2e == "off":
                    raise InvalidInput(
                        f"model '{request.model_name}' does not take sealed inputs (confidential.e2e: off)")
                response, status = await run_sealed(served.loaded.runtime, served.version, request)
                if status != 200:
                    served.metrics.count("client_error" if status < 500 else "server_error")
            else:
                if confidential is not None and confidential.e2e == "required":
                    raise InvalidInput(
                        f"model '{request.model_name}' takes only end-to-end encrypted inputs: seal them to the "
                        f"trusted worker's attested key (parameter {SEALED_PARAMETER}; bastion.client, "
                        "bastion infer --confidential)")
                arrays, rows = validate_inputs(served, request)  # 4. validation against the signature
                outputs = await served.batcher.submit(arrays, rows)  # 5. batching → runtime
                if served.hardening is not None:
                    outputs = harden(outputs, served.hardening)  # 6. hardening of the answer
                response = select_outputs(served, request, outputs)
        except Exception as exc:
            err = self._failed(exc, served, request)
            written = self._audit(who, ticket.transport, request, ts, started, choice, None, err)
            if written is not None:
                await written  # a refusal is an answer too: on record before it leaves
            if err is exc:
                raise
            raise err from exc
        vm = served.metrics
        if status == 200:  # a sealed request's error is sealed to the client, counted above
            vm.outcomes["success"] += 1
        vm.request_latency.observe(time.perf_counter() - started)
        if choice is not None:
            self._zoos.finish(choice, response)  # goodput; the answer names the zoo, not the variant
        # 7. monitors: the extraction detector sees the answer (not a sealed one: it is ciphertext here)
        if self.gate.monitor is not None and SEALED_PARAMETER not in response.parameters:
            self.gate.watch_answer(who, request.model_name, (t.data for t in request.inputs),
                                   {t.name: t.data for t in response.outputs},
                                   served.label_output, served.probabilities_output)
        # 8. audit: the record joins the ones written at the end of this loop iteration, and
        # the answer waits for that write (durability: on record before the answer leaves)
        sealed_error = None if status == 200 else SealedError(status)
        written = self._audit(who, ticket.transport, request, ts, started, choice, response, sealed_error)
        if written is not None:
            await written
        return response  # 9. the transport encodes it

    def _failed(self, exc: Exception, served: Served | None, request: InferenceRequest) -> BastionError:
        """Count the failure against the version that was to serve; a non-Bastion error is a
        bug, logged with its traceback and answered with a generic 500."""
        if isinstance(exc, BastionError):
            if served is not None:
                status = exc.http_status
                outcome = "client_error" if status < 500 else "server_error" if status == 500 else "rejected"
                served.metrics.count(outcome)
            return exc
        if served is not None:
            served.metrics.count("server_error")
        log.exception("inference failed", extra={"model": request.model_name[:200]})
        return InternalError(f"internal error while serving model '{request.model_name[:200]}'")

    def _audit(self, who: Principal, transport: str, request: InferenceRequest, ts: float, started: float,
               choice: ZooChoice | None, response: InferenceResponse | None, err: BastionError | None
               ) -> Awaitable[None] | None:
        """The inference's record, queued for this loop iteration's write; None without a log."""
        if self.gate.audit is None:
            return None
        if err is not None:
            variant = version = None
        elif choice is not None:
            variant, version = choice.variant, choice.served.version
        else:
            variant, version = request.model_name, response.model_version if response is not None else None
        return self.gate.record_batched(inference_record(who, transport, request, ts, started, variant=variant,
                                                         version=version, response=response, err=err))

    # ---- health and metadata ------------------------------------------------------------
    def live(self) -> bool:
        return not self._closing

    def ready(self) -> bool:
        return self._started and not self._closing and self._catalog.ready(self._strict_readiness)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": bastion.__version__, "extensions": list(EXTENSIONS)}

    def model_ready(self, credentials: Credentials, name: str, version: str | None, *, transport: str) -> bool:
        admission.caller(self.gate, credentials, transport, "ready", name)
        return self._catalog.model_ready(name, version)

    def model_metadata(
        self, credentials: Credentials, name: str, version: str | None, *, transport: str
    ) -> ModelMetadata:
        admission.caller(self.gate, credentials, transport, "metadata", name)
        return self._catalog.model_metadata(name, version)

    def version_states(
        self, credentials: Credentials, name: str, version: str | None, *, transport: str
    ) -> list[VersionStatus]:
        admission.caller(self.gate, credentials, transport, "metadata", name)
        return self._catalog.version_states(name, version)

    async def attestation(self, credentials: Credentials, name: str, version: str | None, nonce_hex: str, *,
                          transport: str) -> dict[str, Any]:
        """Evidence from the trusted worker serving ``name`` (a confidential model, or a zoo of
        them), bound to the client's nonce: the client verifies it before sealing anything."""
        admission.caller(self.gate, credentials, transport, "metadata", name)
        return await attestation_document(self._registry, self._zoos, name, version, nonce_hex)

    def repository_index(self, credentials: Credentials, *, transport: str) -> list[dict[str, Any]]:
        """Every model and zoo, or, for a key with a model scope, the ones it may use."""
        who = admission.caller(self.gate, credentials, transport, "index")
        rows = self._catalog.index()
        if who.models is not None:
            rows = [r for r in rows if r["name"] in who.models]
        return rows

    def metrics_text(self, credentials: Credentials, *, transport: str) -> bytes:
        """The Prometheus exposition: admin keys only, unless the server opened it."""
        if not self.gate.open_metrics:
            admission.grant(self.gate, credentials, transport, "metrics")
        return self.metrics.render()

    # ---- admin ------------------------------------------------------------------------
    def admin(self, credentials: Credentials, *, transport: str, action: str, target: str = "") -> AdminGrant:
        """Permission for one admin action (403 without the admin role, audited); the
        operation audits the action itself when it runs."""
        return admission.grant(self.gate, credentials, transport, action, target)

    async def repository_action(self, grant: AdminGrant, parameters: Mapping[str, Any] | None = None) -> None:
        """Load or unload ``grant.target`` (the grant's action), with the request's parameters."""
        await self._ops.repository(grant, parameters or {})

    def key_action(self, grant: AdminGrant, doc: object = None) -> Any:
        """A key-store action (``keys.create``, ``tenants.set_limits``, ...); JSON-ready result."""
        return self._ops.keys(grant, doc)
