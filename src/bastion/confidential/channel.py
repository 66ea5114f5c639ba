"""The front <-> trusted worker channel: framed, attested, encrypted.

Any ordered byte stream carries it (a Unix socket here, vsock into an enclave), through
asyncio's StreamReader/StreamWriter, so nothing here is specific to one transport.

Framing: every frame is a 4-byte big-endian length, then that many bytes. A length
over the receiver's limit is refused before a byte of the payload is read.

Handshake (front = client, worker = server; each message is one frame of CBOR):

1. front -> worker  ``{"op": "hello", "v": 1, "nonce": 32 random bytes}``
2. worker -> front  ``{"op": "evidence", "v": 1, "kind": str, "evidence": bytes}``
   from ``identity.evidence(nonce)``; the front verifies it against its
   :class:`MeasurementPolicy` and learns the worker's attested X25519 key.
3. front -> worker  ``{"op": "key", "v": 1, "sealed": HPKE(secret)}``: a fresh 32-byte
   secret sealed to the attested key, info ``b"bastion-channel-v1\\x00" || nonce``.
4. Both derive, with HKDF-SHA256 over the secret and salt = the transcript hash,
   one AES-256-GCM key per direction. The worker then sends the first encrypted
   frame, ``{"op": "ready"}``: the front only returns a channel once the attested
   worker has proved it could open the secret.

Transcript hash: SHA-256 of ``b"bastion-channel-v1 transcript\\x00"`` followed by
nonce, kind (UTF-8), evidence and sealed, each preceded by its length as 4 bytes big-endian.
Key for each direction: ``HKDF-SHA256(secret, salt=transcript, info=b"bastion-channel-v1 "
+ b"front->worker" | b"worker->front", 32 bytes)``.

Encrypted frames: ``AES-256-GCM(key, nonce = 4 zero bytes || counter as 8 bytes
big-endian, CBOR(message), aad = b"bastion-channel-v1 frame")``, the counter starting at
0 in each direction and going up by one per frame. The receiver decrypts with the
counter it expects, so a replayed, reordered, dropped or altered frame fails
authentication, and the channel is unusable from then on: nothing after a gap can be
trusted to mean what the sender meant.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bastion.confidential.attestation import (
    MAX_EVIDENCE_BYTES,
    Attestation,
    AttestationError,
    MeasurementPolicy,
    verify_evidence,
)
from bastion.confidential.identity import UnsealError, WorkerIdentity, seal_to
from bastion.confidential.tensor_codec import dumps_cbor, loads_cbor
from bastion.core.errors import BastionError, InvalidInput

__all__ = [
    "MAX_FRAME_BYTES",
    "ChannelClosed",
    "ChannelError",
    "SecureChannel",
    "accept_channel",
    "connect_channel",
    "read_frame",
    "write_frame",
]

MAX_FRAME_BYTES = 256 * 1024 * 1024
_U32_MAX = 2**32 - 1
_HEADER = struct.Struct(">I")
VERSION = 1
SECRET_BYTES = 32
HELLO_NONCE_BYTES = 32
CHANNEL_INFO = b"bastion-channel-v1\x00"
_TRANSCRIPT_LABEL = b"bastion-channel-v1 transcript\x00"
_KEY_INFO = b"bastion-channel-v1 "
_FRAME_AAD = b"bastion-channel-v1 frame"
_TAG_BYTES = 16
# Handshake frames are small and come before either side has authenticated anything,
# so they get tight limits of their own, whatever max_frame_bytes allows later.
_HELLO_MAX_BYTES = 1024
_KEY_MAX_BYTES = 1024
_EVIDENCE_MSG_MAX_BYTES = MAX_EVIDENCE_BYTES + 4096
_READY_MAX_BYTES = 1024
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0

_T = TypeVar("_T")


class ChannelError(BastionError):
    """The channel failed: framing, handshake, authentication or the connection.

    What a client is told (typically 503: the worker is unreachable) is the caller's call."""


class ChannelClosed(ChannelError):
    """The peer closed the stream cleanly, between frames."""


# ------------------------------------------------------------------ framing


def _check_max(max_frame_bytes: int) -> int:
    if not isinstance(max_frame_bytes, int) or not _TAG_BYTES < max_frame_bytes <= _U32_MAX:
        raise ValueError(f"max_frame_bytes must be an int in {_TAG_BYTES + 1}..{_U32_MAX}")
    return max_frame_bytes


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One frame's payload. :class:`ChannelClosed` on EOF before a frame starts,
    :class:`ChannelError` on a length over ``max_bytes`` (before reading it) or a
    stream that ends inside a frame."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise ChannelClosed("the peer closed the channel") from None
        raise ChannelError(f"truncated frame: the stream ended after {len(exc.partial)} bytes of a header") from None
    except OSError as exc:
        raise ChannelError(f"connection lost: {exc}") from None
    (length,) = _HEADER.unpack(header)
    if length > max_bytes:
        raise ChannelError(f"frame of {length} bytes announced, more than the {max_bytes} accepted; not reading it")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ChannelError(f"truncated frame: the stream ended after {len(exc.partial)} of {length} bytes") from None
    except OSError as exc:
        raise ChannelError(f"connection lost: {exc}") from None


async def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Write one frame and wait for the transport to take it (drain)."""
    if len(payload) > _U32_MAX:
        raise ChannelError(f"frame of {len(payload)} bytes does not fit a 4-byte length")
    writer.writelines((_HEADER.pack(len(payload)), payload))
    try:
        await writer.drain()
    except OSError as exc:
        raise ChannelError(f"connection lost: {exc}") from None


def _handshake_message(frame: bytes, op: str, fields: Mapping[str, type]) -> dict[str, Any]:
    """Parse a handshake frame that must be exactly ``{"op": op, "v": 1, **fields}``."""
    try:
        message = loads_cbor(frame, f"handshake {op}", max_depth=4)
    except InvalidInput as exc:
        raise ChannelError(exc.message) from None
    expected = {"op", "v", *fields}
    if not isinstance(message, dict) or set(message) != expected:
        raise ChannelError(f"handshake {op}: expected a map of {', '.join(sorted(expected))}")
    if message["op"] != op:
        raise ChannelError(f"handshake: expected {op!r}, got {str(message['op'])[:40]!r}")
    if type(message["v"]) is not int or message["v"] != VERSION:
        raise ChannelError(f"handshake {op}: version {message['v']!r:.40} is not supported; this side speaks {VERSION}")
    for name, kind in fields.items():
        if not isinstance(message[name], kind):
            raise ChannelError(f"handshake {op}.{name}: expected {kind.__name__}, got {type(message[name]).__name__}")
    return message


def _transcript(nonce: bytes, kind: str, evidence: bytes, sealed: bytes) -> bytes:
    digest = hashlib.sha256(_TRANSCRIPT_LABEL)
    for part in (nonce, kind.encode("utf-8"), evidence, sealed):
        digest.update(_HEADER.pack(len(part)))
        digest.update(part)
    return digest.digest()


def _direction_keys(secret: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(front->worker key, worker->front key)."""

    def derive(label: bytes) -> bytes:
        return HKDF(algorithm=SHA256(), length=32, salt=transcript, info=_KEY_INFO + label).derive(secret)

    return derive(b"front->worker"), derive(b"worker->front")


# ------------------------------------------------------------------ the channel


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")


class SecureChannel:
    """An established channel: ``send``/``recv`` whole messages (CBOR maps)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        send_key: bytes,
        recv_key: bytes,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)
        self._send_counter = 0
        self._recv_counter = 0
        self._max = _check_max(max_frame_bytes)
        self._recv_lock = asyncio.Lock()  # two readers interleaving on one stream would split frames
        self._failure: ChannelError | None = None

    @property
    def max_frame_bytes(self) -> int:
        return self._max

    @property
    def usable(self) -> bool:
        return self._failure is None

    def _fail(self, error: ChannelError) -> ChannelError:
        if self._failure is None:
            self._failure = error
        self._writer.close()
        return error

    def _check_usable(self) -> None:
        failure = self._failure
        if failure is not None:
            if isinstance(failure, ChannelClosed):
                raise ChannelClosed(failure.message)
            raise ChannelError(f"channel unusable after an earlier failure: {failure.message}")

    async def send(self, message: Mapping[str, Any]) -> None:
        """Encrypt and write one message. Thread-unsafe, task-safe: concurrent senders
        each get the counter of the frame they write. Byte strings may be given as
        C-contiguous ``memoryview``s (sent as CBOR byte strings) to spare a copy."""
        self._check_usable()
        if not isinstance(message, Mapping):
            raise TypeError("a channel message is a map")
        payload = dumps_cbor(dict(message))
        size = len(payload) + _TAG_BYTES
        if size > self._max:
            # Refused here, before a counter is spent; the channel stays usable.
            raise ChannelError(f"message of {size} bytes encrypted is more than the {self._max}-byte frame limit")
        # From taking the counter to handing the frame to the transport there is no await,
        # so frames reach the stream in counter order however many tasks are sending.
        frame = bytearray(_HEADER.size + size)
        _HEADER.pack_into(frame, 0, size)
        self._send.encrypt_into(_nonce(self._send_counter), payload, _FRAME_AAD, memoryview(frame)[_HEADER.size :])
        self._send_counter += 1
        del payload
        self._writer.write(frame)
        try:
            await self._writer.drain()
        except OSError as exc:
            raise self._fail(ChannelError(f"connection lost: {exc}")) from None

    async def recv(self) -> dict[str, Any]:
        """The next message. :class:`ChannelClosed` when the peer closed cleanly; any
        other failure is a :class:`ChannelError` and leaves the channel unusable."""
        async with self._recv_lock:
            self._check_usable()
            try:
                frame = await read_frame(self._reader, self._max)
            except ChannelError as exc:
                raise self._fail(exc) from None
            try:
                plaintext = self._recv.decrypt(_nonce(self._recv_counter), frame, _FRAME_AAD)
            except InvalidTag:
                raise self._fail(
                    ChannelError(
                        f"frame {self._recv_counter} failed authentication: tampered with, replayed, reordered or "
                        "a frame was dropped"
                    )
                ) from None
            self._recv_counter += 1
            del frame
            try:
                message = loads_cbor(plaintext, f"channel frame {self._recv_counter - 1}")
            except InvalidInput as exc:
                raise self._fail(ChannelError(exc.message)) from None
            if not isinstance(message, dict):
                raise self._fail(ChannelError(f"channel message: expected a map, got {type(message).__name__}"))
            return message

    def close(self) -> None:
        if self._failure is None:
            self._failure = ChannelClosed("the channel was closed")
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


# ------------------------------------------------------------------ handshake


async def _bounded(writer: asyncio.StreamWriter, timeout_s: float, step: Callable[[], Awaitable[_T]], side: str) -> _T:
    """Run a handshake with a deadline; on any failure the stream is closed."""
    try:
        return await asyncio.wait_for(step(), timeout_s)
    except asyncio.TimeoutError:
        writer.close()
        raise ChannelError(f"{side} handshake timed out after {timeout_s:g} s") from None
    except BaseException:
        writer.close()
        raise


async def connect_channel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    policy: MeasurementPolicy,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
) -> tuple[SecureChannel, Attestation]:
    """Front side: prove the worker's evidence against ``policy``, then key the channel
    to its attested key. Raises :class:`AttestationError` when the evidence does not
    satisfy the policy, :class:`ChannelError` for anything else; either way the stream
    is closed."""
    _check_max(max_frame_bytes)

    async def handshake() -> tuple[SecureChannel, Attestation]:
        nonce = os.urandom(HELLO_NONCE_BYTES)
        await write_frame(writer, cbor2.dumps({"op": "hello", "v": VERSION, "nonce": nonce}))
        answer = _handshake_message(
            await read_frame(reader, _EVIDENCE_MSG_MAX_BYTES), "evidence", {"kind": str, "evidence": bytes}
        )
        kind, evidence = answer["kind"], answer["evidence"]
        att = verify_evidence(kind, evidence, nonce=nonce, policy=policy)
        secret = os.urandom(SECRET_BYTES)
        try:
            sealed = seal_to(att.public_key, secret, CHANNEL_INFO + nonce)
        except ValueError as exc:
            raise AttestationError(f"attested public key is unusable: {exc}") from None
        await write_frame(writer, cbor2.dumps({"op": "key", "v": VERSION, "sealed": sealed}))
        to_worker, to_front = _direction_keys(secret, _transcript(nonce, kind, evidence, sealed))
        channel = SecureChannel(reader, writer, send_key=to_worker, recv_key=to_front, max_frame_bytes=max_frame_bytes)
        try:
            ready = await channel.recv()
        except ChannelClosed:
            raise ChannelError("the worker closed the channel instead of confirming the key") from None
        except ChannelError as exc:
            raise ChannelError(f"the worker did not confirm the channel key: {exc.message}") from None
        if ready != {"op": "ready"}:
            raise ChannelError("the worker did not confirm the channel key: unexpected first message")
        return channel, att

    return await _bounded(writer, timeout_s, handshake, "front")


async def accept_channel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    identity: WorkerIdentity,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
) -> SecureChannel:
    """Worker side: answer the front's nonce with evidence, open the channel secret
    with the attested key, confirm. Raises :class:`ChannelError`; the stream is closed."""
    _check_max(max_frame_bytes)

    async def handshake() -> SecureChannel:
        hello = _handshake_message(await read_frame(reader, _HELLO_MAX_BYTES), "hello", {"nonce": bytes})
        nonce = hello["nonce"]
        if len(nonce) != HELLO_NONCE_BYTES:
            raise ChannelError(f"handshake hello.nonce: expected {HELLO_NONCE_BYTES} bytes, got {len(nonce)}")
        try:
            kind, evidence = identity.evidence(nonce)
        except Exception as exc:  # the producer's failure (an NSM error, say) is this worker's, not the front's
            raise ChannelError(f"cannot produce attestation evidence: {exc}") from exc
        answer = {"op": "evidence", "v": VERSION, "kind": kind, "evidence": evidence}
        await write_frame(writer, cbor2.dumps(answer))
        key = _handshake_message(await read_frame(reader, _KEY_MAX_BYTES), "key", {"sealed": bytes})
        sealed = key["sealed"]
        try:
            secret = identity.open(sealed, CHANNEL_INFO + nonce)
        except UnsealError as exc:
            raise ChannelError(f"handshake key: {exc.message}") from None
        if len(secret) != SECRET_BYTES:
            raise ChannelError(f"handshake key: expected a {SECRET_BYTES}-byte secret, got {len(secret)} bytes")
        to_worker, to_front = _direction_keys(secret, _transcript(nonce, kind, evidence, sealed))
        channel = SecureChannel(reader, writer, send_key=to_front, recv_key=to_worker, max_frame_bytes=max_frame_bytes)
        await channel.send({"op": "ready"})
        return channel

    return await _bounded(writer, timeout_s, handshake, "worker")
