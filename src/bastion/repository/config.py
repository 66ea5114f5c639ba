"""``config.yaml`` of a model directory -> ``ModelConfig``, strictly.

Strict because a config file is where silent mistakes hide: an unknown key (a typo
such as ``max_batch: 64``) is an error, not a dropped setting, and every message
names the file and the field path, e.g.
``simple/config.yaml: inputs[0].datatype: expected one of BOOL, ..., got 'INT33'``.

Defaults worth knowing: without a ``dynamic_batching`` key, a model with
``max_batch_size > 0`` is batched with the default knobs (``dynamic_batching: false``
turns it off); with ``max_batch_size: 0`` only ``dynamic_batching.max_queue_size``
matters (requests run one at a time, but the queue is still bounded); the version
policy defaults to ``{latest: 1}``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import yaml

from bastion.core.datatypes import DATATYPES
from bastion.core.errors import InvalidInput
from bastion.core.metadata import BatchingConfig, ConfidentialSpec, ModelConfig, TensorSpec, VersionPolicy
from bastion.runtimes import RUNTIME_NAMES, ModelLoadError
from bastion.runtimes.ray_runtime import MAX_REPLICAS, AutoscaleSpec, PlacementSpec

__all__ = ["CONFIG_FILE", "ConfigError", "load_model_config", "parse_model_config", "parse_model_config_yaml"]

CONFIG_FILE = "config.yaml"

_TOP_KEYS = (
    "name",
    "runtime",
    "max_batch_size",
    "inputs",
    "outputs",
    "dynamic_batching",
    "version_policy",
    "parameters",
    "allow_non_finite",
    "instance_count",
    "hardening",
    "confidential",
    "placement",
)
_PLACEMENT_KEYS = ("engine", "replicas", "num_cpus", "num_gpus", "address", "timeout_s", "start_timeout_s", "autoscale")
_AUTOSCALE_KEYS = (
    "min_replicas", "max_replicas", "target_queue_per_replica", "upscale_delay_s", "downscale_delay_s",
    "request_resources",
)
_PLACEMENT_ENGINES = ("ray",)
# batches in flight per replica when instance_count is left out: one computing, the next
# ones already on their way (the Ray hop overlaps the model), and room for the queue the
# autoscaler reads
_BATCHES_PER_REPLICA = 4
_CONFIDENTIAL_KEYS = ("e2e", "bundle", "tail")
_E2E_MODES = ("required", "optional", "off")
_TENSOR_KEYS = ("name", "datatype", "shape")
_BATCHING_KEYS = ("max_queue_delay_us", "preferred_batch_sizes", "max_queue_size", "inline_max_us")
_DATATYPE_LIST = ", ".join(sorted(DATATYPES))


class ConfigError(ModelLoadError):
    """config.yaml is missing, not YAML, or has a wrong or unknown field (HTTP 400)."""


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read and parse ``model_dir/config.yaml``; the model name is the directory name."""
    model_dir = Path(model_dir)
    name = model_dir.name
    source = f"{name}/{CONFIG_FILE}"
    try:
        text = (model_dir / CONFIG_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: missing; every model directory needs a {CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    return parse_model_config_yaml(name, text, source=source)


def parse_model_config_yaml(name: str, text: str | bytes, *, source: str) -> ModelConfig:
    """Parse config.yaml content that is not in a model directory (a sealed bundle's, in memory)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: not UTF-8: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    return parse_model_config(name, data, source=source)


def parse_model_config(name: str, data: Any, *, source: str | None = None) -> ModelConfig:
    """Validate the parsed YAML ``data`` of model ``name``; errors name ``source`` and the field."""
    p = _Parser(source or f"{name}/{CONFIG_FILE}")
    if data is None:
        p.fail("", "empty file; at least 'runtime' is required")
    top = p.mapping("", data, _TOP_KEYS)
    if "name" in top and top["name"] != name:
        p.fail("name", f"must match the directory name {name!r} (or be left out), got {top['name']!r}")
    if "runtime" not in top:
        p.fail("runtime", f"required; one of {', '.join(sorted(RUNTIME_NAMES))}")
    runtime = top["runtime"]
    if runtime not in RUNTIME_NAMES:
        p.fail("runtime", f"expected one of {', '.join(sorted(RUNTIME_NAMES))}, got {runtime!r}")
    max_batch_size = p.integer("max_batch_size", top.get("max_batch_size", 0), minimum=0)
    inputs = p.tensors("inputs", top.get("inputs", []), max_batch_size)
    outputs = p.tensors("outputs", top.get("outputs", []), max_batch_size)
    parameters = top.get("parameters", {})
    p.mapping("parameters", parameters, None)
    parameters = dict(parameters)
    confidential = p.confidential(top.get("confidential"))
    placement = p.placement(top.get("placement"), runtime, confidential is not None)
    instance_count = p.integer("instance_count", top.get("instance_count", 1), minimum=1)
    if placement is not None:
        if "instance_count" not in top:
            instance_count = _BATCHES_PER_REPLICA * placement.max_replicas
        elif instance_count < placement.max_replicas:
            p.fail("instance_count", f"{instance_count} batches in flight cannot keep {placement.max_replicas} "
                   "replicas busy; leave it out (4 per replica) or raise it")
    return ModelConfig(
        name=name,
        runtime=runtime,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        batching=p.batching(top.get("dynamic_batching"), max_batch_size),
        version_policy=p.version_policy(top.get("version_policy", {"latest": 1})),
        parameters=parameters,
        allow_non_finite=p.boolean("allow_non_finite", top.get("allow_non_finite", False)),
        instance_count=instance_count,
        hardening=p.hardening(top.get("hardening")),
        confidential=confidential,
        placement=placement,
    )


class _Parser:
    """Field checks that all raise ConfigError('<source>: <path>: <what is wrong>')."""

    def hardening(self, value: Any) -> object | None:
        if value is None:
            return None
        from bastion.guard.hardening import parse_hardening

        try:
            spec = parse_hardening(value, where="hardening")
        except InvalidInput as err:
            raise ConfigError(f"{self.source}: {err.message}") from None
        return spec if spec.enabled else None

    def __init__(self, source: str) -> None:
        self.source = source

    def confidential(self, value: Any) -> ConfidentialSpec | None:
        if value is None or value is False:
            return None
        if value is True:
            return ConfidentialSpec()
        c = self.mapping("confidential", value, _CONFIDENTIAL_KEYS)
        e2e = c.get("e2e", "required")
        if e2e not in _E2E_MODES:
            self.fail("confidential.e2e", f"expected one of {', '.join(_E2E_MODES)}, got {_show(e2e)}")
        bundle = c.get("bundle", "model.bundle")
        if not isinstance(bundle, str) or not bundle or "/" in bundle or bundle.startswith("."):
            self.fail("confidential.bundle", f"expected a file name inside the version directory, got {_show(bundle)}")
        tail = c.get("tail")
        if tail is not None and (not isinstance(tail, str) or not tail or "/" in tail or tail.startswith(".")):
            self.fail("confidential.tail", f"expected an ONNX file name in the version directory, got {_show(tail)}")
        return ConfidentialSpec(e2e=e2e, bundle=bundle, tail=tail)

    def placement(self, value: Any, runtime: str, confidential: bool) -> PlacementSpec | None:
        """``placement:``: where the model's replicas run (runtimes/ray_runtime.py)."""
        if value is None:
            return None
        path = "placement"
        c = self.mapping(path, value, _PLACEMENT_KEYS)
        if "engine" not in c:
            self.fail(f"{path}.engine", f"required; one of {', '.join(_PLACEMENT_ENGINES)}")
        if c["engine"] not in _PLACEMENT_ENGINES:
            self.fail(f"{path}.engine", f"expected one of {', '.join(_PLACEMENT_ENGINES)}, got {_show(c['engine'])}")
        if confidential:
            self.fail(path, "a confidential model is served by the trusted worker only; its weights must not be "
                      "placed on a Ray cluster")
        if runtime not in ("onnx", "onnxruntime"):
            self.fail(path, f"only ONNX models (runtime: onnx) can be placed on Ray, got runtime {runtime!r}")
        defaults = PlacementSpec()
        autoscale = self.autoscale(c.get("autoscale"))
        if autoscale is None:
            replicas = self.bounded(f"{path}.replicas", c.get("replicas", 1), 1, MAX_REPLICAS)
        else:
            replicas = self.bounded(f"{path}.replicas", c.get("replicas", autoscale.min_replicas),
                                    autoscale.min_replicas, autoscale.max_replicas, within="placement.autoscale's "
                                    "min_replicas..max_replicas")
        address = c.get("address")
        if address is not None and (not isinstance(address, str) or not address.strip()):
            self.fail(f"{path}.address", f"expected a Ray address such as \"10.0.0.5:6379\", \"ray://host:10001\" "
                      f"or \"auto\" (or leave it out: RAY_ADDRESS, else auto), got {_show(address)}")
        return PlacementSpec(
            engine=c["engine"],
            replicas=replicas,
            num_cpus=self.number(f"{path}.num_cpus", c.get("num_cpus", defaults.num_cpus), minimum=0.0),
            num_gpus=self.number(f"{path}.num_gpus", c.get("num_gpus", defaults.num_gpus), minimum=0.0),
            address=address,
            timeout_s=self.number(f"{path}.timeout_s", c.get("timeout_s", defaults.timeout_s), minimum=0.0,
                                  exclusive=True),
            start_timeout_s=self.number(f"{path}.start_timeout_s", c.get("start_timeout_s", defaults.start_timeout_s),
                                        minimum=0.0, exclusive=True),
            autoscale=autoscale,
        )

    def autoscale(self, value: Any) -> AutoscaleSpec | None:
        if value is None or value is False:
            return None
        path = "placement.autoscale"
        a = self.mapping(path, value, _AUTOSCALE_KEYS)
        for key in ("min_replicas", "max_replicas"):
            if key not in a:
                self.fail(f"{path}.{key}", "required")
        low = self.bounded(f"{path}.min_replicas", a["min_replicas"], 1, MAX_REPLICAS)
        high = self.bounded(f"{path}.max_replicas", a["max_replicas"], low, MAX_REPLICAS,
                            within=f"min_replicas ({low})..{MAX_REPLICAS}")
        d = AutoscaleSpec()
        return AutoscaleSpec(
            min_replicas=low,
            max_replicas=high,
            target_queue_per_replica=self.number(
                f"{path}.target_queue_per_replica", a.get("target_queue_per_replica", d.target_queue_per_replica),
                minimum=0.0, exclusive=True),
            upscale_delay_s=self.number(f"{path}.upscale_delay_s", a.get("upscale_delay_s", d.upscale_delay_s),
                                        minimum=0.0),
            downscale_delay_s=self.number(f"{path}.downscale_delay_s",
                                          a.get("downscale_delay_s", d.downscale_delay_s), minimum=0.0),
            request_resources=self.boolean(f"{path}.request_resources",
                                           a.get("request_resources", d.request_resources)),
        )

    def bounded(self, path: str, value: Any, low: int, high: int, *, within: str = "") -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            self.fail(path, f"expected an integer from {low} to {high}{f' ({within})' if within else ''}, "
                      f"got {_show(value)}")
        return value

    def number(self, path: str, value: Any, *, minimum: float, exclusive: bool = False) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(path, f"expected a number, got {_show(value)}")
        if value < minimum or (exclusive and value == minimum):
            self.fail(path, f"expected a number {'>' if exclusive else '>='} {minimum:g}, got {value}")
        return float(value)

    def fail(self, path: str, message: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def mapping(self, path: str, value: Any, keys: tuple[str, ...] | None) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {_show(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(path, f"keys must be strings, got {key!r}")
            if keys is not None and key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.fail(_join(path, key), f"unknown key; {hint}expected one of {', '.join(keys)}")
        return value

    def integer(self, path: str, value: Any, *, minimum: int) -> int:
        # bool is an int in Python; "max_batch_size: yes" is a mistake, not 1.
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(path, f"expected an integer, got {_show(value)}")
        if value < minimum:
            self.fail(path, f"expected an integer >= {minimum}, got {value}")
        return value

    def boolean(self, path: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {_show(value)}")
        return value

    def int_list(self, path: str, value: Any, *, minimum: int) -> tuple[int, ...]:
        if not isinstance(value, list):
            self.fail(path, f"expected a list of integers, got {_show(value)}")
        return tuple(self.integer(f"{path}[{i}]", v, minimum=minimum) for i, v in enumerate(value))

    def tensors(self, path: str, value: Any, max_batch_size: int) -> tuple[TensorSpec, ...]:
        if not isinstance(value, list):
            self.fail(path, f"expected a list of tensors ({{name, datatype, shape}}), got {_show(value)}")
        specs: list[TensorSpec] = []
        for i, item in enumerate(value):
            at = f"{path}[{i}]"
            t = self.mapping(at, item, _TENSOR_KEYS)
            for key in _TENSOR_KEYS:
                if key not in t:
                    self.fail(_join(at, key), "required")
            name = t["name"]
            if not isinstance(name, str) or not name:
                self.fail(f"{at}.name", f"expected a non-empty string, got {_show(name)}")
            if any(s.name == name for s in specs):
                self.fail(f"{at}.name", f"duplicate tensor name {name!r}")
            if t["datatype"] not in DATATYPES:
                self.fail(f"{at}.datatype", f"expected one of {_DATATYPE_LIST}, got {t['datatype']!r}")
            shape = self.int_list(f"{at}.shape", t["shape"], minimum=-1)
            if any(d == 0 for d in shape):
                self.fail(f"{at}.shape", f"dims are -1 (variable) or positive, got {list(shape)}")
            if max_batch_size > 0 and (not shape or shape[0] != -1):
                self.fail(
                    f"{at}.shape",
                    f"with max_batch_size > 0 the first dim is the batch dim and must be -1, got {list(shape)}",
                )
            specs.append(TensorSpec(name, t["datatype"], shape))
        return tuple(specs)

    def batching(self, value: Any, max_batch_size: int) -> BatchingConfig:
        if value is None or value is True:
            return BatchingConfig(enabled=max_batch_size > 0)
        if value is False:
            return BatchingConfig(enabled=False)
        path = "dynamic_batching"
        b = self.mapping(path, value, _BATCHING_KEYS)
        defaults = BatchingConfig()
        preferred = self.int_list(f"{path}.preferred_batch_sizes", b.get("preferred_batch_sizes", []), minimum=1)
        for i, size in enumerate(preferred):
            if size > max_batch_size:
                self.fail(
                    f"{path}.preferred_batch_sizes[{i}]",
                    f"{size} is larger than max_batch_size {max_batch_size}",
                )
        # With max_batch_size 0 requests run one by one; the queue bound still applies.
        return BatchingConfig(
            enabled=max_batch_size > 0,
            max_queue_delay_us=self.integer(
                f"{path}.max_queue_delay_us",
                b.get("max_queue_delay_us", defaults.max_queue_delay_us),
                minimum=0,
            ),
            preferred_batch_sizes=tuple(sorted(set(preferred))),
            max_queue_size=self.integer(
                f"{path}.max_queue_size", b.get("max_queue_size", defaults.max_queue_size), minimum=1
            ),
            inline_max_us=self.integer(
                f"{path}.inline_max_us", b.get("inline_max_us", defaults.inline_max_us), minimum=0
            ),
        )

    def version_policy(self, value: Any) -> VersionPolicy:
        path = "version_policy"
        if value == "all":
            return VersionPolicy(kind="all")
        kinds = ("latest", "specific", "all")
        policy = self.mapping(path, value, kinds)
        if len(policy) != 1:
            self.fail(path, f"expected exactly one of {{latest: N}}, {{specific: [..]}} or all, got {dict(policy)}")
        ((kind, arg),) = policy.items()
        if kind == "latest":
            return VersionPolicy(kind="latest", num_versions=self.integer(f"{path}.latest", arg, minimum=1))
        if kind == "specific":
            versions = self.int_list(f"{path}.specific", arg, minimum=1)
            if not versions:
                self.fail(f"{path}.specific", "expected at least one version")
            return VersionPolicy(kind="specific", versions=tuple(sorted(set(versions))))
        if arg not in (None, True, {}):  # Triton writes `all: {}`
            self.fail(f"{path}.all", f"takes no value, got {_show(arg)}")
        return VersionPolicy(kind="all")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"
