"""A confidential model version as the front process sees it: a handle on the trusted worker.

The front never reads the model's weights: it sends the version's sealed bundle
(ciphertext) to the worker, which verifies, unwraps (through the key-release service)
and loads it, and answers with the signature. Plaintext inference (``e2e: optional`` or
``off``) crosses the channel batch by batch; end-to-end sealed requests go through
:meth:`infer_sealed` and are never batched here, since the host cannot read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bastion.core.errors import BastionError
from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.runtimes import ModelFiles, ModelLoadError, check_signature

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
        check_signature(config, "inputs", config.inputs, {s.name: s for s in self._inputs})
        check_signature(config, "outputs", config.outputs, {s.name: s for s in self._outputs})

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
        return decode_tensors(reply.get("outputs"), max_bytes=self._client.max_frame_bytes)

    async def apredict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch on the server's loop: no predict thread waits on the worker."""
        from bastion.confidential.tensor_codec import decode_tensors, encode_tensors

        reply = await self._client.acall({"op": "infer", "model": self._name, "version": self.version,
                                          "inputs": encode_tensors(inputs)})
        return decode_tensors(reply.get("outputs"), max_bytes=self._client.max_frame_bytes)

    async def infer_sealed(self, envelope: bytes, rows: int | None, sealed_for: str) -> tuple[int, bytes]:
        """(status, sealed answer): the worker's verdict, whose content only the client reads.
        ``sealed_for``: the name the client sealed to (a zoo's, when this is its variant)."""
        reply = await self._client.acall({"op": "sealed", "model": self._name, "version": self.version,
                                          "envelope": envelope, "rows": rows, "sealed_for": sealed_for})
        return int(reply.get("status", 502)), bytes(reply.get("envelope", b""))

    async def attest(self, nonce: bytes) -> tuple[str, bytes]:
        return await self._client.attest(nonce)

    def close(self) -> None:
        self._client.unload(self._name, self.version, self)


def _spec(item: Any) -> TensorSpec:
    return TensorSpec(str(item["name"]), str(item["datatype"]), tuple(int(d) for d in item["shape"]))
