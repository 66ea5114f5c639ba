"""Start TorchServe in the foreground and answer whether its model's workers are all READY.

TorchServe 0.12's ``GET /ping`` answers 200 "Healthy" as soon as the frontend is up: a
worker still starting (or failing to import its handler) counts as healthy until its
retry timeout expires. The benchmark must not send load before the model is loaded in
every worker, so this launcher (standard library only, under TorchServe's venv) runs the
``torchserve`` command line it is given as a child (same process group) and serves
``GET /ready`` on its own loopback port: 200 once TorchServe's management API
(``GET /models/<name>``) lists at least ``--workers`` workers, all ``READY``; 503 before.
It never touches inference traffic, which goes straight to TorchServe.

Usage: ``python torchserve_launch.py --ready-port P --management-port M --model NAME
--workers N -- torchserve --start --foreground ...``; exits with TorchServe's status.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def workers_ready(management_port: int, model: str, workers: int) -> tuple[bool, str]:
    url = f"http://127.0.0.1:{management_port}/models/{model}"
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            described = json.loads(response.read())
    except (OSError, ValueError) as exc:
        return False, f"management API: {exc}"
    statuses = [w.get("status") for version in described for w in version.get("workers", [])]
    ok = len(statuses) >= workers and all(s == "READY" for s in statuses)
    return ok, f"workers: {statuses}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-port", type=int, required=True)
    parser.add_argument("--management-port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok, detail = workers_ready(args.management_port, args.model, args.workers)
            body = json.dumps({"ready": ok, "detail": detail}).encode()
            self.send_response(200 if ok and self.path == "/ready" else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *log_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.ready_port), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    child = subprocess.Popen(command)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    server.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
