"""The tamper-evident audit log: one JSON line per request or admin action, HMAC-chained.

Layout. Records are JSON lines in segment files ``audit-<writer>-<n>.jsonl`` (``n`` six
digits, from 0) inside one directory. Each server process is one *writer* with its own
``writer_id`` and its own chain; a segment is rotated when it would grow past
``max_segment_bytes``, and the first record of the next segment chains to the last one of
the previous segment. ``audit-<writer>.lock`` (an ``flock``) stops two processes from
writing the same chain.

Many replicas. A writer id is a plain file-name component (letters, digits, ``_``, ``.``,
``-``; at most 64; not starting with ``.`` or ``-``). A server of a replicated front runs
its workers as ``<replica>.<worker>`` (``front-a.0``), so that ids stay unique when the
chains of several machines meet in one place. ``verify``, ``head`` and the readers take
one directory or a tree of replicas' directories, and ``bastion audit ship`` copies a
server's segments into such a tree as immutable objects (``guard/audit_ship.py``).

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
import hmac
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bastion.guard.audit_format import (
    DEFAULT_MAX_SEGMENT_BYTES,
    GENESIS_MAC,
    RECOVERED_ACTION,
    RESERVED_FIELDS,
    WRITER_RE,
    AuditError,
    ChainMac,
    chain_mac,
    parse_line,
    segment_name,
    segments,
    split_line,
    tail_lines,
)

# the log's public API in one place: the verifier and the readers live in their own modules
from bastion.guard.audit_read import follow_records, iter_records, tail_records
from bastion.guard.audit_verify import Anchor, Problem, VerifyReport, head, verify

__all__ = [
    "GENESIS_MAC",
    "RECOVERED_ACTION",
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

_fdatasync = getattr(os, "fdatasync", os.fsync)


class _BatchWritten(asyncio.Future[None]):
    """The write of one batch of records, awaited by every request in it. It refuses to be
    cancelled: cancelling a task cancels the future it awaits, and one request's
    cancellation (a gRPC client gone) must not fail the others of its batch. A cancelled
    task is cancelled once the batch is written instead."""

    def cancel(self, msg: Any = None) -> bool:
        return False


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
        if not WRITER_RE.match(writer_id):
            raise ValueError(f"writer_id {writer_id!r}: use letters, digits, '_', '.' and '-' (at most 64, "
                             "not starting with '.' or '-')")
        if len(chain_key) < 16:
            raise ValueError("chain_key: expected at least 16 bytes (derive_key(secret, 'audit-chain'))")
        if max_segment_bytes < 1024:
            raise ValueError("max_segment_bytes: expected at least 1024")
        self.directory = Path(directory)
        self.writer_id = writer_id
        self.fsync_interval_s = fsync_interval_s
        self.max_segment_bytes = max_segment_bytes
        self._key = bytes(chain_key)
        self._mac = ChainMac(self._key)
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
        segs = segments(self.directory).get(self.writer_id, [])
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
            lines, partial = tail_lines(path, 1)
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
        split = split_line(line)
        rec = parse_line(line) if split else None
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
        self._segment_path = self.directory / segment_name(self.writer_id, n)
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
            # ChainMac(prev, head + b"}") written out: this loop runs once per record
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
