"""Evidence from the AWS Nitro Secure Module (NSM), inside a Nitro Enclave.

UNTESTED ON HARDWARE. This is written against the documented interface of the NSM
driver (aws/aws-nitro-enclaves-nsm-api: ``src/driver/mod.rs``, ``src/api/mod.rs``) and
has never run in an enclave: no machine this project is built on has ``/dev/nsm``.
Only the request encoding, the response decoding and the missing-device error are
unit-tested. Run it in a real enclave, and verify what it returns with
:class:`bastion.confidential.nitro.NitroVerifier`, before relying on it.

The interface: open ``/dev/nsm`` read-write and issue one ``ioctl`` per request. The
ioctl argument is ``struct { struct iovec request; struct iovec response; }``: the
request iovec points at a CBOR-encoded ``Request`` (at most 0x1000 bytes), the response
iovec at a buffer of 0x3000 bytes, whose length the driver sets to the size of the CBOR
``Response`` it wrote. The ioctl number is ``_IOWR(0x0A, 0, sizeof(that struct))``.
serde encodes the attestation request as
``{"Attestation": {"user_data": bytes|null, "nonce": bytes|null, "public_key": bytes|null}}``
and the answer as ``{"Attestation": {"document": <COSE_Sign1 bytes>}}``, or
``{"Error": "<ErrorCode>"}``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import Any

import cbor2

from bastion.confidential.attestation import AttestationError
from bastion.core.errors import BastionError

__all__ = [
    "NSM_DEVICE",
    "NSM_IOCTL_REQUEST",
    "NitroNsmProducer",
    "NsmUnavailable",
    "decode_attestation_response",
    "encode_attestation_request",
]

NSM_DEVICE = "/dev/nsm"
NSM_IOCTL_MAGIC = 0x0A
NSM_REQUEST_MAX_SIZE = 0x1000
NSM_RESPONSE_MAX_SIZE = 0x3000
# The NSM document spec bounds each of user_data, nonce and public_key to 1024 bytes.
_MAX_FIELD_BYTES = 1024


class NsmUnavailable(BastionError):
    """The NSM cannot give evidence: no device (not in an enclave), or it refused."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _NsmMessage(ctypes.Structure):
    _fields_ = [("request", _IoVec), ("response", _IoVec)]


def _iowr(kind: int, nr: int, size: int) -> int:
    """Linux's ``_IOWR`` (asm-generic/ioctl.h, used by x86-64 and arm64): direction
    read|write (3) in bits 30-31, argument size in bits 16-29, type in 8-15, number in 0-7."""
    return (3 << 30) | (size << 16) | (kind << 8) | nr


# 0xC0200A00 on 64-bit Linux (the message is two iovecs, 32 bytes).
NSM_IOCTL_REQUEST = _iowr(NSM_IOCTL_MAGIC, 0, ctypes.sizeof(_NsmMessage))


def encode_attestation_request(public_key: bytes | None, nonce: bytes | None, user_data: bytes | None = None) -> bytes:
    """The CBOR ``Request::Attestation`` the NSM expects (serde's externally tagged enum:
    a one-key map; its fields in declaration order, an absent one as null). Bad input
    (not bytes, over 1024 bytes) is an :class:`AttestationError`, as for dev evidence."""
    fields: dict[str, Any] = {}
    for name, value in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key)):
        if value is not None and not isinstance(value, bytes):
            raise AttestationError(
                f"NSM attestation request: {name}: expected bytes or None, got {type(value).__name__}"
            )
        if value is not None and len(value) > _MAX_FIELD_BYTES:
            raise AttestationError(f"NSM attestation request: {name}: {len(value)} bytes, more than {_MAX_FIELD_BYTES}")
        fields[name] = value
    request = cbor2.dumps({"Attestation": fields})
    if len(request) > NSM_REQUEST_MAX_SIZE:  # unreachable with the bounds above; the driver's limit, stated
        raise AttestationError(f"NSM attestation request: {len(request)} bytes, more than {NSM_REQUEST_MAX_SIZE}")
    return request


def decode_attestation_response(response: bytes) -> bytes:
    """The attestation document out of the NSM's CBOR ``Response``."""
    try:
        value = cbor2.loads(response)
    except Exception as exc:  # cbor2 raises CBORDecodeError and ValueError subclasses on bad input
        raise NsmUnavailable(f"NSM response: not valid CBOR ({exc})") from None
    if isinstance(value, dict) and "Error" in value:
        raise NsmUnavailable(f"NSM refused the attestation request: {value['Error']!r:.80}")
    body = value.get("Attestation") if isinstance(value, dict) else None
    document = body.get("document") if isinstance(body, dict) else None
    if not isinstance(document, bytes) or not document:
        raise NsmUnavailable(f"NSM response: expected {{'Attestation': {{'document': bytes}}}}, got {value!r:.120}")
    return document


class NitroNsmProducer:
    """Inside a Nitro Enclave: attestation documents from the NSM (``kind = "nitro"``).

    UNTESTED ON HARDWARE, see the module docstring."""

    kind = "nitro"

    def __init__(self, device: str = NSM_DEVICE) -> None:
        self.device = device
        if not os.path.exists(device):
            raise NsmUnavailable(_missing(device))

    def evidence(self, public_key: bytes, nonce: bytes | None, user_data: bytes | None = None) -> bytes:
        request = encode_attestation_request(public_key, nonce, user_data)
        try:
            fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NsmUnavailable(_missing(self.device)) from None
        except OSError as exc:
            raise NsmUnavailable(f"cannot open {self.device}: {exc.strerror}") from None
        try:
            return decode_attestation_response(_nsm_ioctl(fd, request, self.device))
        finally:
            os.close(fd)


def _nsm_ioctl(fd: int, request: bytes, device: str) -> bytes:
    req_buf = ctypes.create_string_buffer(request, len(request))
    resp_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
    message = _NsmMessage(
        _IoVec(ctypes.addressof(req_buf), len(request)),
        _IoVec(ctypes.addressof(resp_buf), NSM_RESPONSE_MAX_SIZE),
    )
    try:
        # mutate: the driver writes the response length back into message.response.iov_len
        fcntl.ioctl(fd, NSM_IOCTL_REQUEST, message, True)
    except OSError as exc:
        if exc.errno == errno.EMSGSIZE:
            raise NsmUnavailable("NSM: the attestation request is too large") from None
        if exc.errno == errno.ENOTTY:
            raise NsmUnavailable(f"{device} is not the Nitro Secure Module (ioctl: {exc.strerror})") from None
        raise NsmUnavailable(f"NSM ioctl on {device} failed: {exc.strerror}") from None
    length = message.response.iov_len
    if not 0 < length <= NSM_RESPONSE_MAX_SIZE:
        raise NsmUnavailable(f"NSM: response length {length} outside 1..{NSM_RESPONSE_MAX_SIZE}")
    return resp_buf.raw[:length]


def _missing(device: str) -> str:
    return (
        f"{device} does not exist: Nitro evidence comes from the Nitro Secure Module, which exists only "
        "inside a Nitro Enclave; outside one, run the worker with dev evidence"
    )
