"""The tamper-evident audit log: one JSON line per request or admin action, HMAC-chained.

Layout. Records are JSON lines in segment files ``audit-<writer>-<n>.jsonl`` (``n`` six
digits, from 0) inside one directory. Each server process is one *writer* with its own
``writer_id`` and its own chain; a segment is rotated when it would grow past
``max_segment_bytes``, and the first record of the next segment chains to the last one of
the previous segment. ``audit-<writer>.lock`` (an ``flock``) stops two processes from
writing the same chain.

Chain. The writer adds four fields to whatever the caller gives: ``seq`` (0, 1, 2, … per
writer, so a deleted line leaves a gap), ``writer``, ``prev`` (hex of the previous record's
``mac``; 64 zeros for the first) and ``mac``::

    mac = HMAC-SHA256(chain_key, prev_mac || body)

where ``body`` is the exact bytes of the line as written, without its ``,"mac":"…"`` suffix
(the line is ``body`` with that suffix spliced before the closing brace). MACing the bytes
as written, rather than a re-serialisation, means the verifier needs no canonical form.
``chain_key`` is ``derive_key(master_secret, "audit-chain")``: someone who can edit the
files but lacks the master secret cannot recompute the chain.

Durability rule. ``append`` hands the complete line to the kernel with one ``os.write`` on
an ``O_APPEND`` descriptor before it returns (a short write is continued until the line is
complete), so a record whose response was sent survives the process being killed (SIGKILL,
OOM killer) at any moment afterwards: the data is in the page cache. The data plane's
answers use ``append_batched`` instead: the records queued during one event-loop iteration
are chained exactly as ``append`` chains them (one line, one ``seq`` and one MAC each) and
written by one callback at the start of the next iteration, with one ``os.write`` per
segment; each request awaits that write before its answer leaves, so the rule is the same
(a response is sent only after its record is in the kernel) at one system call per batch
instead of one per request. A background thread
fsyncs (``fdatasync``) dirty segments every ``fsync_interval_s`` (default 0.2 s), so a
power loss or kernel crash loses at most the records of that window; ``close()`` fsyncs
before it returns. With ``fsync_interval_s <= 0`` every ``append`` fsyncs itself (slow).
If the line cannot be written completely (``ENOSPC``, ``EIO``), ``append`` raises
``OSError``; a partly written line is then left behind, and the next ``append`` starts a
new segment whose first record notes the recovery.

Restart. A writer continues the chain of its newest segment. If that segment ends in a
partial line (power loss in the middle of a write), the writer leaves it alone and starts
a new segment whose first record (``"action": "audit.recovered"``) names the segment and
the partial line's size; ``verify`` reports such an acknowledged partial line as a
warning, an unacknowledged one as a problem. A writer whose newest record does not verify
under the key it was given refuses to start (``AuditError``): a chain written under two
keys could never be verified.

What the files alone cannot show. ``verify`` finds edited, deleted, reordered and inserted
lines, a partial last line and a missing middle segment. Deleting a writer's *newest*
segments, or truncating a segment cleanly at a line boundary, leaves a shorter chain that
is still valid, and removing the *oldest* segments looks like retention pruning. Anchor
the chain elsewhere: record ``head()`` (each writer's last ``seq`` and ``mac``)
periodically somewhere the server cannot write (a ticket, another host, a WORM bucket) and
pass those anchors to ``verify``; every anchored record must still be there.

Threads. ``append`` takes a lock (uncontended, ~0.1 µs) around the sequence number, the
MAC and the write, so the event loop and admin threads may share one ``AuditLog``;
``append_batched`` is for the event-loop thread only (its batch is written under the same
lock, so the chain stays one sequence whichever way a record came).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import errno
import fcntl
import hashlib
import heapq
import hmac
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson

__all__ = [
    "RESERVED_FIELDS",
    "Anchor",
    "AuditError",
    "AuditLog",
    "Problem",
    "VerifyReport",
    "chain_mac",
    "follow_records",
    "head",
    "iter_records",
    "tail_records",
    "verify",
]

RESERVED_FIELDS = frozenset({"seq", "writer", "prev", "mac"})
RECOVERED_ACTION = "audit.recovered"
GENESIS_MAC = bytes(32)
DEFAULT_MAX_SEGMENT_BYTES = 64 << 20

_SEGMENT_RE = re.compile(r"^audit-([A-Za-z0-9_][A-Za-z0-9_.]{0,63})-(\d{6,})\.jsonl$")
_WRITER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,63}$")
_MAC_PREFIX = b',"mac":"'
_SUFFIX_LEN = len(_MAC_PREFIX) + 64 + 2  # ,"mac":"<64 hex>"}
_HEX = frozenset(b"0123456789abcdef")
# a displaced record (ts taken at request start, appended at the end) is put back in time
# order as long as fewer than this many records of its writer overtook it
_REORDER_WINDOW = 4096
_fdatasync = getattr(os, "fdatasync", os.fsync)


class AuditError(RuntimeError):
    """The audit log cannot be opened or written as asked."""


class _Mac:
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


class _BatchWritten(asyncio.Future[None]):
    """The write of one batch of records, awaited by every request in it. It refuses to be
    cancelled: cancelling a task cancels the future it awaits, and one request's
    cancellation (a gRPC client gone) must not fail the others of its batch. A cancelled
    task is cancelled once the batch is written instead."""

    def cancel(self, msg: Any = None) -> bool:
        return False


def chain_mac(chain_key: bytes, prev_mac: bytes, body: bytes) -> bytes:
    """``HMAC-SHA256(chain_key, prev_mac || body)``: the link of one record (raw bytes)."""
    return hmac.digest(chain_key, prev_mac + body, "sha256")


def _segment_name(writer: str, n: int) -> str:
    return f"audit-{writer}-{n:06d}.jsonl"


def _segments(directory: Path) -> dict[str, list[tuple[int, Path]]]:
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


def _split_line(line: bytes) -> tuple[bytes, str] | None:
    """(body that was MACed, mac hex) of a complete line without its newline, or None when
    it does not end the way the writer ends lines."""
    if len(line) < _SUFFIX_LEN + 2 or line[-2:] != b'"}' or line[-_SUFFIX_LEN:-66] != _MAC_PREFIX:
        return None
    mac_hex = line[-66:-2]
    if not _HEX.issuperset(mac_hex):
        return None
    return line[:-_SUFFIX_LEN] + b"}", mac_hex.decode()


def _tail_lines(path: Path, count: int, *, chunk: int = 1 << 16) -> tuple[list[bytes], int]:
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


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _ts(rec: Mapping[str, Any]) -> float:
    ts = rec.get("ts")
    return float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else 0.0


# --------------------------------------------------------------------------- writer


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class AuditLog:
    """Appends HMAC-chained records for one writer (one server process). See the module
    docstring for the layout, the chain and the durability rule."""

    def __init__(
        self,
        directory: Path,
        chain_key: bytes,
        *,
        writer_id: str = "0",
        fsync_interval_s: float = 0.2,
        max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES,
    ) -> None:
        if not _WRITER_RE.match(writer_id):
            raise ValueError(f"writer_id {writer_id!r}: use letters, digits, '_' and '.' (at most 64)")
        if len(chain_key) < 16:
            raise ValueError("chain_key: expected at least 16 bytes (derive_key(secret, 'audit-chain'))")
        if max_segment_bytes < 1024:
            raise ValueError("max_segment_bytes: expected at least 1024")
        self.directory = Path(directory)
        self.writer_id = writer_id
        self.fsync_interval_s = fsync_interval_s
        self.max_segment_bytes = max_segment_bytes
        self._key = bytes(chain_key)
        self._mac = _Mac(self._key)
        self._writer_field = b',"writer":"' + writer_id.encode() + b'"'
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._closed = False
        self._dirty = False
        self._dir_dirty = False
        self._retired: list[int] = []  # rotated-out descriptors, fsynced and closed by the flusher
        self._pending_recovery: dict[str, Any] | None = None
        self._fd = -1
        # append_batched: records serialised this loop iteration, and the future of their write
        self._batch: list[bytes] = []
        self._batch_written: _BatchWritten | None = None

        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(self.directory / f"audit-{writer_id}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self._lock_fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AuditError(f"{self.directory}: writer {writer_id!r} is in use by another process "
                                 "(give each process its own writer_id)") from None
            raise
        try:
            self._open_chain()
        except BaseException:
            for fd in (self._fd, *self._retired, self._lock_fd):
                if fd >= 0:
                    os.close(fd)
            raise

        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if fsync_interval_s > 0:
            self._flusher = threading.Thread(target=self._flush_loop, name=f"audit-fsync-{writer_id}", daemon=True)
            self._flusher.start()

    # -- opening

    def _open_chain(self) -> None:
        """Find the head of this writer's chain and the segment to append to."""
        segs = _segments(self.directory).get(self.writer_id, [])
        self._seq = 0
        self._prev = GENESIS_MAC
        self._prev_hex = GENESIS_MAC.hex().encode()
        if not segs:
            self._open_segment(0)
            return
        last_n, last_path = segs[-1]
        fragment: tuple[Path, int] | None = None
        # walk back past empty segments and ones holding only a fragment, to the newest complete line
        for _n, path in reversed(segs):
            lines, partial = _tail_lines(path, 1)
            if fragment is None and (partial or lines):
                fragment = (path, partial)
            if lines:
                self._adopt_head(path, lines[-1])
                break
        if fragment is not None and fragment[1]:
            self._pending_recovery = {
                "ts": time.time(),
                "action": RECOVERED_ACTION,
                "segment": fragment[0].name,
                "partial_bytes": fragment[1],
                "reason": "partial last line (crash or power loss); left in place, chain continues here",
            }
            # an empty newest segment is one whose recovery record never got written: reuse it
            self._open_segment(last_n if last_path.stat().st_size == 0 else last_n + 1)
            self._write_pending_recovery()
        else:
            self._open_segment(last_n)

    def _adopt_head(self, path: Path, line: bytes) -> None:
        split = _split_line(line)
        rec = _parse(line) if split else None
        if split is None or rec is None or not isinstance(rec.get("seq"), int) or not isinstance(rec.get("prev"), str):
            raise AuditError(f"{path}: the last line is not an audit record; cannot continue the chain")
        body, mac_hex = split
        try:
            prev = bytes.fromhex(rec["prev"])
        except ValueError:
            raise AuditError(f"{path}: the last record's prev is not hex; cannot continue the chain") from None
        if not hmac.compare_digest(self._mac(prev, body).hex(), mac_hex):
            raise AuditError(f"{path}: the last record does not verify under this chain key (another master "
                             "secret, or an edited file); use another audit directory or restore the secret")
        self._seq = rec["seq"] + 1
        self._prev = bytes.fromhex(mac_hex)
        self._prev_hex = mac_hex.encode()

    def _open_segment(self, n: int) -> None:
        self._segment_n = n
        self._segment_path = self.directory / _segment_name(self.writer_id, n)
        fd = os.open(self._segment_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(fd).st_size
        if self._fd >= 0:
            self._retired.append(self._fd)
        self._fd = fd
        self._dir_dirty = True  # the new name must reach the disk too

    def _write_pending_recovery(self) -> None:
        assert self._pending_recovery is not None
        # cleared only once written: if this write fails too, the next append tries again
        self._write_records((orjson.dumps(self._pending_recovery),))
        self._pending_recovery = None

    # -- appending

    @property
    def last_seq(self) -> int:
        """``seq`` of the newest record of this writer's chain (-1 while it is empty)."""
        return self._seq - 1

    @property
    def segment(self) -> Path:
        """The segment being appended to."""
        return self._segment_path

    def append(self, record: dict[str, Any]) -> None:
        """Chain ``record`` and hand it to the kernel (durability rule: module docstring).
        Adds ``ts`` (now) when missing. Raises ``ValueError`` if the record uses a reserved
        field (``seq``, ``writer``, ``prev``, ``mac``), ``OSError`` if it could not be written."""
        data = self._serialise(record)
        with self._lock:
            self._before_write()
            self._write_records((data,))

    def append_batched(self, record: dict[str, Any]) -> asyncio.Future[None]:
        """Event-loop thread only: queue ``record`` for the write that ends this loop
        iteration, and return the future of that write (shared by every record queued in the
        iteration). The caller must await it before it answers (the durability rule); it
        raises what ``append`` would have raised. The records are chained as ``append`` chains
        them, one line and one MAC each, but the batch costs one ``write(2)``: on a busy server
        one per request was most of what a record cost (the syscall, and the GIL it drops).
        A record that cannot be serialised raises here, failing only its own request."""
        data = self._serialise(record)
        written = self._batch_written
        if written is None:
            loop = asyncio.get_running_loop()
            written = self._batch_written = _BatchWritten(loop=loop)
            # call_soon: runs after every callback already queued for this iteration, so the
            # requests resumed together (one model batch) share one write
            loop.call_soon(self._write_batch)
        self._batch.append(data)
        return written

    def _serialise(self, record: dict[str, Any]) -> bytes:
        if "seq" in record or "mac" in record or "prev" in record or "writer" in record:
            raise ValueError(f"audit record: the fields {sorted(RESERVED_FIELDS & record.keys())} are reserved")
        if "ts" not in record:
            record = {"ts": time.time(), **record}
        return orjson.dumps(record)

    def _write_batch(self) -> None:
        """The loop callback (or ``close``): write the queued records, then release their requests."""
        batch, written = self._batch, self._batch_written
        self._batch, self._batch_written = [], None
        if written is None:
            return  # close() wrote it already
        try:
            with self._lock:
                self._before_write()
                self._write_records(batch)
        except Exception as err:  # OSError, AuditError: every request of the batch fails with it
            written.set_exception(err)
        else:
            written.set_result(None)

    def _before_write(self) -> None:
        """Under the lock: refuse when closed; note a fragment left by a failed write first."""
        if self._closed:
            raise AuditError("audit log is closed")
        if self._pending_recovery is not None:
            if self._size:
                self._open_segment(self._segment_n + 1)
            self._write_pending_recovery()

    def _write_records(self, records: Sequence[bytes]) -> None:
        """Under the lock: splice the chain fields into each serialised record, MAC each line
        over the previous one, and write them: one ``write(2)`` per segment they land in.
        The chain state moves only past lines the kernel took, so a failed write leaves the
        chain where the file ends. (The hot path, per line: the MAC ~1 µs, the splice ~0.8.)"""
        writer_field = self._writer_field
        inner_pad, outer_pad = self._mac.pads()
        seq, prev, prev_hex = self._seq, self._prev, self._prev_hex
        lines: list[bytes] = []
        append = lines.append
        for data in records:
            if len(data) > 2:
                head = b'%s,"seq":%d%s,"prev":"%s"' % (data[:-1], seq, writer_field, prev_hex)
            else:  # {}
                head = b'{"seq":%d%s,"prev":"%s"' % (seq, writer_field, prev_hex)
            # _Mac(prev, head + b"}") written out: this loop runs once per record
            inner = inner_pad.copy()
            inner.update(prev)
            inner.update(head)
            inner.update(b"}")
            outer = outer_pad.copy()
            outer.update(inner.digest())
            prev = outer.digest()
            prev_hex = binascii.hexlify(prev)
            append(b'%s,"mac":"%s"}\n' % (head, prev_hex))
            seq += 1
        start = 0
        while start < len(lines):
            # the lines that fit the current segment; a line always fits an empty one
            size, end, nbytes = self._size, start, 0
            while end < len(lines) and not (size + nbytes and size + nbytes + len(lines[end]) > self.max_segment_bytes):
                nbytes += len(lines[end])
                end += 1
            if end == start:
                self._open_segment(self._segment_n + 1)
                continue
            chunk = lines[start] if end == start + 1 else b"".join(lines[start:end])
            n = os.write(self._fd, chunk)
            if n != nbytes:
                self._write_rest(chunk, n, lines[start:end])
            self._advance(end - start, lines[end - 1], nbytes)
            start = end
            if self.fsync_interval_s <= 0:
                self._do_sync(self._take_sync_work())

    def _advance(self, count: int, last_line: bytes, nbytes: int) -> None:
        """``count`` more lines, ending with ``last_line``, are in the kernel's hands."""
        self._size += nbytes
        self._seq += count
        self._prev_hex = last_line[-67:-3]  # the mac: ...,"mac":"<64 hex>"}\n
        self._prev = binascii.unhexlify(self._prev_hex)
        self._dirty = True

    def _write_rest(self, chunk: bytes, written: int, lines: list[bytes]) -> None:
        """A short write (disk full, a signal): finish the chunk, or keep the lines that made
        it whole in the chain and leave a noted fragment of the one cut."""
        try:
            while written < len(chunk):
                n = os.write(self._fd, chunk[written:])
                if n <= 0:
                    raise OSError(errno.EIO, "audit segment accepted no bytes")
                written += n
        except OSError:
            whole = done = 0
            while whole < len(lines) and done + len(lines[whole]) <= written:
                done += len(lines[whole])
                whole += 1
            if whole:
                self._advance(whole, lines[whole - 1], done)
            if written > done:
                # the segment now ends in a fragment: never append after it, note it in the next one
                self._size += written - done
                self._pending_recovery = {
                    "ts": time.time(),
                    "action": RECOVERED_ACTION,
                    "segment": self._segment_path.name,
                    "partial_bytes": written - done,
                    "reason": "a write failed part-way; fragment left in place, chain continues here",
                }
            raise

    # -- durability

    def _take_sync_work(self) -> tuple[bool, bool, list[int], int]:
        """Under the lock: what needs syncing, marked clean (a later append marks it again)."""
        dirty, self._dirty = self._dirty, False
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        retired, self._retired = self._retired, []
        return dirty, dir_dirty, retired, self._fd

    def _sync_once(self) -> None:
        # _sync_lock: a descriptor rotated out must not be closed by one sync while another fsyncs it
        with self._sync_lock:
            with self._lock:
                work = self._take_sync_work()
            # fsync outside the append lock: appends go on while the disk works
            self._do_sync(work)

    def _do_sync(self, work: tuple[bool, bool, list[int], int]) -> None:
        dirty, dir_dirty, retired, fd = work
        for old in retired:
            with contextlib.suppress(OSError):
                _fdatasync(old)
            os.close(old)
        if dirty:
            _fdatasync(fd)
        if dir_dirty:
            dfd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval_s):
            try:
                self._sync_once()
            except OSError:
                # keep trying: a transient EIO must not end durability for the rest of the run
                with self._lock:
                    self._dirty = True

    def flush(self) -> None:
        """fsync now (what the background thread does every ``fsync_interval_s``)."""
        if self.fsync_interval_s <= 0:
            return  # every append synced itself
        with self._lock:
            if self._closed:
                return
            self._dirty = True
        self._sync_once()

    def close(self) -> None:
        """Write the records queued by ``append_batched`` (when called on their loop), stop
        the fsync thread, fsync, close. Further appends raise ``AuditError``."""
        written = self._batch_written
        if written is not None and _running_loop() is written.get_loop():
            self._write_batch()
        with self._lock:
            if self._closed:
                return
            self._closed = True  # appends racing with close fail rather than write unsynced
        if self._flusher is not None:
            self._stop.set()
            self._flusher.join()
        with self._sync_lock:
            with self._lock:
                self._dirty = True
                work = self._take_sync_work()
            try:
                self._do_sync(work)
            finally:
                os.close(self._fd)
                self._fd = -1
                os.close(self._lock_fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# --------------------------------------------------------------------------- verifier


class Problem(NamedTuple):
    """Where verification failed: segment file name, 1-based line (0: the file or chain as a
    whole), and what was found."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.line else f"{self.file}: {self.reason}"


@dataclass
class VerifyReport:
    """``ok`` when no problem was found. ``writers``: per writer id, ``segments``,
    ``records``, ``first_seq``, ``last_seq``, ``last_mac``, ``first_ts``, ``last_ts``.
    ``warnings``: acknowledged events that are not tampering (a recovered partial line)."""

    ok: bool
    records: int
    writers: dict[str, dict[str, Any]]
    problems: list[Problem]
    warnings: list[Problem] = field(default_factory=list)
    problems_omitted: int = 0  # problems beyond ``max_problems`` (counted, not listed)


@dataclass(frozen=True)
class Anchor:
    """A writer's newest record, for keeping outside the server (see ``head``)."""

    writer: str
    seq: int
    mac: str
    ts: float
    segment: str
    line: int
    verified: bool  # its MAC checks out under the given key

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Verifier:
    """Walks the chains; collects problems (tampering) and warnings (recovered crashes)."""

    def __init__(self, chain_key: bytes, max_problems: int, allow_pruned: bool) -> None:
        self.mac = _Mac(chain_key)
        self.max_problems = max_problems
        self.allow_pruned = allow_pruned
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.omitted = 0
        self.records = 0
        self.verified = 0

    def problem(self, file: str, line: int, reason: str) -> None:
        if len(self.problems) < self.max_problems:
            self.problems.append(Problem(file, line, reason))
        else:
            self.omitted += 1

    def writer(self, writer: str, segs: list[tuple[int, Path]], anchor: tuple[int, str] | None) -> dict[str, Any]:
        summary: dict[str, Any] = {"segments": len(segs), "records": 0, "first_seq": None, "last_seq": None,
                                   "last_mac": None, "first_ts": None, "last_ts": None}
        last_seq: int | None = None
        last_mac = GENESIS_MAC.hex()
        # a line without its newline at a segment's end: (file, line, size) until the next record explains it
        fragment: tuple[str, int, int] | None = None
        anchor_seen = False
        prev_n: int | None = None
        for n, path in segs:
            name = path.name
            if prev_n is not None and n != prev_n + 1:
                missing = ", ".join(_segment_name(writer, k) for k in range(prev_n + 1, min(n, prev_n + 4)))
                more = "" if n - prev_n - 1 <= 3 else f" and {n - prev_n - 4} more"
                self.problem(name, 0, f"segment(s) missing before this one: {missing}{more}")
            prev_n = n
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if not raw.endswith(b"\n"):  # only ever the last line of a file
                        if fragment is not None:
                            self._unexplained(fragment)
                        fragment = (name, lineno, len(raw))
                        continue
                    rec = self._record(name, lineno, raw[:-1])
                    if rec is None:
                        continue
                    seq, mac_hex = rec["seq"], rec["mac"]
                    summary["records"] += 1
                    if fragment is not None:
                        self._explain(fragment, name, lineno, rec)
                        fragment = None
                    elif rec.get("action") == RECOVERED_ACTION and lineno == 1:
                        self.warnings.append(Problem(name, 1, f"recovery record names a partial line in "
                                                              f"{rec.get('segment')!r} that is not there"))
                    if rec.get("writer") != writer:
                        self.problem(name, lineno, f"seq {seq}: written by writer {rec.get('writer')!r}, found "
                                                   f"in writer {writer!r}'s segment (moved or renamed)")
                    if last_seq is None:
                        summary["first_seq"], summary["first_ts"] = seq, rec.get("ts")
                        if seq != 0 or rec["prev"] != last_mac:
                            if self.allow_pruned:
                                self.warnings.append(Problem(name, lineno, f"chain starts at seq {seq}: older "
                                                                           "segments pruned"))
                            else:
                                self.problem(name, lineno, f"chain starts at seq {seq}, not 0: older records "
                                                           "or segments deleted")
                    elif seq == last_seq + 1:
                        if rec["prev"] != last_mac:
                            self.problem(name, lineno, f"seq {seq}: chain break, prev is not the mac of seq "
                                                       f"{last_seq} (a record replaced or inserted)")
                    elif seq > last_seq + 1:
                        gap = f"seq {last_seq + 1}" if seq == last_seq + 2 else f"seq {last_seq + 1}..{seq - 1}"
                        self.problem(name, lineno, f"seq {seq} follows seq {last_seq}: {gap} missing (deleted)")
                    else:
                        self.problem(name, lineno, f"seq {seq} after seq {last_seq}: reordered, duplicated or "
                                                   "replayed")
                    if anchor is not None and seq == anchor[0]:
                        anchor_seen = True
                        if mac_hex != anchor[1]:
                            self.problem(name, lineno, f"seq {seq}: mac differs from the anchor (history "
                                                       "rewritten)")
                    last_seq, last_mac = seq, mac_hex
                    summary["last_ts"] = rec.get("ts")
        if fragment is not None:
            self.problem(fragment[0], fragment[1], f"partial last line ({fragment[2]} bytes): a crash before the "
                                                   "writer restarted, or truncated")
        if anchor is not None and not anchor_seen:
            where = segs[-1][1].name if segs else "(no segments)"
            self.problem(where, 0, f"anchored seq {anchor[0]} of writer {writer!r} is gone (log ends at seq "
                                   f"{last_seq}: newest records deleted or truncated)")
        summary["last_seq"] = last_seq
        summary["last_mac"] = last_mac if last_seq is not None else None
        return summary

    def _record(self, name: str, lineno: int, line: bytes) -> dict[str, Any] | None:
        """The parsed record with its MAC checked (a mismatch is reported, the record still
        returned so that the chain checks go on), or None for a line that is no record."""
        split = _split_line(line)
        rec = _parse(line) if split is not None else None
        if split is None or rec is None:
            self.problem(name, lineno, "not an audit record (malformed line, or no mac)")
            return None
        body, mac_hex = split
        seq, prev_hex = rec.get("seq"), rec.get("prev")
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev_hex, str) \
                or len(prev_hex) != 64 or not _HEX.issuperset(prev_hex.encode()):
            self.problem(name, lineno, "not an audit record (seq or prev missing or malformed)")
            return None
        self.records += 1
        if hmac.compare_digest(self.mac(bytes.fromhex(prev_hex), body).hex(), mac_hex):
            self.verified += 1
        else:
            self.problem(name, lineno, f"seq {seq}: mac mismatch (record edited or forged)")
        rec["mac"] = mac_hex  # the one that was MACed over, whatever a duplicate key said
        return rec

    def _explain(self, fragment: tuple[str, int, int], name: str, lineno: int, rec: dict[str, Any]) -> None:
        pfile, pline, psize = fragment
        if lineno != 1 or rec.get("action") != RECOVERED_ACTION:
            self._unexplained(fragment)
        elif rec.get("segment") == pfile and rec.get("partial_bytes") == psize:
            self.warnings.append(Problem(pfile, pline, f"partial line ({psize} bytes) left by a crash or a failed "
                                                       f"write; recovered in {name}"))
        else:
            self.problem(pfile, pline, f"partial line ({psize} bytes) does not match the recovery record in {name} "
                                       f"({rec.get('segment')!r}, {rec.get('partial_bytes')} bytes)")

    def _unexplained(self, fragment: tuple[str, int, int]) -> None:
        self.problem(fragment[0], fragment[1], f"partial line ({fragment[2]} bytes) in the middle of the chain, "
                                               "no recovery record")


def _normalise_anchors(anchors: Mapping[str, Anchor | Mapping[str, Any]] | None) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    for writer, a in (anchors or {}).items():
        if isinstance(a, Anchor):
            out[writer] = (a.seq, a.mac)
        else:
            out[writer] = (int(a["seq"]), str(a["mac"]))
    return out


def verify(
    directory: Path,
    chain_key: bytes,
    *,
    anchors: Mapping[str, Anchor | Mapping[str, Any]] | None = None,
    allow_pruned: bool = False,
    max_problems: int = 1000,
) -> VerifyReport:
    """Check every writer's chain in ``directory``. Finds edited fields (mac mismatch),
    deleted lines (seq gap), reordered, duplicated or inserted lines, partial lines, and
    missing middle segments. ``anchors`` (writer -> ``Anchor`` or ``{"seq", "mac"}``, as
    ``head`` returned them earlier) also catch deleted newest records, which the files alone
    cannot show. ``allow_pruned`` accepts chains whose oldest segments were removed on
    purpose (retention). Problems beyond ``max_problems`` are only counted."""
    directory = Path(directory)
    v = _Verifier(chain_key, max_problems, allow_pruned)
    anchored = _normalise_anchors(anchors)
    writers: dict[str, dict[str, Any]] = {}
    by_writer = _segments(directory)
    for writer, segs in by_writer.items():
        writers[writer] = v.writer(writer, segs, anchored.get(writer))
    for writer, (seq, _mac) in anchored.items():
        if writer not in by_writer:
            v.problem("(directory)", 0, f"anchored writer {writer!r} (seq {seq}) has no segments left (deleted)")
    if v.records and not v.verified:
        v.problem("(directory)", 0, "no record verifies under this key: wrong master secret, or every line forged")
    return VerifyReport(ok=not v.problems and not v.omitted, records=v.records, writers=writers,
                        problems=v.problems, warnings=v.warnings, problems_omitted=v.omitted)


def head(directory: Path, chain_key: bytes) -> dict[str, Anchor]:
    """Each writer's newest complete record: the anchors to store outside the server (a
    log cut back at a line boundary still verifies on its own; compared with an older
    anchor it does not). ``verified`` says whether that record's MAC checks out."""
    mac = _Mac(chain_key)
    out: dict[str, Anchor] = {}
    for writer, segs in _segments(Path(directory)).items():
        for _n, path in reversed(segs):
            lines, _partial = _tail_lines(path, 1)
            if not lines:
                continue
            split = _split_line(lines[-1])
            rec = _parse(lines[-1]) if split else None
            if split is None or rec is None or not isinstance(rec.get("seq"), int):
                continue
            body, mac_hex = split
            prev_hex = rec.get("prev")
            try:
                ok = isinstance(prev_hex, str) and hmac.compare_digest(mac(bytes.fromhex(prev_hex), body).hex(),
                                                                       mac_hex)
            except ValueError:
                ok = False
            with open(path, "rb") as f:
                lineno = sum(chunk.count(b"\n") for chunk in iter(lambda f=f: f.read(1 << 20), b""))
            out[writer] = Anchor(writer=writer, seq=rec["seq"], mac=mac_hex, ts=_ts(rec), segment=path.name,
                                 line=lineno, verified=ok)
            break
    return out


# --------------------------------------------------------------------------- readers


def _writer_records(segs: Iterable[tuple[int, Path]]) -> Iterator[dict[str, Any]]:
    for _n, path in segs:
        with open(path, "rb") as f:
            for raw in f:
                if raw.endswith(b"\n"):  # a line still being written, or a fragment, is not a record
                    rec = _parse(raw)
                    if rec is not None:
                        yield rec


def _time_ordered(records: Iterator[dict[str, Any]], window: int) -> Iterator[tuple[float, int, dict[str, Any]]]:
    heap: list[tuple[float, int, dict[str, Any]]] = []
    for i, rec in enumerate(records):
        heapq.heappush(heap, (_ts(rec), i, rec))
        if len(heap) > window:
            yield heapq.heappop(heap)
    while heap:
        yield heapq.heappop(heap)


def _tagged(w: int, items: Iterator[tuple[float, int, dict[str, Any]]]
            ) -> Iterator[tuple[float, int, int, dict[str, Any]]]:
    for ts, i, rec in items:
        yield ts, w, i, rec


def iter_records(
    directory: Path,
    *,
    since: float | None = None,
    until: float | None = None,
    tenant: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of every writer in ``ts`` order (``since <= ts < until``, optionally one
    tenant), chain fields included. Does not verify: run ``verify`` for that. Complete lines
    only, so it can read while writers append."""
    streams = [_tagged(w, _time_ordered(_writer_records(segs), _REORDER_WINDOW))
               for w, segs in enumerate(_segments(Path(directory)).values())]
    for ts, _w, _i, rec in heapq.merge(*streams, key=lambda item: item[:3]):
        if since is not None and ts < since:
            continue
        if until is not None and ts >= until:
            continue
        if tenant is not None and rec.get("tenant") != tenant:
            continue
        yield rec


def tail_records(directory: Path, n: int = 20) -> list[dict[str, Any]]:
    """The ``n`` newest records over all writers, oldest first (reads only file ends)."""
    if n <= 0:
        return []
    found: list[dict[str, Any]] = []
    for segs in _segments(Path(directory)).values():
        need = n
        mine: list[dict[str, Any]] = []
        for _k, path in reversed(segs):
            lines, _partial = _tail_lines(path, need)
            recs = [r for r in map(_parse, lines) if r is not None]
            mine[:0] = recs
            need -= len(recs)
            if need <= 0:
                break
        found.extend(mine)
    found.sort(key=lambda r: (_ts(r), str(r.get("writer")), r.get("seq") if isinstance(r.get("seq"), int) else 0))
    return found[-n:]


def follow_records(directory: Path, *, poll_interval_s: float = 0.5) -> Iterator[dict[str, Any]]:
    """Records appended from now on, as they arrive (forever; new segments included). The
    end of every existing segment is taken when this is called, not at the first ``next``."""
    directory = Path(directory)
    offsets: dict[Path, int] = {}
    for segs in _segments(directory).values():
        for _n, path in segs:
            with contextlib.suppress(FileNotFoundError):
                offsets[path] = path.stat().st_size

    def poll() -> Iterator[dict[str, Any]]:
        while True:
            batch: list[dict[str, Any]] = []
            for segs in _segments(directory).values():
                for _n, path in segs:
                    start = offsets.get(path, 0)
                    try:
                        with open(path, "rb") as f:
                            f.seek(start)
                            data = f.read()
                    except FileNotFoundError:
                        continue
                    end = data.rfind(b"\n") + 1
                    if end:
                        offsets[path] = start + end
                        batch.extend(r for r in map(_parse, data[:end].splitlines()) if r is not None)
            batch.sort(key=_ts)
            yield from batch
            if not batch:
                time.sleep(poll_interval_s)

    return poll()
