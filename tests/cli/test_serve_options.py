"""`bastion serve`'s flags and YAML keys come from one declaration: ServeOptions."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from bastion.cli import main as cli_main
from bastion.cli.serve_options import ServeOptions, flag_fields, yaml_keys
from bastion.core.limits import RequestLimits

INTERNAL = {"control_dir", "worker_index", "listen_when_ready"}  # set by the supervisor for its workers
# settings without a flag (each one a decision: a flag would change `serve --help`)
YAML_ONLY = {"repository", "executor_threads", "strict_readiness", "drain_timeout_s", "audit_fsync_interval_s",
             "extraction_monitor", "probe_monitor"}


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[ServeOptions]:
    """`bastion serve` without the server: the options it would serve with."""
    seen: list[ServeOptions] = []

    def fake(opts: ServeOptions) -> int:
        seen.append(opts)
        return 0

    monkeypatch.setattr(cli_main, "_serve_with_progress", fake)
    monkeypatch.delenv("BASTION_KEYS", raising=False)
    return seen


def serve(tmp_path: Path, captured: list[ServeOptions], *args: str, env: dict[str, str] | None = None) -> ServeOptions:
    result = CliRunner().invoke(cli_main.cli, ["serve", str(tmp_path), *args], env=env)
    assert result.exit_code == 0, result.output
    return captured.pop()


def serve_params() -> dict[str, click.Option]:
    command = cli_main.cli.commands["serve"]
    return {p.name: p for p in command.params if isinstance(p, click.Option) and p.name not in ("config", "help")}


def sample(name: str, param: click.Option, tmp_path: Path) -> tuple[list[str], Any]:
    """Command-line arguments setting one flag to a value other than its default, and the value."""
    opt = param.opts[0]
    if param.is_flag:
        value = not param.default
        return [opt if value else param.secondary_opts[0]], value
    if isinstance(param.type, click.Choice):
        value = next(c for c in param.type.choices if c != param.default)
    elif isinstance(param.type, click.Path):
        target = tmp_path / f"{name}.path"
        if param.type.file_okay:
            target.write_text("x")  # --tls-cert and friends must exist
        value = str(target)
    elif param.type is click.INT:
        value = (param.default or 0) + 7
    elif param.type is click.FLOAT:
        value = (param.default or 0.0) + 2.5
    else:
        value = f"value-of-{name}"
    if param.multiple:
        second = value + "-2" if isinstance(value, str) and not Path(value).exists() else value
        return [opt, str(value), opt, str(second)], [value, second]
    return [opt, str(value)], value


def test_flags_are_exactly_the_declared_flag_fields() -> None:
    params = serve_params()
    declared = {f.name: spec for f, spec in flag_fields()}
    # the click parameter is named after its field: the flag-to-YAML-key mapping is the identity
    assert set(params) == set(declared)
    for name, spec in declared.items():
        assert params[name].opts[0] == spec.decl.split("/")[0]
    assert not set(params) & INTERNAL


def test_yaml_keys_are_every_field_but_the_internal_ones() -> None:
    names = {f.name for f in dataclasses.fields(ServeOptions)}
    assert yaml_keys() == names - INTERNAL
    assert yaml_keys() - {f.name for f, _ in flag_fields()} == YAML_ONLY


def test_every_flag_sets_its_field_from_the_command_line_and_from_yaml(
    tmp_path: Path, captured: list[ServeOptions]
) -> None:
    defaults = ServeOptions()
    for name, param in serve_params().items():
        args, value = sample(name, param, tmp_path)
        assert value != getattr(defaults, name), name
        assert getattr(serve(tmp_path, captured, *args), name) == value, f"flag {args}"
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({name: value}))
        assert getattr(serve(tmp_path, captured, "--config", str(cfg)), name) == value, f"YAML key {name}"


def test_yaml_only_settings_are_read_from_the_file(tmp_path: Path, captured: list[ServeOptions]) -> None:
    settings = {"executor_threads": 9, "strict_readiness": False, "drain_timeout_s": 1.5,
                "audit_fsync_interval_s": 0.5, "extraction_monitor": {"window": 10},
                "probe_monitor": {"threshold": 3}, "repository": "/elsewhere"}
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    opts = serve(tmp_path, captured, "--config", str(cfg))
    for key, value in settings.items():
        expected = str(tmp_path) if key == "repository" else value  # the REPOSITORY argument wins
        assert getattr(opts, key) == expected, key


def test_defaults_then_file_then_flags(tmp_path: Path, captured: list[ServeOptions]) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"http_port": 9100, "workers": 3, "keys_db": "from-file.db"}))
    opts = serve(tmp_path, captured, "--config", str(cfg), "--workers", "5")
    assert (opts.http_port, opts.workers, opts.grpc_port) == (9100, 5, 8001)
    assert opts.keys_db == "from-file.db"
    # an environment variable counts as given: it wins over the file, a flag over both
    opts = serve(tmp_path, captured, "--config", str(cfg), env={"BASTION_KEYS": "from-env.db"})
    assert opts.keys_db == "from-env.db"
    opts = serve(tmp_path, captured, "--config", str(cfg), "--keys", "flag.db", env={"BASTION_KEYS": "from-env.db"})
    assert opts.keys_db == "flag.db"


def test_special_values(tmp_path: Path, captured: list[ServeOptions]) -> None:
    assert serve(tmp_path, captured, "--grpc-port", "-1").grpc_port is None
    cfg = tmp_path / "serve.yaml"
    for text in ("grpc_port: -1\n", "grpc_port: 'off'\n", "grpc_port: off\n"):  # unquoted off is YAML's False
        cfg.write_text(text)
        assert serve(tmp_path, captured, "--config", str(cfg)).grpc_port is None, text
    opts = serve(tmp_path, captured, "--request-timeout", "0", "--model", "a", "--model", "b")
    assert opts.request_limits().request_timeout_s is None
    assert opts.explicit_models == ["a", "b"]
    assert serve(tmp_path, captured).explicit_models is None  # no --model: every model loads


def test_request_limit_defaults_come_from_core_limits() -> None:
    assert ServeOptions().request_limits() == RequestLimits()


def test_unknown_or_internal_yaml_key_fails_naming_it(tmp_path: Path, captured: list[ServeOptions]) -> None:
    cfg = tmp_path / "serve.yaml"
    for key in ("http_prot", "worker_index"):
        cfg.write_text(f"{key}: 9000\n")
        result = CliRunner().invoke(cli_main.cli, ["serve", str(tmp_path), "--config", str(cfg)])
        assert result.exit_code == 2 and key in result.output, result.output
    assert not captured


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_help_lists_every_flag(command: str) -> None:
    result = CliRunner().invoke(cli_main.cli, [command, "--help"])
    assert result.exit_code == 0
    for _f, spec in flag_fields():
        for opt in spec.decl.split("/"):
            assert opt.strip() in result.output, opt
    assert "--config" in result.output
    assert "[default: 67108864]" in result.output  # RequestLimits' 64 MiB, shown for --max-body-bytes
