from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bastion.core.errors import BastionError
from bastion.core.metadata import BatchingConfig, TensorSpec, VersionPolicy
from bastion.repository.config import ConfigError, load_model_config, parse_model_config

FULL = """
runtime: onnx
max_batch_size: 64            # 0 = no batching
inputs:  [{name: INPUT0, datatype: INT32, shape: [-1, 16]}]
outputs: [{name: OUTPUT0, datatype: INT32, shape: [-1, 16]}]
dynamic_batching: {max_queue_delay_us: 500, preferred_batch_sizes: [32, 16], max_queue_size: 256}
version_policy: {latest: 2}
parameters: {intra_op_threads: 1, graph_optimization: all}
allow_non_finite: false
instance_count: 2
"""


def _valid(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "runtime": "onnx",
        "max_batch_size": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
    }
    data.update(overrides)
    return data


def test_full_example(tmp_path: Path) -> None:
    (tmp_path / "simple").mkdir()
    (tmp_path / "simple" / "config.yaml").write_text(FULL)
    config = load_model_config(tmp_path / "simple")
    assert config.name == "simple"
    assert config.runtime == "onnx"
    assert config.max_batch_size == 64
    assert config.inputs == (TensorSpec("INPUT0", "INT32", (-1, 16)),)
    assert config.outputs == (TensorSpec("OUTPUT0", "INT32", (-1, 16)),)
    assert config.batching == BatchingConfig(True, 500, (16, 32), 256)
    assert config.version_policy == VersionPolicy("latest", 2)
    assert config.parameters == {"intra_op_threads": 1, "graph_optimization": "all"}
    assert config.allow_non_finite is False
    assert config.instance_count == 2


def test_defaults() -> None:
    config = parse_model_config("m", {"runtime": "onnx"})
    assert config.max_batch_size == 0 and config.batching.enabled is False
    assert config.version_policy == VersionPolicy("latest", 1)
    batched = parse_model_config("m", {"runtime": "onnx", "max_batch_size": 4})
    assert batched.batching == BatchingConfig(enabled=True)
    off = parse_model_config("m", {"runtime": "onnx", "max_batch_size": 4, "dynamic_batching": False})
    assert off.batching.enabled is False
    # without batching the queue bound still applies
    queue_only = parse_model_config("m", {"runtime": "onnx", "dynamic_batching": {"max_queue_size": 2}})
    assert queue_only.batching == BatchingConfig(enabled=False, max_queue_size=2)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("all", VersionPolicy("all")),
        ({"all": {}}, VersionPolicy("all")),
        ({"specific": [3, 1, 3]}, VersionPolicy("specific", versions=(1, 3))),
        ({"latest": 3}, VersionPolicy("latest", 3)),
    ],
)
def test_version_policies(policy: Any, expected: VersionPolicy) -> None:
    assert parse_model_config("m", _valid(version_policy=policy)).version_policy == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "m/config.yaml: empty file"),
        ([1, 2], "m/config.yaml: expected a mapping, got list"),
        ({"max_batch_size": 1}, "m/config.yaml: runtime: required"),
        (_valid(runtime="tensorrt"), "m/config.yaml: runtime: expected one of onnx, onnxruntime, "),
        (_valid(max_batch=8), "m/config.yaml: max_batch: unknown key; did you mean 'max_batch_size'?"),
        (_valid(max_batch_size=-1), "m/config.yaml: max_batch_size: expected an integer >= 0, got -1"),
        (_valid(max_batch_size=True), "m/config.yaml: max_batch_size: expected an integer, got bool True"),
        (_valid(max_batch_size="8"), "m/config.yaml: max_batch_size: expected an integer, got str '8'"),
        (_valid(name="other"), "m/config.yaml: name: must match the directory name 'm'"),
        (_valid(inputs={"name": "x"}), "m/config.yaml: inputs: expected a list of tensors"),
        (
            _valid(inputs=[{"name": "x", "datatype": "INT33", "shape": [-1]}]),
            "m/config.yaml: inputs[0].datatype: expected one of BOOL, BYTES, FP16, FP32, FP64, INT16, "
            "INT32, INT64, INT8, UINT16, UINT32, UINT64, UINT8, got 'INT33'",
        ),
        (_valid(inputs=[{"name": "x", "datatype": "FP32"}]), "m/config.yaml: inputs[0].shape: required"),
        (
            _valid(outputs=[{"name": "y", "datatype": "FP32", "shape": [-1], "dims": [1]}]),
            "m/config.yaml: outputs[0].dims: unknown key; expected one of name, datatype, shape",
        ),
        (
            _valid(outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, "4"]}]),
            "m/config.yaml: outputs[0].shape[1]: expected an integer, got str '4'",
        ),
        (
            _valid(outputs=[{"name": "y", "datatype": "FP32", "shape": [4]}]),
            "m/config.yaml: outputs[0].shape: with max_batch_size > 0 the first dim is the batch dim",
        ),
        (
            _valid(inputs=[{"name": "x", "datatype": "FP32", "shape": [-1]}] * 2),
            "m/config.yaml: inputs[1].name: duplicate tensor name 'x'",
        ),
        (
            _valid(inputs=[{"name": "", "datatype": "FP32", "shape": [-1]}]),
            "m/config.yaml: inputs[0].name: expected a non-empty",
        ),
        (
            _valid(dynamic_batching={"max_queue_delay": 5}),
            "m/config.yaml: dynamic_batching.max_queue_delay: unknown key; did you mean 'max_queue_delay_us'?",
        ),
        (
            _valid(dynamic_batching={"preferred_batch_sizes": [4, 16]}),
            "m/config.yaml: dynamic_batching.preferred_batch_sizes[1]: 16 is larger than max_batch_size 8",
        ),
        (
            _valid(dynamic_batching={"max_queue_size": 0}),
            "m/config.yaml: dynamic_batching.max_queue_size: expected an integer >= 1, got 0",
        ),
        (
            _valid(dynamic_batching={"inline_max_us": -1}),
            "m/config.yaml: dynamic_batching.inline_max_us: expected an integer >= 0, got -1",
        ),
        (
            {"runtime": "onnx", "dynamic_batching": {"preferred_batch_sizes": [2]}},
            "m/config.yaml: dynamic_batching.preferred_batch_sizes[0]: 2 is larger than max_batch_size 0",
        ),
        (
            _valid(version_policy={"latest": 0}),
            "m/config.yaml: version_policy.latest: expected an integer >= 1",
        ),
        (_valid(version_policy={"newest": 1}), "m/config.yaml: version_policy.newest: unknown key"),
        (
            _valid(version_policy={"latest": 1, "specific": [1]}),
            "m/config.yaml: version_policy: expected exactly one of",
        ),
        (
            _valid(version_policy={"specific": []}),
            "m/config.yaml: version_policy.specific: expected at least one",
        ),
        (
            _valid(version_policy="newest"),
            "m/config.yaml: version_policy: expected a mapping, got str 'newest'",
        ),
        (_valid(parameters=["a"]), "m/config.yaml: parameters: expected a mapping, got list"),
        (
            _valid(allow_non_finite="no"),
            "m/config.yaml: allow_non_finite: expected true or false, got str 'no'",
        ),
        (_valid(instance_count=0), "m/config.yaml: instance_count: expected an integer >= 1, got 0"),
    ],
)
def test_errors_name_the_file_and_the_field(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_model_config("m", data)
    assert str(err.value).startswith(message), str(err.value)
    assert isinstance(err.value, BastionError) and err.value.http_status == 400


def test_file_errors(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match=r"^m/config\.yaml: missing"):
        load_model_config(tmp_path / "m")
    (tmp_path / "m" / "config.yaml").write_text("runtime: onnx\ninputs: [{name: x\n")
    with pytest.raises(ConfigError, match=r"^m/config\.yaml: not valid YAML \(line \d+, column \d+\)"):
        load_model_config(tmp_path / "m")
