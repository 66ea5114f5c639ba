"""A confidential model version as the front process sees it: a handle on the trusted worker.

The front never reads the model's weights: it sends the version's sealed bundle
(ciphertext) to the worker, which verifies, unwraps (through the key-release service)
and loads it, and answers with the signature. Plaintext inference (``e2e: optional`` or
``off``) crosses the channel batch by batch; end-to-end sealed requests go through
:meth:`infer_sealed` and are never batched here, since the host cannot read them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from bastion.core.errors import BastionError
from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.runtimes import ModelFiles, ModelLoadError, check_signature

log = logging.getLogger("bastion.runtimes.worker")

__all__ = ["WorkerRuntime"]


class WorkerRuntime:
    # tells the batcher that predict waits on another process: never run it on the event loop
    remote = True

    def __init__(self, config: ModelConfig, version_dir: Path, files: ModelFiles | None = None) -> None:
        from bastion.confidential.worker_client import current_worker

        spec = config.confidential
        assert spec is not None
        name = config.name
        if files is not None:
            # a root-level bundle is opened by the front process itself: never for these models
            raise ModelLoadError(f"{name}: confidential models cannot be sealed bundles at the repository root, which "
                                 f"the front process opens; put the bundle in each version directory as {spec.bundle}")
        client = current_worker()
        if client is None:
            raise ModelLoadError(f"{name}: marked confidential, but this server has no trusted worker "
                                 "(--worker-socket); it is never served by the front process")
        self.version = int(Path(version_dir).name)
        bundle = Path(version_dir) / spec.bundle
        if not bundle.is_file():
            held = sorted(p.name for p in Path(version_dir).iterdir()) if Path(version_dir).is_dir() else []
            raise ModelLoadError(f"{name}: version {self.version}: confidential models are served from a sealed "
                                 f"bundle {spec.bundle!r} (the host never reads their weights in the clear); "
                                 f"the version directory holds {', '.join(held) or 'nothing'}")
        try:
            if not client.ready:
                client.wait_connected(30)
            reply = client.load(name, self.version, bundle, self)
        except BastionError as err:
            raise ModelLoadError(f"{name}: version {self.version}: the trusted worker refused it: "
                                 f"{err.message}") from None
        self._client = client
        self._name = name
        self._e2e = spec.e2e
        self._inputs = tuple(_spec(s) for s in reply["inputs"])
        self._outputs = tuple(_spec(s) for s in reply["outputs"])
        self.platform = f"confidential/{reply.get('platform', '')}"
        self.bundle_sha256 = str(reply.get("bundle_sha256", ""))
        self.tail: Any = None
        self.part_observer: Any = None  # set by the registry: observe(part, seconds) on the loop
        if spec.tail is not None:
            try:
                self._load_tail(config, Path(version_dir), spec.tail, bool(reply.get("head")))
            except BaseException:
                client.unload(name, self.version, self)
                raise
        check_signature(config, "inputs", config.inputs, {s.name: s for s in self._inputs})
        check_signature(config, "outputs", config.outputs, {s.name: s for s in self._outputs})

    def _load_tail(self, config: ModelConfig, version_dir: Path, tail_file: str, head: bool) -> None:
        """A partitioned model: the worker holds the head, this process runs the tail on the
        head's features (on the GPU provider where the runtime has one)."""
        from bastion.runtimes.onnx_runtime import OnnxRuntime

        if not head:
            raise ModelLoadError(f"{config.name}: config.yaml names a tail, but the sealed bundle's own config does "
                                 "not mark it as a partition head (confidential.tail): the worker would not release "
                                 "its features")
        tail_config = ModelConfig(name=f"{config.name}.tail", runtime="onnx", max_batch_size=config.max_batch_size,
                                  parameters={"file": tail_file, "providers": tail_providers(config)})
        self.tail = OnnxRuntime(tail_config, version_dir)
        self.tail_providers = self.tail.providers
        features = {s.name for s in self._outputs}
        wanted = {s.name for s in self.tail.inputs}
        if not wanted <= features:
            self.tail.close()
            raise ModelLoadError(f"{config.name}: the tail takes {', '.join(sorted(wanted))}, the head gives "
                                 f"{', '.join(sorted(features))}")
        self.head_outputs = self._outputs
        self._outputs = tuple(self.tail.outputs)
        self.platform = f"partitioned/{self.platform.split('/', 1)[1]}+{self.tail.platform}"
        log.info("partition tail loaded", extra={"model": config.name, "providers": self.tail_providers})

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Blocking (the Runtime protocol); the batcher calls ``apredict`` instead."""
        from bastion.confidential.tensor_codec import decode_tensors, encode_tensors

        reply = self._client.call({"op": "infer", "model": self._name, "version": self.version,
                                   "inputs": encode_tensors(inputs)})
        outputs = decode_tensors(reply.get("outputs"), max_bytes=self._client.max_frame_bytes)
        if self.tail is None:
            return outputs
        wanted = {s.name for s in self.tail.inputs}
        return self.tail.predict({n: a for n, a in outputs.items() if n in wanted})

    async def apredict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch on the server's loop: no predict thread waits on the worker."""
        from bastion.confidential.tensor_codec import decode_tensors, encode_tensors

        t0 = time.perf_counter()
        reply = await self._client.acall({"op": "infer", "model": self._name, "version": self.version,
                                          "inputs": encode_tensors(inputs)})
        outputs = decode_tensors(reply.get("outputs"), max_bytes=self._client.max_frame_bytes)
        if self.tail is None:
            return outputs
        return await self._run_tail(outputs, t0)

    async def _run_tail(self, features: dict[str, np.ndarray], t0: float) -> dict[str, np.ndarray]:
        t1 = time.perf_counter()
        wanted = {s.name for s in self.tail.inputs}
        outputs = await asyncio.to_thread(self.tail.predict, {n: a for n, a in features.items() if n in wanted})
        if self.part_observer is not None:
            self.part_observer("head", t1 - t0)
            self.part_observer("tail", time.perf_counter() - t1)
        return outputs

    async def infer_sealed(self, envelope: bytes, rows: int | None,
                           sealed_for: str) -> tuple[int, bytes | dict[str, np.ndarray]]:
        """(status, answer): the sealed answer, whose content only the client reads; for a
        partitioned model, the tail's outputs on the features the head released.
        ``sealed_for``: the name the client sealed to (a zoo's, when this is its variant)."""
        t0 = time.perf_counter()
        reply = await self._client.acall({"op": "sealed", "model": self._name, "version": self.version,
                                          "envelope": envelope, "rows": rows, "sealed_for": sealed_for})
        status = int(reply.get("status", 502))
        if self.tail is not None and status == 200:
            from bastion.confidential.tensor_codec import decode_tensors

            features = decode_tensors(reply.get("features"), max_bytes=self._client.max_frame_bytes)
            return status, await self._run_tail(features, t0)
        return status, bytes(reply.get("envelope", b""))

    async def attest(self, nonce: bytes) -> tuple[str, bytes]:
        return await self._client.attest(nonce)

    def close(self) -> None:
        self._client.unload(self._name, self.version, self)
        if self.tail is not None:
            self.tail.close()


def _spec(item: Any) -> TensorSpec:
    return TensorSpec(str(item["name"]), str(item["datatype"]), tuple(int(d) for d in item["shape"]))


def tail_providers(config: ModelConfig) -> list[str]:
    """Execution providers for a partition's tail: the model's ``parameters.providers`` when
    the config names them (the head runs in the worker, so the front's parameters concern the
    tail only), else CUDA where this ONNX Runtime build has it, then the CPU. The tail is the
    untrusted part of the model, so it is the part that may use the host's accelerator."""
    import onnxruntime as ort

    named = config.parameters.get("providers")
    if isinstance(named, list) and named:
        return [str(p) for p in named]
    available = set(ort.get_available_providers())
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or ["CPUExecutionProvider"]
