"""The `bastion` command as a person and a script use it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.polling import wait_until
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow


def bastion(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bastion.cli.main", *args], capture_output=True, text=True,
                          check=check, timeout=120)


def test_models_list_json_and_table(demo_server: ServerProcess) -> None:
    rows = json.loads(bastion("models", "list", "--url", demo_server.url, "--json").stdout)
    states = {r["name"]: r["state"] for r in rows}
    assert states["simple"] == "READY" and states["digits"] == "READY"
    table = bastion("models", "list", "--url", demo_server.url).stdout
    assert "digits" in table and "READY" in table


def test_infer_npy_and_json(demo_server: ServerProcess, demo_repo: Path, tmp_path: Path) -> None:
    sample = demo_repo / "digits" / "sample.npy"
    doc = json.loads(bastion("infer", "digits", "--url", demo_server.url, "--input", str(sample), "--json").stdout)
    outs = {o["name"]: o for o in doc["outputs"]}
    x = np.load(sample)
    assert outs["label"]["shape"] == [x.shape[0]]
    assert outs["probabilities"]["datatype"] == "FP32"
    a = tmp_path / "a.json"
    a.write_text(json.dumps([list(range(16))]))
    b = tmp_path / "b.npy"
    np.save(b, np.ones((1, 16), np.int64))  # converted to the model's INT32
    doc = json.loads(bastion("infer", "simple", "--url", demo_server.url, "--input", f"INPUT0={a}",
                             "--input", f"INPUT1={b}", "--json", "--no-binary").stdout)
    outs = {o["name"]: o for o in doc["outputs"]}
    assert outs["OUTPUT0"]["data"] == [i + 1 for i in range(16)]
    human = bastion("infer", "simple", "--url", demo_server.url, "--input", f"INPUT0={a}", "--input",
                    f"INPUT1={b}").stdout
    assert "OUTPUT1" in human and "INT32" in human


def test_infer_errors_are_readable(demo_server: ServerProcess, tmp_path: Path) -> None:
    bad = tmp_path / "x.npy"
    np.save(bad, np.ones((1, 3), np.float32))
    out = bastion("infer", "digits", "--url", demo_server.url, "--input", str(bad), check=False)
    assert out.returncode != 0
    assert "HTTP 400" in out.stderr and "shape" in out.stderr
    out = bastion("infer", "nope", "--url", demo_server.url, "--input", str(bad), check=False)
    assert out.returncode != 0 and "404" in out.stderr


def test_load_unload_commands(onnx_demo_repo: Path) -> None:
    with ServerProcess(onnx_demo_repo, "--poll-interval", "0", "--grpc-port", "-1") as server:
        assert "unloaded digits" in bastion("models", "unload", "digits", "--url", server.url).stdout
        rows = json.loads(bastion("models", "list", "--url", server.url, "--json").stdout)
        assert {r["name"]: r["state"] for r in rows}["digits"] == "UNAVAILABLE"
        assert "loaded digits" in bastion("models", "load", "digits", "--url", server.url).stdout
        out = bastion("models", "load", "nope", "--url", server.url, check=False)
        assert out.returncode != 0 and "404" in out.stderr


def test_demo_build_only(demo_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--build-only`` builds, reports and exits without serving. The command runs in
    process with the build replaced by a copy of the session's demo repository: the real
    build through ``bastion demo`` is checked by the serving test below, and building
    twice costs seconds."""
    from click.testing import CliRunner

    import bastion.scenarios.demo as demo_module
    from bastion.cli import main as cli_main

    built: list[tuple[Path, int]] = []

    def build(out: Path, *, progress: Callable[[str], None] | None = None, seed: int = 0) -> list[str]:
        built.append((Path(out), seed))
        shutil.copytree(demo_repo, out)
        return list(demo_module.DEMO_MODELS)

    def serve(opts: object) -> int:
        raise AssertionError("--build-only went on to serve")

    monkeypatch.setattr(demo_module, "build_demo_repository", build)
    monkeypatch.setattr(cli_main, "_serve_with_progress", serve)
    result = CliRunner().invoke(cli_main.cli, ["demo", "--build-only", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert built == [(tmp_path / "r", 0)]
    assert "simple" in result.stderr and "digits" in result.stderr
    assert (tmp_path / "r" / "simple" / "config.yaml").exists()


def test_serve_config_file_and_unknown_setting(onnx_demo_repo: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("poll_interval_s: 0\nmax_body_bytes: 2048\n")
    with ServerProcess(onnx_demo_repo, "--config", str(cfg), "--grpc-port", "-1") as server:
        import httpx

        r = httpx.post(f"{server.url}/v2/models/simple/infer", content=b"{" + b" " * 4000 + b"}")
        assert r.status_code == 413
    cfg.write_text("http_prot: 9000\n")
    out = bastion("serve", str(onnx_demo_repo), "--config", str(cfg), check=False)
    assert out.returncode != 0 and "http_prot" in out.stderr


def test_serve_refuses_a_taken_port(demo_server: ServerProcess, demo_repo: Path) -> None:
    out = bastion("serve", str(demo_repo), "--http-port", str(demo_server.http_port), "--grpc-port", "-1",
                  "--insecure-no-auth",
                  check=False)
    assert out.returncode != 0
    assert "address" in out.stderr.lower() or "in use" in out.stderr.lower()


def test_demo_serves_with_a_fresh_key_and_its_examples_work(tmp_path: Path) -> None:
    """`bastion demo` turns auth on: it creates a key, prints it with examples, and the
    printed curl command works while the same call without the key is refused."""
    import re
    import shlex
    import signal
    import subprocess
    import sys

    import httpx

    from tests.serverproc import free_port

    port = free_port()
    out = tmp_path / "repo"
    log = tmp_path / "demo.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bastion.cli.main", "demo", "--out", str(out), "--http-port", str(port),
             "--grpc-port", "-1", "--poll-interval", "0", "--log-format", "text"],
            stdout=f, stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 180, 0.05, what="`bastion demo` to build and serve", details=log.read_text)
        text = log.read_text()
        # the command built the repository and said so
        from bastion.scenarios.demo import DEMO_MODELS

        assert f"built {len(DEMO_MODELS)} models in" in text, text
        assert all((out / name / "config.yaml").exists() for name in DEMO_MODELS)
        token = re.search(r"export BASTION_API_KEY=(\S+)", text).group(1)  # type: ignore[union-attr]
        assert httpx.get(f"{url}/v2/models/simple").status_code == 401
        curl = next(line for line in text.splitlines() if line.strip().startswith("curl") and "infer" in line)
        data = text.split(curl, 1)[1].splitlines()[1].strip()
        argv = [*shlex.split(curl.strip().rstrip("\\").replace("$BASTION_API_KEY", token)), *shlex.split(data)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert '"OUTPUT0"' in done.stdout, done.stdout + done.stderr
        assert (out.parent / "repo.keys" / "keys.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
