"""The NSM producer, without an NSM: request encoding, response decoding, missing device.

Nothing here talks to a Nitro Secure Module (none exists on this machine); the ioctl
path is exercised only as far as a regular file lets it (the kernel answers ENOTTY)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import cbor2
import pytest

from bastion.confidential.attestation import AttestationError, EvidenceProducer
from bastion.confidential.nsm import (
    NSM_DEVICE,
    NSM_IOCTL_REQUEST,
    NitroNsmProducer,
    NsmUnavailable,
    decode_attestation_response,
    encode_attestation_request,
)


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="the ioctl number is pinned for 64-bit Linux")
def test_ioctl_number_is_iowr_0x0a_0_of_two_iovecs() -> None:
    assert NSM_IOCTL_REQUEST == 0xC020_0A00


def test_request_encoding_matches_serde() -> None:
    """serde_cbor's encoding of ``Request::Attestation { user_data, nonce, public_key }``:
    a one-key map naming the variant, the fields in declaration order."""
    request = encode_attestation_request(b"k" * 32, b"n" * 8, b"u")
    expected = (
        b"\xa1\x6bAttestation\xa3"
        + b"\x69user_data\x41u"
        + b"\x65nonce\x48"
        + b"n" * 8
        + b"\x6apublic_key\x58\x20"
        + b"k" * 32
    )
    assert request == expected
    assert cbor2.loads(request) == {"Attestation": {"user_data": b"u", "nonce": b"n" * 8, "public_key": b"k" * 32}}


def test_absent_fields_are_null() -> None:
    request = encode_attestation_request(None, None)
    assert request == b"\xa1\x6bAttestation\xa3\x69user_data\xf6\x65nonce\xf6\x6apublic_key\xf6"


def test_request_inputs_are_checked() -> None:
    with pytest.raises(AttestationError, match=r"NSM attestation request: nonce: 1025 bytes, more than 1024"):
        encode_attestation_request(b"k" * 32, b"n" * 1025)
    with pytest.raises(AttestationError, match=r"NSM attestation request: public_key: expected bytes or None, got str"):
        encode_attestation_request("key", None)  # type: ignore[arg-type]


def test_response_decoding() -> None:
    document = b"\xd2\x84" + b"doc"
    assert decode_attestation_response(cbor2.dumps({"Attestation": {"document": document}})) == document
    with pytest.raises(NsmUnavailable, match=r"NSM refused the attestation request: 'InvalidArgument'"):
        decode_attestation_response(cbor2.dumps({"Error": "InvalidArgument"}))
    with pytest.raises(NsmUnavailable, match=r"NSM response: expected \{'Attestation': \{'document': bytes\}\}"):
        decode_attestation_response(cbor2.dumps({"DescribeNSM": {}}))
    with pytest.raises(NsmUnavailable, match=r"NSM response: not valid CBOR"):
        decode_attestation_response(b"\xff\xff")


def test_missing_device_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NsmUnavailable, match=r"nsm does not exist: .* exists only inside a Nitro Enclave"):
        NitroNsmProducer(device=str(tmp_path / "nsm"))
    assert NsmUnavailable.http_status == 503 and NsmUnavailable.grpc_code == "UNAVAILABLE"


@pytest.mark.skipif(os.path.exists(NSM_DEVICE), reason="running inside a Nitro Enclave")
def test_default_device_is_missing_here() -> None:
    with pytest.raises(NsmUnavailable, match=r"^/dev/nsm does not exist"):
        NitroNsmProducer()


def test_device_that_vanishes_or_is_not_the_nsm(tmp_path: Path) -> None:
    fake = tmp_path / "nsm"
    fake.write_bytes(b"")
    producer = NitroNsmProducer(device=str(fake))
    assert producer.kind == "nitro" and isinstance(producer, EvidenceProducer)
    with pytest.raises(NsmUnavailable, match=r"is not the Nitro Secure Module \(ioctl: "):
        producer.evidence(b"k" * 32, b"n" * 16)
    fake.unlink()
    with pytest.raises(NsmUnavailable, match=r"nsm does not exist"):
        producer.evidence(b"k" * 32, b"n" * 16)
