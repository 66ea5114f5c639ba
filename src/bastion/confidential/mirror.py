"""The trusted worker's fast-recovery mirror: what it decrypted, kept encrypted on the host's disk.

Plinius (Yuhala et al., DSN 2021) keeps an encrypted mirror of an enclave's model state
so that a restarted enclave recovers from it instead of starting over. Here a restarted
worker would otherwise get every bundle's data key from the key-release service again
(one attested release per version) and decrypt every bundle. With ``mirror:`` in
``worker.yaml`` it instead:

* at start, has one key released: the *mirror key*, a data key that the KMS generated
  for this worker (``POST /v1/keys/{key_id}/generate``) and whose wrapped form
  ``<dir>/mirror.key`` holds. The wrapped form is public; only a worker that the key id's
  release policy accepts gets the key back, so a modified worker (another measurement)
  cannot read the mirror any more than it can open a bundle;
* after it loads a version from a bundle, writes ``<dir>/<model>/<version>-<sha256 of the
  bundle>.mirror``: ``MAGIC || nonce (12) || AES-256-GCM(file key, CBOR {"v", "config",
  "files"})``, the associated data binding model, version and bundle digest, so a file
  answers for exactly one bundle and cannot be renamed to stand for another;
* when a ``load`` comes for a bundle whose digest has a mirror file, still checks the
  bundle's pins and signature (``verify_bundle``: no key, no KMS), then reads the mirror
  instead of asking the KMS for the bundle key and decrypting the bundle. A file that
  does not open is removed and the load goes the cold way.

The file key is HKDF-SHA256 of the mirror key (purpose-bound: the released key itself
encrypts nothing). Only ciphertext is written; the plaintext exists only in this
process. Writes are atomic (a temporary file renamed over), not synced: a file torn by a
crash does not authenticate, is removed, and costs one cold load.

What the mirror does not save: verifying the bundle's signature (a SHA-256 of the whole
bundle) and building the runtime session, which are most of a load, plus the one key
release of the mirror key at start (in the background, while the front connects).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bastion.confidential.tensor_codec import dumps_cbor, loads_cbor
from bastion.core.errors import BastionError
from bastion.guard.keyproviders import KEY_BYTES, KeyProviderError, KeyUnwrapError

__all__ = ["KEY_FILE", "MAGIC", "SUFFIX", "DataKeyGenerator", "Mirror", "MirrorContent", "can_generate"]

log = logging.getLogger("bastion.confidential.mirror")

MAGIC = b"BSTNMIR1"
KEY_FILE = "mirror.key"
SUFFIX = ".mirror"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_AAD = b"bastion-mirror-v1\x00"
_FILE_KEY_INFO = b"bastion-mirror-v1 file key\x00"
# cryptography's AES-GCM takes at most 2**31 - 1 bytes in one call; a model this size would
# want chunking, and the worker's frames (max_frame_bytes) already bound what it loads
MAX_PLAINTEXT = (1 << 31) - (1 << 20)
_MAX_KEY_FILE = 16 * 1024
_MAX_FILES = 10_000
_MODEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")  # bundles' model names: one safe path component
_DIGEST = re.compile(r"[0-9a-f]{64}")
UNLOCK_TIMEOUT_S = 60.0  # a load waits this long for the mirror key, then goes cold


@runtime_checkable
class DataKeyGenerator(Protocol):
    """A key provider that can also draw a fresh data key (``kms_client.KmsKeyProvider``)."""

    def unwrap_key(self, key_id: str, wrapped: bytes) -> bytes: ...

    def generate_data_key(self, key_id: str) -> tuple[bytes, bytes]: ...


def can_generate(provider: object) -> bool:
    return callable(getattr(provider, "generate_data_key", None)) and callable(getattr(provider, "unwrap_key", None))


@dataclass(frozen=True)
class MirrorContent:
    """One version as the worker decrypted it from its bundle: the bundle's config.yaml and
    the version's files (paths inside the version directory)."""

    config: bytes
    files: dict[str, bytes]


class MirrorError(BastionError):
    http_status = 500
    grpc_code = "INTERNAL"


class Mirror:
    """The mirror in ``directory``, keyed through ``provider`` under KMS key id ``key_id``.

    ``start()`` unlocks it in a background thread; ``read`` waits for that. Until unlocked,
    and for good if unlocking fails (the KMS refuses this worker or cannot be reached),
    ``read`` finds nothing and ``write`` writes nothing: every load is cold. Thread-safe.
    """

    def __init__(
        self, directory: Path, key_id: str, provider: DataKeyGenerator, *, max_bytes: int = MAX_PLAINTEXT
    ) -> None:
        self.directory = Path(directory)
        self.key_id = key_id
        self.provider = provider
        self.max_bytes = min(max_bytes, MAX_PLAINTEXT)
        self._aead: AESGCM | None = None
        self._unlocked = threading.Event()
        self._started = False
        self._lock = threading.Lock()
        self.status = "locked"  # locked | released | generated | off: ...

    # ---- the key ----------------------------------------------------------------------
    def start(self) -> None:
        """Unlock in the background: the key release overlaps the front's connection."""
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self.unlock, name="mirror-unlock", daemon=True).start()

    def unlock(self) -> bool:
        """Have the mirror key released (or generated); True when the mirror can be used."""
        t0 = time.perf_counter()
        try:
            key, how = self._key()
            self._aead = AESGCM(_file_key(key, self.key_id))
            self.status = how
            log.info(
                "fast-recovery mirror %s: key %s by the key provider (key id %s) in %.1f ms",
                self.directory,
                how,
                self.key_id,
                (time.perf_counter() - t0) * 1e3,
            )
        except (KeyProviderError, MirrorError, OSError) as exc:
            self._aead = None
            self.status = f"off: {exc}"
            log.warning("fast-recovery mirror %s is off for this worker: %s", self.directory, exc)
        except Exception as exc:  # a key provider's own errors: the mirror is an optimisation, never fatal
            self._aead = None
            self.status = f"off: {exc!r}"
            log.exception("fast-recovery mirror %s is off for this worker", self.directory)
        finally:
            self._started = True
            self._unlocked.set()
        return self._aead is not None

    def _key(self) -> tuple[bytes, str]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stored = self._read_key_file()
        if stored is not None:
            try:
                return _check_key(self.provider.unwrap_key(self.key_id, stored)), "released"
            except KeyUnwrapError as exc:
                # the master key no longer opens it (deleted, or the file was replaced): the old
                # mirror files are unreadable for good
                log.warning("the mirror key in %s does not unwrap (%s); generating a new one", self.key_path, exc)
        wrapped, key = self.provider.generate_data_key(self.key_id)
        key = _check_key(key)
        _write_atomic(
            self.key_path,
            json.dumps({"v": 1, "key_id": self.key_id, "wrapped": base64.b64encode(wrapped).decode()}).encode(),
        )
        removed = self._remove_all()
        if removed:
            log.warning("removed %d mirror file(s) written under the previous mirror key", removed)
        return key, "generated"

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    def _read_key_file(self) -> bytes | None:
        """The wrapped key, or None (absent, malformed, or made for another key id: a new one is generated)."""
        try:
            with self.key_path.open("rb") as f:
                raw = f.read(_MAX_KEY_FILE + 1)
        except FileNotFoundError:
            return None
        try:
            if len(raw) > _MAX_KEY_FILE:
                raise ValueError("too large")
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("v") != 1 or not isinstance(data.get("wrapped"), str):
                raise ValueError('expected {"v": 1, "key_id", "wrapped"}')
            wrapped = base64.b64decode(data["wrapped"], validate=True)
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            log.warning("ignoring the malformed mirror key file %s (%s)", self.key_path, exc)
            return None
        if data.get("key_id") != self.key_id:
            log.warning(
                "the mirror key file %s is for key id %r, not %r", self.key_path, data.get("key_id"), self.key_id
            )
            return None
        return wrapped

    def wait(self, timeout_s: float = UNLOCK_TIMEOUT_S) -> bool:
        """Wait for ``start``'s unlock; True when the mirror is usable."""
        if not self._started:
            return False
        self._unlocked.wait(timeout_s)
        return self._aead is not None

    # ---- the files --------------------------------------------------------------------
    def path(self, model: str, version: int, digest: str) -> Path:
        if not _MODEL.fullmatch(model) or not _DIGEST.fullmatch(digest) or version < 1:
            raise MirrorError(f"no mirror path for {model[:64]!r}/{version} ({digest[:64]!r})")
        return self.directory / model / f"{version}-{digest}{SUFFIX}"

    def read(self, model: str, version: int, digest: str) -> MirrorContent | None:
        """The version mirrored from bundle ``digest``, or None (no file, mirror off, or a
        file that does not open: then it is removed)."""
        if not self.wait():
            return None
        aead = self._aead
        assert aead is not None
        try:
            path = self.path(model, version, digest)
        except MirrorError:
            return None  # not a name a bundle can have: nothing was ever mirrored under it
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > self.max_bytes + len(MAGIC) + _NONCE_BYTES + _TAG_BYTES:
                    raise MirrorError(f"{size} bytes, more than this worker loads")
                blob = f.read()
        except FileNotFoundError:
            return None
        except (OSError, MirrorError) as exc:
            self._discard(path, str(exc))
            return None
        try:
            if len(blob) < len(MAGIC) + _NONCE_BYTES + _TAG_BYTES or blob[: len(MAGIC)] != MAGIC:
                raise MirrorError("not a mirror file (magic)")
            nonce = blob[len(MAGIC) : len(MAGIC) + _NONCE_BYTES]
            try:
                plain = aead.decrypt(nonce, blob[len(MAGIC) + _NONCE_BYTES :], _aad(model, version, digest))
            except InvalidTag:
                raise MirrorError("does not authenticate under this worker's mirror key") from None
            return _decode(plain)
        except MirrorError as exc:
            self._discard(path, exc.message)
            return None

    def write(self, model: str, version: int, digest: str, content: MirrorContent) -> bool:
        """Mirror one loaded version; drop this version's files of other bundles. Never
        raises: a mirror that cannot be written only means the next start is cold."""
        if not self._unlocked.is_set() or self._aead is None:
            return False
        try:
            path = self.path(model, version, digest)
            plain = dumps_cbor({"v": 1, "config": content.config, "files": content.files})
            if len(plain) > self.max_bytes:
                log.info("%s/%s is not mirrored: %d bytes, more than %d", model, version, len(plain), self.max_bytes)
                return False
            nonce = secrets.token_bytes(_NONCE_BYTES)
            blob = MAGIC + nonce + self._aead.encrypt(nonce, plain, _aad(model, version, digest))
            del plain
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_atomic(path, blob)
            for old in path.parent.glob(f"{version}-*{SUFFIX}"):
                if old != path:
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()
            return True
        except (OSError, MirrorError, ValueError) as exc:
            log.warning("cannot mirror %s/%s: %s", model, version, exc)
            return False

    def _discard(self, path: Path, why: str) -> None:
        log.warning("mirror file %s removed, loading from the bundle instead: %s", path, why)
        with contextlib.suppress(OSError):
            path.unlink()

    def _remove_all(self) -> int:
        removed = 0
        for old in self.directory.glob(f"*/*{SUFFIX}"):
            with contextlib.suppress(OSError):
                old.unlink()
                removed += 1
        return removed


def _check_key(key: Any) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise MirrorError(f"the key provider gave a mirror key that is not {KEY_BYTES} bytes")
    return key


def _file_key(key: bytes, key_id: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_FILE_KEY_INFO + key_id.encode()).derive(
        key
    )


def _aad(model: str, version: int, digest: str) -> bytes:
    return _AAD + model.encode() + b"\x00" + str(version).encode() + b"\x00" + digest.encode()


def _decode(plain: bytes) -> MirrorContent:
    """Authenticated, so written by this worker; still checked, as anything decoded is."""
    try:
        data = loads_cbor(plain, "mirror", max_depth=4)
    except BastionError as exc:
        raise MirrorError(exc.message) from None
    if not isinstance(data, Mapping) or sorted(data) != ["config", "files", "v"] or data["v"] != 1:
        raise MirrorError('expected the map {"v": 1, "config", "files"}')
    config, files = data["config"], data["files"]
    if not isinstance(config, bytes) or not isinstance(files, Mapping) or len(files) > _MAX_FILES:
        raise MirrorError("config: expected bytes; files: expected a map of path to bytes")
    if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()):
        raise MirrorError("files: expected a map of path to bytes")
    return MirrorContent(config, dict(files))


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a new 0600 file renamed over it (readers see all or nothing)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
