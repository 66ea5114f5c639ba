"""Stop the Ray Serve benchmark server started by ``rayserve_app.py`` (and only that one).

Ray's worker processes (the Serve controller, the HTTP proxy, the replicas) are started
by the raylet in sessions of their own, so signalling the launcher's process group does
not reach them. This script (standard library only) first sends SIGTERM to the driver
(``rayserve_app.py``, whose pid is in the pid file) and waits for it to end, then SIGKILLs
whatever is left of *this* cluster: every process whose environment carries
``BENCH_RAY_TAG`` with this run's value (set by the adapter on the launcher; the GCS, the
raylet and Ray's workers inherit it). No other Ray cluster on the machine is touched.

Usage: ``BENCH_RAY_TAG=... python rayserve_stop.py [pid-file]``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

GRACE_S = 10.0
KILL_WAIT_S = 10.0


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for its parent to reap it, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def tagged(tag: str) -> list[int]:
    """Live processes (but this one) whose environment has ``BENCH_RAY_TAG=tag``."""
    needle = f"BENCH_RAY_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def main() -> None:
    tag = os.environ.get("BENCH_RAY_TAG", "")
    if not tag:
        sys.exit("BENCH_RAY_TAG is not set; refusing to guess which Ray processes to stop")
    pid_file = Path(sys.argv[1] if len(sys.argv) > 1 else "rayserve_driver.pid")
    try:
        driver = int(pid_file.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        driver = 0
    if driver and driver in tagged(tag):
        os.kill(driver, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while alive(driver) and time.monotonic() < deadline:
            time.sleep(0.1)
    deadline = time.monotonic() + KILL_WAIT_S
    while (left := tagged(tag)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    if left:
        sys.exit(f"still running after SIGKILL: {left}")


if __name__ == "__main__":
    main()
