"""Model configuration and metadata: what a model accepts, returns and how it is served."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor of a model's signature. ``shape`` is the full shape; -1 is a variable dim.

    When the model batches (max_batch_size > 0) the first dim is the batch dim.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """Dynamic batching knobs, as Triton names them."""

    enabled: bool = True
    max_queue_delay_us: int = 0  # 0: take what is queued, never wait (Triton's default)
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 256  # requests waiting per model version; beyond it: 503
    # a batch whose predict is estimated to take at most this long runs on the event loop's
    # thread (no hand-off to a predict thread); 0: always on a predict thread (engine/batcher.py)
    inline_max_us: int = 1000


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which versions on disk are served: ``latest`` N, ``specific`` list, or ``all``."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    runtime: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    max_batch_size: int = 0
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    # runtime options, e.g. intra_op_threads, graph_optimization, file name
    parameters: dict[str, Any] = field(default_factory=dict)
    platform: str = ""
    # NaN/Inf in float inputs are refused (400) unless the model opts in
    allow_non_finite: bool = False
    # batches of one model version that may run at once (each on its own executor thread)
    instance_count: int = 1
    # output hardening against extraction: a guard.hardening.HardeningSpec (core does not import guard)
    hardening: object | None = None
    # served by the trusted worker, never loaded by this process (docs/CONFIDENTIAL.md)
    confidential: ConfidentialSpec | None = None
    # batches run on model replicas in a Ray cluster: a runtimes.ray_runtime.PlacementSpec
    # (core does not import the runtimes); None: in this process
    placement: object | None = None


@dataclass(frozen=True, slots=True)
class ConfidentialSpec:
    """``confidential:`` of config.yaml. ``e2e``: ``required`` (only inputs sealed to the
    worker's attested key are accepted), ``optional`` (plaintext inputs too: the weights
    stay in the worker, the inputs pass through this host) or ``off``. ``bundle``: the
    sealed bundle in each version directory that the worker opens. ``tail``: for a
    partitioned model, the tail's ONNX file beside the bundle."""

    e2e: str = "required"
    bundle: str = "model.bundle"
    # a partitioned model: the bundle holds the head (run by the worker), this plain ONNX file
    # in the version directory the tail (run here, on the head's features)
    tail: str | None = None


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # for a model that is not serving: its state (LOADING, UNAVAILABLE, FAILED) and why
    state: str = ""
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": self.platform,
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
        }


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """One version of a model (or a zoo, version "") and whether it serves:
    ``state`` READY, LOADING, UNAVAILABLE or FAILED; ``reason`` says why it does not."""

    version: str
    state: str
    reason: str = ""
