"""The audit log's on-disk format, shared by its writer (``guard/audit.py``), its verifier
(``guard/audit_verify.py``) and its readers (``guard/audit_read.py``): segment names, the
chain fields, the HMAC link and how a line is split and parsed. The format itself is
described in ``guard/audit.py``'s module docstring; the multi-replica tree that
``verify`` and the readers walk (and ``audit ship`` writes) is described in
``guard/audit_ship.py``'s.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

import orjson

RESERVED_FIELDS = frozenset({"seq", "writer", "prev", "mac"})
RECOVERED_ACTION = "audit.recovered"
GENESIS_MAC = bytes(32)
DEFAULT_MAX_SEGMENT_BYTES = 64 << 20

# A writer id is a plain file-name component: no separator, no leading '.' or '-' (so never
# '.', '..' or an option), at most 80 characters (a Kubernetes pod name of 63, a dot and
# the worker index). '-' is allowed for replica names
# (``front-a.0``); a segment name still parses one way, because the segment number after
# the last '-' is all digits. The same set names a replica (a directory of a shipped tree).
WRITER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
REPLICA_RE = WRITER_RE
_SEGMENT_RE = re.compile(r"^audit-([A-Za-z0-9_][A-Za-z0-9_.-]{0,79})-(\d{6,})\.jsonl$")
# a shipped copy of an active segment, cut at its last complete line (guard/audit_ship.py)
PARTIAL_SUFFIX = ".partial"
_PARTIAL_RE = re.compile(r"^audit-([A-Za-z0-9_][A-Za-z0-9_.-]{0,79})-(\d{6,})\.jsonl\.partial$")
# ``<segment>.sha256`` beside a shipped segment: its digest, in sha256sum's format
DIGEST_SUFFIX = ".sha256"
# ``<replica>.<worker index>``: the writer ids ``bastion serve --replica-id`` gives
_REPLICA_WRITER_RE = re.compile(r"^(.+)\.(\d+)$")
# how far below the given directory ``chains`` looks (DEST/<replica>/<writer>/ is 2), and
# how many directories it reads at most: a stray deep or huge tree is refused, not walked
MAX_TREE_DEPTH = 3
MAX_TREE_DIRS = 4096
# a longer line is reported, not parsed: no record comes near it (client strings are capped)
MAX_LINE_BYTES = 4 << 20
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


def replica_of(writer: str) -> str | None:
    """The replica of a ``<replica>.<worker>`` writer id (``front-a.0`` -> ``front-a``), or
    None for a plain one (``0``)."""
    m = _REPLICA_WRITER_RE.match(writer)
    return m.group(1) if m else None


def segments(directory: Path, *, include_partial: bool = False) -> dict[str, list[tuple[int, Path]]]:
    """Writer id -> its segments, oldest first. ``include_partial`` (a shipped directory):
    a ``.partial`` copy counts as the writer's newest segment when no complete segment of
    that number or later is there (once the complete one is, the partial is stale)."""
    found: dict[str, list[tuple[int, Path]]] = {}
    partial: dict[str, tuple[int, Path]] = {}
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    for entry in entries:
        if len(entry.name) > 136:  # audit- + 80 + -n + .jsonl.partial: longer is not ours
            continue
        m = _SEGMENT_RE.match(entry.name)
        if m and entry.is_file():
            found.setdefault(m.group(1), []).append((int(m.group(2)), Path(entry.path)))
        elif include_partial and (m := _PARTIAL_RE.match(entry.name)) and entry.is_file():
            n, before = int(m.group(2)), partial.get(m.group(1))
            if before is None or n > before[0]:
                partial[m.group(1)] = (n, Path(entry.path))
    for writer, (n, path) in partial.items():
        segs = found.setdefault(writer, [])
        if all(k < n for k, _ in segs):
            segs.append((n, path))
    for segs in found.values():
        segs.sort()
    return dict(sorted(found.items()))


class Chain(NamedTuple):
    """One writer's chain in a tree of audit directories. ``label`` names it in reports and
    anchors: the writer id, or ``<writer>@<directory>`` when that id has chains in more than
    one directory. ``directory`` is relative to the root ('' for the root itself)."""

    label: str
    writer: str
    directory: str
    segments: list[tuple[int, Path]]

    def display(self, path: Path) -> str:
        """How a segment of this chain is named in problems: relative to the root."""
        return f"{self.directory}/{path.name}" if self.directory else path.name


def chains(root: Path) -> list[Chain]:
    """Every writer's chain in ``root`` and in its subdirectories down to ``MAX_TREE_DEPTH``
    levels: one server's directory, every replica's segments in one directory, or a root
    with a directory per replica (``audit ship``'s layout). Symbolic links to directories
    and hidden directories (``.ship-tmp``) are not entered. Raises ``AuditError`` past
    ``MAX_TREE_DIRS`` directories."""
    root = Path(root)
    found: list[tuple[str, str, list[tuple[int, Path]]]] = []
    pending: list[tuple[Path, str, int]] = [(root, "", 0)]
    seen = 0
    while pending:
        directory, rel, depth = pending.pop()
        seen += 1
        if seen > MAX_TREE_DIRS:
            raise AuditError(f"{root}: more than {MAX_TREE_DIRS} directories below it; point at a subdirectory")
        try:
            for writer, segs in segments(directory, include_partial=True).items():
                found.append((writer, rel, segs))
            if depth >= MAX_TREE_DEPTH:
                continue
            entries = sorted(os.scandir(directory), key=lambda e: e.name, reverse=True)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed while we walk
        except PermissionError as err:
            # skipping it would pass a tree whose chains were never read
            raise AuditError(f"{directory}: cannot read it ({err.strerror})") from None
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            pending.append((Path(entry.path), f"{rel}/{entry.name}" if rel else entry.name, depth + 1))
    count: dict[str, int] = {}
    for writer, _rel, _segs in found:
        count[writer] = count.get(writer, 0) + 1
    out = [Chain(writer if count[writer] == 1 else f"{writer}@{rel or '.'}", writer, rel, segs)
           for writer, rel, segs in found]
    return sorted(out, key=lambda c: (c.label, c.directory))


def read_lines(f: IO[bytes], max_len: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line with its newline) of a binary file; the last line may
    lack the newline. A line longer than ``max_len`` is skipped to its end and given as
    None, so that no untrusted line is held or parsed whole."""
    lineno = 0
    while True:
        raw = f.readline(max_len + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_len:
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(1 << 20)
            yield lineno, None
        else:
            yield lineno, raw


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
