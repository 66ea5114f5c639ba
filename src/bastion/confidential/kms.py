"""The key-release service: a bundle's data key, unwrapped only for a worker that proves what it runs.

secureTF's "configuration and attestation service", for sealed bundles
(``guard/bundles.py``). A trusted worker that must open a bundle sends the bundle's
*wrapped* data key together with attestation evidence; the service verifies the evidence
against the release policy of the bundle's key id (``kms_store.ReleasePolicy``), unwraps
the data key with the master key it holds, and answers it HPKE-sealed (RFC 9180,
X25519 / HKDF-SHA256 / AES-256-GCM, ``identity.HPKE_SUITE``) to the public key the evidence attests. Only the
private half, which never leaves the attested worker, opens it: the untrusted host that
relays the answer learns nothing. Every decision is audited in the service's own HMAC
chain (``guard/audit.py``); no record ever holds key material.

HTTP API (JSON bodies, errors as ``{"error": reason}`` plus ``"field"`` on a 400):

* ``GET /healthz`` -> 200 ``{"status": "ok"}``.
* ``POST /v1/nonce`` -> 200 ``{"nonce": b64(32 random bytes), "expires_in": 120}``. Nonces
  are held in memory, single use, and expire; when ``max_nonces`` are outstanding the
  answer is 503 with ``Retry-After`` (unexpired nonces are never evicted: evicting them
  would let a flood of nonce requests void the honest workers' nonces).
* ``POST /v1/keys/{key_id}/release`` with ``{"kind", "evidence": b64, "nonce": b64,
  "wrapped": b64}`` -> 200 ``{"sealed_key": b64}``, the data key sealed with
  ``info = RELEASE_INFO_PREFIX + key_id + b"\\0" + nonce`` (:func:`release_info`), so a
  sealed key answered for one key id and nonce cannot be passed off as another's.
  400: malformed body (the field is named), or ``wrapped`` does not unwrap under the key
  id's master key; 403: the nonce is not one this service issued, unused and unexpired,
  the key id has no policy, or the evidence does not verify or does not satisfy the
  policy (the reason says which measurement differs); 404: unknown key id; 413: body over
  ``MAX_BODY_BYTES`` (refused before it is read); 503: the audit log cannot be written
  (nothing is released unaudited).
* ``POST /v1/keys/{key_id}/generate`` with ``{"kind", "evidence": b64, "nonce": b64}``
  -> 200 ``{"wrapped": b64, "sealed_key": b64}``: a fresh random 32-byte data key,
  wrapped under the key id's master key (the format ``release`` unwraps) and sealed to
  the attested key exactly as ``release`` seals (same ``info``). AWS KMS's
  GenerateDataKey, for the worker's fast-recovery mirror (``mirror.py``): the worker keeps
  the wrapped form on the host's disk and has it released again after a restart. Same
  checks, refusals and audit as ``release`` (action ``kms.generate``); no ``wrapped``
  field, so no 400 for it. One more refusal, 403: a key id whose master key was imported
  from a key file (``bastion kms import-key``): whoever holds that file could unwrap the
  generated key, so ``generate`` serves only keys this service generated (``add-key``).

There is deliberately no ``wrap`` route: operators seal bundles with a local key file
(``bastion bundle keygen --master-key``, ``bastion bundle seal --key-provider
file:KEYFILE``) and then ``bastion kms import-key KEY_ID --key-file KEYFILE``. The wrap
format is ``LocalKeyProvider``'s, so those bundles open here unchanged, and a service
that never wraps cannot be used to mint wrapped keys for bundles it did not approve.
``generate`` does not change that: it wraps only a key it drew itself, which only the
attested worker (and this service) ever holds, so nobody else can encrypt anything
under it; and bundles are signed besides.

Why no authentication of the answer: HPKE base mode does not authenticate the sender, so
whoever sits between worker and service could seal a data key of its own choosing to the
worker. That gains nothing: a bundle is signed (Ed25519) and every chunk is AES-GCM
authenticated under the real data key, so a substituted key only makes the bundle fail
to open. Serve over TLS (``--tls-cert``) anyway where the network is not trusted.

The decision's inputs live beside it, each in its own module: ``kms_policy.py`` holds the
nonce book and turns a key id's release policy into the measurement check the evidence
must pass (and the HPKE ``info`` the answer is bound with); ``kms_requests.py`` parses
and bounds the request body. This module routes, decides ``release`` and ``generate``
step by step, audits every decision, and runs the service.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import secrets
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from bastion.confidential.attestation import Attestation, AttestationError, verify_evidence
from bastion.confidential.identity import seal_to
from bastion.confidential.kms_policy import (
    MAX_NONCES,
    NONCE_BYTES,
    NONCE_TTL_S,
    RELEASE_INFO_PREFIX,
    NonceBook,
    PolicyMismatch,
    _measurement_policy,
    release_info,
)
from bastion.confidential.kms_requests import MAX_BODY_BYTES, MAX_WRAPPED_BYTES, FieldError, _parse_key_request
from bastion.confidential.kms_store import KmsStore, KmsStoreError
from bastion.core.errors import (
    BastionError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
)
from bastion.guard.audit import AuditLog
from bastion.guard.keyproviders import KEY_BYTES, KeyProviderError, KeyUnwrapError, LocalKeyProvider, check_key_id
from bastion.guard.secrets import derive_key, load_or_create_secret

__all__ = [
    "AUDIT_ADMIN_WRITER",
    "AUDIT_WRITER",
    "MAX_BODY_BYTES",
    "MAX_NONCES",
    "MAX_WRAPPED_BYTES",
    "NONCE_BYTES",
    "NONCE_TTL_S",
    "RELEASE_INFO_PREFIX",
    "FieldError",
    "KmsApp",
    "NonceBook",
    "PolicyMismatch",
    "audit_log_for",
    "bind_socket",
    "release_info",
    "run_kms",
    "serve_kms",
]

log = logging.getLogger("bastion.kms")

AUDIT_WRITER = "kms"
AUDIT_ADMIN_WRITER = "kms_admin"
AUDIT_CHAIN_PURPOSE = "audit-chain"  # the purpose `bastion audit verify` derives the chain key with
_MAX_REASON = 500

Response = tuple[int, list[tuple[bytes, bytes]], bytes]


class Unavailable(BastionError):
    """The service cannot decide right now (audit log unwritable, a master key that does not open)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class _StoreKeys(LocalKeyProvider):
    """Unwraps exactly as ``file:``/``env:`` providers wrap (same AES-256-GCM format and
    AAD), with master keys from the store."""

    def __init__(self, store: KmsStore) -> None:
        self._store = store

    def master_key(self, key_id: str) -> bytes:
        return self._store.master_key(key_id)

    def __str__(self) -> str:
        return f"the KMS store {self._store.path}"


def _json(status: int, data: Mapping[str, Any], extra: list[tuple[bytes, bytes]] | None = None) -> Response:
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    if extra:
        headers += extra
    return status, headers, orjson.dumps(data)


def _error(err: BastionError) -> Response:
    data: dict[str, Any] = {"error": err.message[:_MAX_REASON]}
    extra = []
    if isinstance(err, FieldError):
        data["field"] = err.field
    if err.retry_after_s is not None:
        extra.append((b"retry-after", str(err.retry_after_s).encode()))
    if isinstance(err, MethodNotAllowed) and err.allow:
        extra.append((b"allow", ", ".join(err.allow).encode()))
    return _json(err.http_status, data, extra)


def _client_of(scope: Mapping[str, Any]) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _short_id(key_id: str) -> str:
    """A path segment as it may appear in a message or the audit log (bounded, printable)."""
    return key_id if len(key_id) <= 128 and key_id.isprintable() else repr(key_id[:64]) + "..."


# ---------------------------------------------------------------------- the app


class KmsApp:
    """The service as an app for ``bastion.transport.http_server.HttpServer`` (its
    ``respond`` fast path and ``head`` front door) and, through ``__call__``, for any
    ASGI-3 server."""

    def __init__(
        self,
        store: KmsStore,
        audit: AuditLog | None,
        *,
        nonces: NonceBook | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.store = store
        self.audit = audit
        self.nonces = nonces if nonces is not None else NonceBook()  # (an empty book is falsy: __len__)
        self.max_body_bytes = max_body_bytes
        self._keys = _StoreKeys(store)

    # -- routing

    @staticmethod
    def _route(method: str, path: str) -> tuple[str, str] | BastionError:
        if path == "/healthz":
            return ("health", "") if method in ("GET", "HEAD") else _not_allowed("GET")
        if path == "/v1/nonce":
            return ("nonce", "") if method == "POST" else _not_allowed("POST")
        if path.startswith("/v1/keys/"):
            for what in ("release", "generate"):
                if path.endswith(f"/{what}"):
                    key_id = path[len("/v1/keys/") : -len(what) - 1]
                    if key_id and "/" not in key_id:
                        return (what, key_id) if method == "POST" else _not_allowed("POST")
        return NotFound(
            f"no route {path[:200]!r}: expected POST /v1/nonce, POST /v1/keys/KEY_ID/release, "
            "POST /v1/keys/KEY_ID/generate or GET /healthz"
        )

    def head(self, scope: dict[str, Any]) -> Response | None:
        """Refuse a request with a body to an unknown route before reading the body."""
        route = self._route(scope["method"], scope["path"])
        return _error(route) if isinstance(route, BastionError) else None

    async def respond(self, scope: dict[str, Any], receive: Any, body: bytes) -> Response:
        route = self._route(scope["method"], scope["path"])
        if isinstance(route, BastionError):
            return _error(route)
        what, key_id = route
        if what == "health":
            return _json(200, {"status": "ok"})
        if what == "nonce":
            return self._nonce(scope)
        # Verification is a few milliseconds of CPU at most (a COSE signature and a certificate
        # chain for Nitro); key releases are rare (one per bundle a worker loads), so it runs on
        # the loop rather than paying a thread hop for every request.
        return self._key_route(what, key_id, body, _client_of(scope))

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks, size, response = [], 0, None
        while True:  # bounded before anything is parsed, whichever server runs the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                response = _error(PayloadTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes"))
                break
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        if response is None:
            response = await self.respond(scope, receive, b"".join(chunks))
        status, headers, body = response
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    # -- handlers

    def _nonce(self, scope: Mapping[str, Any]) -> Response:
        try:
            nonce = self.nonces.issue()
        except Overloaded as err:
            self._audit(
                {
                    "action": "kms.nonce",
                    "decision": "refused",
                    "status": err.http_status,
                    "reason": err.message,
                    "client": _client_of(scope),
                }
            )
            return _error(err)
        return _json(200, {"nonce": base64.b64encode(nonce).decode(), "expires_in": round(self.nonces.ttl_s)})

    def _key_route(self, what: str, key_id: str, body: bytes, client: str | None) -> Response:
        """``release`` or ``generate``: one decision, audited, whatever its outcome."""
        generate = what == "generate"
        record: dict[str, Any] = {
            "action": "kms.refuse",
            "decision": "refused",
            "status": 0,
            "route": what,
            "key_id": _short_id(key_id),
            "kind": None,
            "measurement": None,
            "attested_key": None,
            "policy": None,
            "reason": "",
            "client": client,
        }
        try:
            sealed, wrapped = self._decide(key_id, body, record, generate=generate)
        except BastionError as err:
            record["status"] = err.http_status
            record["reason"] = err.message[:_MAX_REASON]
            self._audit(record)
            return _error(err)
        except Exception as exc:  # a verifier or store bug: refuse (fail closed), audited, logged
            log.exception("key %s failed", what, extra={"key_id": record["key_id"]})
            record["status"] = 500
            record["reason"] = f"internal error: {type(exc).__name__}"
            self._audit(record)
            return _json(500, {"error": f"internal error while deciding the {what} (see the service log)"})
        record.update(action=f"kms.{what}", decision="released", status=200, reason="")
        try:
            self._audit(record, required=True)
        except Unavailable as err:
            return _error(err)  # never release what the audit log does not show
        answer = {"sealed_key": base64.b64encode(sealed).decode()}
        if wrapped is not None:
            answer["wrapped"] = base64.b64encode(wrapped).decode()
        return _json(200, answer)

    def _decide(
        self, key_id: str, body: bytes, record: dict[str, Any], *, generate: bool = False
    ) -> tuple[bytes, bytes | None]:
        """The release (or generation), step by step: ``(sealed data key, wrapped data key
        if generated)``; raises the refusal. Fills ``record`` as it learns."""
        try:
            check_key_id(key_id)
        except KeyProviderError:
            raise NotFound(f"unknown key id {_short_id(key_id)!r}") from None
        if len(body) > self.max_body_bytes:
            raise PayloadTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes")
        req = _parse_key_request(body, generate=generate)
        record["kind"] = req.kind
        if not self.store.has_key(key_id):
            raise NotFound(f"unknown key id {key_id!r}: this service holds no master key by that name")
        # used up before anything else is checked: a nonce buys one attempt, successful or not
        self.nonces.consume(req.nonce)
        policy = self.store.policy(key_id)
        if policy is None:
            raise PermissionDenied(
                f"key id {key_id!r} has no release policy: nothing is released until one is set "
                f"(bastion kms policy {key_id} --accept ...)"
            )
        record["policy"] = policy.digest()
        if generate and self.store.key(key_id).source != "generated":
            # An imported master key is also in a key file: whoever holds that file could unwrap
            # the generated key, read what the worker encrypts under it, and forge it.
            raise PermissionDenied(
                f"key id {key_id!r} was imported from a key file: generate serves only master keys generated "
                "in this service, which no one else holds (bastion kms add-key KEY_ID, then a policy)"
            )
        if req.kind == "dev" and not policy.allow_dev:
            # said here rather than by verify_evidence, whose reason names another command's flag
            raise PermissionDenied(
                f"dev evidence refused by policy: key id {key_id!r} accepts only hardware "
                "evidence (dev evidence is self-signed and proves nothing about the host; "
                f"bastion kms policy {key_id} --allow-dev admits it)"
            )
        try:
            att = verify_evidence(req.kind, req.evidence, nonce=req.nonce, policy=_measurement_policy(policy))
        except PolicyMismatch as exc:
            self._note_attestation(record, exc.attestation)
            raise PermissionDenied(exc.message) from None
        except AttestationError as exc:
            raise PermissionDenied(exc.message) from None
        self._note_attestation(record, att)
        wrapped = None
        try:
            if req.wrapped is None:
                data_key = secrets.token_bytes(KEY_BYTES)
                wrapped = self._keys.wrap_key(key_id, data_key)
            else:
                data_key = self._keys.unwrap_key(key_id, req.wrapped)
        except KeyUnwrapError as exc:
            raise FieldError("wrapped", exc.message) from None
        except KmsStoreError as exc:
            raise Unavailable(f"the service cannot open its master key {key_id!r}: {exc}") from None
        try:  # identity.seal_to: the worker's HPKE suite, and it refuses low-order (all-zero secret) keys
            return seal_to(att.public_key, data_key, release_info(key_id, req.nonce)), wrapped
        except ValueError as exc:
            raise PermissionDenied(f"the attested public key is unusable: {exc}") from None

    @staticmethod
    def _note_attestation(record: dict[str, Any], att: Attestation) -> None:
        # digests only: measurement values and a fingerprint of the worker's public key
        record["measurement"] = {str(k)[:32]: str(v)[:256] for k, v in sorted(att.measurement.items())[:32]}
        record["attested_key"] = hashlib.sha256(att.public_key).hexdigest()[:32]

    def _audit(self, record: dict[str, Any], *, required: bool = False) -> None:
        if self.audit is None:
            return
        record = {"ts": time.time(), **record}
        try:
            self.audit.append(record)
        except Exception as exc:
            log.error("cannot write the KMS audit log: %s", exc)
            if required:
                raise Unavailable("the audit log cannot be written; nothing is released unaudited") from None


def _not_allowed(allowed: str) -> BastionError:
    return MethodNotAllowed(f"method not allowed; this route takes {allowed}", allow=(allowed,))


# ---------------------------------------------------------------------- running it


def audit_log_for(directory: Path, writer_id: str = AUDIT_WRITER) -> AuditLog:
    """The KMS's own audit chain in ``directory`` (writer ``kms`` for the service,
    ``kms_admin`` for ``bastion kms`` changes). Its secret is ``DIRECTORY.secret`` beside
    it, where ``bastion audit verify --dir DIRECTORY`` looks without further options; it
    is not the store's secret, so an auditor who verifies the chain needs nothing that
    opens master keys."""
    directory = Path(directory)
    secret = load_or_create_secret(directory.with_name(directory.name + ".secret"))
    return AuditLog(directory, derive_key(secret, AUDIT_CHAIN_PURPOSE), writer_id=writer_id)


async def serve_kms(
    app: KmsApp, sock: socket.socket, *, ssl_context: ssl.SSLContext | None = None, stop: asyncio.Event
) -> None:
    """Serve ``app`` on the bound socket until ``stop`` is set, then let in-flight requests finish.

    The project's own HTTP server rather than uvicorn: it enforces the body limit on the
    headers (a 413 before a byte of an oversized body is buffered), caps headers, closes
    refused connections cleanly, and needs no server configuration of its own.
    """
    from bastion.transport.http_server import HttpServer

    server = HttpServer(app, max_body_bytes=app.max_body_bytes)
    await server.start([sock], ssl=ssl_context)
    try:
        await stop.wait()
    finally:
        await server.shutdown(5.0)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _write_port_file(path: Path, port: int) -> None:
    """Written whole then renamed: a reader polling for it never sees it half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def run_kms(
    db: Path,
    audit_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    port_file: Path | None = None,
    secret_file: Path | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_nonces: int = MAX_NONCES,
    ready: Callable[[str], None] | None = None,
) -> int:
    """Open the store and the audit log, serve until SIGTERM/SIGINT; returns the exit code.

    The store must exist (a typo'd ``--db`` must not serve an empty store). ``ready`` is
    called with the URL once the socket listens (after ``port_file`` is written).
    """
    store = KmsStore(db, secret_file=secret_file, create=False)
    audit = None
    sock = None
    try:
        audit = audit_log_for(audit_dir)
        sock = bind_socket(host, port)
        bound = sock.getsockname()[1]
        scheme = "https" if ssl_context is not None else "http"
        url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{bound}"
        app = KmsApp(store, audit, nonces=NonceBook(capacity=max_nonces))
        audit.append(
            {
                "ts": time.time(),
                "action": "kms.start",
                "decision": "accepted",
                "status": 0,
                "url": url,
                "keys": len(store.list_keys()),
                "reason": "",
            }
        )

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
            task = asyncio.ensure_future(serve_kms(app, sock, ssl_context=ssl_context, stop=stop))
            # the socket listens already (bind_socket): a client connecting now waits in the backlog
            if port_file is not None:
                _write_port_file(Path(port_file), bound)
            if ready is not None:
                ready(url)
            await task

        asyncio.run(main())
        audit.append({"ts": time.time(), "action": "kms.stop", "decision": "accepted", "status": 0, "reason": ""})
        return 0
    finally:
        if sock is not None:
            sock.close()
        if audit is not None:
            audit.close()
        store.close()
