"""The model repository on disk: config.yaml parsing, version loading and hot reload."""

from bastion.repository.config import ConfigError, load_model_config, parse_model_config
from bastion.repository.store import (
    LoadedVersion,
    ModelRepository,
    ModelState,
    ModelStatus,
    RepositoryListener,
)

__all__ = [
    "ConfigError",
    "LoadedVersion",
    "ModelRepository",
    "ModelState",
    "ModelStatus",
    "RepositoryListener",
    "load_model_config",
    "parse_model_config",
]
