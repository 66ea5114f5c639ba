"""One virtual environment per framework, installed from pinned requirements.

Each framework runs under its own interpreter so that its dependency pins (an older
uvloop, its own pydantic, a torch build) never meet Bastion's or another peer's. A venv
is (re)built only when its pin list changed: the list is stored in the venv as
``bench-requirements.txt`` and compared on every call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

INSTALL_TIMEOUT_S = 1800
_STAMP = "bench-requirements.txt"


def venv_python(root: Path, name: str) -> Path:
    return root / name / "bin" / "python"


def ensure_venv(
    root: Path,
    name: str,
    requirements: Sequence[str],
    *,
    say: Callable[[str], None] = print,
    base_python: str = sys.executable,
) -> Path:
    """The interpreter of ``root/name`` with ``requirements`` installed; installs if needed.

    A ``torch==`` pin goes first and alone: installed after other packages, a package that
    depends on torch would already have pulled a multi-GB CUDA build from PyPI.
    """
    target = root / name
    python = venv_python(root, name)
    wanted = "\n".join(requirements) + "\n"
    stamp = target / _STAMP
    if python.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == wanted:
        return python
    if target.exists():
        shutil.rmtree(target)
    say(f"installing {name} into {target} ({len(requirements)} pins) ...")
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([base_python, "-m", "venv", str(target)], check=True, timeout=300)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    torch = [r for r in requirements if r.replace(" ", "").startswith("torch==")]
    rest = [r for r in requirements if r not in torch]
    for group in (torch, rest):
        if group:
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", *group],
                check=True,
                timeout=INSTALL_TIMEOUT_S,
                env=env,
            )
    stamp.write_text(wanted, encoding="utf-8")
    return python


def python_for(name: str, requirements: Sequence[str], cache: Path, *, say: Callable[[str], None] = print) -> Path:
    """The interpreter a framework runs under: Bastion's own when it pins nothing, else its
    venv ``cache/venvs/<name>`` (installed on first use)."""
    if not requirements:
        return Path(sys.executable)
    return ensure_venv(cache / "venvs", name, requirements, say=say)


def installed_version(python: Path, distribution: str) -> str:
    """``importlib.metadata.version`` of ``distribution`` inside another interpreter ("?" if absent)."""
    code = (
        "import importlib.metadata as m, sys\n"
        "try: print(m.version(sys.argv[1]))\n"
        "except m.PackageNotFoundError: print('?')\n"
    )
    try:
        out = subprocess.run([str(python), "-c", code, distribution], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"
