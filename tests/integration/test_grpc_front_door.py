"""gRPC's front door (issue 14): admission before the ModelInfer message is parsed or buffered.

An anonymous caller is refused on its metadata, before the server reads its message, so it
can neither make the server parse its payload nor make it hold many megabytes; an admitted
caller's scope and limits are decided on the model name read off the wire, before the
message is parsed. One real server (key store, one worker) on loopback, real clients.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from bastion.guard.keystore import KeyStore
from bastion.guard.principal import Limits
from bastion.protocol.grpc_v2 import grpc_service_pb2 as pb2
from tests.serverproc import ServerProcess

SERVICE = "/inference.GRPCInferenceService/"
MODEL_INFER = SERVICE + "ModelInfer"
BIG = 60 << 20  # a 60 MB message, under the 64 MiB default limit
CALLERS = 32  # concurrent anonymous uploads
RSS_BUDGET_KIB = 50 << 10  # what they may add to the server's resident memory
TIMEOUT_S = 60.0


class Keys:
    def __init__(self, db: Path) -> None:
        store = KeyStore(db)
        self.admin, _ = store.create_key("ops", role="admin")
        self.alice, _ = store.create_key("alice", models=["simple"])
        self.slow, _ = store.create_key("slow", limits=Limits(rate_per_s=0.001, burst=1))
        store.close()


@pytest.fixture(scope="module")
def door(onnx_demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Keys]]:
    db = tmp_path_factory.mktemp("grpc-door") / "keys.db"
    keys = Keys(db)
    server = ServerProcess(onnx_demo_repo, "--keys", str(db), "--poll-interval", "0", "--workers", "1")
    yield server, keys
    assert server.stop() == 0, server.logs()


@pytest.fixture(scope="module")
def channel(door: tuple[ServerProcess, Keys]) -> Iterator[grpc.Channel]:
    server, _ = door
    with grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", -1)]) as ch:
        yield ch


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def simple_request(model: str = "simple") -> pb2.ModelInferRequest:
    msg = pb2.ModelInferRequest(model_name=model)
    for name in ("INPUT0", "INPUT1"):
        msg.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        msg.raw_input_contents.append(np.arange(16, dtype=np.int32).tobytes())
    return msg


def big_message(model: str = "simple", size: int = BIG) -> bytes:
    msg = pb2.ModelInferRequest(model_name=model)
    msg.inputs.add(name="INPUT0", datatype="UINT8", shape=[size])
    msg.raw_input_contents.append(bytes(size))
    return msg.SerializeToString()


def call(channel: grpc.Channel, data: bytes, metadata: tuple = ()) -> grpc.StatusCode:
    try:
        channel.unary_unary(MODEL_INFER)(data, metadata=metadata, timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def refusal(channel: grpc.Channel, data: bytes, metadata: tuple = (), method: str = MODEL_INFER) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method)(data, metadata=metadata, timeout=TIMEOUT_S)
    return info.value


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


# ------------------------------------------------------------------ anonymous callers


def test_concurrent_anonymous_60mb_uploads_do_not_grow_the_server(door) -> None:  # type: ignore[no-untyped-def]
    """32 anonymous 60 MB ModelInfer calls at once, each on its own connection. Had the
    server received their messages it would hold about 2 GB (3 GB measured before issue 14);
    refused on their metadata, it holds at most a flow-control window of each. First in
    this module, so that the baseline is a server that has not yet handled a large message."""
    server, keys = door
    data = big_message()
    pid = server.proc.pid
    base = peak = rss_kib(pid)
    codes: list[grpc.StatusCode] = []
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            done.wait(0.002)

    def upload() -> None:
        # a connection of its own (no shared subchannel): each has its own flow-control window
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(server.grpc_url, options=options) as ch:
            codes.append(call(ch, data))

    sampler = threading.Thread(target=sample)
    sampler.start()
    uploads = [threading.Thread(target=upload) for _ in range(CALLERS)]
    try:
        for t in uploads:
            t.start()
        for t in uploads:
            t.join(TIMEOUT_S)
    finally:
        done.set()
        sampler.join()
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * CALLERS
    grown = peak - base
    assert grown < RSS_BUDGET_KIB, f"server RSS grew {grown / 1024:.1f} MiB (from {base / 1024:.0f} MiB)"
    with grpc.insecure_channel(server.grpc_url) as ch:  # and it still serves
        assert call(ch, simple_request().SerializeToString(), bearer(keys.admin)) == grpc.StatusCode.OK


def test_an_anonymous_60mb_model_infer_is_unauthenticated(door, channel) -> None:  # type: ignore[no-untyped-def]
    _, keys = door
    data = big_message()
    for metadata in ((), bearer("bst_000000000000_notakey"), (("authorization", "Basic abc"),)):
        err = refusal(channel, data, metadata)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
    # the same message from a key holder is read and parsed: refused by the model, not the door
    err = refusal(channel, data, bearer(keys.admin))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


def test_an_anonymous_caller_never_gets_a_parse_error(door, channel) -> None:  # type: ignore[no-untyped-def]
    """Garbage, a cut-off message, or a valid name followed by 60 MB of garbage: had the
    server parsed any of them it would have answered INVALID_ARGUMENT."""
    _, keys = door
    name = pb2.ModelInferRequest(model_name="simple").SerializeToString()
    for data in (b"\xff\xff\xff", b"\x0a\x7fsimple", name + b"\xff" * BIG):
        err = refusal(channel, data)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
        assert "ModelInferRequest" not in err.details()
    # the same bytes from a key holder: INVALID_ARGUMENT naming the problem, as before
    err = refusal(channel, b"\xff\xff\xff", bearer(keys.admin))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest message" in err.details()
    err = refusal(channel, b"\x0a\x7fsimple", bearer(keys.admin))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field 1 at byte 0 claims 127 bytes, 6 are left" in err.details()


def test_every_method_that_needs_a_key_refuses_before_reading(door, channel) -> None:  # type: ignore[no-untyped-def]
    """The other methods that need a key: a stranger's garbage is UNAUTHENTICATED, not a
    parse error. The health and server-metadata requests have no fields: never read."""
    _, keys = door
    garbage = b"\xff" * (1 << 20)
    for method in ("ModelReady", "ModelMetadata", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"):
        err = refusal(channel, garbage, method=SERVICE + method)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (method, err.details())
        err = refusal(channel, garbage, bearer(keys.admin), method=SERVICE + method)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.details())
        assert "message" in err.details()
    for method, answer in (("ServerLive", pb2.ServerLiveResponse(live=True)),
                           ("ServerReady", pb2.ServerReadyResponse(ready=True))):
        raw = channel.unary_unary(SERVICE + method)(garbage, timeout=TIMEOUT_S)
        assert raw == answer.SerializeToString()
    raw = channel.unary_unary(SERVICE + "ServerMetadata")(garbage, timeout=TIMEOUT_S)
    assert pb2.ServerMetadataResponse.FromString(raw).name == "bastion"


# ------------------------------------------------------------------ admitted callers


def test_scope_and_limits_are_decided_before_the_message_is_parsed(door, channel) -> None:  # type: ignore[no-untyped-def]
    _, keys = door
    # alice may use 'simple' only: a 'digits' message with a garbage tail is refused on scope
    name = pb2.ModelInferRequest(model_name="digits").SerializeToString()
    err = refusal(channel, name + b"\xff" * 1000, bearer(keys.alice))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    # 'slow' has one request in its bucket: the second is refused on the limit, not on the garbage
    assert call(channel, simple_request().SerializeToString(), bearer(keys.slow)) == grpc.StatusCode.OK
    name = pb2.ModelInferRequest(model_name="simple").SerializeToString()
    err = refusal(channel, name + b"\xff" * 1000, bearer(keys.slow))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()


def test_a_second_model_name_cannot_dodge_the_scope(door, channel) -> None:  # type: ignore[no-untyped-def]
    """A parser keeps the last occurrence of a field; admission read the first. Two
    different names are refused, so alice's 'simple' cannot become 'digits'."""
    _, keys = door
    data = simple_request().SerializeToString() + pb2.ModelInferRequest(model_name="digits").SerializeToString()
    err = refusal(channel, data, bearer(keys.alice))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_name" in err.details()
    same = simple_request().SerializeToString() + pb2.ModelInferRequest(model_name="simple").SerializeToString()
    assert call(channel, same, bearer(keys.alice)) == grpc.StatusCode.OK


def test_an_empty_message_needs_a_model_name(door, channel) -> None:  # type: ignore[no-untyped-def]
    _, keys = door
    assert refusal(channel, b"").code() == grpc.StatusCode.UNAUTHENTICATED
    err = refusal(channel, b"", bearer(keys.admin))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "model_name: must not be empty"


def test_tritonclient_plain_and_compressed(door) -> None:  # type: ignore[no-untyped-def]
    server, keys = door
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            t = grpcclient.InferInput(name, [1, 16], "INT32")
            t.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
            inputs.append(t)
        headers = {"authorization": f"Bearer {keys.alice}"}
        for compression in (None, "gzip", "deflate"):
            result = client.infer("simple", inputs, headers=headers, compression_algorithm=compression)
            assert result.as_numpy("OUTPUT0").tolist() == [[2 * i for i in range(16)]]
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", inputs, compression_algorithm="gzip")
        assert str(info.value.status()) == "StatusCode.UNAUTHENTICATED"
    finally:
        client.close()


def test_a_client_stream_is_read_as_one_unary_message(door, channel) -> None:  # type: ignore[no-untyped-def]
    """ModelInfer is unary; on the wire a client stream looks the same. No message is
    INVALID_ARGUMENT (a unary registration waited for the deadline); only the first of
    several is read, as with a unary registration; a stranger is refused either way."""
    _, keys = door
    stream = channel.stream_unary(MODEL_INFER)
    one = simple_request().SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        stream(iter([]), metadata=bearer(keys.admin), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "ModelInfer: the call carried no request message"
    for messages in ([one], [one, one]):
        answer = pb2.ModelInferResponse.FromString(stream(iter(messages), metadata=bearer(keys.admin),
                                                          timeout=TIMEOUT_S))
        assert answer.model_name == "simple"
    with pytest.raises(grpc.RpcError) as info:
        stream(iter([one, one]), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
