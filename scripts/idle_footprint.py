#!/usr/bin/env python
"""Time to ready and idle memory of ``bastion serve`` on a model repository.

For each of ``--runs`` starts: pick free loopback ports, start

    python -m bastion.cli.main serve REPO --host 127.0.0.1 --http-port P --grpc-port G
        --insecure-no-auth --poll-interval 0

time from just before the process is spawned to the first 200 on /v2/health/ready
(polled every ``--poll-ms``), wait ``--idle`` seconds, then sum VmRSS over the server's
process tree (from /proc), and stop it with SIGTERM. Prints one JSON object: the command,
every sample and the medians.

``--importtime`` adds one more start under ``python -X importtime`` and reports the
biggest top-level imports (cumulative), plus whether torch, scikit-learn, scipy,
matplotlib, rich, skops and onnxruntime were imported at all.

``--build-demo`` builds the demo repository first (``bastion.scenarios.demo``) into REPO.

    .venv/bin/python scripts/idle_footprint.py /tmp/demo --build-demo --runs 7 --importtime

Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEMORY = ("idle_rss_mib", "rss_anon_mib", "rss_file_mib")
WATCHED = ("torch", "sklearn", "scipy", "matplotlib", "rich", "skops", "onnxruntime", "pandas", "onnx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(python: str, repo: Path, http_port: int, grpc_port: int, extra: list[str]) -> list[str]:
    return [
        python,
        "-m",
        "bastion.cli.main",
        "serve",
        str(repo),
        "--host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--insecure-no-auth",
        "--poll-interval",
        "0",
        *extra,
    ]


def ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def tree_memory_kib(root: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile summed over ``root`` and all its descendants (KiB)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    totals = dict.fromkeys(("VmRSS", "RssAnon", "RssFile"), 0)
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in totals:
                        totals[key] += int(line.split()[1])
        except OSError:
            pass
    return totals


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one_start(args: argparse.Namespace, *, importtime: Path | None = None) -> dict[str, float]:
    """One start: seconds to the first ready 200, then the process tree's memory after ``--idle``."""
    http_port, grpc_port = free_port(), free_port()
    python = [args.python, "-X", "importtime"] if importtime else [args.python]
    cmd = python + serve_command("", args.repo, http_port, grpc_port, args.serve_args)[1:]
    stderr = open(importtime, "wb") if importtime else open(os.devnull, "wb")  # noqa: SIM115
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = start + args.timeout
        while not ready(http_port):
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode} before ready: {' '.join(cmd)}")
            if time.perf_counter() > deadline:
                raise SystemExit(f"not ready after {args.timeout}s: {' '.join(cmd)}")
            time.sleep(args.poll_ms / 1000)
        ready_s = time.perf_counter() - start
        time.sleep(args.idle)
        memory = tree_memory_kib(proc.pid)
    finally:
        stop(proc)
        stderr.close()
    return {
        "ready_s": round(ready_s, 3),
        "idle_rss_mib": round(memory["VmRSS"] / 1024, 1),
        # RssFile is mostly shared-library text: shared with other processes mapping it
        "rss_anon_mib": round(memory["RssAnon"] / 1024, 1),
        "rss_file_mib": round(memory["RssFile"] / 1024, 1),
    }


def importtime_report(path: Path, top: int) -> dict[str, object]:
    """Top-level imports by cumulative time, and which watched packages were imported."""
    rows: list[tuple[int, int, str]] = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("import time:") or "|" not in line or "imported package" in line:
            continue
        _self_us, cumulative, raw_name = line[len("import time:") :].split("|")
        depth = (len(raw_name) - len(raw_name.lstrip(" ")) - 1) // 2
        rows.append((depth, int(cumulative), raw_name.strip()))
    modules = {name for _, _, name in rows}
    top_level = sorted((r for r in rows if r[0] == 0), key=lambda r: -r[1])[:top]
    return {
        "total_import_s": round(sum(r[1] for r in rows if r[0] == 0) / 1e6, 3),
        "modules_imported": len(modules),
        "top_level_imports_ms": {name: round(us / 1000, 1) for _, us, name in top_level},
        # by prefix: a line can be garbled when a thread logs while another imports
        "watched_imported": {pkg: any(m == pkg or m.startswith(pkg + ".") for m in modules) for pkg in WATCHED},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", type=Path, help="model repository to serve")
    parser.add_argument("--build-demo", action="store_true", help="build the demo repository into REPO first")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle after ready before reading RSS")
    parser.add_argument("--poll-ms", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--importtime", action="store_true", help="one extra start under -X importtime")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--importtime-log", type=Path, help="keep the raw -X importtime output here")
    parser.add_argument("serve_args", nargs="*", help="extra `bastion serve` arguments (after --)")
    args = parser.parse_args()

    if args.build_demo:
        from bastion.scenarios.demo import build_demo_repository

        build_demo_repository(args.repo, seed=0)

    samples = [one_start(args) for _ in range(args.runs)]
    result: dict[str, object] = {
        "command": " ".join(serve_command(args.python, args.repo, 0, 0, args.serve_args)).replace(
            "--http-port 0 --grpc-port 0", "--http-port FREE --grpc-port FREE"
        ),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "load_average": os.getloadavg(),
        "runs": args.runs,
        "idle_s": args.idle,
        "ready_s_median": statistics.median(s["ready_s"] for s in samples) if samples else None,
        **{f"{key}_median": statistics.median(s[key] for s in samples) if samples else None for key in MEMORY},
        "samples": samples,
    }
    if args.importtime:
        with tempfile.TemporaryDirectory() as tmp:
            log = args.importtime_log or Path(tmp) / "importtime.txt"
            result["importtime_start"] = one_start(args, importtime=log)
            result["importtime"] = importtime_report(log, args.top)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
