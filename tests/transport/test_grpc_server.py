"""The gRPC transport, driven by the official tritonclient against a fake data plane.

The server runs on its own event loop in a background thread (grpc.aio), bound to
127.0.0.1 on an ephemeral port; tritonclient's blocking client drives it from the
test thread. The real data plane is tested end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from bastion.core.errors import InvalidInput, NotFound, Overloaded
from bastion.core.limits import RequestLimits
from bastion.core.metadata import ModelMetadata, TensorSpec
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor
from bastion.dataplane import Credentials
from bastion.dataplane.admin import check_repository_parameters
from bastion.protocol import v2_grpc
from bastion.protocol.grpc_v2 import grpc_service_pb2 as pb2
from bastion.protocol.grpc_v2 import grpc_service_pb2_grpc as pb2_grpc
from bastion.transport.grpc_server import create_grpc_server, grpc_server_port

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

MAX_MESSAGE = 1 << 20


class FakeDataPlane:
    """Just enough of bastion.dataplane.DataPlane: an echo model and models that fail."""

    def __init__(self) -> None:
        self.models = {
            "echo": "READY",
            "busy": "READY",
            "broken": "READY",
            "slow": "READY",
            "idle": "UNAVAILABLE",
        }
        self.transports: list[str] = []
        self.limits = RequestLimits(max_body_bytes=MAX_MESSAGE)

    def _state(self, name: str) -> str:
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"model {name!r} is not in the repository") from None

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "bastion", "version": "0.1.0", "extensions": ["model_repository"]}

    # auth is the data plane's business (tested over a real server); the fake lets everyone in
    def authenticate(self, credentials: Credentials, *, transport: str, action: str) -> None:
        pass

    def admit(self, credentials: Credentials, model: str, *, transport: str) -> Any:
        self.transports.append(transport)
        return model  # the ticket: the fake's infer checks it names the request's model

    def admin(self, credentials: Credentials, *, transport: str, action: str, target: str = "") -> Any:
        return action, target

    def model_ready(self, credentials: Credentials, name: str, version: str | None, **_: Any) -> bool:
        return self._state(name) == "READY"

    def model_metadata(self, credentials: Credentials, name: str, version: str | None, **_: Any) -> ModelMetadata:
        self._state(name)
        return ModelMetadata(
            name=name,
            versions=("1",),
            platform="fake",
            inputs=(TensorSpec("INPUT0", "FP32", (-1, 4)),),
            outputs=(TensorSpec("OUTPUT0", "FP32", (-1, 4)),),
        )

    async def infer(self, ticket: Any, request: InferenceRequest) -> InferenceResponse:
        assert ticket == request.model_name
        self._state(request.model_name)
        if request.model_name == "busy":
            raise Overloaded("model 'busy': queue is full", retry_after=1.2)
        if request.model_name == "broken":
            raise RuntimeError("secret internal detail")
        if request.model_name == "slow":
            await asyncio.sleep(0.5)
        if any(t.name == "BAD" for t in request.inputs):
            raise InvalidInput("input 'BAD': not an input of the model")
        # echo: INPUTn -> OUTPUTn, same datatype, shape and data
        outputs = [
            InferTensor(t.name.replace("INPUT", "OUTPUT"), t.datatype, t.shape, t.data)
            for t in request.inputs
        ]
        return InferenceResponse(request.model_name, "1", outputs, parameters={"echoed": len(outputs)})

    def repository_index(self, credentials: Credentials, **_: Any) -> list[dict[str, Any]]:
        return [
            {"name": n, "version": "1", "state": s, "reason": "" if s == "READY" else "unloaded"}
            for n, s in sorted(self.models.items())
        ]

    async def repository_action(self, grant: tuple[str, str], parameters: Mapping[str, Any] | None = None) -> None:
        action, name = grant
        check_repository_parameters(action, parameters or {})  # the plane's rule, as it is
        self._state(name)
        self.models[name] = "READY" if action == "load" else "UNAVAILABLE"


class ServerThread:
    """A Bastion gRPC server on its own event loop in a daemon thread."""

    def __init__(self, dataplane: FakeDataPlane, **options: Any) -> None:
        self.dataplane = dataplane
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-server", daemon=True)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def _start(self) -> int:
        self.server = create_grpc_server(self.dataplane, "127.0.0.1", 0, **self.options)
        await self.server.start()
        return grpc_server_port(self.server)

    def start(self) -> ServerThread:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def server():
    running = ServerThread(FakeDataPlane()).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    triton = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 8 * MAX_MESSAGE)]
    )
    yield pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def status_of(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.status()


# ------------------------------------------------------------------ health & metadata


def test_health(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("echo")
    assert not client.is_model_ready("idle")


def test_server_metadata(client):
    metadata = client.get_server_metadata(as_json=True)
    assert metadata == {"name": "bastion", "version": "0.1.0", "extensions": ["model_repository"]}


def test_model_metadata(client):
    metadata = client.get_model_metadata("echo")
    assert metadata.name == "echo" and list(metadata.versions) == ["1"] and metadata.platform == "fake"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("INPUT0", "FP32", [-1, 4])]


def test_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as info:
        client.is_model_ready("nope")
    assert status_of(info) == "StatusCode.NOT_FOUND"
    assert "'nope' is not in the repository" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert status_of(info) == "StatusCode.NOT_FOUND"


# ------------------------------------------------------------------ inference


@pytest.mark.parametrize(
    ("datatype", "array"),
    [
        ("INT32", np.arange(-8, 8, dtype=np.int32).reshape(1, 16)),
        ("FP32", np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)),
        ("BYTES", np.array([[b"abc", b"", "h\u00e9".encode(), b"\x00\xff"]], dtype=object)),
        ("FP16", np.array([[0.5, -1.0, 65504.0, np.inf]], dtype=np.float16)),
        ("BOOL", np.array([[True, False, True]])),
        ("UINT64", np.array([0, 2**64 - 1], dtype=np.uint64)),
    ],
)
def test_infer_round_trip(client, server, datatype, array):
    infer_input = grpcclient.InferInput("INPUT0", list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    result = client.infer("echo", [infer_input], request_id="req-7")
    out = result.as_numpy("OUTPUT0")
    assert out.shape == array.shape
    if datatype == "BYTES":
        assert out.tolist() == array.tolist()
    else:
        assert out.dtype == array.dtype
        np.testing.assert_array_equal(out, array)
    response = result.get_response()
    assert response.id == "req-7" and response.model_version == "1"
    assert response.parameters["echoed"].int64_param == 1
    assert server.dataplane.transports[-1] == "grpc"


def test_infer_several_inputs_and_requested_outputs(client):
    a = np.ones((2, 3), dtype=np.int64)
    b = np.full((1,), 2.5, dtype=np.float64)
    inputs = [grpcclient.InferInput("INPUT0", [2, 3], "INT64"), grpcclient.InferInput("INPUT1", [1], "FP64")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("echo", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), b)


def test_typed_request_gets_typed_response(stub):
    request = pb2.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="INPUT0", datatype="INT16", shape=[3])
    tensor.contents.int_contents.extend([-1, 0, 300])
    response = stub.ModelInfer(request)
    assert not response.raw_output_contents
    assert list(response.outputs[0].contents.int_contents) == [-1, 0, 300]
    decoded = v2_grpc.decode_infer_response(response)
    assert decoded.outputs[0].data.dtype == np.int16


# ------------------------------------------------------------------ errors


def test_bad_request_is_invalid_argument_with_field_message(stub):
    request = pb2.ModelInferRequest(model_name="echo")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    request.raw_input_contents.append(b"\x00" * 60)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        info.value.details() == "input 'INPUT0': raw content is 60 bytes but shape [1,16] of INT32 needs 64"
    )


def test_data_plane_invalid_input_and_empty_name(client):
    bad = grpcclient.InferInput("BAD", [1], "INT32")
    bad.set_data_from_numpy(np.zeros(1, dtype=np.int32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("echo", [bad])
    assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == "input 'BAD': not an input of the model"
    with pytest.raises(InferenceServerException) as info:
        client.infer("", [bad])
    assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == "model_name: must not be empty"


def test_unknown_model_infer_is_not_found(client):
    infer_input = grpcclient.InferInput("INPUT0", [1], "FP32")
    infer_input.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope", [infer_input])
    assert status_of(info) == "StatusCode.NOT_FOUND"


def test_overloaded_is_unavailable_with_retry_after(client, stub):
    infer_input = grpcclient.InferInput("INPUT0", [1], "FP32")
    infer_input.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("busy", [infer_input])
    assert status_of(info) == "StatusCode.UNAVAILABLE"
    assert info.value.message() == "model 'busy': queue is full"
    # tritonclient drops trailing metadata, so read it with a plain stub
    request = pb2.ModelInferRequest(model_name="busy")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[0])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ("retry-after", "2") in tuple(err.value.trailing_metadata())  # 1.2 s, rounded up


def test_unexpected_exception_is_internal_and_logged(client, caplog):
    infer_input = grpcclient.InferInput("INPUT0", [1], "FP32")
    infer_input.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with (
        caplog.at_level(logging.ERROR, logger="bastion.grpc"),
        pytest.raises(InferenceServerException) as info,
    ):
        client.infer("broken", [infer_input])
    assert status_of(info) == "StatusCode.INTERNAL"
    assert "secret" not in info.value.message()  # details stay in the log
    [record] = [r for r in caplog.records if r.name == "bastion.grpc"]
    assert record.exc_info is not None and "secret internal detail" in str(record.exc_info[1])


def test_unparsable_message_is_invalid_argument(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest message" in info.value.details()


def test_oversized_message_is_resource_exhausted(stub):
    request = pb2.ModelInferRequest(model_name="echo")
    request.inputs.add(name="INPUT0", datatype="UINT8", shape=[2 * MAX_MESSAGE])
    request.raw_input_contents.append(bytes(2 * MAX_MESSAGE))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unimplemented_triton_method(client):
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("echo")
    assert status_of(info) == "StatusCode.UNIMPLEMENTED"


def test_still_serving_after_bad_requests(client, stub):
    # runs after the error tests above (file order): the server must be unharmed
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(pb2.ModelInferRequest())
    assert client.is_server_live()
    infer_input = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
    infer_input.set_data_from_numpy(np.array([[1.0, 2.0]], dtype=np.float32))
    np.testing.assert_array_equal(client.infer("echo", [infer_input]).as_numpy("OUTPUT0"), [[1.0, 2.0]])


# ------------------------------------------------------------------ model repository


def test_repository_index_load_unload(client):
    index = client.get_model_repository_index()
    states = {m.name: (m.version, m.state, m.reason) for m in index.models}
    assert states["idle"] == ("1", "UNAVAILABLE", "unloaded")
    assert states["echo"] == ("1", "READY", "")

    client.load_model("idle")
    assert client.is_model_ready("idle")
    client.unload_model("idle")
    assert not client.is_model_ready("idle")

    with pytest.raises(InferenceServerException) as info:
        client.load_model("nope")
    assert status_of(info) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.load_model("idle", config='{"backend": "python"}')
    assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
    assert "only from its model repository" in info.value.message()
    assert not client.is_model_ready("idle")


def test_repository_index_ready_only(stub):
    names = [m.name for m in stub.RepositoryIndex(pb2.RepositoryIndexRequest(ready=True)).models]
    assert "echo" in names and "idle" not in names


# ------------------------------------------------------------------ the factory


def test_factory_needs_a_running_loop():
    with pytest.raises(RuntimeError, match="inside a running event loop"):
        create_grpc_server(FakeDataPlane(), "127.0.0.1", 0)


def test_concurrency_limit():
    """Plain asyncio.run: an aio client against a server on the same loop."""

    async def scenario() -> list[str]:
        server = create_grpc_server(FakeDataPlane(), "127.0.0.1", 0, max_concurrent_rpcs=1)
        await server.start()
        request = pb2.ModelInferRequest(model_name="slow")  # holds its RPC for 0.5 s
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[0])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_server_port(server)}") as channel:
                stub = pb2_grpc.GRPCInferenceServiceStub(channel)
                results = await asyncio.gather(
                    stub.ModelInfer(request, timeout=10),
                    stub.ModelInfer(request, timeout=10),
                    return_exceptions=True,
                )
        finally:
            await server.stop(None)
        return sorted(r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in results)

    assert asyncio.run(scenario()) == ["OK", "RESOURCE_EXHAUSTED"]


def test_reuse_port_and_bind_errors():
    async def scenario() -> None:
        first = create_grpc_server(FakeDataPlane(), "127.0.0.1", 0)
        await first.start()
        port = grpc_server_port(first)
        try:
            # SO_REUSEPORT: a second worker process can share the port ...
            second = create_grpc_server(FakeDataPlane(), "127.0.0.1", port, reuse_port=True)
            await second.start()
            assert grpc_server_port(second) == port
            await second.stop(None)
            # ... but a server that refuses to share it cannot bind
            with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}"):
                create_grpc_server(FakeDataPlane(), "127.0.0.1", port, reuse_port=False)
        finally:
            await first.stop(None)

    asyncio.run(scenario())
