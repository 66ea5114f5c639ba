"""Sealed model bundles: one file holding a model's config.yaml and versions, encrypted and signed.

Why: a model repository is often a bucket or a volume that CI, operators and backups
can all read. A sealed bundle keeps the weights unreadable there (AES-256-GCM under a
per-bundle data key, itself wrapped by a master key that lives with a key provider)
and lets the server refuse any bundle that a trusted signer did not produce (Ed25519).

Layout (integers big-endian)::

    magic        8 bytes   b"BSTNBNDL"
    version      2         format version, 1
    header_len   4         at most MAX_HEADER_BYTES
    header       header_len bytes of UTF-8 JSON: model, created, bundle_id, key_id,
                           wrapped_key (base64), cipher, chunk_size, signer (fingerprint),
                           files: [{path, size, sha256 of the plaintext}]
    ciphertext             each file in manifest order, in chunks of chunk_size bytes,
                           each chunk AES-256-GCM ciphertext + 16-byte tag
    trailer      104       b"BSTNSIG1" || Ed25519 public key (32) || signature (64)

The signature covers ``SIGNATURE_CONTEXT || SHA-256(everything before the trailer)``,
so header, wrapped key and ciphertext are all covered. Chunk ``j`` of file ``i`` uses
nonce ``i (u32) || j (u64)``: unique because every bundle has a fresh data key. Its
AAD is ``SHA-256(prefix + header) || i || j || final``, which binds each chunk to this
header, its file and its position, so chunks cannot be moved between bundles, files
or places, and a file cannot be truncated at a chunk boundary.

Opening is ordered so nothing unauthenticated is ever decrypted or interpreted:
the signature is checked against the trusted keys first (only the fixed-size prefix
and trailer are read before that), then the header is parsed (bounded), then the
data key is unwrapped, then files are decrypted, into memory only, one at a time,
each checked against the manifest's SHA-256.

Paths inside a bundle: ``config.yaml`` and ``<version>/<path>`` (Triton's layout of
a model directory, without the directory).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.core.errors import BastionError
from bastion.guard.keyproviders import KEY_BYTES, KeyProvider, KeyProviderError, KeyUnwrapError, check_key_id

__all__ = [
    "BUNDLE_SUFFIX",
    "CONFIG_PATH",
    "BadSignature",
    "BundleDecryptError",
    "BundleError",
    "BundleFile",
    "BundleFormatError",
    "BundleHeader",
    "BundleInfo",
    "BundleKeyError",
    "BundleUnsigned",
    "OpenBundle",
    "SealError",
    "UntrustedSigner",
    "VerifiedBundle",
    "fingerprint",
    "generate_signing_key",
    "inspect_bundle",
    "load_private_key",
    "load_public_key",
    "open_bundle",
    "seal_bundle",
    "verify_bundle",
    "write_private_key",
    "write_public_key",
]

BUNDLE_SUFFIX = ".bundle"
CONFIG_PATH = "config.yaml"
MAGIC = b"BSTNBNDL"
FORMAT_VERSION = 1
SIG_MAGIC = b"BSTNSIG1"
SIGNATURE_CONTEXT = b"bastion-bundle-signature-v1\x00"
CIPHER = "AES-256-GCM"
DEFAULT_CHUNK_SIZE = 4 << 20
MAX_HEADER_BYTES = 1 << 20

_PREFIX = struct.Struct(">8sHI")
_TRAILER_BYTES = len(SIG_MAGIC) + 32 + 64
_TAG_BYTES = 16
# Bounds on what a header may claim, so parsing an (unverified, for inspect) header never
# allocates more than the header itself; sizes are also checked against the file's length.
_MAX_FILES = 10_000
_MAX_PATH = 1024
_MAX_FILE_SIZE = 1 << 40
_MAX_WRAPPED_KEY = 4096
_CHUNK_RANGE = (1 << 10, 64 << 20)
_HEADER_KEYS = ("model", "created", "bundle_id", "key_id", "wrapped_key", "cipher", "chunk_size", "signer", "files")
_FILE_KEYS = ("path", "size", "sha256")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav", ".dill", ".cloudpickle")


# ---------------------------------------------------------------------- errors


class BundleError(BastionError):
    """A sealed bundle cannot be used; the message says why and what to do."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class BundleFormatError(BundleError):
    """Not a bundle, truncated, an unsupported format version, or a malformed header."""


class BundleUnsigned(BundleError):
    """The bundle has no signature block."""


class UntrustedSigner(BundleError):
    """Signed by a key that is not among the trusted signers (or none are configured)."""


class BadSignature(BundleError):
    """The signature does not verify: the bundle changed after signing."""


class BundleKeyError(BundleError):
    """The data key cannot be unwrapped: wrong master key, or the key provider failed."""


class BundleDecryptError(BundleError):
    """A file does not decrypt or does not match its manifest digest."""


class SealError(BundleError):
    """The model directory cannot be sealed."""


# ---------------------------------------------------------------------- keys


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short, stable name of a signing key: ``ed25519:`` + 32 hex digits of SHA-256(raw public key)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return "ed25519:" + hashlib.sha256(_raw(public)).hexdigest()[:32]


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``bastion bundle keygen`` writes ``*.pub.pem``)."""
    data = _read_small(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise BundleError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: a {type(key).__name__}, expected an Ed25519 public key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from an unencrypted PKCS#8 PEM file."""
    data = _read_small(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: a {type(key).__name__}, expected an Ed25519 private key")
    return key


def write_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_new(path, pem, 0o600)


def write_public_key(key: Ed25519PublicKey, path: Path) -> None:
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(path, pem, 0o644)


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _read_small(path: Path, what: str) -> bytes:
    try:
        with Path(path).open("rb") as f:
            data = f.read(65537)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > 65536:
        raise BundleError(f"{path}: too large to be a {what} PEM file")
    return data


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: keygen must never overwrite an existing key (that would orphan every bundle it sealed).
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise BundleError(f"{path}: already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------- header


@dataclass(frozen=True)
class BundleFile:
    path: str  # "config.yaml" or "<version>/<path>"
    size: int  # plaintext bytes
    sha256: str  # of the plaintext, hex

    @property
    def version(self) -> int | None:
        head, sep, _ = self.path.partition("/")
        return int(head) if sep else None


@dataclass(frozen=True)
class BundleHeader:
    model: str
    created: str
    bundle_id: str
    key_id: str
    wrapped_key: bytes
    cipher: str
    chunk_size: int
    signer: str
    files: tuple[BundleFile, ...]

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted({v for f in self.files if (v := f.version) is not None}))

    @property
    def plaintext_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        """The header as shown to people (wrapped key as base64)."""
        data = dataclasses.asdict(self)
        data["wrapped_key"] = base64.b64encode(self.wrapped_key).decode("ascii")
        return data


def _chunks(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))  # an empty file is one empty chunk (its tag still authenticates it)


def _ciphertext_len(size: int, chunk_size: int) -> int:
    return size + _TAG_BYTES * _chunks(size, chunk_size)


def _encode_header(header: BundleHeader) -> bytes:
    data = header.to_json()
    return json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two "key_id"s would let a reader and the server disagree on which one counts.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_header(raw: bytes, source: str) -> BundleHeader:
    def bad(message: str) -> BundleFormatError:
        return BundleFormatError(f"{source}: malformed bundle header: {message}")

    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or sorted(data) != sorted(_HEADER_KEYS):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise bad(f"expected the keys {', '.join(sorted(_HEADER_KEYS))}, got {keys}")

    def text(key: str, limit: int = 256) -> str:
        value = data[key]
        if not isinstance(value, str) or not value or len(value) > limit:
            raise bad(f"{key}: expected a string of 1-{limit} characters")
        return value

    def integer(value: Any, where: str, low: int, high: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise bad(f"{where}: expected an integer in [{low}, {high}], got {value!r}")
        return value

    model = text("model")
    if not _MODEL_NAME.fullmatch(model):
        raise bad(f"model: {model!r} is not a model name")
    key_id = text("key_id", 128)
    try:
        check_key_id(key_id)
    except KeyProviderError as exc:
        raise bad(str(exc)) from None
    cipher = text("cipher")
    if cipher != CIPHER:
        raise bad(f"cipher: {cipher!r} is not supported (expected {CIPHER})")
    wrapped_text = text("wrapped_key", _MAX_WRAPPED_KEY * 2)
    try:
        wrapped = base64.b64decode(wrapped_text, validate=True)
    except (binascii.Error, ValueError):
        raise bad("wrapped_key: not base64") from None
    files_data = data["files"]
    if not isinstance(files_data, list) or not 1 <= len(files_data) <= _MAX_FILES:
        raise bad(f"files: expected a list of 1-{_MAX_FILES} entries")
    files: list[BundleFile] = []
    seen: set[str] = set()
    for i, item in enumerate(files_data):
        if not isinstance(item, dict) or sorted(item) != sorted(_FILE_KEYS):
            raise bad(f"files[{i}]: expected the keys {', '.join(_FILE_KEYS)}")
        path = item["path"]
        problem = _path_problem(path)
        if problem:
            raise bad(f"files[{i}].path: {problem}")
        if path in seen:
            raise bad(f"files[{i}].path: {path!r} appears twice")
        seen.add(path)
        size = integer(item["size"], f"files[{i}].size", 0, _MAX_FILE_SIZE)
        digest = item["sha256"]
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise bad(f"files[{i}].sha256: expected 64 lowercase hex digits")
        files.append(BundleFile(path, size, digest))
    if CONFIG_PATH not in seen:
        raise bad(f"files: no {CONFIG_PATH}")
    return BundleHeader(
        model=model,
        created=text("created", 64),
        bundle_id=text("bundle_id", 64),
        key_id=key_id,
        wrapped_key=wrapped,
        cipher=cipher,
        chunk_size=integer(data["chunk_size"], "chunk_size", *_CHUNK_RANGE),
        signer=text("signer", 128),
        files=tuple(files),
    )


def _path_problem(path: Any) -> str | None:
    """Why ``path`` is not a safe bundle path (None when it is)."""
    if not isinstance(path, str) or not path or len(path) > _MAX_PATH:
        return f"expected a relative path of 1-{_MAX_PATH} characters"
    if path == CONFIG_PATH:
        return None
    parts = path.split("/")
    if len(parts) < 2 or not _is_version(parts[0]):
        return f"{path!r}: expected {CONFIG_PATH} or <version>/<file> (version a positive integer)"
    for part in parts[1:]:
        if not part or part in (".", "..") or part.startswith(".") or "\\" in part or "\0" in part:
            return f"{path!r}: empty, hidden, '.', '..' or backslashed component"
    return None


def _is_version(name: str) -> bool:
    return name.isascii() and name.isdigit() and not name.startswith("0") and len(name) <= 18


# ---------------------------------------------------------------------- sealing


def seal_bundle(
    model_dir: Path,
    out: Path,
    *,
    key_id: str,
    signing_key: Ed25519PrivateKey,
    key_provider: KeyProvider,
    model_name: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> BundleHeader:
    """Seal ``model_dir`` (config.yaml and its version directories) into ``out``, atomically.

    The model name defaults to the directory name; the server serves the bundle under
    the name sealed inside it, and refuses it when the file name says otherwise.
    Other top-level entries (metrics.json, test data) and hidden files are not sealed.
    """
    model_dir = Path(model_dir)
    out = Path(out)
    name = model_name or model_dir.resolve().name
    if not _MODEL_NAME.fullmatch(name):
        raise SealError(f"model name {name!r}: expected letters, digits, '.', '_' or '-'")
    try:
        check_key_id(key_id)
    except KeyProviderError as exc:
        raise SealError(str(exc)) from None
    if not _CHUNK_RANGE[0] <= chunk_size <= _CHUNK_RANGE[1]:
        raise SealError(f"chunk_size {chunk_size}: expected {_CHUNK_RANGE[0]}-{_CHUNK_RANGE[1]}")
    sources = _collect(model_dir)
    files = tuple(BundleFile(rel, *_digest(path)) for rel, path in sources)

    data_key = secrets.token_bytes(KEY_BYTES)
    wrapped = key_provider.wrap_key(key_id, data_key)
    if not isinstance(wrapped, bytes) or not 1 <= len(wrapped) <= _MAX_WRAPPED_KEY:
        raise SealError(f"the key provider returned a wrapped key that is not 1-{_MAX_WRAPPED_KEY} bytes")
    header = BundleHeader(
        model=name,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        bundle_id=secrets.token_hex(16),
        key_id=key_id,
        wrapped_key=wrapped,
        cipher=CIPHER,
        chunk_size=chunk_size,
        signer=fingerprint(signing_key),
        files=files,
    )
    header_bytes = _encode_header(header)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise SealError(f"{model_dir}: {len(files)} files make a header over {MAX_HEADER_BYTES} bytes")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes
    header_digest = hashlib.sha256(prefix).digest()
    aead = AESGCM(data_key)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Hidden temp name in the same directory: the repository ignores it, and the rename
    # makes the new bundle appear whole (hot reload never sees half a bundle).
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    body = hashlib.sha256()
    try:
        with tmp.open("xb") as f:
            _write(f, body, prefix)
            for index, (entry, (_, path)) in enumerate(zip(files, sources, strict=True)):
                _encrypt_file(f, body, aead, path, entry, index, header_digest, chunk_size)
            signature = signing_key.sign(SIGNATURE_CONTEXT + body.digest())
            f.write(SIG_MAGIC + _raw(signing_key.public_key()) + signature)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return header


def _collect(model_dir: Path) -> list[tuple[str, Path]]:
    if not (model_dir / CONFIG_PATH).is_file():
        raise SealError(f"{model_dir}: no {CONFIG_PATH}; seal a model directory (config.yaml and 1/, 2/, ...)")
    found: list[tuple[str, Path]] = [(CONFIG_PATH, model_dir / CONFIG_PATH)]
    versions = sorted(
        (int(p.name), p) for p in model_dir.iterdir() if p.is_dir() and _is_version(p.name)
    )
    if not versions:
        raise SealError(f"{model_dir}: no version directories (positive integers such as 1/)")
    for _, vdir in versions:
        for path in sorted(vdir.rglob("*")):
            rel = path.relative_to(model_dir).as_posix()
            if any(part.startswith(".") for part in path.relative_to(vdir).parts) or not path.is_file():
                continue
            if path.suffix.lower() in _PICKLE_SUFFIXES:
                raise SealError(
                    f"{rel}: refusing to seal a pickle file (loading it would run code); "
                    "export to ONNX or save with skops or torch.jit/torch.export"
                )
            problem = _path_problem(rel)
            if problem:
                raise SealError(f"{model_dir}: {problem}")
            found.append((rel, path))
    if len(found) > _MAX_FILES:
        raise SealError(f"{model_dir}: {len(found)} files; a bundle holds at most {_MAX_FILES}")
    return found


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    if size > _MAX_FILE_SIZE:
        raise SealError(f"{path}: larger than {_MAX_FILE_SIZE} bytes")
    return size, h.hexdigest()


def _encrypt_file(
    f: BinaryIO,
    body: Any,
    aead: AESGCM,
    path: Path,
    entry: BundleFile,
    index: int,
    header_digest: bytes,
    chunk_size: int,
) -> None:
    count = _chunks(entry.size, chunk_size)
    check = hashlib.sha256()
    with path.open("rb") as src:
        for j in range(count):
            want = min(chunk_size, entry.size - j * chunk_size)
            plain = src.read(want)
            if len(plain) != want:
                raise SealError(f"{path}: changed while sealing; seal again")
            check.update(plain)
            nonce, aad = _nonce_aad(header_digest, index, j, j == count - 1)
            _write(f, body, aead.encrypt(nonce, plain, aad))
        if src.read(1) or check.hexdigest() != entry.sha256:
            raise SealError(f"{path}: changed while sealing; seal again")


def _write(f: BinaryIO, body: Any, data: bytes) -> None:
    f.write(data)
    body.update(data)


def _nonce_aad(header_digest: bytes, index: int, chunk: int, final: bool) -> tuple[bytes, bytes]:
    position = struct.pack(">IQ", index, chunk)
    return position, header_digest + position + (b"\x01" if final else b"\x00")


# ---------------------------------------------------------------------- opening


@dataclass(frozen=True)
class _Span:
    index: int
    offset: int  # of the file's first ciphertext chunk in the bundle
    entry: BundleFile


class VerifiedBundle:
    """A bundle whose signature verified against a trusted key; still encrypted.

    Only ``verify_bundle`` makes one, so holding one means the signature was checked.
    """

    def __init__(self, data: bytes | memoryview, header: BundleHeader, header_digest: bytes, source: str) -> None:
        self._data = memoryview(data)
        self.header = header
        self.source = source
        self._header_digest = header_digest
        self._spans: dict[str, _Span] = {}
        offset = _PREFIX.size + _header_len(self._data)
        for index, entry in enumerate(header.files):
            self._spans[entry.path] = _Span(index, offset, entry)
            offset += _ciphertext_len(entry.size, header.chunk_size)

    @property
    def signer(self) -> str:
        return self.header.signer

    def unseal(self, key_provider: KeyProvider) -> OpenBundle:
        """Unwrap the data key with ``key_provider``; files are decrypted on request."""
        h = self.header
        try:
            data_key = key_provider.unwrap_key(h.key_id, h.wrapped_key)
        except KeyUnwrapError as exc:
            raise BundleKeyError(f"{self.source}: wrong master key for key id {h.key_id!r}: {exc}") from None
        except KeyProviderError as exc:
            raise BundleKeyError(f"{self.source}: the key provider cannot unwrap key id {h.key_id!r}: {exc}") from None
        except Exception as exc:  # a KMS plug-in's own errors: still this bundle's failure, with its reason
            raise BundleKeyError(
                f"{self.source}: the key provider failed to unwrap key id {h.key_id!r}: {exc!r}"
            ) from None
        if not isinstance(data_key, bytes) or len(data_key) != KEY_BYTES:
            raise BundleKeyError(f"{self.source}: the key provider returned a data key that is not {KEY_BYTES} bytes")
        return OpenBundle(self, AESGCM(data_key))


class OpenBundle:
    """A verified bundle with its data key: decrypts files into memory, never to disk."""

    def __init__(self, verified: VerifiedBundle, aead: AESGCM) -> None:
        self._verified = verified
        self._aead = aead
        self.header = verified.header
        self.source = verified.source

    @property
    def versions(self) -> tuple[int, ...]:
        return self.header.versions

    def read(self, path: str) -> bytes:
        """The plaintext of one file, checked against the manifest's size and SHA-256."""
        v = self._verified
        span = v._spans.get(path)
        if span is None:
            raise BundleDecryptError(f"{self.source}: no file {path!r} in the bundle")
        chunk_size = self.header.chunk_size
        count = _chunks(span.entry.size, chunk_size)
        parts: list[bytes] = []
        offset = span.offset
        for j in range(count):
            length = min(chunk_size, span.entry.size - j * chunk_size) + _TAG_BYTES
            nonce, aad = _nonce_aad(v._header_digest, span.index, j, j == count - 1)
            try:
                parts.append(self._aead.decrypt(nonce, v._data[offset : offset + length], aad))
            except InvalidTag:
                raise BundleDecryptError(
                    f"{self.source}: {path}: chunk {j} does not decrypt: the data key from the key provider "
                    "is not this bundle's, or the bundle was sealed wrongly"
                ) from None
            offset += length
        plain = b"".join(parts)
        if len(plain) != span.entry.size or hashlib.sha256(plain).hexdigest() != span.entry.sha256:
            raise BundleDecryptError(f"{self.source}: {path}: decrypted content does not match its manifest digest")
        return plain

    def read_version(self, version: int) -> dict[str, bytes]:
        """Every file of one version, keyed by its path inside the version directory."""
        prefix = f"{version}/"
        return {f.path[len(prefix) :]: self.read(f.path) for f in self.header.files if f.path.startswith(prefix)}

    def read_all(self) -> Iterable[tuple[str, int]]:
        """Decrypt every file once (to check it), yielding (path, size); nothing is kept."""
        for f in self.header.files:
            yield f.path, len(self.read(f.path))


def _header_len(data: memoryview) -> int:
    return int(_PREFIX.unpack_from(data, 0)[2])


def verify_bundle(
    data: bytes | memoryview, trusted: Sequence[Ed25519PublicKey], *, source: str = "bundle"
) -> VerifiedBundle:
    """Check ``data`` is a bundle signed by one of ``trusted``, then parse its header.

    Raises BundleFormatError, BundleUnsigned, UntrustedSigner or BadSignature, each
    with a message that starts with ``source``.
    """
    view = memoryview(data)
    if len(view) < _PREFIX.size + _TRAILER_BYTES:
        raise BundleFormatError(f"{source}: {len(view)} bytes is too short to be a sealed bundle (truncated?)")
    magic, version, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise BundleFormatError(f"{source}: not a Bastion sealed bundle (wrong magic bytes)")
    if version != FORMAT_VERSION:
        raise BundleFormatError(
            f"{source}: bundle format version {version} is not supported (this server reads {FORMAT_VERSION})"
        )
    trailer = bytes(view[-_TRAILER_BYTES:])
    if trailer[: len(SIG_MAGIC)] != SIG_MAGIC:
        raise BundleUnsigned(
            f"{source}: the bundle is not signed (no signature block; truncated or sealed without a "
            "signing key); seal it with `bastion bundle seal --signing-key`"
        )
    if not trusted:
        raise UntrustedSigner(f"{source}: no trusted signers configured; pass --trusted-signer PUBLIC_KEY.pem")
    public_raw, signature = trailer[len(SIG_MAGIC) : len(SIG_MAGIC) + 32], trailer[len(SIG_MAGIC) + 32 :]
    key = next((k for k in trusted if _raw(k) == public_raw), None)
    if key is None:
        try:
            claimed = fingerprint(Ed25519PublicKey.from_public_bytes(public_raw))
        except ValueError:
            claimed = "an invalid key"
        raise UntrustedSigner(
            f"{source}: signed by {claimed}, which is not a trusted signer "
            f"(trusted: {', '.join(fingerprint(k) for k in trusted)})"
        )
    body = view[: len(view) - _TRAILER_BYTES]
    try:
        key.verify(signature, SIGNATURE_CONTEXT + hashlib.sha256(body).digest())
    except InvalidSignature:
        raise BadSignature(
            f"{source}: the signature does not verify: the bundle was modified after it was signed "
            f"by {fingerprint(key)} (or the signature is corrupt); refusing to decrypt it"
        ) from None

    # Signed by a trusted key from here on; the bounds still guard against a buggy sealer.
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(body):
        raise BundleFormatError(f"{source}: header length {header_len} is out of bounds")
    raw_header = bytes(body[_PREFIX.size : _PREFIX.size + header_len])
    header = _parse_header(raw_header, source)
    if header.signer != fingerprint(key):
        raise BundleFormatError(
            f"{source}: the header names signer {header.signer} but the bundle is signed by {fingerprint(key)}"
        )
    expected = _PREFIX.size + header_len + sum(_ciphertext_len(f.size, header.chunk_size) for f in header.files)
    if expected != len(body):
        raise BundleFormatError(
            f"{source}: the manifest accounts for {expected} bytes but the bundle body has {len(body)}"
        )
    header_digest = hashlib.sha256(body[: _PREFIX.size + header_len]).digest()
    return VerifiedBundle(view, header, header_digest, source)


def open_bundle(
    data: bytes | memoryview,
    trusted: Sequence[Ed25519PublicKey],
    key_provider: KeyProvider,
    *,
    source: str = "bundle",
) -> OpenBundle:
    """Verify the signature, then unwrap the data key: the bundle's files are then readable in memory."""
    return verify_bundle(data, trusted, source=source).unseal(key_provider)


@dataclass(frozen=True)
class BundleInfo:
    """What ``inspect_bundle`` reads without any key: NOT verified."""

    header: BundleHeader
    size: int
    signed_by: str | None  # fingerprint of the key in the signature block, None when unsigned


def inspect_bundle(path: Path) -> BundleInfo:
    """The header and signature block of a bundle file, read without keys and without checking.

    Reads only the prefix, the header and the trailer, so inspecting a large bundle is cheap.
    """
    path = Path(path)
    source = path.name
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or size < _PREFIX.size + _TRAILER_BYTES:
                raise BundleFormatError(f"{source}: too short to be a sealed bundle")
            magic, version, header_len = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise BundleFormatError(f"{source}: not a Bastion sealed bundle (wrong magic bytes)")
            if version != FORMAT_VERSION:
                raise BundleFormatError(f"{source}: bundle format version {version} is not supported")
            if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len + _TRAILER_BYTES > size:
                raise BundleFormatError(f"{source}: header length {header_len} is out of bounds")
            raw_header = f.read(header_len)
            f.seek(size - _TRAILER_BYTES)
            trailer = f.read(_TRAILER_BYTES)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror or exc}") from None
    header = _parse_header(raw_header, source)
    signed_by = None
    if trailer[: len(SIG_MAGIC)] == SIG_MAGIC:
        try:
            signed_by = fingerprint(Ed25519PublicKey.from_public_bytes(trailer[len(SIG_MAGIC) : len(SIG_MAGIC) + 32]))
        except ValueError:
            signed_by = "an invalid key"
    return BundleInfo(header, size, signed_by)
