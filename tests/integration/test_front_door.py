"""The HTTP front door: callers are admitted on their headers, before their body is read;
every early answer reaches the client; only answers worth it are compressed.

One guarded server (a key store, the default 64 MiB body limit) serves the module.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests

from bastion.guard.keystore import KeyStore
from tests.serverproc import ServerProcess

MB = 1_000_000
SIMPLE_ROW = {
    "inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    ]
}
INFER = "/v2/models/simple/infer"


class Guarded:
    def __init__(self, server: ServerProcess, user: str, admin: str) -> None:
        self.server, self.user, self.admin = server, user, admin
        self.port = server.http_port

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.server.url}/metrics", headers={"authorization": f"Bearer {self.admin}"}).text
        m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.server.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def guarded(onnx_demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    db = tmp_path_factory.mktemp("front-door") / "keys.db"
    store = KeyStore(db)
    user, _ = store.create_key("alice", models=["simple", "digits"])
    admin, _ = store.create_key("ops", role="admin")
    store.close()
    server = ServerProcess(onnx_demo_repo, "--keys", str(db), "--poll-interval", "0", "--grpc-port", "-1",
                           "--no-audit")
    yield Guarded(server, user, admin)
    assert server.stop() == 0, server.logs()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 MB of a JSON-looking body: over the 64 MiB limit."""
    path = tmp_path_factory.mktemp("bodies") / "80mb.json"
    with path.open("wb") as f:
        f.write(b'{"inputs":[{"name":"INPUT0","datatype":"INT32","shape":[1,16],"data":[')
        f.write(b"0," * (40 * MB - 50))
        f.write(b"0]}]}")
    return path


def _head(port: int, length: int, *, key: str | None = None, expect: bool = False) -> bytes:
    lines = [f"POST {INFER} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             f"Content-Length: {length}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if expect:
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_head(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """The status line and headers of the next response on ``sock``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_an_anonymous_upload_is_answered_on_its_headers(guarded: Guarded) -> None:
    # the headers announce 60 MB; not a byte of the body is sent, and the answer comes anyway
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(_head(guarded.port, 60 * MB))
        head = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 401 "), head
        assert b"connection: close" in head.lower()
        assert b"www-authenticate: bearer" in head.lower()


def test_100_continue_is_sent_only_after_admission(guarded: Guarded) -> None:
    body = json.dumps(SIMPLE_ROW).encode()
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(_head(guarded.port, len(body), expect=True))
        assert _read_head(sock).startswith(b"HTTP/1.1 401 ")  # not "100 Continue"
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(_head(guarded.port, len(body), key=guarded.user, expect=True))
        assert _read_head(sock).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        head = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 200 "), head


def test_curl_uploads_almost_nothing_of_a_refused_body(guarded: Guarded, tmp_path: Path) -> None:
    path = tmp_path / "60mb.bin"
    with path.open("wb") as f:
        f.truncate(60 * MB)
    discarded_before = guarded.metric("bastion_http_discarded_body_bytes_total")
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}", "--data-binary", f"@{path}",
         "-H", "content-type: application/json", f"{guarded.server.url}{INFER}"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    status, uploaded = out.stdout.split()
    assert status == "401"
    assert float(uploaded) < 1 << 20, out.stdout
    assert guarded.metric("bastion_http_discarded_body_bytes_total") - discarded_before < 1 << 20
    assert guarded.metric("bastion_http_early_responses_total", '{status="401"}') >= 1


def test_32_anonymous_60mb_uploads_do_not_grow_the_server(guarded: Guarded) -> None:
    """Clients that write their whole body before reading (as urllib does): each reads its
    401 (lingering close), and the server holds none of the 1.9 GB."""
    chunk = bytes(1 << 20)
    start = threading.Barrier(33)

    def upload() -> bytes:
        with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
            start.wait()
            sock.sendall(_head(guarded.port, 60 * MB))
            for _ in range(60):
                sock.sendall(chunk)
            return _read_head(sock, timeout=30)

    httpx.get(f"{guarded.server.url}/v2/health/ready")
    baseline = guarded.rss_bytes()
    peak = baseline
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(upload) for _ in range(32)]
        start.wait()
        while not all(f.done() for f in futures):
            peak = max(peak, guarded.rss_bytes())
            time.sleep(0.01)
        heads = [f.result() for f in futures]
    assert all(h.startswith(b"HTTP/1.1 401 ") for h in heads), heads
    assert peak - baseline < 50 * 1024 * 1024, f"RSS grew by {(peak - baseline) / 2**20:.1f} MiB"
    # and the server still serves
    r = httpx.post(f"{guarded.server.url}{INFER}", json=SIMPLE_ROW, headers={"authorization": f"Bearer {guarded.user}"})
    assert r.status_code == 200


def _urllib_status(url: str, data: bytes, key: str) -> int:
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


@pytest.mark.parametrize("client", ["urllib", "requests", "httpx", "curl"])
def test_every_client_reads_the_413(guarded: Guarded, big_file: Path, client: str) -> None:
    url = f"{guarded.server.url}{INFER}"
    auth = {"authorization": f"Bearer {guarded.user}", "content-type": "application/json"}
    if client == "curl":
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary",
                              f"@{big_file}", *(x for k, v in auth.items() for x in ("-H", f"{k}: {v}")), url],
                             capture_output=True, text=True, timeout=60, check=True)
        status = int(out.stdout)
    else:
        data = big_file.read_bytes()
        if client == "urllib":
            status = _urllib_status(url, data, guarded.user)
        elif client == "requests":
            status = requests.post(url, data=data, headers=auth, timeout=60).status_code
        else:
            status = httpx.post(url, content=data, headers=auth, timeout=60).status_code
    assert status == 413


def test_a_small_refused_request_keeps_its_connection(guarded: Guarded) -> None:
    """A refusal whose whole (small) body had arrived is an ordinary answer: the connection
    stays open for the retry with a key."""
    with httpx.Client(base_url=guarded.server.url) as client:
        r = client.post(INFER, json=SIMPLE_ROW)
        assert r.status_code == 401 and r.headers.get("connection") != "close"
        r = client.post(INFER, json=SIMPLE_ROW, headers={"authorization": f"Bearer {guarded.user}"})
        assert r.status_code == 200


def test_a_refusal_waits_for_the_answers_ahead_of_it(guarded: Guarded) -> None:
    """Pipelined: a good request, then an anonymous 60 MB one whose body never comes. The
    first answer comes first, then the 401 and the close."""
    body = json.dumps(SIMPLE_ROW).encode()
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(_head(guarded.port, len(body), key=guarded.user) + body + _head(guarded.port, 60 * MB))
        sock.settimeout(10)
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    first, second = data.index(b"HTTP/1.1 200 "), data.index(b"HTTP/1.1 401 ")
    assert first < second


def test_only_answers_worth_it_are_compressed(guarded: Guarded) -> None:
    auth = {"authorization": f"Bearer {guarded.user}", "accept-encoding": "gzip"}
    with httpx.Client(base_url=guarded.server.url, headers=auth) as client:
        small = client.post(INFER, json=SIMPLE_ROW)
        assert small.status_code == 200 and "content-encoding" not in small.headers
        rows = {"inputs": [{**t, "shape": [64, 16], "data": t["data"] * 64} for t in SIMPLE_ROW["inputs"]]}
        big = client.post(INFER, json=rows)
        assert big.status_code == 200 and big.headers["content-encoding"] == "gzip"
        assert int(big.headers["content-length"]) < len(big.content)
        assert big.json()["outputs"][0]["shape"] == [64, 16]
    # gzip request bodies stay accepted
    r = httpx.post(f"{guarded.server.url}{INFER}", content=gzip.compress(json.dumps(SIMPLE_ROW).encode()),
                   headers={**auth, "content-encoding": "gzip", "content-type": "application/json"})
    assert r.status_code == 200
