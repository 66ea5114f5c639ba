"""AWS Nitro Enclaves attestation documents, verified against the pinned AWS root.

The procedure is AWS's published one (aws-nitro-enclaves-nsm-api,
``docs/attestation_process.md``; "Verifying the root of trust" in the Nitro Enclaves
user guide), in the order :mod:`bastion.confidential.attestation` asks for:

1. bound the bytes and find the ``COSE_Sign1`` (tagged, untagged, or inside dstack's
   envelope, see :func:`cose_sign1_from_evidence`);
2. decode it (protected header ``alg`` must be ES384) and its CBOR payload, taking
   only ``certificate`` and ``cabundle`` out of it before anything is authenticated;
3. the certificate chain: ``cabundle[0]`` is the pinned AWS Nitro Enclaves Root G1,
   each next certificate (``cabundle[1..]``, then the leaf) is directly issued by the
   one before, every CA is a CA (basicConstraints, keyCertSign, pathLen), and every
   certificate is valid at ``now``;
4. the COSE signature, with the leaf's P-384 key, over the ``Sig_structure``;
5. only then the remaining fields (module_id, digest, timestamp, PCRs, public_key,
   user_data, nonce), type-checked against the spec.

Every refusal is an :class:`AttestationError` whose message names what failed.
Nothing here reaches the network: AWS's CRLs are not consulted (AWS's own procedure
disables revocation checking; NSM leaf certificates live ~3 hours).

The CBOR/COSE helpers at the bottom (:func:`decode_cbor`, :func:`decode_sign1`,
:class:`PayloadFields`, ...) are shared with :mod:`bastion.confidential.dev_evidence`
so that dev evidence goes through the same parsing and the same field checks.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.resources
import io
from collections.abc import Iterable, Mapping
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID
from pycose import algorithms, headers
from pycose.messages import Sign1Message

from bastion.confidential.attestation import MAX_EVIDENCE_BYTES, Attestation, AttestationError

__all__ = [
    "AWS_NITRO_ROOT_G1_SHA256",
    "NitroVerifier",
    "PayloadFields",
    "cbor_type",
    "cose_sign1_from_evidence",
    "decode_cbor",
    "decode_sign1",
    "timestamp_from_ms",
]

# SHA-256 of the DER of the AWS Nitro Enclaves Root G1 (CN=aws.nitro-enclaves, P-384,
# valid 2019-10-28 .. 2049-10-28), as AWS publishes it. The shipped PEM must match: a
# package whose root file was swapped refuses to verify anything rather than trust it.
AWS_NITRO_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
_ROOT_RESOURCE = "certs/aws_nitro_enclaves_root_g1.pem"

# The attestation document spec (CDDL): cert = bytes .size (1..1024),
# user_data = bytes .size (0..1024), pcr = bytes .size (32/48/64), index = 0..31.
_MAX_CERT_BYTES = 1024
_MAX_USER_BYTES = 1024
_PCR_LENGTHS = (32, 48, 64)
_MAX_PCR_INDEX = 31
# The spec leaves cabundle unbounded; AWS's chains hold 4 certificates. A cap keeps a
# hostile document from making us verify dozens of signatures.
_MAX_CABUNDLE = 16
_MAX_CBOR_DEPTH = 16  # tag > array > map > map is as deep as a document goes
_ES384_SIGNATURE_BYTES = 96  # raw r || s, 48 bytes each

_DOCUMENT_FIELDS = frozenset(
    {"module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key", "user_data", "nonce"}
)
# Critical extensions this verifier understands and enforces (RFC 5280 §4.2: a
# certificate with any other critical extension must be refused).
_KNOWN_CRITICAL = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})

# dstack (Dstack-TEE/dstack) wraps an NSM document in a SCALE-encoded
# ``VersionedAttestation::V0 { attestation: Attestation { quote, runtime_events,
# report_data, config } }``; the fixture in shared/fixtures/attestation is one of those.
_DSTACK_V0 = 0x00  # VersionedAttestation::V0
_DSTACK_NITRO_QUOTE = 0x02  # AttestationQuote::DstackNitroEnclave(DstackNitroQuote { nsm_quote: Vec<u8> })
_DSTACK_REPORT_DATA_BYTES = 64


class NitroVerifier:
    """Verifies AWS Nitro Enclaves attestation documents (``kind = "nitro"``).

    ``root_pem`` replaces the pinned AWS root (tests, or another AWS partition's root);
    by default the AWS Nitro Enclaves Root G1 shipped with the package is used, after
    checking it against :data:`AWS_NITRO_ROOT_G1_SHA256`."""

    kind = "nitro"

    def __init__(self, root_pem: bytes | None = None) -> None:
        if root_pem is None:
            self._root, self._root_der = _pinned_root()
            self._root_label = "the pinned AWS Nitro Enclaves Root G1"
        else:
            try:
                self._root = x509.load_pem_x509_certificate(root_pem)
            except ValueError as exc:
                raise AttestationError(f"root certificate: not a PEM certificate ({exc})") from None
            self._root_der = self._root.public_bytes(Encoding.DER)
            self._root_label = "the configured root"
        self._root_sha256 = hashlib.sha256(self._root_der).hexdigest()

    def verify(self, evidence: bytes, *, now: datetime.datetime | None = None) -> Attestation:
        when = _utc_now(now)
        cose, framing = cose_sign1_from_evidence(evidence)
        msg = decode_sign1(cose, alg=algorithms.Es384)
        doc = PayloadFields(decode_cbor(msg.payload, "payload"), "payload")

        # Only the two fields the chain needs are read before the signature is checked.
        leaf_der = doc.bytes_("certificate", 1, _MAX_CERT_BYTES)
        cabundle = doc.array("cabundle", 1, _MAX_CABUNDLE)
        bundle: list[bytes] = []
        for i, item in enumerate(cabundle):
            if not isinstance(item, bytes):
                raise AttestationError(f"payload: cabundle[{i}]: expected bytes (DER), got {cbor_type(item)}")
            if not 1 <= len(item) <= _MAX_CERT_BYTES:
                raise AttestationError(f"payload: cabundle[{i}]: {len(item)} bytes, expected 1..{_MAX_CERT_BYTES}")
            bundle.append(item)

        leaf = self._verify_chain(bundle, leaf_der, when)
        _verify_es384(msg, leaf)

        # Authenticated from here on.
        doc.reject_unknown(_DOCUMENT_FIELDS)
        module_id = doc.text("module_id")
        digest = doc.text("digest")
        if digest != "SHA384":
            raise AttestationError(f"payload: digest: expected 'SHA384', got {digest[:40]!r}")
        timestamp = timestamp_from_ms(doc.uint("timestamp"), "payload: timestamp")
        pcrs = _pcrs(doc.get("pcrs"))
        public_key = doc.optional_bytes("public_key", _MAX_USER_BYTES)
        user_data = doc.optional_bytes("user_data", _MAX_USER_BYTES)
        nonce = doc.optional_bytes("nonce", _MAX_USER_BYTES)

        return Attestation(
            kind=self.kind,
            measurement={f"pcr{i}": value.hex() for i, value in sorted(pcrs.items())},
            public_key=public_key or b"",
            nonce=nonce,
            user_data=user_data,
            timestamp=timestamp,
            module_id=module_id,
            details={
                "leaf_subject": leaf.subject.rfc4514_string(),
                "digest": digest,
                "root_sha256": self._root_sha256,
                "framing": framing,
            },
        )

    def _verify_chain(self, bundle: list[bytes], leaf_der: bytes, now: datetime.datetime) -> x509.Certificate:
        """root = cabundle[0] -> cabundle[1] -> ... -> leaf; returns the leaf certificate.

        Signatures first (walking down from the trusted root, so a tampered certificate
        is named as not issued by its parent), then CA constraints, then validity at
        ``now`` from the leaf up: the leaf lives hours, the intermediates days, so an
        old document names the leaf's expiry, which is the useful reason."""
        if bundle[0] != self._root_der:
            got = hashlib.sha256(bundle[0]).hexdigest()
            raise AttestationError(
                f"certificate chain: cabundle[0] is not {self._root_label} "
                f"(SHA-256 of its DER is {got}, expected {self._root_sha256})"
            )
        chain: list[tuple[str, x509.Certificate]] = [("cabundle[0]", self._root)]
        path = [(f"cabundle[{i}]", der) for i, der in enumerate(bundle[1:], 1)]
        path.append(("the leaf certificate", leaf_der))
        for label, der in path:
            cert = _load_der(der, label)
            parent_label, parent = chain[-1]
            try:
                cert.verify_directly_issued_by(parent)
            except InvalidSignature:
                raise AttestationError(
                    f"certificate chain: {label} is not issued by {parent_label}: "
                    f"its signature does not verify with {parent_label}'s key"
                ) from None
            # issuer name mismatch, inner/outer signature algorithms differ, unsupported key or algorithm
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise AttestationError(f"certificate chain: {label} is not issued by {parent_label}: {exc}") from None
            chain.append((label, cert))

        cas = chain[:-1]
        for position, (label, cert) in enumerate(cas):
            # CAs that follow this one in the path, the leaf not counted (RFC 5280 pathLenConstraint).
            _check_ca(cert, label, following_cas=len(cas) - 1 - position)
        leaf_label, leaf = chain[-1]
        _check_leaf(leaf, leaf_label)

        for label, cert in reversed(chain):
            _check_valid_at(cert, "leaf certificate" if cert is leaf else f"certificate chain: {label}", now)
        return leaf


# --- framing -------------------------------------------------------------------------


def cose_sign1_from_evidence(evidence: bytes, *, envelopes: bool = True) -> tuple[bytes, str]:
    """The tagged ``COSE_Sign1`` inside ``evidence``, and which framing carried it
    (``envelopes=False``: a bare ``COSE_Sign1`` only, as for dev evidence).

    Detected from the first bytes, never by scanning for a marker:

    * CBOR major type 6 (a tag; ``0xd2`` is tag 18): a tagged ``COSE_Sign1``, what the
      NSM returns in ``{"Attestation": {"document": ...}}``;
    * CBOR major type 4 (an array; ``0x84`` is a 4-element one): an untagged
      ``COSE_Sign1``, tagged here (``0xd2`` prefix) for pycose;
    * ``00 02``: dstack's envelope (Dstack-TEE/dstack ``ra-tls`` ``VersionedAttestation``,
      SCALE codec), as in the shared fixture. Its "4-byte framing prefix" is
      ``00`` (``VersionedAttestation::V0``), ``02`` (``AttestationQuote::
      DstackNitroEnclave``) and ``bd 46``, the SCALE compact length of the NSM document
      (``0x46bd >> 2`` = 4,527 bytes). After the document come the envelope's other
      fields, none of them signed by AWS: ``runtime_events`` (an empty vector, ``00``),
      ``report_data`` (64 bytes) and ``config`` (a compact-length UTF-8 string, dstack's
      ``{"os_image_hash": ...}``). Their layout is checked so that a malformed envelope is
      refused, but their content is ignored: only the NSM document is authenticated.
    """
    if not isinstance(evidence, bytes | bytearray | memoryview):
        raise AttestationError(f"evidence: expected bytes, got {type(evidence).__name__}")
    data = bytes(evidence)
    if len(data) > MAX_EVIDENCE_BYTES:
        raise AttestationError(f"evidence: {len(data)} bytes, more than the {MAX_EVIDENCE_BYTES} accepted")
    if not data:
        raise AttestationError("evidence: empty")
    major = data[0] >> 5
    if major == 6:
        return data, "cose_sign1_tagged"
    if major == 4:
        return b"\xd2" + data, "cose_sign1"
    if not envelopes:
        raise AttestationError(
            f"evidence: starts with {data[:4].hex()}: not a CBOR COSE_Sign1 (tag 18 or a 4-element array)"
        )
    if data[0] == _DSTACK_V0 and len(data) > 1 and data[1] == _DSTACK_NITRO_QUOTE:
        return b"\xd2" + _dstack_nsm_quote(data), "dstack_v0"
    raise AttestationError(
        f"evidence: starts with {data[:4].hex()}: neither a CBOR COSE_Sign1 (tag 18 or a 4-element array) "
        "nor a dstack envelope holding a Nitro quote (00 02 ...)"
    )


def _dstack_nsm_quote(data: bytes) -> bytes:
    """The NSM document inside a dstack ``VersionedAttestation::V0`` (see above)."""
    length, pos = _scale_compact(data, 2, "nsm_quote length")
    end = pos + length
    if end > len(data):
        raise AttestationError(
            f"dstack envelope: the NSM document is declared {length} bytes, only {len(data) - pos} follow"
        )
    quote = data[pos:end]
    if not quote or quote[0] >> 5 not in (4, 6):
        raise AttestationError("dstack envelope: the NSM document is not a CBOR COSE_Sign1")
    events, pos = _scale_compact(data, end, "runtime_events count")
    if events:
        raise AttestationError(f"dstack envelope: {events} runtime events; a Nitro quote carries none")
    pos += _DSTACK_REPORT_DATA_BYTES
    if pos > len(data):
        raise AttestationError("dstack envelope: truncated in report_data")
    config_len, pos = _scale_compact(data, pos, "config length")
    if pos + config_len != len(data):
        raise AttestationError(
            f"dstack envelope: config is declared {config_len} bytes, {len(data) - pos} remain after its length"
        )
    return quote


def _scale_compact(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """A SCALE compact unsigned integer at ``pos``: (value, position after it).

    The two low bits of the first byte give the width (1, 2 or 4 bytes, little-endian,
    value in the upper bits); a value that fits a narrower width is refused, as
    parity-scale-codec does, so that one value has one encoding."""
    if pos >= len(data):
        raise AttestationError(f"dstack envelope: truncated at {what}")
    mode = data[pos] & 0b11
    if mode == 0b11:
        raise AttestationError(f"dstack envelope: {what} uses SCALE's big-integer form, far beyond any evidence")
    width = (1, 2, 4)[mode]
    if pos + width > len(data):
        raise AttestationError(f"dstack envelope: truncated at {what}")
    value = int.from_bytes(data[pos : pos + width], "little") >> 2
    if value < (0, 1 << 6, 1 << 14)[mode]:
        raise AttestationError(f"dstack envelope: {what} is not minimally encoded")
    return value, pos + width


# --- chain ---------------------------------------------------------------------------


@functools.cache
def _pinned_root() -> tuple[x509.Certificate, bytes]:
    pem = importlib.resources.files("bastion.confidential").joinpath(_ROOT_RESOURCE).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(Encoding.DER)
    got = hashlib.sha256(der).hexdigest()
    if got != AWS_NITRO_ROOT_G1_SHA256:
        raise AttestationError(
            f"the shipped AWS Nitro root ({_ROOT_RESOURCE}) has SHA-256 {got}, not the pinned "
            f"{AWS_NITRO_ROOT_G1_SHA256}: the package is damaged or was altered; refusing to verify"
        )
    return cert, der


def _load_der(der: bytes, label: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is not a ValueError
        raise AttestationError(f"certificate chain: {label} is not a valid DER certificate ({exc})") from None


def _extensions(cert: x509.Certificate, label: str) -> x509.Extensions:
    try:
        exts = cert.extensions
    except ValueError as exc:  # duplicate or malformed extensions
        raise AttestationError(f"certificate chain: {label}: bad extensions ({exc})") from None
    for ext in exts:
        if ext.critical and ext.oid not in _KNOWN_CRITICAL:
            raise AttestationError(
                f"certificate chain: {label} has an unsupported critical extension {ext.oid.dotted_string}"
            )
    return exts


def _check_ca(cert: x509.Certificate, label: str, *, following_cas: int) -> None:
    exts = _extensions(cert, label)
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise AttestationError(f"certificate chain: {label} has no basicConstraints, so it is not a CA") from None
    if not bc.value.ca:
        raise AttestationError(f"certificate chain: {label} is not a CA (basicConstraints cA is false)")
    if not bc.critical:
        raise AttestationError(f"certificate chain: {label}: basicConstraints of a CA must be critical")
    if bc.value.path_length is not None and following_cas > bc.value.path_length:
        raise AttestationError(
            f"certificate chain: {label} allows {bc.value.path_length} CA certificates below it, "
            f"the chain has {following_cas}"
        )
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise AttestationError(f"certificate chain: {label} has no keyUsage (a CA needs keyCertSign)") from None
    if not ku.key_cert_sign:
        raise AttestationError(f"certificate chain: {label}: keyUsage lacks keyCertSign, it may not issue certificates")


def _check_leaf(cert: x509.Certificate, label: str) -> None:
    exts = _extensions(cert, label)
    try:
        if exts.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise AttestationError(f"certificate chain: {label} is a CA certificate, expected an end-entity one")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise AttestationError(f"certificate chain: {label} has no keyUsage (needs digitalSignature)") from None
    if not ku.digital_signature:
        raise AttestationError(f"certificate chain: {label}: keyUsage lacks digitalSignature")


def _check_valid_at(cert: x509.Certificate, label: str, now: datetime.datetime) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        raise AttestationError(f"{label} not valid at {_iso(now)}: not valid before {_iso(start)}")
    if now > end:
        raise AttestationError(f"{label} not valid at {_iso(now)}: expired {_iso(end)}")


def _verify_es384(msg: Sign1Message, leaf: x509.Certificate) -> None:
    """ECDSA P-384 / SHA-384 over ``["Signature1", protected, b"", payload]`` (RFC 9052 §4.4).

    With cryptography (OpenSSL), not pycose's ``verify_signature``: pycose's ECDSA path
    runs the pure-Python ``ecdsa`` package, ~50x slower, for the same check."""
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AttestationError(f"leaf certificate: unusable public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationError(f"leaf certificate: expected a P-384 key for ES384, got {_key_name(key)}")
    sig = msg.signature
    if not isinstance(sig, bytes) or len(sig) != _ES384_SIGNATURE_BYTES:
        got = f"{len(sig)} bytes" if isinstance(sig, bytes) else cbor_type(sig)
        raise AttestationError(f"COSE signature: expected {_ES384_SIGNATURE_BYTES} bytes (r || s), got {got}")
    r = int.from_bytes(sig[:48], "big")
    s = int.from_bytes(sig[48:], "big")
    to_be_signed = cbor2.dumps(["Signature1", msg.phdr_encoded, b"", msg.payload])
    try:
        key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError("COSE signature does not verify with the leaf certificate") from None


def _pcrs(value: Any) -> dict[int, bytes]:
    if not isinstance(value, Mapping):
        raise AttestationError(f"payload: pcrs: expected a map, got {cbor_type(value)}")
    if not 1 <= len(value) <= _MAX_PCR_INDEX + 1:
        raise AttestationError(f"payload: pcrs: {len(value)} entries, expected 1..{_MAX_PCR_INDEX + 1}")
    out: dict[int, bytes] = {}
    for index, pcr in value.items():
        if type(index) is not int or not 0 <= index <= _MAX_PCR_INDEX:
            raise AttestationError(f"payload: pcrs: index {index!r}: expected an integer 0..{_MAX_PCR_INDEX}")
        if not isinstance(pcr, bytes):
            raise AttestationError(f"payload: pcrs[{index}]: expected bytes, got {cbor_type(pcr)}")
        if len(pcr) not in _PCR_LENGTHS:
            raise AttestationError(f"payload: pcrs[{index}]: expected 32, 48 or 64 bytes, got {len(pcr)}")
        out[index] = pcr
    return out


# --- shared CBOR / COSE helpers (also used by dev_evidence) ----------------------------


def decode_cbor(data: Any, what: str) -> Any:
    """Exactly one CBOR item filling ``data``; trailing bytes are refused."""
    if not isinstance(data, bytes):
        raise AttestationError(f"{what}: expected bytes, got {cbor_type(data)}")
    fp = io.BytesIO(data)
    try:
        # No duplicate map keys (parsers disagree on which one wins) and shallow nesting.
        # Indefinite lengths stay allowed: the NSM encodes the document as an indefinite map.
        decoder = cbor2.CBORDecoder(fp, max_depth=_MAX_CBOR_DEPTH, allow_duplicate_keys=False)
        value = decoder.decode()
    except Exception as exc:  # cbor2 raises CBORDecodeError, and ValueError/RecursionError/... on hostile input
        raise AttestationError(f"{what}: not valid CBOR ({type(exc).__name__}: {exc})") from None
    if fp.tell() != len(data):
        raise AttestationError(f"{what}: {len(data) - fp.tell()} bytes after the CBOR item")
    return value


def decode_sign1(tagged: bytes, *, alg: type[algorithms.CoseAlgorithm]) -> Sign1Message:
    """A tagged ``COSE_Sign1`` (as :func:`cose_sign1_from_evidence` returns it) decoded by
    pycose, with ``alg`` required in the protected header. The signature is not checked
    here: the caller knows which key to check it with."""
    obj = decode_cbor(tagged, "COSE_Sign1")
    if not isinstance(obj, cbor2.CBORTag) or obj.tag != Sign1Message.cbor_tag:
        got = f"tag {obj.tag}" if isinstance(obj, cbor2.CBORTag) else cbor_type(obj)
        raise AttestationError(f"COSE_Sign1: expected CBOR tag 18, got {got}")
    # cbor2 6 decodes an array inside a tag as a tuple, which pycose 1.1's
    # Sign1Message.decode rejects ("Bytes cannot be decoded as COSE message"); so the
    # array is decoded here and handed to pycose's from_cose_obj, which decode calls.
    items = obj.value
    if not isinstance(items, list | tuple) or len(items) != 4:
        got = f"{len(items)} elements" if isinstance(items, list | tuple) else cbor_type(items)
        raise AttestationError(f"COSE_Sign1: expected an array [protected, unprotected, payload, signature], got {got}")
    protected, unprotected, payload, signature = items
    if not isinstance(protected, bytes) or not isinstance(unprotected, Mapping):
        raise AttestationError("COSE_Sign1: expected a bytes protected header and a map unprotected header")
    if not isinstance(payload, bytes) or not payload:
        raise AttestationError(f"COSE_Sign1: payload: expected non-empty bytes, got {cbor_type(payload)}")
    if not isinstance(signature, bytes):
        raise AttestationError(f"COSE_Sign1: signature: expected bytes, got {cbor_type(signature)}")
    try:
        # (and a map inside a tag as cbor2.frozendict, where pycose wants a dict)
        cose_obj = [protected, dict(unprotected), payload, signature]
        msg = Sign1Message.from_cose_obj(cose_obj, allow_unknown_attributes=True)
    except Exception as exc:  # pycose raises KeyError, TypeError, ValueError, CoseException, ... on bad headers
        raise AttestationError(f"COSE_Sign1: cannot decode its headers ({type(exc).__name__}: {exc})") from None
    if headers.Critical in msg.phdr:
        raise AttestationError("COSE_Sign1: protected header has critical parameters (crit), none are supported")
    if headers.Algorithm in msg.uhdr:
        raise AttestationError("COSE_Sign1: alg must be in the protected header only")
    got_alg = msg.phdr.get(headers.Algorithm)
    if got_alg is not alg:
        name = getattr(got_alg, "fullname", None) or repr(got_alg)
        raise AttestationError(
            f"COSE_Sign1: protected header alg must be {alg.fullname} ({alg.identifier}), got {name}"
        )
    return msg


class PayloadFields:
    """Typed access to a CBOR map of text keys; every error names the field."""

    def __init__(self, value: Any, what: str) -> None:
        if not isinstance(value, Mapping):
            raise AttestationError(f"{what}: expected a CBOR map, got {cbor_type(value)}")
        for key in value:
            if not isinstance(key, str):
                raise AttestationError(f"{what}: keys must be text, got {cbor_type(key)} {key!r:.40}")
        self._map: Mapping[str, Any] = value
        self._what = what

    def get(self, name: str) -> Any:
        if name not in self._map:
            raise AttestationError(f"{self._what}: {name}: missing")
        return self._map[name]

    def reject_unknown(self, allowed: Iterable[str]) -> None:
        extra = sorted(set(self._map) - set(allowed))
        if extra:
            raise AttestationError(f"{self._what}: unexpected field {extra[0]!r:.60}")

    def text(self, name: str) -> str:
        value = self.get(name)
        if not isinstance(value, str):
            raise AttestationError(f"{self._what}: {name}: expected text, got {cbor_type(value)}")
        if not value:
            raise AttestationError(f"{self._what}: {name}: empty")
        return value

    def uint(self, name: str) -> int:
        value = self.get(name)
        if type(value) is not int:
            raise AttestationError(f"{self._what}: {name}: expected an unsigned integer, got {cbor_type(value)}")
        if not 0 < value < 1 << 64:
            raise AttestationError(f"{self._what}: {name}: {value} is out of range (1..2^64-1)")
        return value

    def bytes_(self, name: str, lo: int, hi: int) -> bytes:
        value = self.get(name)
        if not isinstance(value, bytes):
            raise AttestationError(f"{self._what}: {name}: expected bytes, got {cbor_type(value)}")
        if not lo <= len(value) <= hi:
            raise AttestationError(f"{self._what}: {name}: {len(value)} bytes, expected {lo}..{hi}")
        return value

    def optional_bytes(self, name: str, hi: int) -> bytes | None:
        """Absent or null is None; NSM writes null for a field the request left out."""
        if self._map.get(name) is None:
            return None
        return self.bytes_(name, 0, hi)

    def array(self, name: str, lo: int, hi: int) -> list[Any] | tuple[Any, ...]:
        value = self.get(name)
        if not isinstance(value, list | tuple):
            raise AttestationError(f"{self._what}: {name}: expected an array, got {cbor_type(value)}")
        if not lo <= len(value) <= hi:
            raise AttestationError(f"{self._what}: {name}: {len(value)} entries, expected {lo}..{hi}")
        return value


def timestamp_from_ms(ms: int, what: str) -> datetime.datetime:
    """UTC time from milliseconds since the Unix epoch, exactly (no float rounding)."""
    try:
        return datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(milliseconds=ms)
    except OverflowError:
        raise AttestationError(f"{what}: {ms} ms is beyond any date") from None


def cbor_type(value: Any) -> str:
    """The CBOR name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, cbor2.CBORTag):
        return f"tag {value.tag}"
    names = {bytes: "bytes", str: "text", int: "integer", float: "float", list: "array", tuple: "array", Mapping: "map"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _utc_now(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now: expected a timezone-aware datetime")
    return now.astimezone(datetime.timezone.utc)


def _iso(when: datetime.datetime) -> str:
    return when.astimezone(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _key_name(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__
