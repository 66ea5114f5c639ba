"""Master keys for sealed bundles: where they live and how a data key is wrapped.

Each bundle's files are encrypted under a fresh random 32-byte *data key*; the bundle
stores only that data key *wrapped* (encrypted) under a master key named by a key id.
The protocol is wrap/unwrap rather than "hand me the master key" because a KMS never
lets its keys out: a KMS-backed provider forwards both calls to the KMS, while the
local providers (environment variable, key file) hold the master key in memory and
wrap with AES-256-GCM themselves.

Provider specs (``--key-provider`` / ``--bundle-key-provider``):

* ``env:VAR``: the variable holds the base64 of a 32-byte master key, used for every
  key id;
* ``file:PATH``: PATH is a key file (base64 text, as ``bastion bundle keygen`` writes,
  or 32 raw bytes) used for every key id, or a directory holding ``<key-id>.key``
  files, one master key per key id (key rotation: old bundles keep their key id);
* ``module:pkg.mod:factory``: ``factory()`` returns any object with ``wrap_key`` and
  ``unwrap_key`` (the KMS hook).
"""

from __future__ import annotations

import base64
import binascii
import importlib
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.core.errors import BastionError

__all__ = [
    "KEY_BYTES",
    "EnvKeyProvider",
    "FileKeyProvider",
    "KeyProvider",
    "KeyProviderError",
    "KeyUnwrapError",
    "LocalKeyProvider",
    "check_key_id",
    "decode_master_key",
    "encode_master_key",
    "generate_master_key",
    "load_key_provider",
    "write_master_key",
]

log = logging.getLogger("bastion.guard")

KEY_BYTES = 32  # AES-256
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_WRAP_VERSION = b"\x01"
_NONCE_BYTES = 12
# The key id is bound into the wrap, so a bundle cannot be relabelled to another key id
# that happens to hold the same key material.
_WRAP_AAD = b"bastion-bundle-data-key-v1\x00"
_WRAPPED_BYTES = 1 + _NONCE_BYTES + KEY_BYTES + 16
_MAX_KEY_FILE_BYTES = 4096  # a key file is a few dozen bytes; never read a huge file by mistake


class KeyProviderError(BastionError):
    """The key provider is misconfigured or cannot give the key (missing variable, bad file, ...)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class KeyUnwrapError(KeyProviderError):
    """A wrapped data key does not open under the master key: wrong key, or a corrupt wrap."""


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps bundle data keys under the master key named ``key_id``.

    ``wrap_key`` returns opaque bytes (at most a few KiB) that ``unwrap_key`` of the
    same provider turns back into the data key. ``unwrap_key`` raises
    ``KeyUnwrapError`` when the master key is not the one the data key was wrapped
    with, and ``KeyProviderError`` for anything else (e.g. the KMS is unreachable).
    Both may be called from worker threads.
    """

    def wrap_key(self, key_id: str, data_key: bytes) -> bytes: ...

    def unwrap_key(self, key_id: str, wrapped: bytes) -> bytes: ...


def check_key_id(key_id: str) -> str:
    """A key id is a short name (letters, digits, ``.``, ``_``, ``-``): it may become a file name."""
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise KeyProviderError(
            f"key id {key_id!r}: expected 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return key_id


def generate_master_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def encode_master_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def write_master_key(path: Path, key: bytes) -> None:
    """Write ``key`` as base64 to a new file, mode 0600; never overwrites (that would orphan bundles)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyProviderError(f"{path}: already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(encode_master_key(key) + "\n")


def decode_master_key(text: str | bytes, source: str) -> bytes:
    """The 32-byte key in base64 ``text`` (standard or URL-safe alphabet, whitespace ignored)."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    compact = b"".join(raw.split())
    try:
        key = base64.b64decode(compact.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
    except (binascii.Error, ValueError):
        raise KeyProviderError(f"{source}: not base64; expected the base64 of a {KEY_BYTES}-byte key") from None
    if len(key) != KEY_BYTES:
        raise KeyProviderError(f"{source}: the key is {len(key)} bytes, expected {KEY_BYTES} (AES-256)")
    return key


class LocalKeyProvider:
    """A provider that holds master keys itself and wraps with AES-256-GCM.

    Subclasses implement ``master_key(key_id)``.
    """

    def master_key(self, key_id: str) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def wrap_key(self, key_id: str, data_key: bytes) -> bytes:
        if len(data_key) != KEY_BYTES:
            raise KeyProviderError(f"data key is {len(data_key)} bytes, expected {KEY_BYTES}")
        nonce = secrets.token_bytes(_NONCE_BYTES)  # random: one master key wraps many data keys
        sealed = AESGCM(self.master_key(key_id)).encrypt(nonce, data_key, _WRAP_AAD + key_id.encode())
        return _WRAP_VERSION + nonce + sealed

    def unwrap_key(self, key_id: str, wrapped: bytes) -> bytes:
        if len(wrapped) != _WRAPPED_BYTES or wrapped[:1] != _WRAP_VERSION:
            raise KeyUnwrapError(
                f"the wrapped data key ({len(wrapped)} bytes) was not made by a local key provider "
                f"(env:/file:); was the bundle sealed with a KMS provider?"
            )
        nonce, sealed = wrapped[1 : 1 + _NONCE_BYTES], wrapped[1 + _NONCE_BYTES :]
        try:
            return AESGCM(self.master_key(key_id)).decrypt(nonce, sealed, _WRAP_AAD + key_id.encode())
        except InvalidTag:
            raise KeyUnwrapError(
                f"the data key does not unwrap under master key {key_id!r} from {self}: "
                "this is not the master key the bundle was sealed with"
            ) from None


class EnvKeyProvider(LocalKeyProvider):
    """One master key, base64 in an environment variable, read once at construction."""

    def __init__(self, var: str) -> None:
        self.var = var
        value = os.environ.get(var)
        if not value:
            raise KeyProviderError(f"env:{var}: the environment variable is not set (expected a base64 32-byte key)")
        self._key = decode_master_key(value, f"env:{var}")

    def master_key(self, key_id: str) -> bytes:
        check_key_id(key_id)
        return self._key

    def __str__(self) -> str:
        return f"env:{self.var}"


class FileKeyProvider(LocalKeyProvider):
    """A key file (one key for every key id) or a directory of ``<key-id>.key`` files.

    A single file is read at construction; directory keys are read when first needed
    and cached, so a key added for a new key id is picked up without a restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._cache: dict[str, bytes] = {}
        self._single: bytes | None = None
        if self.path.is_dir():
            return
        if not self.path.exists():
            raise KeyProviderError(f"file:{self.path}: no such key file or directory")
        self._single = _read_key_file(self.path)

    def master_key(self, key_id: str) -> bytes:
        check_key_id(key_id)
        if self._single is not None:
            return self._single
        key = self._cache.get(key_id)
        if key is None:
            path = self.path / f"{key_id}.key"
            if not path.is_file():
                raise KeyUnwrapError(f"file:{self.path}: no key file {path.name} for key id {key_id!r}")
            key = self._cache[key_id] = _read_key_file(path)
        return key

    def __str__(self) -> str:
        return f"file:{self.path}"


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyProviderError(f"file:{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyProviderError(f"file:{path}: too large for a key file (expected a base64 32-byte key)")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Warn, not refuse: secret volumes are often mounted 0644 and the operator may rely
        # on directory permissions instead.
        log.warning("master key file is readable by group or others", extra={"path": str(path)})
    if len(data) == KEY_BYTES:
        return data  # raw: 32 characters of base64 could only hold 24 bytes
    return decode_master_key(data, f"file:{path}")


def load_key_provider(spec: str) -> KeyProvider:
    """The provider for ``env:VAR``, ``file:PATH`` or ``module:pkg.mod:factory``."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise KeyProviderError(
            f"key provider {spec!r}: expected env:VAR, file:PATH or module:pkg.mod:factory"
        )
    if kind == "env":
        return EnvKeyProvider(rest)
    if kind == "file":
        return FileKeyProvider(Path(rest).expanduser())
    if kind == "module":
        module_name, sep, attr = rest.rpartition(":")
        if not sep or not module_name or not attr:
            raise KeyProviderError(f"key provider {spec!r}: expected module:pkg.mod:factory")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise KeyProviderError(f"key provider {spec!r}: cannot import {module_name}: {exc}") from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise KeyProviderError(f"key provider {spec!r}: {module_name} has no callable {attr!r}")
        provider = factory()
        if not isinstance(provider, KeyProvider):
            raise KeyProviderError(
                f"key provider {spec!r}: {attr}() returned {type(provider).__name__}, which lacks "
                "wrap_key(key_id, data_key) and unwrap_key(key_id, wrapped)"
            )
        return provider
    raise KeyProviderError(f"key provider {spec!r}: unknown kind {kind!r}; expected env:, file: or module:")
