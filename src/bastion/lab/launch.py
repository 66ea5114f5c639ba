"""The experimenter's server: ``bastion serve`` on loopback over the sweep's work copy.

Started, waited for and stopped by the benchmark's launcher (:mod:`bastion.bench.launcher`:
its own process group, a readiness streak, stop kills the whole group), so the lab and the
benchmark share one way to run a server they measure. The launcher is a client-side
tool: it starts a command and polls a URL, it imports nothing of the server.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from bastion.bench.frameworks.base import Launch
from bastion.bench.launcher import free_port
from bastion.bench.launcher import serve as run_server

__all__ = ["serve", "serve_launch"]


def serve_launch(repo: Path, zoo: str, keys_db: Path, port: int, *, extra_args: Sequence[str] = (),
                 ready_timeout_s: float = 120.0) -> Launch:
    """``bastion serve repo`` with the key store on ``127.0.0.1:port``, REST only, no
    polling of the repository (the sweep rewrites files only between servers)."""
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "bastion.cli.main", "serve", str(repo), "--host", "127.0.0.1",
            "--http-port", str(port), "--grpc-port", "-1", "--keys", str(keys_db), "--poll-interval", "0",
            "--log-format", "text", *extra_args]
    # the launcher starts from a clean copy of the environment without PYTHONPATH (a peer's
    # venv must not see ours); this server is our own interpreter, so a source checkout
    # run through PYTHONPATH keeps it
    env = {"PYTHONUNBUFFERED": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    # cwd: where the caller runs, since the repository and key store paths may be relative
    return Launch(argv=argv, port=port, ready_url=f"{url}/v2/health/ready", infer_url=f"{url}/v2/models/{zoo}/infer",
                  cwd=Path.cwd(), env=env, ready_timeout_s=ready_timeout_s)


@contextlib.contextmanager
def serve(repo: Path, zoo: str, keys_db: Path, *, log: Path, ready_timeout_s: float = 120.0,
          extra_args: Sequence[str] = ()) -> Iterator[str]:
    """Serve ``repo`` until the block ends (errors and Ctrl-C included); yields the URL.
    Raises RuntimeError if the server exits before it is ready, TimeoutError if it is not
    ready in ``ready_timeout_s`` (both with the log's tail)."""
    launch = serve_launch(repo, zoo, keys_db, free_port(), extra_args=extra_args, ready_timeout_s=ready_timeout_s)
    with run_server(launch, log):
        yield f"http://127.0.0.1:{launch.port}"
