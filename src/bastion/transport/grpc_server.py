"""The Open Inference Protocol over gRPC (grpc.aio): servicer and server factory.

Thin by design: each method decodes the message (``bastion.protocol.v2_grpc``),
calls the data plane, and encodes the answer. Every rule -- auth, limits, zoo
choice, audit -- lives below, in the data plane. Errors are values: a
``BastionError`` becomes the gRPC status its class names, anything else is a bug
in Bastion and becomes INTERNAL with a generic message (the traceback goes to the
``bastion.grpc`` log, never to the client).

The front door (issue 14): every method is registered as stream-unary, which on the
wire is the same HTTP/2 exchange as a unary call, so a handler runs on the call's
metadata before its message is read. A method that needs a key authenticates the
caller first (``DataPlane.authenticate``) and only then reads the one message; until
then the server holds only what HTTP/2 flow control lets a stream send (one window),
never a whole message. ModelInfer then takes the model name off the wire without
parsing the message (``grpc_peek.peek_model_name``) and admits the caller for it (scope,
rate limit, query budget) before the message is parsed. The health and server-metadata
requests have no fields: they are answered without being read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from bastion.core.errors import BastionError, InvalidInput
from bastion.core.limits import RequestLimits
from bastion.core.metadata import ModelMetadata
from bastion.core.tensors import InferenceRequest, InferenceResponse
from bastion.dataplane import AdminGrant, Admission, Credentials
from bastion.protocol import grpc_peek, v2_grpc
from bastion.protocol.grpc_v2 import grpc_service_pb2 as pb2
from bastion.protocol.grpc_v2 import grpc_service_pb2_grpc as pb2_grpc

__all__ = [
    "DataPlaneAPI",
    "GrpcInferenceServicer",
    "add_servicer_to_server",
    "create_grpc_server",
    "grpc_server_port",
]

logger = logging.getLogger("bastion.grpc")

T = TypeVar("T")
M = TypeVar("M", bound=Message)

# Shown to clients for unexpected exceptions: details of a bug are for the operator's log.
INTERNAL_ERROR_MESSAGE = "internal server error; the server log has the details"


class DataPlaneAPI(Protocol):
    """What the gRPC transport needs from ``bastion.dataplane.DataPlane``."""

    limits: RequestLimits

    def live(self) -> bool: ...

    def ready(self) -> bool: ...

    def server_metadata(self) -> dict[str, Any]: ...

    def authenticate(self, credentials: Credentials, *, transport: str, action: str) -> None: ...

    def admit(self, credentials: Credentials, model: str, *, transport: str) -> Admission: ...

    async def infer(self, ticket: Admission, request: InferenceRequest) -> InferenceResponse: ...

    def model_ready(self, credentials: Credentials, name: str, version: str | None, *, transport: str) -> bool: ...

    def model_metadata(
        self, credentials: Credentials, name: str, version: str | None, *, transport: str
    ) -> ModelMetadata: ...

    def repository_index(self, credentials: Credentials, *, transport: str) -> list[dict[str, Any]]: ...

    def admin(self, credentials: Credentials, *, transport: str, action: str, target: str = "") -> AdminGrant: ...

    async def repository_action(self, grant: AdminGrant, parameters: Mapping[str, Any] | None = None) -> None: ...


def _retry_after_metadata(err: BastionError) -> tuple[tuple[str, str], ...]:
    retry_after = err.retry_after_s  # the same whole seconds as HTTP's Retry-After
    return () if retry_after is None else (("retry-after", str(retry_after)),)


async def _abort(context: grpc.aio.ServicerContext, err: BastionError) -> NoReturn:
    code = getattr(grpc.StatusCode, err.grpc_code, None)
    if code is None:  # an error class naming a non-existent code is our bug; still answer
        logger.error("%s names unknown gRPC code %r", type(err).__name__, err.grpc_code)
        code = grpc.StatusCode.INTERNAL
    await context.abort(code, err.message, _retry_after_metadata(err))
    raise AssertionError("unreachable: context.abort raises")


class GrpcInferenceServicer(pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` on top of a data plane."""

    def __init__(self, dataplane: DataPlaneAPI, *, client_certs: bool = False) -> None:
        self._dataplane = dataplane
        self._limits = dataplane.limits
        # mutual TLS: a client certificate may stand for an API key
        self._client_certs = client_certs

    def _credentials(self, context: grpc.aio.ServicerContext) -> Credentials:
        """The ``authorization`` metadata value and the client certificate's fingerprint."""
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                token = value if isinstance(value, str) else value.decode("latin-1")
                break
        cert_fp = None
        if self._client_certs:
            from bastion.guard.tls import grpc_peer_fingerprint

            cert_fp = grpc_peer_fingerprint(context)
        return Credentials(token, cert_fp)

    async def _serve(
        self, context: grpc.aio.ServicerContext, method: str, work: Callable[[], Awaitable[T]]
    ) -> T:
        """Run one RPC's work and turn its failure into a gRPC status."""
        try:
            return await work()
        except BastionError as err:
            if err.grpc_code == "INTERNAL":
                logger.error("gRPC %s failed: %s", method, err.message, exc_info=True)
            else:
                logger.debug("gRPC %s refused (%s): %s", method, err.grpc_code, err.message)
            await _abort(context, err)
        except Exception:
            # A bug in Bastion: the traceback goes to the log, the client gets a generic message.
            logger.exception("gRPC %s failed with an unexpected error", method)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE)
        raise AssertionError("unreachable: context.abort raises")

    # -------------------------------------------------------------- health

    async def ServerLive(
        self, request: pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ServerLiveResponse:
        async def work() -> pb2.ServerLiveResponse:
            return pb2.ServerLiveResponse(live=bool(self._dataplane.live()))

        return await self._serve(context, "ServerLive", work)

    async def ServerReady(
        self, request: pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ServerReadyResponse:
        async def work() -> pb2.ServerReadyResponse:
            return pb2.ServerReadyResponse(ready=bool(self._dataplane.ready()))

        return await self._serve(context, "ServerReady", work)

    async def ModelReady(
        self, request: pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ModelReadyResponse:
        async def work() -> pb2.ModelReadyResponse:
            name, version = v2_grpc.decode_model_ref(request)
            ready = self._dataplane.model_ready(self._credentials(context), name, version, transport="grpc")
            return pb2.ModelReadyResponse(ready=bool(ready))

        return await self._serve(context, "ModelReady", work)

    # ------------------------------------------------------------ metadata

    async def ServerMetadata(
        self, request: pb2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ServerMetadataResponse:
        async def work() -> pb2.ServerMetadataResponse:
            return v2_grpc.encode_server_metadata(self._dataplane.server_metadata())

        return await self._serve(context, "ServerMetadata", work)

    async def ModelMetadata(
        self, request: pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ModelMetadataResponse:
        async def work() -> pb2.ModelMetadataResponse:
            name, version = v2_grpc.decode_model_ref(request)
            meta = self._dataplane.model_metadata(self._credentials(context), name, version, transport="grpc")
            return v2_grpc.encode_model_metadata(meta)

        return await self._serve(context, "ModelMetadata", work)

    # ----------------------------------------------------------- inference

    async def ModelInfer(
        self, request: pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ModelInferResponse:
        """A parsed message (the servicer called directly); the server runs ``infer_message``."""

        async def work() -> pb2.ModelInferResponse:
            ticket = self._dataplane.admit(self._credentials(context), request.model_name, transport="grpc")
            return await self._answer(ticket, request)

        return await self._serve(context, "ModelInfer", work)

    async def infer_message(
        self, data: bytes, context: grpc.aio.ServicerContext, credentials: Credentials
    ) -> pb2.ModelInferResponse:
        """ModelInfer as the server runs it: ``data`` is the message as received, not parsed,
        from a caller already authenticated on its metadata."""

        async def work() -> pb2.ModelInferResponse:
            # scope, rate limit and query budget for the name on the wire, before parsing
            name = grpc_peek.peek_model_name(data)
            ticket = self._dataplane.admit(credentials, name, transport="grpc")
            request = _parse(pb2.ModelInferRequest, data)
            if request.model_name != name:  # a parser keeps the last of repeated fields
                raise InvalidInput("model_name: given more than once, with different values")
            return await self._answer(ticket, request)

        return await self._serve(context, "ModelInfer", work)

    async def _answer(self, ticket: Admission, request: pb2.ModelInferRequest) -> pb2.ModelInferResponse:
        decoded = v2_grpc.decode_infer_request(request, limits=self._limits)
        response = await self._dataplane.infer(ticket, decoded)
        if response.id is None:
            response.id = decoded.id  # the protocol echoes the request id
        return v2_grpc.encode_infer_response(response, raw=v2_grpc.response_uses_raw(request))

    async def read_authenticated(
        self, context: grpc.aio.ServicerContext, method: str, action: str, credentials: Credentials
    ) -> bytes:
        """Authenticate the caller on its metadata, then read the call's message.

        A refused caller is answered before any of its message is read: HTTP/2 flow control
        then lets its stream send one window at most, and the server drops that. Only the
        first message is read; a unary client sends no other (a second one, which only a
        hand-made client could send, is never read, as with a unary registration).
        """

        async def work() -> bytes:
            self._dataplane.authenticate(credentials, transport="grpc", action=action)
            data = await context.read()
            if data is grpc.aio.EOF:
                raise InvalidInput(f"{method}: the call carried no request message")
            return data

        return await self._serve(context, method, work)

    # ---------------------------------------------------- model repository

    async def RepositoryIndex(
        self, request: pb2.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb2.RepositoryIndexResponse:
        async def work() -> pb2.RepositoryIndexResponse:
            # repository_name is ignored: Bastion serves a single repository.
            index = self._dataplane.repository_index(self._credentials(context), transport="grpc")
            return v2_grpc.encode_repository_index(index, request.ready)

        return await self._serve(context, "RepositoryIndex", work)

    async def RepositoryModelLoad(
        self, request: pb2.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb2.RepositoryModelLoadResponse:
        async def work() -> pb2.RepositoryModelLoadResponse:
            name, parameters = v2_grpc.decode_model_load_request(request)
            grant = self._dataplane.admin(self._credentials(context), transport="grpc", action="load", target=name)
            await self._dataplane.repository_action(grant, parameters)
            return pb2.RepositoryModelLoadResponse()

        return await self._serve(context, "RepositoryModelLoad", work)

    async def RepositoryModelUnload(
        self, request: pb2.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb2.RepositoryModelUnloadResponse:
        async def work() -> pb2.RepositoryModelUnloadResponse:
            name, parameters = v2_grpc.decode_model_unload_request(request)
            grant = self._dataplane.admin(self._credentials(context), transport="grpc", action="unload", target=name)
            await self._dataplane.repository_action(grant, parameters)
            return pb2.RepositoryModelUnloadResponse()

        return await self._serve(context, "RepositoryModelUnload", work)


def _parse(request_type: type[M], data: bytes) -> M:
    """The message, or InvalidInput: a client's garbage (corrupt wire format, a string field
    that is not UTF-8) is a client mistake, not the UNKNOWN gRPC's own parsing would answer."""
    try:
        return request_type.FromString(data)
    except DecodeError as exc:
        raise InvalidInput(f"request is not a valid {request_type.DESCRIPTOR.full_name} message: {exc}") from None


# methods whose request message has no fields (health, server metadata): open to everyone,
# and answered without reading the message, so a stranger cannot make the server hold one
_UNREAD = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})
# every other method authenticates before reading; the action its refusal is audited as
_ACTIONS = {
    "ModelReady": "ready",
    "ModelMetadata": "metadata",
    "ModelInfer": "infer",
    "RepositoryIndex": "index",
    "RepositoryModelLoad": "load",
    "RepositoryModelUnload": "unload",
}

Handler = Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Awaitable[Message]]


def _front_door(servicer: GrpcInferenceServicer, name: str, request_type: type[Message]) -> Handler:
    """The stream-unary handler of one method (see the module docstring)."""
    method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]] = getattr(servicer, name)
    if name in _UNREAD:

        async def unread(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Message:
            return await method(request_type(), context)

        return unread
    action = _ACTIONS[name]  # a method missing here is refused at registration, not served open

    async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Message:
        credentials = servicer._credentials(context)
        data = await servicer.read_authenticated(context, name, action, credentials)
        if name == "ModelInfer":
            return await servicer.infer_message(data, context, credentials)
        try:
            request = _parse(request_type, data)
        except InvalidInput as err:
            await _abort(context, err)
        return await method(request, context)

    return handle


def add_servicer_to_server(servicer: GrpcInferenceServicer, server: grpc.aio.Server) -> None:
    """Register every method of ``inference.GRPCInferenceService`` (in place of protoc's
    ``add_GRPCInferenceServiceServicer_to_server``): each as stream-unary with a bytes
    deserializer (``_front_door``), which tritonclient and any unary stub call unchanged."""
    service = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:  # all unary-unary in the .proto
        request_type = getattr(pb2, method.input_type.name)
        response_type = getattr(pb2, method.output_type.name)
        handlers[method.name] = grpc.stream_unary_rpc_method_handler(
            _front_door(servicer, method.name, request_type),
            request_deserializer=None,
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    # Registered handlers skip the generic lookup per call (grpcio >= 1.62).
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service.full_name, handlers)


def _address(host: str, port: int) -> str:
    # A bare IPv6 literal needs brackets before the port.
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def create_grpc_server(
    dataplane: DataPlaneAPI,
    host: str,
    port: int,
    *,
    reuse_port: bool = True,
    max_concurrent_rpcs: int | None = None,
    credentials: grpc.ServerCredentials | None = None,
    client_certs: bool = False,
) -> grpc.aio.Server:
    """A grpc.aio server serving ``inference.GRPCInferenceService``, bound but not started.

    Call it inside the running event loop that will serve it, then ``await server.start()``
    and, on shutdown, ``await server.stop(grace)``.

    The bound port is ``server.bastion_port`` (also ``grpc_server_port(server)``): with
    ``port=0`` the OS picks a free one.

    - the plane's ``limits.max_body_bytes`` caps received and sent messages; gRPC itself answers a larger
      message with RESOURCE_EXHAUSTED when the handler reads it (after the caller is authenticated).
    - ``reuse_port`` sets SO_REUSEPORT so that several worker processes can bind the same
      port and the kernel spreads connections between them.
    - ``max_concurrent_rpcs``: RPCs beyond it are refused with RESOURCE_EXHAUSTED.
    - ``credentials``: TLS (``grpc.ssl_server_credentials``); plaintext when None.
    - ``client_certs``: mutual TLS; the client certificate's fingerprint is passed to
      authentication, so a registered certificate can stand for an API key.
    """
    # grpc.aio binds the server to the loop running now; created without one it would
    # bind to a loop that never runs it.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("create_grpc_server must be called inside a running event loop") from None
    options = [
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", dataplane.limits.max_body_bytes),
        ("grpc.max_send_message_length", dataplane.limits.max_body_bytes),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)
    servicer = GrpcInferenceServicer(dataplane, client_certs=client_certs)
    add_servicer_to_server(servicer, server)
    address = _address(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # recent grpcio raises; older ones return 0
        raise OSError(f"gRPC server cannot bind {address}: {exc}") from exc
    if not bound:
        raise OSError(f"gRPC server cannot bind {address}")
    server.bastion_port = bound  # type: ignore[attr-defined]
    return server


def grpc_server_port(server: grpc.aio.Server) -> int:
    """The port a server made by ``create_grpc_server`` is bound to."""
    port: int = server.bastion_port  # type: ignore[attr-defined]
    return port
