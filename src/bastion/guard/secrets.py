"""The server's master secret and the keys derived from it.

One random 32-byte master secret per deployment lives in a file beside the key store
(mode 0600, never in the database, so a leaked database alone cannot forge anything).
Purpose-bound keys are derived from it with HKDF-SHA256: the keyed hash of API keys,
the audit log's hash chain, the selection randomness of the defenses.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_BYTES = 32


def load_or_create_secret(path: Path, *, create: bool = True) -> bytes:
    """Read the master secret at ``path``; create it (0600) when missing and ``create``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise
        path.parent.mkdir(parents=True, exist_ok=True)
        data = secrets.token_bytes(SECRET_BYTES)
        # Written whole to a private temporary file, then linked into place: link() fails if
        # the name exists, so of two processes racing to create it one wins and the other
        # reads the winner's secret, and no reader ever sees a file that is still empty
        # (O_CREAT|O_EXCL on the final name would let one read it between create and write).
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return load_or_create_secret(path, create=False)
        finally:
            tmp.unlink(missing_ok=True)
        return data
    if len(data) < SECRET_BYTES:
        raise ValueError(f"{path}: secret is {len(data)} bytes, expected at least {SECRET_BYTES}")
    return data


def derive_key(master: bytes, purpose: str, length: int = 32) -> bytes:
    """A key for one ``purpose`` (e.g. "api-key-hash", "audit-chain"); different purposes
    give independent keys."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=purpose.encode()).derive(master)
