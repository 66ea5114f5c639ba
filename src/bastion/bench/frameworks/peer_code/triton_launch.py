"""Start the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel ships, as PyTriton does.

Run by the triton venv's interpreter: ``python triton_launch.py <backends dir> <tritonserver args...>``.
It does what ``pytriton.server.triton_server`` does before it runs the same binary:

* copies the python backend (``libtriton_python.so``, ``triton_python_backend_utils.py``)
  and the python-backend stub built for this interpreter's Python version into
  ``<backends dir>/python`` (the wheel keeps one stub per Python version apart);
* puts the wheel's bundled libraries (``nvidia_pytriton.libs``) and this interpreter's
  ``libpython`` on ``LD_LIBRARY_PATH``, and the venv's ``bin`` first on ``PATH`` so the
  stub's embedded Python finds the venv (numpy, onnxruntime);

then replaces itself with ``tritonserver --backend-directory=<backends dir> <args...>``
(``exec``: same process id, so the suite's process-group stop reaches the server and its
stub processes). Never imported by Bastion.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path


def main() -> None:
    backends = Path(sys.argv[1]).resolve()
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nvidia-pytriton is not installed in this interpreter's environment")
    package = Path(next(iter(spec.submodule_search_locations)))
    dist = package / "tritonserver"
    libs = package.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"nvidia-pytriton has no python-backend stub for Python {version}")

    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for item in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist / "backends" / "python" / item, python_backend / item)
    shutil.copy2(stub, python_backend / "triton_python_backend_stub")

    env = dict(os.environ)
    lib_dirs = [str(libs)]
    libpython_dir = sysconfig.get_config_var("LIBDIR")
    if libpython_dir and (Path(libpython_dir) / f"libpython{version}.so.1.0").exists():
        lib_dirs.append(libpython_dir)
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(lib_dirs)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"

    server = dist / "bin" / "tritonserver"
    argv = [str(server), f"--backend-directory={backends}", *sys.argv[2:]]
    sys.stdout.flush()
    os.execve(server, argv, env)


if __name__ == "__main__":
    main()
