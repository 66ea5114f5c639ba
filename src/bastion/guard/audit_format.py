"""The audit log's on-disk format, shared by its writer (``guard/audit.py``), its verifier
(``guard/audit_verify.py``) and its readers (``guard/audit_read.py``): segment names, the
chain fields, the HMAC link and how a line is split and parsed. The format itself is
described in ``guard/audit.py``'s module docstring.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

RESERVED_FIELDS = frozenset({"seq", "writer", "prev", "mac"})
RECOVERED_ACTION = "audit.recovered"
GENESIS_MAC = bytes(32)
DEFAULT_MAX_SEGMENT_BYTES = 64 << 20

_SEGMENT_RE = re.compile(r"^audit-([A-Za-z0-9_][A-Za-z0-9_.]{0,63})-(\d{6,})\.jsonl$")
WRITER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,63}$")
_MAC_PREFIX = b',"mac":"'
_SUFFIX_LEN = len(_MAC_PREFIX) + 64 + 2  # ,"mac":"<64 hex>"}
HEX_DIGITS = frozenset(b"0123456789abcdef")


class AuditError(RuntimeError):
    """The audit log cannot be opened or written as asked."""


class ChainMac:
    """HMAC-SHA256 with the key's inner and outer pad states hashed once (RFC 2104): half
    the cost of ``hmac.digest`` per record, which re-derives them on every call."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def pads(self) -> tuple[Any, Any]:
        """The hash states after the inner and outer pads (copy before use)."""
        return self._inner, self._outer

    def __call__(self, prev: bytes, body: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(prev)
        inner.update(body)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def chain_mac(chain_key: bytes, prev_mac: bytes, body: bytes) -> bytes:
    """``HMAC-SHA256(chain_key, prev_mac || body)``: the link of one record (raw bytes)."""
    return hmac.digest(chain_key, prev_mac + body, "sha256")


def segment_name(writer: str, n: int) -> str:
    return f"audit-{writer}-{n:06d}.jsonl"


def segments(directory: Path) -> dict[str, list[tuple[int, Path]]]:
    """Writer id -> its segments, oldest first."""
    found: dict[str, list[tuple[int, Path]]] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return {}
    for entry in entries:
        m = _SEGMENT_RE.match(entry.name)
        if m and entry.is_file():
            found.setdefault(m.group(1), []).append((int(m.group(2)), Path(entry.path)))
    for segs in found.values():
        segs.sort()
    return dict(sorted(found.items()))


def split_line(line: bytes) -> tuple[bytes, str] | None:
    """(body that was MACed, mac hex) of a complete line without its newline, or None when
    it does not end the way the writer ends lines."""
    if len(line) < _SUFFIX_LEN + 2 or line[-2:] != b'"}' or line[-_SUFFIX_LEN:-66] != _MAC_PREFIX:
        return None
    mac_hex = line[-66:-2]
    if not HEX_DIGITS.issuperset(mac_hex):
        return None
    return line[:-_SUFFIX_LEN] + b"}", mac_hex.decode()


def tail_lines(path: Path, count: int, *, chunk: int = 1 << 16) -> tuple[list[bytes], int]:
    """The last ``count`` complete lines of ``path`` (without newlines, oldest first) and
    the size of a partial line after them (0 when the file ends with a newline)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        buf = b""
        partial = -1
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            if partial < 0:
                if not buf.endswith(b"\n"):
                    nl = buf.rfind(b"\n")
                    if nl < 0 and pos > 0:
                        continue  # the partial line is longer than what we read so far
                    partial = len(buf) - (nl + 1)
                else:
                    partial = 0
            if buf.count(b"\n") > count:
                break
    if partial < 0:
        partial = 0
    complete = buf[: len(buf) - partial]
    lines = complete.split(b"\n")[:-1] if complete else []
    if pos > 0:
        lines = lines[1:]  # the first one may be cut at the chunk boundary
    return lines[-count:] if count else [], partial


def parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def record_ts(rec: Mapping[str, Any]) -> float:
    ts = rec.get("ts")
    return float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else 0.0
