"""A model version served by replicas that Ray places on the nodes of a cluster.

config.yaml names the placement (``repository/config.py`` parses it into ``PlacementSpec``)::

    placement: {engine: ray, replicas: 2, num_cpus: 1, num_gpus: 0, address: "10.0.0.5:6379"}

The front process keeps everything but the model: protocol, auth, zoo selection, batching
and audit. Each *batch* the batcher forms is sent to one replica, a Ray actor holding the
version in an ONNX Runtime session (``OnnxRuntime``, so it answers exactly as a local
model), and the answer awaited on the server's event loop.

Why plain actors and not Ray Serve. A Serve deployment adds its own router, its own
queueing and (through handles) a controller and a proxy actor per node; a handle call is
an actor call to the replica plus Serve's request bookkeeping, and Serve would batch again
what Bastion's batcher has already batched. Bastion needs exactly one thing from Ray: run
this batch on some replica, somewhere. An actor method call is that, with the least
machinery on the hot path (one task submission, one awaited ObjectRef), and the routing,
retry, replacement and scaling below are a few dozen lines that Bastion controls and tests.

What travels. The model file is read by the front and ``ray.put`` once; every replica (and
every replacement) gets it from the object store, so nodes need no shared filesystem, only
Python with bastion and onnxruntime installed (Ray runs code, not files). A sealed bundle
is refused: its weights exist in the clear only in this process's memory, and placing it
would copy them to every node's object store. A confidential model is never placed (its
weights must stay in the trusted worker; config.py refuses the combination).

Routing and failure. A batch goes to the live replica with the fewest batches outstanding
(round robin among equals). When the call fails because the replica is gone (actor died,
node lost, object lost) the batch is retried once on another live replica; with none left,
or when the retry fails too, the batch fails with 503 + Retry-After, which a client can
repeat: nothing was answered. Every call has a deadline (``placement.timeout_s``): a
replica that does not answer in time fails the batch with 503 and is pinged; a replica that
does not answer the ping is replaced. Dead replicas are replaced in the background (an
asyncio task on the server's loop), idle ones are pinged every few seconds so that a death
without traffic is noticed too. An error raised by the model itself (a bad input: 400) is
the client's answer and is never retried.

Autoscaling (``placement.autoscale``). Every tick (0.25 s) the runtime samples its batches
outstanding at the replicas; when their mean over ``upscale_delay_s`` exceeds
``target_queue_per_replica`` per replica it adds replicas (up to ``max_replicas``), and when
for ``downscale_delay_s`` even the peak would fit in fewer it retires one (down to
``min_replicas``): the retired replica gets no new batches and is killed once its
outstanding ones are answered. The signal counts batches, as Ray Serve counts ongoing
requests: requests that arrive together are merged by the batcher into one batch, and a
second replica would have nothing to do for them; requests arriving apart (independent
clients) become batches of their own, which is the load more replicas absorb. New actors
are placed by Ray's scheduler (``SPREAD``); on a cluster with Ray's autoscaler, pending
actors are what it scales nodes for, and ``autoscale.request_resources: true`` also asks it
for the target's resources ahead (``ray.autoscaler.sdk.request_resources``; that request is
cluster-wide and replaces earlier ones, so it is off by default).

Connection. ``ray.init`` is called once per process (the first placed model), with the
address from config.yaml, else ``RAY_ADDRESS``, else ``"auto"``; a namespace of this
server process's own, no dashboard, worker logs not forwarded to this process. With
``--workers N`` each worker process has its own replicas. Actors are not detached: if the
front process dies, Ray kills its replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bastion.core.errors import BastionError, InternalError, Overloaded
from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.runtimes import ModelFiles, ModelLoadError, model_file

log = logging.getLogger("bastion.runtimes.ray")

__all__ = ["MAX_REPLICAS", "AutoscaleSpec", "PlacementSpec", "RayRuntime", "replica_stats"]

MAX_REPLICAS = 64
TICK_S = 0.25  # autoscale sampling and housekeeping
HEALTH_PERIOD_S = 5.0  # an idle replica is pinged this often
PING_TIMEOUT_S = 5.0
RESTART_BACKOFF_MAX_S = 30.0

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class AutoscaleSpec:
    """``placement.autoscale``: replicas follow the batches outstanding at them."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_queue_per_replica: float = 2.0
    upscale_delay_s: float = 1.0
    downscale_delay_s: float = 30.0
    request_resources: bool = False


@dataclass(frozen=True, slots=True)
class PlacementSpec:
    """``placement:`` of config.yaml (only ``engine: ray`` exists)."""

    engine: str = "ray"
    replicas: int = 1  # at load; with autoscale, within its bounds
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    address: str | None = None  # None: RAY_ADDRESS, else "auto"
    timeout_s: float = 30.0  # per batch: a replica that has not answered by then fails it (503)
    start_timeout_s: float = 120.0  # for the replicas to load the model
    autoscale: AutoscaleSpec | None = None

    @property
    def max_replicas(self) -> int:
        return self.autoscale.max_replicas if self.autoscale is not None else self.replicas


# ---- the process's one connection to the cluster -------------------------------------------

_connect_lock = threading.Lock()
_connected: str | None = None  # the address this process connected with


def connect(address: str | None, model: str) -> None:
    """``ray.init`` once per process; a second placed model must name the same cluster."""
    global _connected
    import ray

    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    with _connect_lock:
        if ray.is_initialized():
            # a model that names no address uses the cluster this process is connected to
            if address is not None and _connected is not None and address != _connected:
                raise ModelLoadError(f"{model}: placement.address: this server is connected to the Ray cluster at "
                                     f"{_connected!r}; one process talks to one cluster, got {target!r}")
            return
        namespace = f"bastion-{socket.gethostname()}-{os.getpid()}"
        try:
            ray.init(address=target, namespace=namespace, log_to_driver=False, configure_logging=False,
                     logging_level=logging.WARNING)
        except Exception as exc:  # ConnectionError, ValueError, RuntimeError: all "cannot reach it"
            raise ModelLoadError(f"{model}: placement.address: cannot connect to the Ray cluster at {target!r}: "
                                 f"{exc}") from None
        _connected = target
        log.info("connected to the Ray cluster", extra={"address": target, "namespace": namespace})


# ---- the replica: a Ray actor (its class is made remote lazily: ray is imported on first use) --

class _Replica:
    """One copy of the model version in a Ray worker process."""

    def __init__(self, config: ModelConfig, file_name: str, model: bytes) -> None:
        from bastion.runtimes.onnx_runtime import OnnxRuntime

        # a load error is reported by signature(), as the front's ModelLoadError: an exception
        # here would kill the actor and reach the front as a generic actor death
        self._error = ""
        self._runtime: Any = None
        try:
            self._runtime = OnnxRuntime(config, Path(config.name), {file_name: model})
        except BastionError as err:
            self._error = err.message

    def signature(self) -> dict[str, Any]:
        import ray

        if self._runtime is None:
            return {"error": self._error}
        return {
            "inputs": [s.as_dict() for s in self._runtime.inputs],
            "outputs": [s.as_dict() for s in self._runtime.outputs],
            "platform": self._runtime.platform,
            "providers": self._runtime.providers,
            "node": ray.get_runtime_context().get_node_id(),
        }

    def predict(self, inputs: Tensors) -> Tensors:
        return self._runtime.predict(inputs)  # type: ignore[no-any-return]

    def ping(self) -> bool:
        return True


_remote_class: Any = None


def _replica_class() -> Any:
    global _remote_class
    if _remote_class is None:
        import ray

        # max_restarts=0: a dead replica is replaced by the runtime (elsewhere, with the retry
        # rules above), not restarted in place by Ray behind the runtime's back
        _remote_class = ray.remote(max_restarts=0, max_task_retries=0)(_Replica)
    return _remote_class


@dataclass(eq=False, slots=True)
class _Handle:
    actor: Any
    index: int
    node: str = ""
    outstanding: int = 0  # batches sent and not answered
    last_used: float = 0.0


_runtimes: weakref.WeakSet[RayRuntime] = weakref.WeakSet()


def replica_stats() -> list[tuple[str, int, int]]:
    """(model, live replicas, retries so far) of every placed model version in this process,
    summed per model (for ``observability.metrics``)."""
    totals: dict[str, list[int]] = {}
    for rt in list(_runtimes):
        t = totals.setdefault(rt.name, [0, 0])
        t[0] += rt.replicas_alive
        t[1] += rt.retries
    return [(name, alive, retries) for name, (alive, retries) in totals.items()]


class RayRuntime:
    """A model version whose batches run on Ray actors (see the module doc)."""

    # tells the batcher that predict waits on other processes: never run it on the event loop
    remote = True

    def __init__(self, config: ModelConfig, version_dir: Path, files: ModelFiles | None = None) -> None:
        spec = config.placement
        if not isinstance(spec, PlacementSpec):
            raise ModelLoadError(f"{config.name}: placement: missing (the Ray runtime needs a placement block)")
        if files is not None:
            raise ModelLoadError(f"{config.name}: placement: a sealed bundle cannot be placed on Ray: its weights "
                                 "are decrypted in this process's memory only, and placing it would copy them in "
                                 "the clear to every node of the cluster")
        import ray

        self.name = config.name
        self.version = Path(version_dir).name
        self.spec = spec
        onnx_parameters = dict(config.parameters)
        # what each replica loads: the model's own config, minus the placement and the front's concerns
        self._replica_config = ModelConfig(name=config.name, runtime="onnx", inputs=config.inputs,
                                           outputs=config.outputs, max_batch_size=config.max_batch_size,
                                           parameters=onnx_parameters)
        path = model_file(replace(config, parameters=onnx_parameters), Path(version_dir), "model.onnx")
        self._file_name = os.path.relpath(path, version_dir).replace(os.sep, "/")
        data = path.read_bytes()
        connect(spec.address, config.name)

        self._lock = threading.Lock()  # the replica lists; apredict runs on the loop, predict anywhere
        self._live: list[_Handle] = []
        self._retiring: list[_Handle] = []
        self._starting = 0
        self._counter = itertools.count()
        self._rr = 0
        self._closed = False
        self.retries = 0  # batches retried on another replica after a replica failure
        self.replaced = 0  # replicas started to replace dead ones
        self.failures = 0  # batches failed with 503 for want of a live replica
        self._target = spec.replicas
        self._outstanding = 0
        self._samples: deque[tuple[float, int]] = deque()
        self._last_scale = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tick_task: asyncio.Task[None] | None = None

        self._model_ref = ray.put(data)
        actors = [self._new_actor() for _ in range(spec.replicas)]
        try:
            replies = self._wait_ready(actors)
        except BaseException:
            for actor in actors:
                _kill(actor)
            raise
        first = replies[0]
        self._inputs = tuple(_tensor(s) for s in first["inputs"])
        self._outputs = tuple(_tensor(s) for s in first["outputs"])
        self.platform = f"ray/{first['platform']}"
        self.providers: list[str] = list(first["providers"])
        now = time.monotonic()
        self._live = [_Handle(a, next(self._counter), str(r["node"]), last_used=now) for a, r in zip(actors, replies,
                                                                                                    strict=True)]
        _runtimes.add(self)
        log.info("model replicas placed on Ray", extra={"model": self.name, "version": self.version,
                                                        "replicas": len(self._live),
                                                        "nodes": len({h.node for h in self._live})})

    # ---- the Runtime protocol -----------------------------------------------------------------
    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def replicas_alive(self) -> int:
        return len(self._live)

    @property
    def nodes(self) -> set[str]:
        """The Ray node ids the live replicas run on."""
        return {h.node for h in self._live}

    async def apredict(self, inputs: Tensors) -> Tensors:
        """The batch on one replica, awaited on the server's loop (the batcher's path)."""
        import ray.exceptions as rx

        if self._tick_task is None and not self._closed:
            self._start_background()
        tried: list[_Handle] = []
        for _ in range(2):  # the batch, and once more on another replica if the first is lost
            handle = self._pick(tried)
            if handle is None:
                break
            if tried:  # the first replica was lost: this is the retry
                self.retries += 1
            tried.append(handle)
            try:
                ref = handle.actor.predict.remote(inputs)
                return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.spec.timeout_s)  # type: ignore[no-any-return]
            except rx.RayTaskError as err:
                raise _model_error(self.name, err) from None
            except (rx.RayError, ConnectionError) as err:  # the replica (or its node) is gone
                self._lost(handle, err)
            except asyncio.TimeoutError:  # not the builtin before 3.11
                self._suspect(handle)
                self.failures += 1
                raise Overloaded(f"model '{self.name}': a replica did not answer within {self.spec.timeout_s:g} s; "
                                 "retry", retry_after=1) from None
            finally:
                self._release(handle)
        self.failures += 1
        raise self._unavailable()

    def predict(self, inputs: Tensors) -> Tensors:
        """Blocking (the Runtime protocol, e.g. ``bastion profile``): same routing and retry;
        replacement of a dead replica needs the server's loop (``apredict``)."""
        import ray
        import ray.exceptions as rx

        tried: list[_Handle] = []
        for _ in range(2):  # the batch, and once more on another replica if the first is lost
            handle = self._pick(tried)
            if handle is None:
                break
            if tried:  # the first replica was lost: this is the retry
                self.retries += 1
            tried.append(handle)
            try:
                return ray.get(handle.actor.predict.remote(inputs), timeout=self.spec.timeout_s)  # type: ignore[no-any-return]
            except rx.RayTaskError as err:
                raise _model_error(self.name, err) from None
            except rx.GetTimeoutError:
                raise Overloaded(f"model '{self.name}': a replica did not answer within {self.spec.timeout_s:g} s; "
                                 "retry", retry_after=1) from None
            except (rx.RayError, ConnectionError) as err:
                self._lost(handle, err)
            finally:
                self._release(handle)
        raise self._unavailable()

    def close(self) -> None:
        """Kill every replica (ray.kill: at once, a batch still running on one is lost)."""
        with self._lock:
            self._closed = True
            handles = self._live + self._retiring
            self._live, self._retiring = [], []
        for h in handles:
            _kill(h.actor)
        _runtimes.discard(self)
        loop, tasks = self._loop, [*self._tasks, *([self._tick_task] if self._tick_task else [])]
        if loop is not None and not loop.is_closed():
            for task in tasks:
                loop.call_soon_threadsafe(task.cancel)
        self._model_ref = None
        log.info("model replicas stopped", extra={"model": self.name, "version": self.version,
                                                  "replicas": len(handles)})

    # ---- routing ------------------------------------------------------------------------------
    def _pick(self, tried: list[_Handle]) -> _Handle | None:
        """The live replica with the fewest outstanding batches, round robin among equals."""
        with self._lock:
            live = [h for h in self._live if h not in tried]
            if not live:
                return None
            self._rr += 1
            start = self._rr % len(live)
            best = min(live[start:] + live[:start], key=lambda h: h.outstanding)
            best.outstanding += 1
            best.last_used = time.monotonic()
            self._outstanding += 1
            return best

    def _release(self, handle: _Handle) -> None:
        with self._lock:
            handle.outstanding -= 1
            self._outstanding -= 1

    def _unavailable(self) -> Overloaded:
        starting = f"; {self._starting} starting" if self._starting else ""
        return Overloaded(f"model '{self.name}': no live replica could take the batch ({len(self._live)} live"
                          f"{starting}); retry", retry_after=1)

    # ---- failure and replacement ---------------------------------------------------------------
    def _lost(self, handle: _Handle, err: BaseException) -> None:
        with self._lock:
            if handle in self._live:
                self._live.remove(handle)
            elif handle in self._retiring:
                self._retiring.remove(handle)
            else:
                return  # already known
        log.warning("model replica lost", extra={"model": self.name, "version": self.version,
                                                 "replica": handle.index, "error": type(err).__name__})
        _kill(handle.actor)
        self._reconcile()

    def _suspect(self, handle: _Handle) -> None:
        """A replica that timed out: ping it, and replace it if it does not answer."""
        self._spawn(self._check(handle))

    async def _check(self, handle: _Handle) -> None:
        try:
            await asyncio.wait_for(asyncio.wrap_future(handle.actor.ping.remote().future()), PING_TIMEOUT_S)
        except Exception as err:  # dead, unreachable or hung: all the same to a client
            self._lost(handle, err)

    def _reconcile(self) -> None:
        """Start replicas until live + starting reaches the target (replacements, scale-up);
        retire the surplus (scale-down). Needs the server's loop; without it (predict only) the
        next apredict does it."""
        if self._closed or self._loop is None:
            return
        with self._lock:
            missing = self._target - len(self._live) - self._starting
            surplus = len(self._live) + self._starting - self._target
            if missing > 0:
                self._starting += missing
            retire: list[_Handle] = []
            while surplus > 0 and len(self._live) > 1:
                victim = min(self._live, key=lambda h: h.outstanding)
                self._live.remove(victim)
                self._retiring.append(victim)
                retire.append(victim)
                surplus -= 1
        for victim in retire:
            log.info("model replica retired", extra={"model": self.name, "version": self.version,
                                                     "replica": victim.index})
        for _ in range(max(0, missing)):
            self._spawn(self._start_one())

    async def _start_one(self) -> None:
        backoff = 1.0
        try:
            while not self._closed:
                actor = self._new_actor()
                try:
                    reply = await asyncio.wait_for(asyncio.wrap_future(actor.signature.remote().future()),
                                                   self.spec.start_timeout_s)
                    if "error" in reply:
                        raise ModelLoadError(str(reply["error"]))
                except Exception as err:
                    _kill(actor)
                    log.warning("model replica did not start; retrying", extra={
                        "model": self.name, "version": self.version, "error": f"{type(err).__name__}: {err}"[:300],
                        "retry_in_s": backoff})
                    await asyncio.sleep(backoff)
                    backoff = min(RESTART_BACKOFF_MAX_S, backoff * 2)
                    continue
                handle = _Handle(actor, next(self._counter), str(reply.get("node", "")), last_used=time.monotonic())
                with self._lock:
                    closed = self._closed
                    if not closed:
                        self._live.append(handle)
                        self.replaced += 1
                if closed:
                    _kill(actor)
                else:
                    log.info("model replica started", extra={"model": self.name, "version": self.version,
                                                             "replica": handle.index, "live": len(self._live)})
                return
        finally:
            with self._lock:
                self._starting -= 1

    # ---- background: autoscaling, retiring, pinging idle replicas --------------------------------
    def _start_background(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tick_task = self._loop.create_task(self._tick())
        self._reconcile()  # replicas lost before the loop was known (predict-only use)

    def _spawn(self, coro: Any) -> None:
        loop = self._loop
        if loop is None or self._closed or loop.is_closed():
            coro.close()
            return
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if not here:  # a blocking predict on another thread lost a replica: hand over to the loop
            loop.call_soon_threadsafe(self._spawn, coro)
            return
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tick(self) -> None:
        last_health = time.monotonic()
        while not self._closed:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            if self.spec.autoscale is not None:
                self._autoscale(now)
            self._finish_retiring()
            if now - last_health >= HEALTH_PERIOD_S:
                last_health = now
                for h in list(self._live):
                    if h.outstanding == 0 and now - h.last_used >= HEALTH_PERIOD_S:
                        self._spawn(self._check(h))

    def _autoscale(self, now: float) -> None:
        auto = self.spec.autoscale
        assert auto is not None
        self._samples.append((now, self._outstanding))
        horizon = max(auto.upscale_delay_s, auto.downscale_delay_s, TICK_S)
        while self._samples and self._samples[0][0] < now - horizon - TICK_S:
            self._samples.popleft()
        per = auto.target_queue_per_replica

        def window(delay_s: float) -> list[int] | None:
            # None until the samples cover the delay: no decision on a moment's burst
            if now - self._samples[0][0] < delay_s - TICK_S / 2:
                return None
            return [n for t, n in self._samples if t >= now - delay_s - TICK_S / 2]

        up = window(auto.upscale_delay_s)
        if up:
            want = min(auto.max_replicas, math.ceil(sum(up) / len(up) / per))
            if want > self._target:
                self._scale(want, now, sum(up) / len(up))
                return
        down = window(auto.downscale_delay_s)
        if down and now - self._last_scale >= auto.downscale_delay_s:
            want = max(auto.min_replicas, math.ceil(max(down) / per))
            if want < self._target:
                self._scale(self._target - 1, now, float(max(down)))  # one at a time: shrinking is the risky way

    def _scale(self, target: int, now: float, load: float) -> None:
        log.info("model replicas rescaled", extra={"model": self.name, "version": self.version,
                                                   "from": self._target, "to": target, "outstanding": round(load, 2)})
        self._target = target
        self._last_scale = now
        self._samples.clear()
        self._reconcile()
        auto = self.spec.autoscale
        if auto is not None and auto.request_resources:
            self._spawn(asyncio.to_thread(self._request_resources, target))

    def _request_resources(self, target: int) -> None:
        from ray.autoscaler.sdk import request_resources

        bundle = {"CPU": self.spec.num_cpus, **({"GPU": self.spec.num_gpus} if self.spec.num_gpus else {})}
        try:
            request_resources(bundles=[bundle] * target)
        except Exception as err:  # a hint to the autoscaler; the actors are placed either way
            log.warning("request_resources failed", extra={"model": self.name, "error": str(err)[:300]})

    def _finish_retiring(self) -> None:
        with self._lock:
            done = [h for h in self._retiring if h.outstanding == 0]
            self._retiring = [h for h in self._retiring if h.outstanding > 0]
        for h in done:
            _kill(h.actor)

    # ---- helpers -------------------------------------------------------------------------------
    def _new_actor(self) -> Any:
        return _replica_class().options(
            num_cpus=self.spec.num_cpus, num_gpus=self.spec.num_gpus,
            # replicas on different nodes where the cluster has room: a lost node takes one replica
            scheduling_strategy="SPREAD",
        ).remote(self._replica_config, self._file_name, self._model_ref)

    def _wait_ready(self, actors: list[Any]) -> list[dict[str, Any]]:
        import ray

        refs = [a.signature.remote() for a in actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.spec.start_timeout_s)
        if pending:
            raise ModelLoadError(
                f"{self.name}: placement.replicas: {len(ready)} of {len(refs)} replicas started within "
                f"{self.spec.start_timeout_s:g} s (placement.start_timeout_s); each needs {self.spec.num_cpus:g} CPU "
                f"and {self.spec.num_gpus:g} GPU, the cluster has {ray.available_resources()} available")
        replies: list[dict[str, Any]] = []
        for ref in refs:
            try:
                reply = ray.get(ref)
            except Exception as err:
                raise ModelLoadError(f"{self.name}: a replica failed to start on Ray: {err}") from None
            if "error" in reply:
                raise ModelLoadError(str(reply["error"]))
            replies.append(reply)
        return replies


def _model_error(name: str, err: Any) -> BastionError:
    """An exception raised by the model in a replica: the client's answer (a bad input is a 400)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BastionError):
        return cause
    return InternalError(f"model '{name}': the replica failed: {cause!r}"[:2000])


def _kill(actor: Any) -> None:
    import ray

    with contextlib.suppress(Exception):  # already dead, or Ray is shutting down
        ray.kill(actor, no_restart=True)


def _tensor(item: dict[str, Any]) -> TensorSpec:
    return TensorSpec(str(item["name"]), str(item["datatype"]), tuple(int(d) for d in item["shape"]))
