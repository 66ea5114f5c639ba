"""Bastion's HTTP/1.1 layer at the byte level: keep-alive, pipelining, chunked bodies,
100-continue, limits and malformed requests. Also a smoke run of the uvicorn option."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import orjson
import pytest

from tests.serverproc import ServerProcess

pytestmark = pytest.mark.slow

BODY = orjson.dumps({"inputs": [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
]})


def _connect(server: ServerProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    return s


def _read_response(f) -> tuple[int, dict[str, str], bytes]:  # type: ignore[no-untyped-def]
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers.get("content-length", "0")))
    return status, headers, body


def _infer_request(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return (b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_keep_alive_and_pipelining_answer_in_order(demo_server: ServerProcess) -> None:
    with _connect(demo_server) as s, s.makefile("rb") as f:
        s.sendall(_infer_request())
        assert _read_response(f)[0] == 200
        # three requests in one write: answered in order on the same connection
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + _infer_request()
                  + b"GET /v2/models/nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(f)[0] == 200
        status, headers, body = _read_response(f)
        assert status == 200 and orjson.loads(body)["model_name"] == "simple"
        assert headers["content-type"] == "application/json"
        assert _read_response(f)[0] == 404


def test_chunked_request_body(demo_server: ServerProcess) -> None:
    half = len(BODY) // 2
    chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, BODY[:half], len(BODY) - half, BODY[half:])
    with _connect(demo_server) as s, s.makefile("rb") as f:
        s.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        status, _, body = _read_response(f)
        assert status == 200
        assert orjson.loads(body)["outputs"][0]["data"][0] == 1


def test_expect_100_continue(demo_server: ServerProcess) -> None:
    with _connect(demo_server) as s, s.makefile("rb") as f:
        head = _infer_request(extra=b"Expect: 100-continue\r\n")
        split = head.index(b"\r\n\r\n") + 4
        s.sendall(head[:split])
        assert f.readline().startswith(b"HTTP/1.1 100")
        assert f.readline() == b"\r\n"
        s.sendall(head[split:])
        assert _read_response(f)[0] == 200


def test_connection_close_is_honoured(demo_server: ServerProcess) -> None:
    with _connect(demo_server) as s, s.makefile("rb") as f:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, _ = _read_response(f)
        assert status == 200 and headers["connection"] == "close"
        assert f.read() == b""  # the server closed the connection


def test_malformed_http_gets_400_and_server_keeps_serving(demo_server: ServerProcess) -> None:
    for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                    b"POST /v2/models/simple/infer HTTP/1.1\r\nContent-Length: abc\r\n\r\n"):
        with _connect(demo_server) as s, s.makefile("rb") as f:
            s.sendall(garbage)
            status, _, body = _read_response(f)
            assert status == 400, garbage
            assert b"error" in body
    assert httpx.post(f"{demo_server.url}/v2/models/simple/infer", content=BODY).status_code == 200


def test_body_limit_refused_before_reading_it(small_body_server: ServerProcess) -> None:
    server = small_body_server  # --max-body-bytes 1000
    with _connect(server) as s, s.makefile("rb") as f:
        # the client announces a huge body and sends none of it: the answer comes anyway
        s.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        status, headers, body = _read_response(f)
        assert status == 413 and b"1000" in body and headers["connection"] == "close"
    with _connect(server) as s, s.makefile("rb") as f:
        s.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"800\r\n" + b" " * 0x800 + b"\r\n")
        assert _read_response(f)[0] == 413
    assert httpx.post(f"{server.url}/v2/models/simple/infer", content=BODY).status_code == 200


def test_uvicorn_option_serves_the_same_api(onnx_demo_repo: Path) -> None:
    with ServerProcess(onnx_demo_repo, "--poll-interval", "0", "--http-impl", "uvicorn", "--grpc-port", "-1") as server:
        r = httpx.post(f"{server.url}/v2/models/simple/infer", content=BODY)
        assert r.status_code == 200 and r.json()["outputs"][1]["data"][0] == -1
        assert httpx.get(f"{server.url}/v2/models/nope").status_code == 404
        assert server.stop() == 0


def test_query_strings_and_percent_encoded_paths(demo_server: ServerProcess) -> None:
    with _connect(demo_server) as s, s.makefile("rb") as f:
        s.sendall(b"GET /v2/models/simple?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /v2/models/sim%70le HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET http://x/v2/models/simple HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(3):
            status, _, body = _read_response(f)
            assert status == 200 and orjson.loads(body)["name"] == "simple"
