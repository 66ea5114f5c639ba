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

The front door. An app with a ``head(scope)`` method (``RestApp``) decides on the headers
alone, before a byte of the body is read, whether the request may go on: a request it
refuses (401, 403, 404, 429, ...) or one too large (413) is answered at once, its body is
never buffered, and ``100 Continue`` is sent only to a request that was let through.
When such an early answer leaves the client still writing its body, the connection is
closed the way nginx's ``lingering_close`` does it: the answer is written, the write side
is shut (FIN), and what the client still sends is read and discarded, for at most
``linger_s`` seconds and ``linger_max_bytes`` bytes. Closing at once would leave unread
bytes in the socket's receive buffer, and the kernel would answer them with a reset that
destroys the answer before a client that writes its whole body first (Python's
``urllib``, many HTTP libraries) has read it. Both are counted in ``HttpServer.stats``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
Response = tuple[int, list[tuple[bytes, bytes]], bytes]

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
# the request line and headers of one request: beyond this it is answered 431 (httptools
# itself does not bound them, and every byte of them is held until the headers end)
MAX_HEADER_BYTES = 64 * 1024
# lingering close after an early answer (nginx: lingering_time 30 s, lingering_timeout 5 s;
# shorter here, as the bytes discarded are an anonymous client's)
LINGER_S = 5.0
LINGER_MAX_BYTES = 256 << 20
# a refused request's body up to this size is read and dropped before the answer, which
# keeps the connection open; a larger one is answered at once and the connection closed
SMALL_BODY_BYTES = 64 * 1024


@dataclass
class HttpStats:
    """What the front door refused and discarded, for the metrics (plain counters: the
    server runs on one event loop)."""

    early_responses: dict[int, int] = field(default_factory=dict)  # by status
    lingering_closes: int = 0
    discarded_bytes: int = 0

    def early(self, status: int) -> None:
        self.early_responses[status] = self.early_responses.get(status, 0) + 1


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} \r\n".encode()
    return line


def _error_response(status: int, message: str) -> Response:
    body = b'{"error":"' + message.replace('"', "'").encode() + b'"}'
    return status, [(b"content-type", b"application/json")], body


def _serialize(response: Response, *, close: bool, head_only: bool = False) -> bytes:
    """A whole response with its Content-Length (``close`` adds ``connection: close``)."""
    status, headers, body = response
    out = [_status_line(status)]
    for name, value in headers:
        out.append(name + b": " + value + b"\r\n")
    if close:
        out.append(b"connection: close\r\n")
    out.append(b"content-length: %d\r\n\r\n" % len(body))
    if not head_only:
        out.append(body)
    return b"".join(out)


class _Exchange:
    """One request and its response on a connection."""

    __slots__ = (
        "body",
        "chunked",
        "complete",
        "conn",
        "early",
        "keep_alive",
        "receive_waiter",
        "refusal",
        "refusal_waits",
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
        # the answer decided on the headers (app.head or the size limit); the body is then
        # discarded rather than buffered
        self.refusal: Response | None = None
        self.early = False  # the refusal was (or is to be) sent before the body arrived
        # a small body still coming after a refusal: read (and dropped) before answering, so
        # that the connection stays open for the client's next request (a retry with a key)
        self.refusal_waits = False

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
        self.head = server.head
        self.stats = server.stats
        self.loop = server.loop
        self.max_body = server.max_body_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = False
        self.shutting_down = False
        self.write_paused = False
        self.lingering = False
        self._linger_bytes = 0
        self._linger_timer: asyncio.TimerHandle | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self.current: _Exchange | None = None  # the exchange whose response is being produced
        self.parsing: _Exchange | None = None  # the exchange whose request is being parsed
        self.pending: deque[_Exchange] = deque()  # parsed requests waiting for their turn
        self.last_active = 0.0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._server_addr: tuple[str, int] | None = None
        self._client_addr: tuple[str, int] | None = None
        self._tls_scope: dict[str, Any] | None = None  # set by _HttpsProtocol

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
        if self._linger_timer is not None:
            self._linger_timer.cancel()
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
        if self.lingering:
            self._discard(len(data))
            return
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as err:
            self._fail(400, f"malformed HTTP request: {err}")
            return
        ex = self.parsing
        if ex is not None and ex.refusal is not None and not ex.refusal_waits and not self.closed:
            # refused on its headers and its body is still coming: answer now, not after it
            self.parsing = None
            self._answer_early(ex)
        elif ex is None and self._header_bytes > MAX_HEADER_BYTES and not self.closed:
            self._fail(431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes")

    def _fail(self, status: int, message: str) -> None:
        """A request the parser cannot go on with: answer, then close (lingering)."""
        if self.closed or self.lingering:
            return
        self.stats.early(status)
        self.transport.write(_serialize(_error_response(status, message), close=True))
        self._linger()

    def _answer_early(self, ex: _Exchange) -> None:
        """Answer a request refused on its headers before its body has arrived, then close
        the connection lingering. Responses still owed to earlier pipelined requests go
        first: until then nothing more is read (so nothing is parsed after this one)."""
        ex.early = True
        if self.current is not None or self.pending:
            self.pending.append(ex)
            self.transport.pause_reading()
            return
        self.current = ex
        self._write_early(ex)

    def _write_early(self, ex: _Exchange) -> None:
        assert ex.refusal is not None
        self.stats.early(ex.refusal[0])
        ex.response_done = True
        self.transport.write(_serialize(ex.refusal, close=True, head_only=ex.scope["method"] == "HEAD"))
        self._linger()

    def _linger(self) -> None:
        """Half-close, then read and discard for a bounded time and byte count, so that a
        client still writing its body reads the answer instead of a reset."""
        if self.closed or self.lingering:
            return
        self.lingering = True
        self.stats.lingering_closes += 1
        self.transport.resume_reading()
        if self.transport.can_write_eof():  # not over TLS: there the close_notify comes at close
            self.transport.write_eof()  # sent once the answer is flushed
        self._linger_timer = self.loop.call_later(self.server.linger_s, self.close)
        log.debug("lingering close", extra={"client": self._client_addr})

    def _discard(self, n: int) -> None:
        self.stats.discarded_bytes += n
        self._linger_bytes += n
        if self._linger_bytes > self.server.linger_max_bytes:
            self.close()

    def eof_received(self) -> bool:
        return False  # the client is done sending: close (also ends a lingering close)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def idle(self) -> bool:
        return self.current is None and self.parsing is None and not self.pending and not self.lingering

    # ---- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        if self._header_bytes <= MAX_HEADER_BYTES:
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools may split a header over two calls when it spans two reads
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes <= MAX_HEADER_BYTES:
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
        if self._tls_scope is not None:
            scope.update(self._tls_scope)  # before head(): a client certificate is a credential
        ex = _Exchange(self, scope, parser.should_keep_alive())
        self.parsing = ex
        self._headers_done(ex)

    def _headers_done(self, ex: _Exchange) -> None:
        """Decide on the headers alone: the size limit, then the app's ``head``, then
        ``100 Continue`` for a request that may go on."""
        if self._header_bytes > MAX_HEADER_BYTES:
            ex.refusal = _error_response(431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes")
            return
        expect_continue = False
        has_body = False
        length = -1
        for name, value in ex.scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length > self.max_body:
                    ex.refusal = _error_response(
                        413, f"request body of {length} bytes exceeds the limit of {self.max_body} bytes"
                    )
                    return
                has_body = length != 0
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
        if has_body and self.head is not None:
            # a body is on its way: who may send it is decided before it is read
            ex.refusal = self.head(ex.scope)
            if ex.refusal is not None:
                # a small body announced without Expect is on the wire already: drop it as it
                # comes and answer in order, keeping the connection; anything else now
                ex.refusal_waits = 0 <= length <= SMALL_BODY_BYTES and not expect_continue
                return
        if expect_continue and not self.closed:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        if ex.refusal is not None:  # answered without it: never buffered
            self.stats.discarded_bytes += len(body)
            return
        ex.size += len(body)
        if ex.size > self.max_body:  # a chunked body without Content-Length grew past the limit
            ex.body = []
            ex.refusal = _error_response(413, f"request body exceeds the limit of {self.max_body} bytes")
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
        if ex.refusal is not None:
            self._answer_refused(ex)
        elif self.server.respond is not None:
            self.loop.create_task(self._run_direct(ex))
        else:
            self.loop.create_task(self._run(ex))

    def _answer_refused(self, ex: _Exchange) -> None:
        """A request refused on its headers, now at the head of the line."""
        if ex.early:  # answered before its body had arrived: close lingering
            self._write_early(ex)
            return
        assert ex.refusal is not None  # its whole body came (and went): an ordinary answer
        self.stats.early(ex.refusal[0])
        ex.response_done = True
        ex.keep_alive = ex.keep_alive and not self.shutting_down
        self.transport.write(
            _serialize(ex.refusal, close=not ex.keep_alive, head_only=ex.scope["method"] == "HEAD")
        )
        self.exchange_finished(ex)

    async def _run_direct(self, ex: _Exchange) -> None:
        """Apps with ``respond(scope, receive) -> (status, headers, body)`` skip the ASGI
        send messages: the response is serialised here in one pass."""
        try:
            chunks = ex.body
            ex.body = []
            whole = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            response = await self.server.respond(ex.scope, ex.receive, whole)
        except Exception:
            log.exception("unhandled error in app", extra={"path": ex.scope.get("path")})
            response = _error_response(500, "internal server error")
        if self.closed:
            ex.response_done = True
            return
        if not ex.keep_alive or self.shutting_down:
            ex.keep_alive = False
        self.transport.write(_serialize(response, close=not ex.keep_alive, head_only=ex.scope["method"] == "HEAD"))
        ex.response_done = True
        self.exchange_finished(ex)

    async def _run(self, ex: _Exchange) -> None:
        try:
            await self.app(ex.scope, ex.receive, ex.send)
        except Exception:
            log.exception("unhandled error in ASGI app", extra={"path": ex.scope.get("path")})
            if ex.response_started is None and not self.closed:
                self.transport.write(_serialize(_error_response(500, "internal server error"), close=True))
                self.close()
                return
        if not ex.response_done and not self.closed:
            if ex.response_started is None:
                self.transport.write(_serialize(_error_response(500, "the application sent no response"), close=True))
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


class HttpServer:
    """Serve an ASGI app on already-bound sockets until ``shutdown()``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int = DEFAULT_LIMITS.max_body_bytes,
        keep_alive_timeout_s: float = 30.0,
        linger_s: float = LINGER_S,
        linger_max_bytes: int = LINGER_MAX_BYTES,
    ) -> None:
        self.app = app
        self.respond = getattr(app, "respond", None)
        # head(scope) -> a response to send instead of reading the body, or None to go on
        self.head: Callable[[dict[str, Any]], Response | None] | None = getattr(app, "head", None)
        self.max_body_bytes = max_body_bytes
        self.keep_alive_timeout_s = keep_alive_timeout_s
        self.linger_s = linger_s
        self.linger_max_bytes = linger_max_bytes
        self.stats = HttpStats()
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
