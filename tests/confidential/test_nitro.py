"""NitroVerifier against a real AWS Nitro Enclaves document and against a synthetic CA.

The real document (shared/fixtures/attestation/nitro_attestation.bin, captured from a
live enclave on 2025-12-25) proves the verifier accepts what AWS actually produces and
refuses every single-byte change to it with a reason naming what broke. Its leaf
certificate lived three hours, so it verifies only with ``now`` pinned to its own
timestamp. The synthetic CA (P-384, same shape as AWS's chain) covers what a real
document cannot show: each field and chain rule failing on its own.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.resources
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from bastion.confidential.attestation import (
    AttestationError,
    MeasurementPolicy,
    verifier_for,
    verify_evidence,
)
from bastion.confidential.nitro import AWS_NITRO_ROOT_G1_SHA256, NitroVerifier

UTC = datetime.timezone.utc
FIXTURES = Path(__file__).resolve().parents[3] / "shared/fixtures/attestation"
# The fixture's own signed timestamp (1766668537578 ms) and its leaf's validity window.
DOC_TIME = datetime.datetime(2025, 12, 25, 13, 15, 37, 578000, tzinfo=UTC)
PCR0 = "5cb702954321826d7939d6da829a940d787fcf32357beb8eae1ddf33c28c17d36f3ac3ba6828fdf7edeed02889702da6"


# --- the real document ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> dict[str, Any]:
    """The fixture bytes and where each part of them lies, found by decoding it here
    independently of the verifier (cbor2 and the SCALE length)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"attestation fixtures absent: {FIXTURES} does not exist")
    data = (FIXTURES / "nitro_attestation.bin").read_bytes()
    assert data[:2] == b"\x00\x02", "fixture: expected dstack's VersionedAttestation::V0 / Nitro quote prefix"
    cose_len = int.from_bytes(data[2:4], "little") >> 2
    cose = data[4 : 4 + cose_len]
    protected, _unprotected, payload, signature = cbor2.loads(cose)
    doc = cbor2.loads(payload)
    payload_at = data.index(payload)
    regions: dict[str, tuple[int, int]] = {
        "prefix": (0, 4),
        "protected": (data.index(protected, 4), data.index(protected, 4) + len(protected)),
        "signature": (data.index(signature), data.index(signature) + len(signature)),
        "leaf": _span(data, doc["certificate"], payload_at),
        "module_id": _span(data, doc["module_id"].encode(), payload_at),
        "user_data": _span(data, doc["user_data"], payload_at),
    }
    for i, der in enumerate(doc["cabundle"]):
        regions[f"cabundle[{i}]"] = _span(data, der, payload_at)
    for i, pcr in doc["pcrs"].items():
        if i in (0, 1, 2, 3, 8, 15):  # distinct values (the others repeat zeros): found unambiguously
            regions[f"pcr{i}"] = _span(data, pcr, payload_at) if data.count(pcr) == 1 else (0, 0)
    regions = {k: v for k, v in regions.items() if v != (0, 0)}
    return {
        "data": data,
        "cose": cose,
        "doc": doc,
        "regions": regions,
        "payload": (payload_at, payload_at + len(payload)),
        "cose_span": (4, 4 + cose_len),
    }


def _span(data: bytes, needle: bytes, start: int) -> tuple[int, int]:
    at = data.index(needle, start)
    return at, at + len(needle)


def test_real_document_verifies_at_its_own_timestamp(real: dict[str, Any]) -> None:
    att = NitroVerifier().verify(real["data"], now=DOC_TIME)
    assert att.kind == "nitro"
    assert att.timestamp == DOC_TIME
    assert att.module_id == "i-0827e799ec9232d44-enc019b55a68bd2ed4b"
    assert sorted(att.measurement, key=lambda k: int(k[3:])) == [f"pcr{i}" for i in range(16)]
    assert att.measurement["pcr0"] == PCR0
    assert all(re.fullmatch(r"[0-9a-f]{96}", v) for v in att.measurement.values())  # SHA-384 PCRs
    assert att.public_key == b""  # the capture asked for none: NSM wrote null
    assert att.nonce is None
    assert att.user_data == real["doc"]["user_data"] and len(att.user_data) == 64
    assert att.details["digest"] == "SHA384"
    assert att.details["leaf_subject"].startswith("CN=i-0827e799ec9232d44-enc019b55a68bd2ed4b.us-east-1.aws")
    assert att.details["root_sha256"] == AWS_NITRO_ROOT_G1_SHA256
    assert att.details["framing"] == "dstack_v0"


def test_real_document_as_plain_cose_tagged_and_untagged(real: dict[str, Any]) -> None:
    enveloped = NitroVerifier().verify(real["data"], now=DOC_TIME)
    untagged = NitroVerifier().verify(real["cose"], now=DOC_TIME)
    tagged = NitroVerifier().verify(b"\xd2" + real["cose"], now=DOC_TIME)
    assert untagged.details["framing"] == "cose_sign1" and tagged.details["framing"] == "cose_sign1_tagged"
    for att in (untagged, tagged):
        assert att.measurement == enveloped.measurement
        assert (att.timestamp, att.user_data, att.module_id) == (DOC_TIME, enveloped.user_data, enveloped.module_id)


def test_real_document_refused_now_because_its_leaf_expired(real: dict[str, Any]) -> None:
    with pytest.raises(
        AttestationError, match=r"^leaf certificate not valid at 20\d\d-.*: expired 2025-12-25T16:15:37Z$"
    ):
        NitroVerifier().verify(real["data"])
    before = datetime.datetime(2025, 12, 25, 13, 0, tzinfo=UTC)  # the leaf starts at 13:15:34
    with pytest.raises(AttestationError, match=r"leaf certificate not valid at 2025-12-25T13:00:00Z: not valid before"):
        NitroVerifier().verify(real["data"], now=before)


def test_real_document_refused_under_another_root(real: dict[str, Any]) -> None:
    with pytest.raises(AttestationError, match=r"certificate chain: cabundle\[0\] is not the configured root"):
        NitroVerifier(root_pem=CA.root.public_bytes(Encoding.PEM)).verify(real["data"], now=DOC_TIME)


def test_every_signature_byte_tampered_is_refused(real: dict[str, Any]) -> None:
    start, end = real["regions"]["signature"]
    assert end - start == 96
    verifier = NitroVerifier()
    for pos in range(start, end):
        with pytest.raises(AttestationError, match=r"^COSE signature does not verify with the leaf certificate$"):
            verifier.verify(_flip(real["data"], pos), now=DOC_TIME)


# Expected reason for a flipped byte, by the region it lies in. Certificates are named by
# their place in the chain; a signed field's change is the COSE signature's failure.
_REASONS = {
    "prefix": r"^(evidence: starts with|dstack envelope: )",
    "protected": r"^COSE_Sign1: ",
    "cabundle[0]": r"^certificate chain: cabundle\[0\] is not the pinned AWS Nitro Enclaves Root G1 ",
    "leaf": r"^certificate chain: the leaf certificate (is not issued by cabundle\[3\]|is not a valid DER certificate)",
    "module_id": r"^COSE signature does not verify with the leaf certificate$",
    "user_data": r"^COSE signature does not verify with the leaf certificate$",
    "signature": r"^COSE signature does not verify with the leaf certificate$",
}
# Anything else (CBOR structure, field names, lengths): a reason that names its layer.
_ANY_REASON = r"^(COSE_Sign1: |COSE signature |payload: |certificate chain: |dstack envelope: |evidence: )"


_COSE_SIGNATURE = r"^COSE signature does not verify with the leaf certificate$"


def _reason_for(region: str) -> str:
    if region.startswith("pcr"):
        return _COSE_SIGNATURE
    m = re.fullmatch(r"cabundle\[(\d)\]", region)
    if m and m.group(1) != "0":
        i = int(m.group(1))
        return rf"^certificate chain: cabundle\[{i}\] (is not issued by cabundle\[{i - 1}\]|is not a valid DER cert)"
    return _REASONS.get(region, _ANY_REASON)


def test_single_byte_tampers_across_the_document_are_refused_with_the_right_reason(real: dict[str, Any]) -> None:
    """Every signed byte would take ~10 s here (each try verifies up to five signatures);
    this covers a deterministic spread instead: every 5th byte of the envelope prefix and
    COSE_Sign1, plus the first, middle and last byte of every region. Set
    BASTION_TAMPER_EVERY_BYTE=1 to try them all."""
    data, regions = real["data"], real["regions"]
    lo, hi = 0, real["cose_span"][1]
    if os.environ.get("BASTION_TAMPER_EVERY_BYTE") == "1":
        positions = set(range(lo, hi))
    else:
        positions = set(range(lo, hi, 5))
        for start, end in regions.values():
            positions |= {start, (start + end) // 2, end - 1}
    positions -= set(range(*regions["signature"]))  # every one of those has its own test
    assert len(positions) >= 600
    tries: Counter[str] = Counter()
    named: Counter[str] = Counter()  # tries refused with the region's own reason
    verifier = NitroVerifier()
    for pos in sorted(positions):
        region = next((name for name, (s, e) in regions.items() if s <= pos < e), "structure")
        tries[region] += 1
        with pytest.raises(AttestationError) as caught:
            verifier.verify(_flip(data, pos), now=DOC_TIME)
        reason = str(caught.value)
        if re.search(_reason_for(region), reason):
            named[region] += 1
        else:
            # A certificate's outer encoding (e.g. the unused-bits byte of its signature
            # BIT STRING) is not covered by its issuer's signature, and cryptography may
            # still parse it: the COSE signature, which covers the whole payload, catches it.
            assert region.startswith(("cabundle", "leaf")), (pos, region, reason)
            assert re.search(_COSE_SIGNATURE, reason), (pos, region, reason)
    assert set(tries) >= set(regions) - {"signature"} | {"structure"}
    for region, n in tries.items():
        assert named[region] >= 0.9 * n, (region, named[region], n)


def test_unsigned_dstack_fields_are_ignored_but_their_layout_is_checked(real: dict[str, Any]) -> None:
    data = real["data"]
    end = real["cose_span"][1]
    # report_data (64 bytes after the empty runtime_events) is dstack's, not signed by AWS
    assert NitroVerifier().verify(_flip(data, end + 1), now=DOC_TIME).module_id
    with pytest.raises(AttestationError, match=r"dstack envelope: 1 runtime events; a Nitro quote carries none"):
        NitroVerifier().verify(data[:end] + b"\x04" + data[end + 1 :], now=DOC_TIME)
    with pytest.raises(AttestationError, match=r"dstack envelope: config is declared 84 bytes, 85 remain"):
        NitroVerifier().verify(data + b"!", now=DOC_TIME)
    with pytest.raises(AttestationError, match=r"dstack envelope: the NSM document is declared 4527 bytes, only 96"):
        NitroVerifier().verify(data[:100], now=DOC_TIME)


def test_framing_is_detected_not_guessed(real: dict[str, Any]) -> None:
    with pytest.raises(AttestationError, match=r"evidence: starts with 00030000: neither a CBOR COSE_Sign1"):
        NitroVerifier().verify(b"\x00\x03\x00\x00" + real["cose"], now=DOC_TIME)
    with pytest.raises(AttestationError, match=r"evidence: starts with 41424344"):
        NitroVerifier().verify(b"ABCD" + real["cose"], now=DOC_TIME)
    with pytest.raises(AttestationError, match=r"^evidence: empty$"):
        NitroVerifier().verify(b"", now=DOC_TIME)
    with pytest.raises(AttestationError, match=r"COSE_Sign1: 1 bytes after the CBOR item"):
        NitroVerifier().verify(real["cose"] + b"\x00", now=DOC_TIME)
    with pytest.raises(AttestationError, match=r"evidence: 65537 bytes, more than the 65536 accepted"):
        NitroVerifier().verify(real["cose"] + bytes(65537 - len(real["cose"])), now=DOC_TIME)


def test_real_document_through_verify_evidence(real: dict[str, Any]) -> None:
    """The capture bound no key and no nonce: verify_evidence verifies it, then refuses it."""
    policy = MeasurementPolicy({"pcr0": PCR0})
    with pytest.raises(AttestationError, match=r"evidence nonce does not match the nonce sent"):
        verify_evidence("nitro", real["data"], nonce=b"n" * 16, policy=policy, now=DOC_TIME)
    with pytest.raises(AttestationError, match=r"evidence public key: expected a 32-byte X25519 key, got 0 bytes"):
        verify_evidence("nitro", real["data"], nonce=None, policy=policy, now=DOC_TIME)
    assert isinstance(verifier_for("nitro"), NitroVerifier)


def test_pinned_root_matches_the_shipped_file_and_the_published_one() -> None:
    pem = importlib.resources.files("bastion.confidential").joinpath("certs/aws_nitro_enclaves_root_g1.pem")
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest() == AWS_NITRO_ROOT_G1_SHA256
    assert cert.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    if FIXTURES.is_dir():
        published = x509.load_pem_x509_certificate((FIXTURES / "AWS_NitroEnclaves_Root-G1.pem").read_bytes())
        assert published == cert


def test_root_pem_must_be_a_certificate() -> None:
    with pytest.raises(AttestationError, match=r"root certificate: not a PEM certificate"):
        NitroVerifier(root_pem=b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        NitroVerifier(root_pem=CA.root_pem).verify(CA.evidence(), now=datetime.datetime(2030, 1, 1))


def _flip(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0x01
    return bytes(out)


# --- a synthetic CA shaped like AWS's ---------------------------------------------------

T0 = datetime.datetime(2030, 1, 1, tzinfo=UTC)
DAY = datetime.timedelta(days=1)


def _ku(*, cert_sign: bool, digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _cert(
    cn: str,
    key: Any,
    issuer_cn: str,
    issuer_key: Any,
    *,
    ca: bool,
    path_length: int | None = None,
    bc: bool = True,
    bc_critical: bool = True,
    key_usage: x509.KeyUsage | None = None,
    not_before: datetime.datetime = T0 - DAY,
    not_after: datetime.datetime = T0 + DAY,
    extra: x509.ExtensionType | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if bc:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=bc_critical)
    ku = key_usage or _ku(cert_sign=ca, digital_signature=not ca)
    builder = builder.add_extension(ku, critical=True)
    if extra is not None:
        builder = builder.add_extension(extra, critical=True)
    return builder.sign(issuer_key, hashes.SHA384())


class _TestCA:
    """root -> intermediate -> leaf, all P-384, like AWS's (which has three intermediates)."""

    def __init__(self) -> None:
        self.keys = {name: ec.generate_private_key(ec.SECP384R1()) for name in ("root", "int", "int2", "leaf", "x")}
        self.root = _cert("test-root", self.keys["root"], "test-root", self.keys["root"], ca=True)
        self.root_pem = self.root.public_bytes(Encoding.PEM)
        self.inter = _cert("test-int", self.keys["int"], "test-root", self.keys["root"], ca=True, path_length=1)
        self.leaf = _cert("test-leaf", self.keys["leaf"], "test-int", self.keys["int"], ca=False)

    def payload(self, **overrides: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
            "digest": "SHA384",
            "timestamp": int(T0.timestamp() * 1000),
            "pcrs": {0: b"\x01" * 48, 1: b"\x02" * 48, 2: b"\x03" * 48, 8: bytes(48)},
            "certificate": self.leaf.public_bytes(Encoding.DER),
            "cabundle": [self.root.public_bytes(Encoding.DER), self.inter.public_bytes(Encoding.DER)],
            "public_key": b"k" * 32,
            "user_data": None,
            "nonce": b"n" * 16,
        }
        doc.update(overrides)
        return {k: v for k, v in doc.items() if v is not _DROP}

    def evidence(
        self,
        payload: bytes | dict[str, Any] | None = None,
        *,
        key: Any = None,
        protected: dict[int, Any] | None = None,
        unprotected: dict[int, Any] | None = None,
        signature: bytes | None = None,
        tagged: bool = True,
    ) -> bytes:
        body = payload if isinstance(payload, bytes) else cbor2.dumps(payload or self.payload())
        phdr = cbor2.dumps({1: -35} if protected is None else protected)
        if signature is None:
            signer = key or self.keys["leaf"]
            der = signer.sign(cbor2.dumps(["Signature1", phdr, b"", body]), ec.ECDSA(hashes.SHA384()))
            r, s = decode_dss_signature(der)
            width = (signer.curve.key_size + 7) // 8
            signature = r.to_bytes(width, "big") + s.to_bytes(width, "big")
        array = [phdr, unprotected or {}, body, signature]
        return cbor2.dumps(cbor2.CBORTag(18, array) if tagged else array)

    def verify(self, evidence: bytes, now: datetime.datetime = T0) -> Any:
        return NitroVerifier(root_pem=self.root_pem).verify(evidence, now=now)


_DROP = object()
CA = _TestCA()


def test_synthetic_document_verifies_tagged_and_untagged() -> None:
    for tagged in (True, False):
        att = CA.verify(CA.evidence(tagged=tagged))
        assert att.measurement == {"pcr0": "01" * 48, "pcr1": "02" * 48, "pcr2": "03" * 48, "pcr8": "00" * 48}
        assert (att.public_key, att.nonce, att.user_data) == (b"k" * 32, b"n" * 16, None)
        assert att.timestamp == T0 and att.details["leaf_subject"] == "CN=test-leaf"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"module_id": ""}, r"^payload: module_id: empty$"),
        ({"module_id": 7}, r"^payload: module_id: expected text, got integer$"),
        ({"module_id": _DROP}, r"^payload: module_id: missing$"),
        ({"digest": "SHA256"}, r"^payload: digest: expected 'SHA384', got 'SHA256'$"),
        ({"timestamp": "2030"}, r"^payload: timestamp: expected an unsigned integer, got text$"),
        ({"timestamp": True}, r"^payload: timestamp: expected an unsigned integer, got bool$"),
        ({"timestamp": 0}, r"^payload: timestamp: 0 is out of range"),
        ({"timestamp": -5}, r"^payload: timestamp: -5 is out of range"),
        ({"pcrs": {3: b"x" * 20}}, r"^payload: pcrs\[3\]: expected 32, 48 or 64 bytes, got 20$"),
        ({"pcrs": {0: "00" * 48}}, r"^payload: pcrs\[0\]: expected bytes, got text$"),
        ({"pcrs": {32: b"x" * 48}}, r"^payload: pcrs: index 32: expected an integer 0\.\.31$"),
        ({"pcrs": {"0": b"x" * 48}}, r"^payload: pcrs: index '0': expected an integer"),
        ({"pcrs": {}}, r"^payload: pcrs: 0 entries, expected 1\.\.32$"),
        ({"pcrs": [b"x" * 48]}, r"^payload: pcrs: expected a map, got array$"),
        ({"certificate": _DROP}, r"^payload: certificate: missing$"),
        ({"certificate": "der"}, r"^payload: certificate: expected bytes, got text$"),
        ({"certificate": b"\x30" * 1025}, r"^payload: certificate: 1025 bytes, expected 1\.\.1024$"),
        ({"cabundle": []}, r"^payload: cabundle: 0 entries, expected 1\.\.16$"),
        ({"cabundle": b"der"}, r"^payload: cabundle: expected an array, got bytes$"),
        ({"cabundle": [b"x"] * 17}, r"^payload: cabundle: 17 entries, expected 1\.\.16$"),
        ({"cabundle": [CA.root.public_bytes(Encoding.DER), "x"]}, r"^payload: cabundle\[1\]: expected bytes \(DER\)"),
        ({"public_key": b"k" * 1025}, r"^payload: public_key: 1025 bytes, expected 0\.\.1024$"),
        ({"nonce": 5}, r"^payload: nonce: expected bytes, got integer$"),
        ({"user_data": ["x"]}, r"^payload: user_data: expected bytes, got array$"),
        ({"extra": 1}, r"^payload: unexpected field 'extra'$"),
    ],
)
def test_payload_fields_are_type_checked(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(AttestationError, match=reason):
        CA.verify(CA.evidence(CA.payload(**overrides)))


def test_optional_fields_may_be_absent_or_null() -> None:
    att = CA.verify(CA.evidence(CA.payload(public_key=_DROP, nonce=None, user_data=b"")))
    assert (att.public_key, att.nonce, att.user_data) == (b"", None, b"")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (cbor2.dumps([1, 2]), r"^payload: expected a CBOR map, got array$"),
        (cbor2.dumps({1: 2}), r"^payload: keys must be text, got integer"),
        (cbor2.dumps({"a": 1}) + b"\x00", r"^payload: 1 bytes after the CBOR item$"),
        (b"\xa2\x61a\x01\x61a\x02", r"^payload: not valid CBOR \(.*Duplicate map key"),
        (b"\xbf", r"^payload: not valid CBOR"),
    ],
)
def test_payload_must_be_one_well_formed_map(payload: bytes, reason: str) -> None:
    with pytest.raises(AttestationError, match=reason):
        CA.verify(CA.evidence(payload))


def test_cose_structure_and_headers() -> None:
    with pytest.raises(AttestationError, match=r"^COSE_Sign1: protected header alg must be ES384 \(-35\), got ES256$"):
        CA.verify(CA.evidence(protected={1: -7}))
    with pytest.raises(AttestationError, match=r"^COSE_Sign1: alg must be in the protected header only$"):
        CA.verify(CA.evidence(protected={}, unprotected={1: -35}))
    with pytest.raises(AttestationError, match=r"^COSE_Sign1: protected header has critical parameters"):
        CA.verify(CA.evidence(protected={1: -35, 2: [99]}))
    with pytest.raises(AttestationError, match=r"^COSE signature: expected 96 bytes \(r \|\| s\), got 64 bytes$"):
        CA.verify(CA.evidence(signature=b"\x01" * 64))
    with pytest.raises(AttestationError, match=r"^COSE signature does not verify with the leaf certificate$"):
        CA.verify(CA.evidence(key=CA.keys["x"]))
    with pytest.raises(AttestationError, match=r"^COSE_Sign1: expected CBOR tag 18, got tag 98$"):
        CA.verify(cbor2.dumps(cbor2.CBORTag(98, [b"", {}, b"x", b"y"])))
    with pytest.raises(AttestationError, match=r"^COSE_Sign1: expected an array .*, got 3 elements$"):
        CA.verify(cbor2.dumps([cbor2.dumps({1: -35}), {}, b"x"]))
    with pytest.raises(AttestationError, match=r"^COSE_Sign1: payload: expected non-empty bytes, got null$"):
        CA.verify(cbor2.dumps([cbor2.dumps({1: -35}), {}, None, b"y" * 96]))


def _with_chain(cabundle: list[x509.Certificate], leaf: x509.Certificate, leaf_key: Any = None) -> bytes:
    payload = CA.payload(
        certificate=leaf.public_bytes(Encoding.DER), cabundle=[c.public_bytes(Encoding.DER) for c in cabundle]
    )
    return CA.evidence(payload, key=leaf_key)


def test_chain_rules() -> None:
    k = CA.keys
    # issued by the wrong key, under the right name
    forged = _cert("test-leaf", k["leaf"], "test-int", k["x"], ca=False)
    reason = r"^certificate chain: the leaf certificate is not issued by cabundle\[1\]: its signature does not verify"
    with pytest.raises(AttestationError, match=reason + r" with cabundle\[1\]'s key$"):
        CA.verify(_with_chain([CA.root, CA.inter], forged))
    # issuer name that is not the parent's subject
    stray = _cert("test-leaf", k["leaf"], "someone-else", k["int"], ca=False)
    with pytest.raises(
        AttestationError, match=r"^certificate chain: the leaf certificate is not issued by cabundle\[1\]: "
    ):
        CA.verify(_with_chain([CA.root, CA.inter], stray))
    # out of order
    int2 = _cert("test-int2", k["int2"], "test-int", k["int"], ca=True, path_length=0)
    leaf2 = _cert("test-leaf", k["leaf"], "test-int2", k["int2"], ca=False)
    with pytest.raises(AttestationError, match=r"^certificate chain: cabundle\[1\] is not issued by cabundle\[0\]"):
        CA.verify(_with_chain([CA.root, int2, CA.inter], leaf2))
    assert CA.verify(_with_chain([CA.root, CA.inter, int2], leaf2)).details["leaf_subject"] == "CN=test-leaf"
    # junk instead of a certificate
    with pytest.raises(
        AttestationError, match=r"^certificate chain: the leaf certificate is not a valid DER certificate"
    ):
        CA.verify(CA.evidence(CA.payload(certificate=b"\x30\x03\x02\x01\x01")))


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (
            lambda k: _cert("test-int", k["int"], "test-root", k["root"], ca=False),
            r"^certificate chain: cabundle\[1\] is not a CA \(basicConstraints cA is false\)$",
        ),
        (
            lambda k: _cert("test-int", k["int"], "test-root", k["root"], ca=True, bc=False),
            r"^certificate chain: cabundle\[1\] has no basicConstraints, so it is not a CA$",
        ),
        (
            lambda k: _cert("test-int", k["int"], "test-root", k["root"], ca=True, bc_critical=False),
            r"^certificate chain: cabundle\[1\]: basicConstraints of a CA must be critical$",
        ),
        (
            lambda k: _cert(
                "test-int",
                k["int"],
                "test-root",
                k["root"],
                ca=True,
                key_usage=_ku(cert_sign=False, digital_signature=True),
            ),
            r"^certificate chain: cabundle\[1\]: keyUsage lacks keyCertSign",
        ),
        (
            lambda k: _cert("test-int", k["int"], "test-root", k["root"], ca=True, not_after=T0 - DAY / 2),
            r"^certificate chain: cabundle\[1\] not valid at 2030-01-01T00:00:00Z: expired 2029-12-31T12:00:00Z$",
        ),
        (
            lambda k: _cert(
                "test-int",
                k["int"],
                "test-root",
                k["root"],
                ca=True,
                extra=x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
            ),
            r"^certificate chain: cabundle\[1\] has an unsupported critical extension 1\.3\.6\.1\.4\.1\.99999\.1$",
        ),
    ],
)
def test_intermediate_must_be_a_valid_ca(build: Any, reason: str) -> None:
    inter = build(CA.keys)
    with pytest.raises(AttestationError, match=reason):
        CA.verify(_with_chain([CA.root, inter], CA.leaf))


def test_path_length_is_enforced() -> None:
    k = CA.keys
    tight = _cert("test-int", k["int"], "test-root", k["root"], ca=True, path_length=0)
    int2 = _cert("test-int2", k["int2"], "test-int", k["int"], ca=True, path_length=0)
    leaf2 = _cert("test-leaf", k["leaf"], "test-int2", k["int2"], ca=False)
    with pytest.raises(
        AttestationError, match=r"^certificate chain: cabundle\[1\] allows 0 CA certificates below it, the chain has 1$"
    ):
        CA.verify(_with_chain([CA.root, tight, int2], leaf2))


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (
            lambda k: _cert("test-leaf", k["leaf"], "test-int", k["int"], ca=True),
            r"^certificate chain: the leaf certificate is a CA certificate, expected an end-entity one$",
        ),
        (
            lambda k: _cert(
                "test-leaf",
                k["leaf"],
                "test-int",
                k["int"],
                ca=False,
                key_usage=_ku(cert_sign=False, digital_signature=False),
            ),
            r"^certificate chain: the leaf certificate: keyUsage lacks digitalSignature$",
        ),
        (
            lambda k: _cert("test-leaf", k["leaf"], "test-int", k["int"], ca=False, not_before=T0 + DAY / 2),
            r"^leaf certificate not valid at 2030-01-01T00:00:00Z: not valid before 2030-01-01T12:00:00Z$",
        ),
    ],
)
def test_leaf_must_be_a_valid_end_entity(build: Any, reason: str) -> None:
    with pytest.raises(AttestationError, match=reason):
        CA.verify(_with_chain([CA.root, CA.inter], build(CA.keys)))


def test_leaf_key_must_be_p384() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("test-leaf", p256, "test-int", CA.keys["int"], ca=False)
    with pytest.raises(AttestationError, match=r"^leaf certificate: expected a P-384 key for ES384, got EC secp256r1$"):
        CA.verify(_with_chain([CA.root, CA.inter], leaf, leaf_key=p256))


def test_expired_root_is_refused() -> None:
    """AWS's procedure checks the root's validity too (AWS's runs to 2049)."""
    k = CA.keys
    old_root = _cert("test-root", k["root"], "test-root", k["root"], ca=True, not_after=T0 - DAY / 2)
    evidence = _with_chain([old_root, CA.inter], CA.leaf)
    with pytest.raises(
        AttestationError, match=r"^certificate chain: cabundle\[0\] not valid at 2030-01-01T00:00:00Z: expired"
    ):
        NitroVerifier(root_pem=old_root.public_bytes(Encoding.PEM)).verify(evidence, now=T0)
