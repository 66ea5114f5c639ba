"""Plain types: tensors, requests/responses, model metadata and the error hierarchy."""

from bastion.core.errors import BastionError
from bastion.core.metadata import BatchingConfig, ModelConfig, ModelMetadata, TensorSpec, VersionPolicy
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor, RequestedOutput

__all__ = [
    "BastionError",
    "BatchingConfig",
    "InferTensor",
    "InferenceRequest",
    "InferenceResponse",
    "ModelConfig",
    "ModelMetadata",
    "RequestedOutput",
    "TensorSpec",
    "VersionPolicy",
]
