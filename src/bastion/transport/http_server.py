"""A lean HTTP/1.1 server for ASGI apps, on httptools and asyncio.

Why not uvicorn: for a model that costs ~8 µs a row, uvicorn's generic request cycle
(per-request keep-alive timers, header validation passes, flow-control bookkeeping)
costs several times the model. This server keeps only what an inference API needs:
keep-alive and pipelining (answered in order), Content-Length and chunked request
bodies, ``Expect: 100-continue``, a body-size limit enforced before buffering, an idle
timeout swept once a second instead of a timer per request, write backpressure, and a
graceful shutdown that lets in-flight requests finish. It speaks ASGI 3 (HTTP only),
so the application is the same one uvicorn would run (``bastion serve --http-impl
uvicorn`` still selects uvicorn).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from ssl import SSLContext
from typing import Any
from urllib.parse import unquote

import httptools

from bastion.core.limits import DEFAULT_LIMITS
from bastion.guard.tls import CLIENT_CERT_FP_SCOPE_KEY, fingerprint_der

log = logging.getLogger("bastion.http")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]

_STATUS_LINES = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_DISCONNECT = {"type": "http.disconnect"}
# pipelined requests held per connection before the server stops reading from it
_MAX_PIPELINED = 16
# a peer that opens a TCP connection and stalls the handshake is dropped after this long
# (the idle sweep only sees connections once the handshake is done)
TLS_HANDSHAKE_TIMEOUT_S = 10.0


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} \r\n".encode()
    return line


def _error_response(status: int, message: str) -> bytes:
    body = b'{"error":"' + message.replace('"', "'").encode() + b'"}'
    return (
        _status_line(status)
        + b"content-type: application/json\r\nconnection: close\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class _Exchange:
    """One request and its response on a connection."""

    __slots__ = (
        "body",
        "chunked",
        "complete",
        "conn",
        "keep_alive",
        "receive_waiter",
        "response_done",
        "response_started",
        "scope",
        "size",
    )

    def __init__(self, conn: _HttpProtocol, scope: dict[str, Any], keep_alive: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False
        self.receive_waiter: asyncio.Future[None] | None = None
        self.response_started: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.response_done = False
        self.chunked = False

    async def receive(self) -> dict[str, Any]:
        if self.response_done or self.conn.closed:
            return _DISCONNECT
        if not self.complete:
            self.receive_waiter = self.conn.loop.create_future()
            await self.receive_waiter
            self.receive_waiter = None
            if not self.complete:
                return _DISCONNECT
        body = self.body
        self.body = []
        return {"type": "http.request", "body": body[0] if len(body) == 1 else b"".join(body), "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        conn = self.conn
        kind = message["type"]
        if kind == "http.response.start":
            if self.response_started is not None:
                raise RuntimeError("http.response.start sent twice")
            self.response_started = (message["status"], message.get("headers", []))
            return
        if kind != "http.response.body":
            return
        if self.response_started is None:
            raise RuntimeError("http.response.body before http.response.start")
        if self.response_done:
            raise RuntimeError("response already complete")
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if conn.closed:
            self.response_done = not more
            return
        out: list[bytes]
        if self.response_started[0] >= 0:
            status, headers = self.response_started
            self.response_started = (-1, headers)  # head written
            has_length = False
            out = [_status_line(status)]
            for name, value in headers:
                if name == b"content-length":
                    has_length = True
                elif name == b"connection":
                    if value.lower() == b"close":
                        self.keep_alive = False
                    continue  # the server decides the connection header below
                out.append(name + b": " + value + b"\r\n")
            if not has_length:
                if more:
                    self.chunked = True
                    out.append(b"transfer-encoding: chunked\r\n")
                else:
                    out.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
            if not self.keep_alive or conn.shutting_down:
                self.keep_alive = False
                out.append(b"connection: close\r\n")
            out.append(b"\r\n")
        else:
            out = []
        if self.scope["method"] != "HEAD":
            if self.chunked:
                if body:
                    out.append(b"%x\r\n" % len(body) + body + b"\r\n")
                if not more:
                    out.append(b"0\r\n\r\n")
            elif body:
                out.append(body)
        conn.transport.write(b"".join(out))
        if not more:
            self.response_done = True
            conn.exchange_finished(self)
        if conn.write_paused:
            await conn.drained()


class _HttpProtocol(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.max_body = server.max_body_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = False
        self.shutting_down = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.current: _Exchange | None = None  # the exchange whose response is being produced
        self.parsing: _Exchange | None = None  # the exchange whose request is being parsed
        self.pending: deque[_Exchange] = deque()  # parsed requests waiting for their turn
        self.last_active = 0.0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._server_addr: tuple[str, int] | None = None
        self._client_addr: tuple[str, int] | None = None

    # ---- connection --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._server_addr = transport.get_extra_info("sockname")[:2]
        peer = transport.get_extra_info("peername")
        self._client_addr = peer[:2] if peer else None
        self.last_active = time.monotonic()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for ex in (self.parsing, self.current):
            if ex is not None and ex.receive_waiter is not None and not ex.receive_waiter.done():
                ex.receive_waiter.set_result(None)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self.pending.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    async def drained(self) -> None:
        if self.write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as err:
            self._fail(400, f"malformed HTTP request: {err}")

    def _fail(self, status: int, message: str) -> None:
        if not self.closed:
            self.transport.write(_error_response(status, message))
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def idle(self) -> bool:
        return self.current is None and self.parsing is None and not self.pending

    # ---- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        raw_url = self._url
        if b"?" in raw_url or b"%" in raw_url or not raw_url.startswith(b"/"):
            url = httptools.parse_url(raw_url)
            raw_path, query = url.path, url.query or b""
        else:  # the common plain path needs no URL parser
            raw_path, query = raw_url, b""
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        method = parser.get_method().decode("ascii")
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": parser.get_http_version(),
            "server": self._server_addr,
            "client": self._client_addr,
            "scheme": "http",
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self._headers,
        }
        ex = _Exchange(self, scope, parser.should_keep_alive())
        self.parsing = ex
        expect_continue = False
        for name, value in self._headers:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length > self.max_body:
                    # refuse before reading (or buffering) a byte of the body
                    self.parsing = None
                    self._fail(413, f"request body of {length} bytes exceeds the limit of {self.max_body} bytes")
                    return
            elif name == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
        if expect_continue and not self.closed:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.size += len(body)
        if ex.size > self.max_body:  # a chunked body without Content-Length grew past the limit
            self.parsing = None
            self._fail(413, f"request body exceeds the limit of {self.max_body} bytes")
            return
        ex.body.append(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None or self.closed:
            return
        self.parsing = None
        ex.complete = True
        if self.current is None:
            self._start(ex)
        else:
            self.pending.append(ex)
            if len(self.pending) >= _MAX_PIPELINED:
                self.transport.pause_reading()

    # ---- request cycle ------------------------------------------------------------------------
    def _start(self, ex: _Exchange) -> None:
        self.current = ex
        if self.server.respond is not None:
            self.loop.create_task(self._run_direct(ex))
        else:
            self.loop.create_task(self._run(ex))

    async def _run_direct(self, ex: _Exchange) -> None:
        """Apps with ``respond(scope, receive) -> (status, headers, body)`` skip the ASGI
        send messages: the response is serialised here in one pass."""
        try:
            chunks = ex.body
            ex.body = []
            whole = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            status, headers, body = await self.server.respond(ex.scope, ex.receive, whole)
        except Exception:
            log.exception("unhandled error in app", extra={"path": ex.scope.get("path")})
            status, headers, body = 500, [(b"content-type", b"application/json")], b'{"error":"internal server error"}'
        if self.closed:
            ex.response_done = True
            return
        out = [_status_line(status)]
        for name, value in headers:
            out.append(name + b": " + value + b"\r\n")
        if not ex.keep_alive or self.shutting_down:
            ex.keep_alive = False
            out.append(b"connection: close\r\n")
        out.append(b"content-length: %d\r\n\r\n" % len(body))
        if ex.scope["method"] != "HEAD":
            out.append(body)
        self.transport.write(b"".join(out))
        ex.response_done = True
        self.exchange_finished(ex)

    async def _run(self, ex: _Exchange) -> None:
        try:
            await self.app(ex.scope, ex.receive, ex.send)
        except Exception:
            log.exception("unhandled error in ASGI app", extra={"path": ex.scope.get("path")})
            if ex.response_started is None and not self.closed:
                self.transport.write(_error_response(500, "internal server error"))
                self.close()
                return
        if not ex.response_done and not self.closed:
            if ex.response_started is None:
                self.transport.write(_error_response(500, "the application sent no response"))
            self.close()

    def exchange_finished(self, ex: _Exchange) -> None:
        if self.current is not ex:
            return
        self.current = None
        self.last_active = time.monotonic()
        if not ex.keep_alive:
            self.close()
            return
        if self.pending:
            nxt = self.pending.popleft()
            if len(self.pending) < _MAX_PIPELINED:
                self.transport.resume_reading()
            self._start(nxt)
        elif self.shutting_down and self.idle():
            self.close()


class _HttpsProtocol(_HttpProtocol):
    """A connection over TLS. A subclass, so that plaintext connections pay nothing for it:
    what TLS adds to each request's scope is worked out once, when the handshake is done."""

    def __init__(self, server: HttpServer) -> None:
        super().__init__(server)
        self._tls_scope: dict[str, Any] = {"scheme": "https"}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio calls this after the handshake, so the peer certificate is known here
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:  # present only if the client sent one and it verified against the client CA
            self._tls_scope[CLIENT_CERT_FP_SCOPE_KEY] = fingerprint_der(der)
        super().connection_made(transport)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        ex = self.parsing
        if ex is not None:  # None when the request was refused (413) before its body
            ex.scope.update(self._tls_scope)


class HttpServer:
    """Serve an ASGI app on already-bound sockets until ``shutdown()``."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int = DEFAULT_LIMITS.max_body_bytes, keep_alive_timeout_s: float = 30.0
    ) -> None:
        self.app = app
        self.respond = getattr(app, "respond", None)
        self.max_body_bytes = max_body_bytes
        self.keep_alive_timeout_s = keep_alive_timeout_s
        self.connections: set[_HttpProtocol] = set()
        self.loop = asyncio.get_running_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, sockets: list[Any], ssl: SSLContext | None = None) -> None:
        """Serve on ``sockets``; with ``ssl``, TLS only (``guard.tls.server_ssl_context``).

        Over TLS each request's scope has ``scheme`` "https" and, when the client presented
        a certificate that verified, ``scope["bastion.client_cert_fp"]``: the lowercase hex
        SHA-256 of its DER (``guard.tls.fingerprint_der``). Absent otherwise.
        """
        if ssl is None:
            for sock in sockets:
                server = await self.loop.create_server(lambda: _HttpProtocol(self), sock=sock, backlog=2048)
                self._servers.append(server)
        else:
            for sock in sockets:
                server = await self.loop.create_server(
                    lambda: _HttpsProtocol(self), sock=sock, backlog=2048,
                    ssl=ssl, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S,
                )
                self._servers.append(server)
        self._sweeper = self.loop.create_task(self._sweep_idle())

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            limit = time.monotonic() - self.keep_alive_timeout_s
            for conn in list(self.connections):
                if conn.idle() and conn.last_active < limit:
                    conn.close()

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting, close idle connections, let in-flight requests finish."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.shutting_down = True
            if conn.idle():
                conn.close()
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            await server.wait_closed()
