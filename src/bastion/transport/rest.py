"""REST transport: a raw ASGI app for the V2 REST API, TF-Serving REST and /metrics.

It is deliberately thin and framework-free: parse bytes → data plane → encode. A web
framework's request objects, middleware stack and validation would each cost more than
the model does for small models (~8 µs/row), so routing is a split of the path and the
body is read straight off the ASGI channel.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson

from bastion.core.errors import (
    BastionError,
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from bastion.dataplane import AdminGrant, Admission, Credentials, DataPlane
from bastion.protocol import tfserving, v2_rest

log = logging.getLogger("bastion.rest")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Response = tuple[int, list[tuple[bytes, bytes]], bytes]

# answers smaller than this are sent as they are: gzip would save a few hundred bytes at
# best and cost both sides more CPU than the model does (issue 14: 26 % of throughput)
DEFAULT_COMPRESS_MIN_BYTES = 1024
_COMPRESSIBLE = (b"application/json", b"text/")

JSON_HEADERS = [(b"content-type", b"application/json")]
METRICS_HEADERS = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
_OK = b"{}"


class _Request:
    """The few header values the routes need, read in one pass over the ASGI headers."""

    __slots__ = (
        "_content_length", "_header_length", "accept_encoding", "authorization", "body", "cert_fp", "content_encoding",
    )

    def __init__(self, scope: Scope, body: bytes | None = None) -> None:
        self.body = body
        # kept raw and parsed when used: a malformed header must not be reported before
        # the caller is authenticated (a 400 would tell an anonymous client more than 401)
        self._content_length: bytes | None = None
        self._header_length: bytes | None = None
        self.content_encoding = b""
        self.accept_encoding = b""
        self.authorization: bytes | None = None
        # set by the HTTP server on a mutual-TLS connection: SHA-256 of the client certificate
        self.cert_fp: str | None = scope.get("bastion.client_cert_fp")
        for key, value in scope["headers"]:
            if key == b"authorization":
                self.authorization = value
            elif key == b"content-length":
                self._content_length = value
            elif key == b"inference-header-content-length":
                self._header_length = value
            elif key == b"content-encoding":
                self.content_encoding = value.strip().lower()
            elif key == b"accept-encoding":
                self.accept_encoding = value.lower()


    def credentials(self) -> Credentials:
        return Credentials(self.authorization, self.cert_fp)

    @property
    def content_length(self) -> int | None:
        raw = self._content_length
        return None if raw is None else _int_header(raw, "Content-Length")

    @property
    def header_length(self) -> int | None:
        raw = self._header_length
        return None if raw is None else _int_header(raw, "Inference-Header-Content-Length")


def _int_header(value: bytes, name: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise InvalidInput(f"header {name}: expected a non-negative integer, got {value[:40]!r}") from None
    if n < 0:
        raise InvalidInput(f"header {name}: expected a non-negative integer, got {n}")
    return n


def _decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    if encoding in (b"", b"identity"):
        return body
    if encoding == b"gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == b"deflate":
        wbits = zlib.MAX_WBITS  # zlib-wrapped, as HTTP's "deflate" means
    else:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding.decode(errors='replace')!r} is not supported; use gzip, deflate or identity"
        )
    d = zlib.decompressobj(wbits)
    try:
        # bounded: a small compressed body must not expand past the request size limit
        out = d.decompress(body, limit + 1)
        if len(out) > limit or d.unconsumed_tail:
            raise PayloadTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
        out += d.flush()
    except zlib.error as err:
        raise InvalidInput(f"request body is not valid {encoding.decode()} data: {err}") from None
    if not d.eof:
        raise InvalidInput(f"request body is truncated {encoding.decode()} data")
    return out


def _pick_encoding(accept: bytes) -> bytes | None:
    if not accept:
        return None
    offered = {}
    for part in accept.split(b","):
        token, _, params = part.strip().partition(b";")
        q = 1.0
        params = params.strip()
        if params.startswith(b"q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        offered[token.strip()] = q
    for enc in (b"gzip", b"deflate"):
        if offered.get(enc, 0.0) > 0:
            return enc
    return None


def _compressible(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(_COMPRESSIBLE)
    return False


def _compress(body: bytes, encoding: bytes) -> bytes:
    if encoding == b"gzip":
        c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    else:
        c = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS)
    return c.compress(body) + c.flush()


# what the headers decided: the rest of the request's work, given the (still unread) body
Step = Callable[["_Request", Receive], Awaitable[Response]]
_PLAN = "bastion.plan"  # the scope key under which head() leaves the step for respond()


class RestApp:
    """The ASGI application over one data plane; its request limits are the plane's.

    Each request is handled in two steps. The *plan* reads only the path, the method and
    the headers: it picks the route and, for a route that takes a body, admits the caller
    (credentials, scope, rate limit, quota; an admin's role). The *step* it returns reads
    the body and does the rest. Bastion's HTTP server runs the plan as soon as the headers
    are in (``head``), so a refused caller is answered before its body is read; any other
    ASGI server runs both in ``__call__``, the plan still before ``receive`` is awaited.
    """

    def __init__(self, dataplane: DataPlane, *, compress_min_bytes: int = DEFAULT_COMPRESS_MIN_BYTES) -> None:
        if compress_min_bytes < 0:
            raise ValueError("compress_min_bytes: expected a non-negative number of bytes")
        self.dataplane = dataplane
        self.limits = dataplane.limits
        self.max_body_bytes = self.limits.max_body_bytes
        self.compress_min_bytes = compress_min_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, headers, body = await self.respond(scope, receive)
        # an explicit length: without it uvicorn falls back to chunked encoding, which costs
        # both sides more work per response
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def head(self, scope: Scope) -> Response | None:
        """Decide on the headers, before the body is read (Bastion's HTTP server calls this
        for every request that has a body): the answer to send instead of reading it (a
        refusal: 401, 403, 404, 405, 429, ...), or None to read it and go on."""
        req = _Request(scope)
        try:
            scope[_PLAN] = (self._plan(scope, req), req)
        except BastionError as err:
            return self._finish(req, *_error(err))
        except Exception:
            log.exception("unhandled error in REST transport", extra={"path": scope.get("path")})
            return self._finish(req, *_error(InternalError("internal server error")))
        return None

    async def respond(self, scope: Scope, receive: Receive, body: bytes | None = None) -> Response:
        """The whole response for one request. Bastion's own HTTP server calls this directly
        with the complete ``body`` (skipping the ASGI messages); ``__call__`` wraps it for any
        ASGI server, and then the body is read through ``receive``."""
        planned: tuple[Step, _Request] | None = scope.pop(_PLAN, None)  # head() ran on the headers
        if planned is None:
            req = _Request(scope, body)
        else:
            req = planned[1]
            req.body = body
        try:
            step = self._plan(scope, req) if planned is None else planned[0]
            status, headers, out = await step(req, receive)
        except BastionError as err:
            status, headers, out = _error(err)
        except Exception:
            log.exception("unhandled error in REST transport", extra={"path": scope.get("path")})
            status, headers, out = _error(InternalError("internal server error"))
        return self._finish(req, status, headers, out)

    def _finish(self, req: _Request, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
        """Compress where it pays: a body of at least ``compress_min_bytes`` of a compressible
        type, for a client that accepts gzip or deflate. A small answer gains nothing on the
        wire and costs both sides CPU; binary tensors barely shrink."""
        headers = list(headers)  # routes return shared constant lists
        accept = req.accept_encoding
        if accept and len(body) >= self.compress_min_bytes and _compressible(headers):
            enc = _pick_encoding(accept)
            if enc is not None:
                body = _compress(body, enc)
                headers += ((b"content-encoding", enc), (b"vary", b"accept-encoding"))
        return status, headers, body

    async def _read_body(self, req: _Request, receive: Receive) -> bytes:
        if req.body is not None:  # handed over whole by Bastion's HTTP server
            body = req.body
            return _decompress(body, req.content_encoding, self.max_body_bytes) if req.content_encoding else body
        limit = self.max_body_bytes
        if req.content_length is not None and req.content_length > limit:
            raise PayloadTooLarge(f"request body of {req.content_length} bytes exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidInput("client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if req.content_encoding:
            body = _decompress(body, req.content_encoding, limit)
        return body

    # ---- the plan: route, method and admission, from the headers alone -------------------
    def _plan(self, scope: Scope, req: _Request) -> Step:
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "HEAD":
            method = "GET"  # the HTTP server sends the headers only
        parts = path.strip("/").split("/")
        head = parts[0]
        if head == "v2":
            return self._plan_v2(method, parts, req)
        if head == "v1" and len(parts) >= 3 and parts[1] == "models":
            return self._plan_v1(method, parts, req)
        if path == "/metrics":
            _expect(method, "GET")
            return self._metrics
        raise NotFound(f"no route for {method} {path}")

    def _plan_v2(self, method: str, parts: list[str], req: _Request) -> Step:
        dp = self.dataplane
        n = len(parts)
        if n >= 3 and parts[1] == "models":
            name = parts[2]
            version: str | None = None
            rest = parts[3:]
            if len(rest) >= 2 and rest[0] == "versions":
                version = rest[1]
                rest = rest[2:]
            if rest == ["infer"]:
                _expect(method, "POST")
                # credentials, scope and limits before the body is even read
                ticket = dp.admit(req.credentials(), name, transport="rest")
                return partial(self._infer, ticket, name, version)
            if not rest:
                _expect(method, "GET")
                return partial(self._model_metadata, name, version)
            if rest == ["ready"]:
                _expect(method, "GET")
                return partial(self._model_ready, name, version)
            if len(rest) == 2 and rest[0] == "attestation":
                _expect(method, "GET")
                return partial(self._attestation, name, version, rest[1])
        elif n == 1:
            _expect(method, "GET")
            return self._server_metadata
        elif n == 3 and parts[1] == "health":
            _expect(method, "GET")
            if parts[2] == "live":
                return self._live
            if parts[2] == "ready":
                return self._ready
        elif n >= 3 and parts[1] == "repository":
            return self._plan_repository(method, parts, req)
        elif n >= 3 and parts[1] == "admin":
            return self._plan_admin(method, parts, req)
        raise NotFound(f"no route for {method} /{'/'.join(parts)}")

    def _plan_repository(self, method: str, parts: list[str], req: _Request) -> Step:
        """Triton's model-repository extension, which tritonclient's load/unload call."""
        if parts[2] == "index" and len(parts) == 3:
            _expect(method, "POST", "GET")
            return self._repository_index
        if len(parts) == 5 and parts[2] == "models" and parts[4] in ("load", "unload"):
            _expect(method, "POST")
            grant = self.dataplane.admin(req.credentials(), transport="rest", action=parts[4], target=parts[3])
            return partial(self._repository_action, grant)
        raise NotFound(f"no route for {method} /{'/'.join(parts)}")

    def _plan_admin(self, method: str, parts: list[str], req: _Request) -> Step:
        """Key management: /v2/admin/keys[/{id}], /v2/admin/tenants[/{t}/limits|class]."""
        rest = parts[2:]
        route = "/" + "/".join(parts)
        action, target, has_body = _admin_action(method, rest)
        grant = self.dataplane.admin(req.credentials(), transport="rest", action=action or "admin", target=target)
        if action is None:  # an admin asking for a route that does not exist
            allow = _admin_allow(rest)
            if allow:
                raise MethodNotAllowed(f"method {method} not allowed on {route}; use {' or '.join(allow)}", allow=allow)
            raise NotFound(f"no route for {method} {route}")
        return partial(self._key_action, grant, has_body)

    def _plan_v1(self, method: str, parts: list[str], req: _Request) -> Step:
        """TF-Serving REST: /v1/models/{m}[/versions/{v}][:predict]."""
        last = parts[-1]
        verb = ""
        if ":" in last:
            last, _, verb = last.partition(":")
            parts = [*parts[:-1], last]
        name = parts[2]
        version: str | None = None
        if len(parts) == 5 and parts[3] == "versions":
            version = parts[4]
        elif len(parts) != 3:
            raise NotFound(f"no route for {method} /{'/'.join(parts)}")
        if verb == "predict":
            _expect(method, "POST")
            ticket = self.dataplane.admit(req.credentials(), name, transport="tfserving")
            return partial(self._predict, ticket, name, version)
        if verb:
            raise NotFound(f"TF-Serving method ':{verb}' is not supported; use ':predict'")
        _expect(method, "GET")
        return partial(self._version_states, name, version)

    # ---- the steps: the body and the work -------------------------------------------------
    async def _infer(self, ticket: Admission, name: str, version: str | None, req: _Request, receive: Receive
                     ) -> Response:
        body = await self._read_body(req, receive)
        request = v2_rest.decode_infer_request(body, name, version, req.header_length, limits=self.limits)
        response = await self.dataplane.infer(ticket, request)
        out, header_len = v2_rest.encode_infer_response(response, request)
        if header_len is None:
            return 200, JSON_HEADERS, out
        return (
            200,
            [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(header_len).encode()),
            ],
            out,
        )

    async def _predict(self, ticket: Admission, name: str, version: str | None, req: _Request, receive: Receive
                       ) -> Response:
        body = await self._read_body(req, receive)
        signature = self.dataplane.signature(ticket, version)
        request, row_format = tfserving.decode_predict_request(body, name, version, signature, limits=self.limits)
        response = await self.dataplane.infer(ticket, request)
        return 200, JSON_HEADERS, tfserving.encode_predict_response(response, row_format)

    async def _model_metadata(self, name: str, version: str | None, req: _Request, receive: Receive) -> Response:
        meta = self.dataplane.model_metadata(req.credentials(), name, version, transport="rest")
        return 200, JSON_HEADERS, v2_rest.encode_model_metadata(meta)

    async def _model_ready(self, name: str, version: str | None, req: _Request, receive: Receive) -> Response:
        ready = self.dataplane.model_ready(req.credentials(), name, version, transport="rest")
        return (200 if ready else 503), JSON_HEADERS, _OK

    async def _version_states(self, name: str, version: str | None, req: _Request, receive: Receive) -> Response:
        states = self.dataplane.version_states(req.credentials(), name, version, transport="tfserving")
        return 200, JSON_HEADERS, tfserving.encode_model_status(states)

    async def _attestation(self, name: str, version: str | None, nonce: str, req: _Request,
                           receive: Receive) -> Response:
        doc = await self.dataplane.attestation(req.credentials(), name, version, nonce, transport="rest")
        return 200, JSON_HEADERS, orjson.dumps(doc)

    async def _server_metadata(self, req: _Request, receive: Receive) -> Response:
        return 200, JSON_HEADERS, orjson.dumps(self.dataplane.server_metadata())

    async def _live(self, req: _Request, receive: Receive) -> Response:
        return (200 if self.dataplane.live() else 503), JSON_HEADERS, _OK

    async def _ready(self, req: _Request, receive: Receive) -> Response:
        return (200 if self.dataplane.ready() else 503), JSON_HEADERS, _OK

    async def _metrics(self, req: _Request, receive: Receive) -> Response:
        return 200, METRICS_HEADERS, self.dataplane.metrics_text(req.credentials(), transport="rest")

    async def _repository_index(self, req: _Request, receive: Receive) -> Response:
        return 200, JSON_HEADERS, orjson.dumps(self.dataplane.repository_index(req.credentials(), transport="rest"))

    async def _repository_action(self, grant: AdminGrant, req: _Request, receive: Receive) -> Response:
        parameters = v2_rest.decode_repository_request(await self._read_body(req, receive))
        await self.dataplane.repository_action(grant, parameters)
        return 200, JSON_HEADERS, _OK

    async def _key_action(self, grant: AdminGrant, has_body: bool, req: _Request, receive: Receive) -> Response:
        doc = _json_body(await self._read_body(req, receive)) if has_body else None
        return 200, JSON_HEADERS, orjson.dumps(self.dataplane.key_action(grant, doc))


def _admin_action(method: str, rest: list[str]) -> tuple[str | None, str, bool]:
    """(the admin action a route names, its target, whether it takes a JSON body); the
    action None for a route that does not exist."""
    if rest == ["keys"]:
        if method == "GET":
            return "keys.list", "", False
        if method == "POST":
            return "keys.create", "", True
    elif len(rest) == 2 and rest[0] == "keys" and method == "DELETE":
        return "keys.revoke", rest[1], False
    elif rest == ["tenants"] and method == "GET":
        return "tenants.list", "", False
    elif len(rest) == 3 and rest[0] == "tenants" and method == "PUT":
        if rest[2] == "limits":
            return "tenants.set_limits", rest[1], True
        if rest[2] == "class":
            return "tenants.set_defense_class", rest[1], True
    return None, "", False


def _admin_allow(rest: list[str]) -> tuple[str, ...]:
    if rest == ["keys"]:
        return ("GET", "HEAD", "POST")
    if rest == ["tenants"]:
        return ("GET", "HEAD")
    if rest[:1] == ["keys"] and len(rest) == 2:
        return ("DELETE",)
    if len(rest) == 3 and rest[0] == "tenants" and rest[2] in ("limits", "class"):
        return ("PUT",)
    return ()


def _json_body(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"request body is not valid JSON: {err}") from None


def _expect(method: str, *allowed: str) -> None:
    if method not in allowed:
        allow = (*allowed, "HEAD") if "GET" in allowed else allowed
        raise MethodNotAllowed(f"method {method} not allowed here; use {' or '.join(allowed)}", allow=allow)


def _error(err: BastionError) -> tuple[int, list, bytes]:
    headers = list(JSON_HEADERS)
    retry_after = err.retry_after_s
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if err.http_status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="bastion"'))
    elif isinstance(err, MethodNotAllowed) and err.allow:
        headers.append((b"allow", ", ".join(err.allow).encode()))
    return err.http_status, headers, v2_rest.encode_error(err.message)


async def _lifespan(receive: Receive, send: Send) -> None:
    # the server launcher owns startup/shutdown of the data plane; just acknowledge
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
