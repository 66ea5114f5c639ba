from __future__ import annotations

import asyncio
import datetime
import shutil
import struct
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from bastion.confidential import attestation
from bastion.confidential.attestation import Attestation, AttestationError, MeasurementPolicy
from bastion.confidential.channel import (
    ChannelClosed,
    ChannelError,
    SecureChannel,
    accept_channel,
    connect_channel,
    read_frame,
    write_frame,
)
from bastion.confidential.identity import WorkerIdentity

MEASUREMENT = "ab" * 32
POLICY = MeasurementPolicy(expected={"measurement": MEASUREMENT})

# ------------------------------------------------------------------ a test-only evidence kind
# Unsigned, so it proves nothing: these tests are about the channel, and verify_evidence
# applies nonce, freshness and measurement checks to it exactly as to real evidence.


class FakeProducer:
    def __init__(self, measurement: str = MEASUREMENT, kind: str = "test") -> None:
        self.measurement = measurement
        self.kind = kind

    def evidence(self, public_key: bytes, nonce: bytes | None, user_data: bytes | None = None) -> bytes:
        now = datetime.datetime.now(datetime.timezone.utc).timestamp()
        return cbor2.dumps({"pk": public_key, "nonce": nonce, "m": self.measurement, "ts": now})


class FakeVerifier:
    kind = "test"

    def verify(self, evidence: bytes, *, now: datetime.datetime | None = None) -> Attestation:
        doc = cbor2.loads(evidence)
        return Attestation(
            kind="test",
            measurement={"measurement": doc["m"]},
            public_key=doc["pk"],
            nonce=doc["nonce"],
            user_data=None,
            timestamp=datetime.datetime.fromtimestamp(doc["ts"], datetime.timezone.utc),
        )


@pytest.fixture(autouse=True)
def _test_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(attestation._VERIFIERS, "test", f"{__name__}:FakeVerifier")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short on purpose: a Unix socket path must fit in ~100 bytes, pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="bch-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ harness

Hook = Callable[[int, bytes], list[bytes]]


class Harness:
    """A worker on a Unix socket, optionally behind a frame-level man in the middle."""

    def __init__(self, directory: Path, identity: WorkerIdentity, *, max_frame_bytes: int = 1 << 24) -> None:
        self.directory = directory
        self.identity = identity
        self.max_frame_bytes = max_frame_bytes
        self.accepted: asyncio.Queue[SecureChannel | BaseException] = asyncio.Queue()
        self.servers: list[asyncio.AbstractServer] = []
        self.to_worker: Hook | None = None
        self.to_front: Hook | None = None

    async def start(self) -> None:
        self.servers.append(await asyncio.start_unix_server(self._worker, path=str(self.directory / "w")))
        self.servers.append(await asyncio.start_unix_server(self._proxy, path=str(self.directory / "p")))

    async def stop(self) -> None:
        for server in self.servers:
            server.close()

    async def _worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            channel = await accept_channel(
                reader, writer, identity=self.identity, max_frame_bytes=self.max_frame_bytes, timeout_s=5
            )
        except BaseException as exc:  # the test looks at it
            await self.accepted.put(exc)
        else:
            await self.accepted.put(channel)

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        w_reader, w_writer = await asyncio.open_unix_connection(str(self.directory / "w"))
        await asyncio.gather(_pump(reader, w_writer, self.to_worker), _pump(w_reader, writer, self.to_front))

    async def raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(self.directory / "w"))

    async def connect(
        self, policy: MeasurementPolicy = POLICY, *, via_proxy: bool = False
    ) -> tuple[SecureChannel, Attestation]:
        path = self.directory / ("p" if via_proxy else "w")
        reader, writer = await asyncio.open_unix_connection(str(path))
        return await connect_channel(reader, writer, policy=policy, max_frame_bytes=self.max_frame_bytes, timeout_s=5)

    async def worker_channel(self) -> SecureChannel:
        got = await asyncio.wait_for(self.accepted.get(), 5)
        assert isinstance(got, SecureChannel), got
        return got

    async def worker_error(self) -> BaseException:
        got = await asyncio.wait_for(self.accepted.get(), 5)
        assert isinstance(got, BaseException), got
        return got


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hook: Hook | None) -> None:
    index = 0
    try:
        while True:
            frame = await read_frame(reader, 1 << 30)
            for out in hook(index, frame) if hook else [frame]:
                await write_frame(writer, out)
            index += 1
    except ChannelError:
        pass
    finally:
        writer.close()


def run(directory: Path, scenario: Callable[[Harness], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        harness = Harness(directory, kwargs.pop("identity", None) or WorkerIdentity.generate(FakeProducer()), **kwargs)
        await harness.start()
        try:
            await asyncio.wait_for(scenario(harness), 10)
        finally:
            await harness.stop()

    asyncio.run(main())


# Handshake frames through the proxy: front->worker hello (0), key (1); worker->front
# evidence (0), ready (1). The first application frame is index 2 either way.
FIRST = 2


# ------------------------------------------------------------------ handshake and messages


def test_handshake_and_messages_both_ways(sock_dir: Path) -> None:
    async def scenario(h: Harness) -> None:
        front, att = await h.connect()
        worker = await h.worker_channel()
        assert att.kind == "test" and att.public_key == h.identity.public_key
        assert att.measurement == {"measurement": MEASUREMENT}
        big = bytes(range(256)) * 8192  # 2 MiB: more than the stream buffers
        # send() waits for the transport to drain, so the peer must be reading meanwhile
        _, got = await asyncio.gather(front.send({"op": "infer", "data": big, "n": 1}), worker.recv())
        assert got == {"op": "infer", "data": big, "n": 1}
        view = memoryview(bytearray(b"view")).cast("B")
        await worker.send({"outputs": [b"x", view], "id": 7})
        await worker.send({"id": 8})
        assert await front.recv() == {"outputs": [b"x", b"view"], "id": 7}  # a memoryview goes as bytes
        assert await front.recv() == {"id": 8}
        front.close()
        with pytest.raises(ChannelClosed):
            await worker.recv()
        with pytest.raises(ChannelClosed):
            await front.send({"late": True})

    run(sock_dir, scenario)


def test_concurrent_senders_never_reorder_frames(sock_dir: Path) -> None:
    async def scenario(h: Harness) -> None:
        front, _ = await h.connect()
        worker = await h.worker_channel()
        # Big and small messages alternate: an implementation that let anything slow (drain,
        # encryption in a thread) come between taking a counter and writing the frame would
        # write some small frame ahead of a big one taken earlier, and the receiver would fail.
        big, small = b"\x5a" * 1_000_000, b"s"

        async def receive(channel: SecureChannel, n: int) -> set[int]:
            return {(await channel.recv())["i"] for _ in range(n)}

        sends = [front.send({"i": i, "p": big if i % 2 == 0 else small}) for i in range(40)]
        sends += [worker.send({"i": i, "p": big if i % 2 == 0 else small}) for i in range(40)]
        *_, at_worker, at_front = await asyncio.gather(*sends, receive(worker, 40), receive(front, 40))
        assert at_worker == at_front == set(range(40))

    run(sock_dir, scenario)


def test_oversized_message_is_refused_by_the_sender_and_the_channel_stays_usable(sock_dir: Path) -> None:
    async def scenario(h: Harness) -> None:
        front, _ = await h.connect()
        worker = await h.worker_channel()
        with pytest.raises(ChannelError, match=r"more than the 65536-byte frame limit"):
            await front.send({"p": b"x" * 70_000})
        await front.send({"p": b"ok"})
        assert await worker.recv() == {"p": b"ok"}

    run(sock_dir, scenario, max_frame_bytes=65536)


# ------------------------------------------------------------------ an active attacker on the stream


def _flip_first(index: int, frame: bytes) -> list[bytes]:
    if index != FIRST:
        return [frame]
    tampered = bytearray(frame)
    tampered[len(tampered) // 2] ^= 0x01
    return [bytes(tampered)]


def _replay_first(index: int, frame: bytes) -> list[bytes]:
    return [frame, frame] if index == FIRST else [frame]


def _drop_first(index: int, frame: bytes) -> list[bytes]:
    return [] if index == FIRST else [frame]


def _swap_first_two() -> Hook:
    held: list[bytes] = []

    def hook(index: int, frame: bytes) -> list[bytes]:
        if index == FIRST:
            held.append(frame)
            return []
        if index == FIRST + 1:
            return [frame, *held]
        return [frame]

    return hook


@pytest.mark.parametrize(
    ("hook", "good_before"),
    [(_flip_first, 0), (_replay_first, 1), (_drop_first, 0), (_swap_first_two(), 0)],
    ids=["tampered", "replayed", "dropped", "reordered"],
)
def test_tampered_replayed_dropped_or_reordered_frames_break_the_channel(
    sock_dir: Path, hook: Hook, good_before: int
) -> None:
    async def scenario(h: Harness) -> None:
        h.to_worker = hook
        front, _ = await h.connect(via_proxy=True)
        worker = await h.worker_channel()
        await front.send({"i": 0})
        await front.send({"i": 1})
        for i in range(good_before):
            assert await worker.recv() == {"i": i}
        with pytest.raises(ChannelError, match=rf"frame {good_before} failed authentication") as err:
            await worker.recv()
        assert not isinstance(err.value, ChannelClosed)
        assert not worker.usable
        with pytest.raises(ChannelError, match="channel unusable after an earlier failure"):
            await worker.recv()
        with pytest.raises(ChannelError, match="channel unusable"):
            await worker.send({"i": 2})

    run(sock_dir, scenario)


def test_frames_from_one_direction_do_not_open_in_the_other(sock_dir: Path) -> None:
    """Per-direction keys: a worker->front frame reflected back to the worker does not open."""

    async def scenario(h: Harness) -> None:
        reflected: list[bytes] = []
        h.to_front = lambda i, frame: (reflected.append(frame), [frame])[1]
        h.to_worker = lambda i, frame: [reflected[1]] if i == FIRST else [frame]  # the "ready" frame, counter 0
        front, _ = await h.connect(via_proxy=True)
        worker = await h.worker_channel()
        await front.send({"i": 0})
        with pytest.raises(ChannelError, match="frame 0 failed authentication"):
            await worker.recv()

    run(sock_dir, scenario)


def test_evidence_swapped_for_another_keys_does_not_yield_a_channel(sock_dir: Path) -> None:
    """An attacker who substitutes evidence for its own key (same measurement: the fake kind
    is unsigned) gets the secret sealed to itself; the worker cannot open it, so it never
    confirms, and the front does not get a channel."""
    impostor = WorkerIdentity.generate(FakeProducer())

    def swap(index: int, frame: bytes) -> list[bytes]:
        if index != 0:
            return [frame]
        message = cbor2.loads(frame)
        nonce = cbor2.loads(message["evidence"])["nonce"]
        message["evidence"] = impostor.evidence(nonce)[1]
        return [cbor2.dumps(message)]

    async def scenario(h: Harness) -> None:
        h.to_front = swap
        with pytest.raises(ChannelError, match="the worker closed the channel instead of confirming the key"):
            await h.connect(via_proxy=True)
        error = await h.worker_error()
        assert isinstance(error, ChannelError) and "handshake key: ciphertext does not open" in str(error)

    run(sock_dir, scenario)


# ------------------------------------------------------------------ frame limits


def test_read_frame_refuses_an_oversized_length_before_reading_it() -> None:
    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack(">I", 1_000_001))  # and no payload, nor EOF: reading it would hang
        with pytest.raises(ChannelError, match=r"frame of 1000001 bytes announced, more than the 1000000 accepted"):
            await asyncio.wait_for(read_frame(reader, 1_000_000), 1)

    asyncio.run(scenario())


def test_read_frame_eof_and_truncation() -> None:
    async def read(data: bytes) -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader, 100)

    assert asyncio.run(read(b"\x00\x00\x00\x03abc")) == b"abc"
    assert asyncio.run(read(b"\x00\x00\x00\x00")) == b""
    with pytest.raises(ChannelClosed, match="the peer closed the channel"):
        asyncio.run(read(b""))
    with pytest.raises(ChannelError, match="after 2 bytes of a header"):
        asyncio.run(read(b"\x00\x00"))
    with pytest.raises(ChannelError, match=r"after 1 of 3 bytes"):
        asyncio.run(read(b"\x00\x00\x00\x03a"))


def test_worker_refuses_an_oversized_hello_without_reading_it(sock_dir: Path) -> None:
    async def scenario(h: Harness) -> None:
        reader, writer = await h.raw()
        writer.write(struct.pack(">I", 2**31))  # a 2 GiB "hello", never sent
        await writer.drain()
        error = await h.worker_error()
        assert isinstance(error, ChannelError) and "frame of 2147483648 bytes announced" in str(error)
        assert await reader.read() == b""  # the worker hung up
        writer.close()

    run(sock_dir, scenario)


def test_front_refuses_an_oversized_frame_on_an_open_channel(sock_dir: Path) -> None:
    async def scenario(h: Harness) -> None:
        front, _ = await h.connect()
        worker = await h.worker_channel()
        worker._writer.write(struct.pack(">I", 2**30))  # a 1 GiB frame announced, never sent
        with pytest.raises(ChannelError, match=r"frame of 1073741824 bytes announced, more than the 16777216"):
            await asyncio.wait_for(front.recv(), 2)
        assert not front.usable

    run(sock_dir, scenario)


# ------------------------------------------------------------------ attestation policy


def test_wrong_expected_measurement_refuses_the_handshake(sock_dir: Path) -> None:
    async def scenario(h: Harness) -> None:
        policy = MeasurementPolicy(expected={"measurement": "cd" * 32})
        with pytest.raises(AttestationError, match=rf"expected {'cd' * 32}, the worker attests {MEASUREMENT}"):
            await h.connect(policy)
        error = await h.worker_error()
        assert isinstance(error, ChannelError)  # the front hung up before sending a key

    run(sock_dir, scenario)


def test_dev_evidence_is_refused_without_allow_dev(sock_dir: Path) -> None:
    async def scenario(h: Harness) -> None:
        with pytest.raises(AttestationError, match="dev evidence is self-signed"):
            await h.connect()
        await h.worker_error()

    run(sock_dir, scenario, identity=WorkerIdentity.generate(FakeProducer(kind="dev")))


def test_real_dev_evidence_is_accepted_when_allowed(sock_dir: Path) -> None:
    dev = pytest.importorskip("bastion.confidential.dev_evidence")
    measurement = bytes.fromhex(MEASUREMENT)

    async def scenario(h: Harness) -> None:
        with pytest.raises(AttestationError, match="dev evidence"):
            await h.connect()
        await h.worker_error()
        front, att = await h.connect(MeasurementPolicy(expected={"measurement": MEASUREMENT}, allow_dev=True))
        assert att.kind == "dev" and att.public_key == h.identity.public_key
        worker = await h.worker_channel()
        await worker.send({"ok": True})
        assert await front.recv() == {"ok": True}

    run(sock_dir, scenario, identity=WorkerIdentity.generate(dev.DevEvidenceProducer(measurement)))


# ------------------------------------------------------------------ malformed handshakes


def test_worker_refuses_a_hello_of_another_version(sock_dir: Path) -> None:
    async def scenario(h: Harness) -> None:
        _, writer = await h.raw()
        await write_frame(writer, cbor2.dumps({"op": "hello", "v": 2, "nonce": b"n" * 32}))
        error = await h.worker_error()
        assert isinstance(error, ChannelError) and "handshake hello: version 2 is not supported" in str(error)
        writer.close()

    run(sock_dir, scenario)


def test_worker_refuses_a_short_nonce(sock_dir: Path) -> None:
    async def scenario(h: Harness) -> None:
        _, writer = await h.raw()
        await write_frame(writer, cbor2.dumps({"op": "hello", "v": 1, "nonce": b"n" * 8}))
        error = await h.worker_error()
        assert "hello.nonce: expected 32 bytes, got 8" in str(error)
        writer.close()

    run(sock_dir, scenario)


def test_handshake_times_out_against_a_silent_peer(sock_dir: Path) -> None:
    async def scenario() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never answers, waits for EOF

        server = await asyncio.start_unix_server(silent, path=str(sock_dir / "s"))
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock_dir / "s"))
            with pytest.raises(ChannelError, match=r"front handshake timed out after 0.2 s"):
                await connect_channel(reader, writer, policy=POLICY, timeout_s=0.2)
            assert writer.is_closing()
        finally:
            server.close()

    asyncio.run(scenario())
