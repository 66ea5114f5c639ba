"""Bastion's HTTP server running a plain ASGI app (no ``respond`` shortcut): bodies through
``receive``, streamed responses through ``send``, HEAD, and errors in the app."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx

from bastion.transport.http_server import HttpServer


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/boom":
        raise RuntimeError("app bug")
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-kind", b"stream")]})
        await send({"type": "http.response.body", "body": b"part1-", "more_body": True})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": scope["method"].encode() + b":" + body})


def _serve_and(check) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        server = HttpServer(echo_app, max_body_bytes=1024)
        await server.start([sock])
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                await check(client)
        finally:
            await server.shutdown(5)

    asyncio.run(main())


def test_plain_asgi_app_request_and_streamed_response() -> None:
    async def check(client: httpx.AsyncClient) -> None:
        r = await client.post("/echo", content=b"hello")
        assert r.status_code == 201 and r.text == "POST:hello"
        assert r.headers["content-length"] == "10"
        r = await client.post("/stream", content=b"tail")
        assert r.status_code == 200 and r.text == "part1-tail"
        assert r.headers["transfer-encoding"] == "chunked" and r.headers["x-kind"] == "stream"
        r = await client.head("/echo")
        assert r.status_code == 201 and r.content == b""

    _serve_and(check)


def test_app_exception_is_a_500_and_the_server_survives() -> None:
    async def check(client: httpx.AsyncClient) -> None:
        r = await client.post("/boom", content=b"x")
        assert r.status_code == 500 and "error" in r.json()
        r = await client.post("/echo", content=b"y" * 2000)
        assert r.status_code == 413
        r = await client.post("/echo", content=b"ok")
        assert r.text == "POST:ok"

    _serve_and(check)
