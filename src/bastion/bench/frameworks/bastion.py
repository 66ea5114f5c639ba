"""Bastion itself, as the benchmark runs it: the scenario repository, one model loaded.

The server starts through :data:`PRELUDE`, which prints the file ``bastion`` was imported
from before it runs the CLI, so every server log says which Bastion served. That is the
proof a before/after comparison needs (``bench/abcompare.py``): a baseline build runs from
an exported source tree put first on ``PYTHONPATH`` (ahead of the editable install's
``.pth`` entry, which site-packages adds after it), with this same interpreter and venv.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bastion.bench.frameworks.base import Framework, Launch, ModelSpec
from bastion.bench.frameworks.v2json import decode_v2, encode_v2

SERVED_FROM = "bench: bastion imported from "
# ``python -m bastion.cli.main`` with one line first; run_module with alter_sys keeps
# ``__main__``'s spec, which the spawned --workers processes re-import by name.
PRELUDE = (
    "import runpy, sys, bastion; "
    f"print({SERVED_FROM!r} + bastion.__file__, file=sys.stderr, flush=True); "
    "runpy.run_module('bastion.cli.main', run_name='__main__', alter_sys=True)"
)


class BastionFramework(Framework):
    """``bastion serve REPO --model NAME`` with the model's config as the scenario wrote it
    (dynamic batching included), REST only, no authentication: the peers have none, so
    this compares the serving paths like for like (the guard's own cost is measured in
    BENCHMARKS.md's security section).

    ``src``: serve the package from this source tree instead of the installed one (a
    baseline build); ``extra_args`` go after the standard flags (``--no-audit``, ...);
    ``auth`` replaces ``--insecure-no-auth`` (``("--keys", DB)``: the guard's benchmark).
    """

    name = "bastion"
    package = "bastion-serve"

    def __init__(
        self, src: Path | None = None, extra_args: Sequence[str] = (), auth: Sequence[str] = ("--insecure-no-auth",)
    ) -> None:
        self.src = src.resolve() if src is not None else None
        self.extra_args = tuple(extra_args)
        self.auth = tuple(auth)

    def requirements(self) -> list[str]:
        return []  # Bastion's own venv: the interpreter running the suite

    def prepare(self, model: ModelSpec, workdir: Path, python: Path, port: int, workers: int) -> Launch:
        repo = model.onnx_path.parent.parent.parent
        argv = [
            str(python),
            "-c",
            PRELUDE,
            "serve",
            str(repo),
            "--model",
            model.name,
            "--host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--grpc-port",
            "-1",
            "--workers",
            str(workers),
            *self.auth,
            "--log-level",
            "warning",
            *self.extra_args,
        ]
        env = {"PYTHONPATH": str(self.src)} if self.src is not None else {}
        origin = f", from {self.src}" if self.src is not None else ""
        return Launch.v2(
            argv,
            port,
            model.name,
            workdir,
            env=env,
            # several workers: each ready poll lands on any of them, so ask for a longer streak
            ready_streak=max(5, 10 * workers),
            notes=f"--workers {workers}, "
            + ("no auth (like the peers)" if self.auth == ("--insecure-no-auth",) else " ".join(self.auth))
            + ", model config as built by the scenario"
            + "".join(f" {a}" for a in self.extra_args)
            + origin,
        )

    def encode(self, model: ModelSpec, rows: np.ndarray) -> bytes:
        return encode_v2(model, rows)

    def decode(self, model: ModelSpec, body: bytes) -> np.ndarray:
        return decode_v2(model, body)


def bastion_python() -> Path:
    return Path(sys.executable)


def served_from(log_text: str) -> Path | None:
    """The ``bastion/__init__.py`` a server started by :class:`BastionFramework` imported
    (from its log), or None when the line is missing."""
    match = re.search(rf"^{re.escape(SERVED_FROM)}(.+)$", log_text, re.MULTILINE)
    return Path(match.group(1).strip()) if match else None
