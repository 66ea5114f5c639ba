"""Shipping one server's audit segments to a shared, object-storage-like directory.

Many replicas. Each front replica (``bastion serve --replica-id NAME``) writes chains
whose writer ids are ``<replica>.<worker>`` (``front-a.0``, ``front-a.1``), so ids are
unique across machines. ``verify``, ``head`` and the readers take one directory or a tree
of them (``audit_format.chains``: at most ``MAX_TREE_DEPTH`` levels, no symlinked or
hidden directories) and check each chain on its own.

Layout written by ``ship`` (``bastion audit ship --from AUDIT_DIR --to DEST``)::

    DEST/<replica>/<writer>/audit-<writer>-<n>.jsonl          a complete segment
    DEST/<replica>/<writer>/audit-<writer>-<n>.jsonl.sha256   its digest (sha256sum format)
    DEST/<replica>/<writer>/audit-<writer>-<n>.jsonl.partial  the active segment, so far
    DEST/.ship-tmp/                                           in-flight copies (exclude it)

``<replica>`` is the part of the writer id before its last '.', or ``--replica NAME``
for plain ids (``0``, ``1``) of a server run without ``--replica-id``.

Objects. A segment is *complete* once a later segment of its writer exists (the writer
never appends to a segment after opening the next). It is copied once: into
``.ship-tmp``, fsynced, then hard-linked to its name, which fails if the name exists, so
neither a reader nor a concurrent ship ever sees half an object or a replaced one. Its
``.sha256`` sidecar follows the same way. Both are immutable: an object already at DEST
whose content differs is never overwritten but reported as a conflict (tampering at the
destination, or two replicas given the same writer id).

The *active* (newest) segment is shipped as ``<segment>.partial``, cut at its last
complete line, so records reach DEST without waiting for a rotation (64 MiB by default).
A partial object only grows: each ship replaces it (atomic rename) with a longer copy
only if the old one is a prefix of the new one, and refuses otherwise; it has no sidecar.
Once the segment is complete, the complete object is shipped and the partial one removed.
The partial objects are therefore the only objects ship replaces or deletes: sync them to a
prefix without object lock (or leave ``*.partial`` out of a WORM bucket).

Idempotence. Running ship again copies nothing that is already there (it compares the
source and the object by sha256, so a run reads every source segment and every shipped
object of this replica once), and extends the partial object only when the active
segment grew.

Object storage. DEST is a plain directory whose relative paths are the object keys, so
an operator can sync it with their own tools (``aws s3 sync DEST s3://bucket/audit
--exclude '.ship-tmp/*'``, ``gsutil rsync``, ``rclone copy``), ideally to a bucket with
object lock or retention; ``bastion audit verify DEST`` (or over a copy synced back)
checks every replica's chains and every sidecar. Ship needs no key: it copies bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from bastion.guard.audit_format import (
    DIGEST_SUFFIX,
    PARTIAL_SUFFIX,
    REPLICA_RE,
    AuditError,
    replica_of,
    segments,
)
from bastion.guard.audit_verify import file_sha256

TMP_DIR = ".ship-tmp"
_CHUNK = 1 << 20
_STALE_TMP_S = 3600.0  # an in-flight copy older than this was left by a killed ship


@dataclass
class ShipReport:
    """What one ``ship`` did; paths are relative to DEST. ``conflicts``: objects that
    differ from what this run would write, each with the reason (nothing was written over
    them); ``ok`` when there are none."""

    copied: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    removed_partial: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.conflicts


class _Conflict(Exception):
    """An object at DEST that ship must not write over."""


def replica_dir(writer: str, replica: str | None) -> str:
    """The replica directory of ``writer`` under DEST. Raises ``ValueError`` for a plain
    writer id without ``replica``, or one whose id names another replica."""
    own = replica_of(writer)
    if replica is None:
        if own is None:
            raise ValueError(f"writer {writer!r} has no replica in its id (<replica>.<worker>): pass --replica NAME")
        return own
    if own is not None and own != replica:
        raise ValueError(f"writer {writer!r} belongs to replica {own!r}, not {replica!r}")
    return replica


def ship(source: Path, dest: Path, *, replica: str | None = None) -> ShipReport:
    """Copy the segments of every writer in ``source`` (one server's audit directory) to
    ``dest`` in the layout of the module docstring. Conflicts are collected in the report
    (the other writers' segments are still shipped). Raises ``ValueError`` for a bad
    ``replica`` or a writer that needs one, ``AuditError`` when ``dest`` and ``source``
    overlap, ``OSError`` when reading or writing fails."""
    source, dest = Path(source), Path(dest)
    if replica is not None and not REPLICA_RE.match(replica):
        raise ValueError(f"replica {replica!r}: use letters, digits, '_', '.' and '-' (at most 64, not first '.'/'-')")
    if not source.is_dir():
        raise AuditError(f"{source}: no such audit directory")
    src_real, dest_real = source.resolve(), dest.resolve()
    if dest_real == src_real or dest_real.is_relative_to(src_real) or src_real.is_relative_to(dest_real):
        # a tree holding both the live chains and their copies would report every chain twice
        raise AuditError(f"{dest}: the destination must be outside the audit directory {source} (and not hold it)")
    by_writer = segments(source)
    plan = [(writer, replica_dir(writer, replica), segs) for writer, segs in by_writer.items()]  # all before any copy
    report = ShipReport()
    if not plan:
        return report
    tmp = dest / TMP_DIR
    tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
    _clean_stale(tmp)
    for writer, rdir, segs in plan:
        wdir = dest / rdir / writer
        wdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        rel = f"{rdir}/{writer}"
        for i, (_n, path) in enumerate(segs):
            try:
                if i + 1 < len(segs):
                    _ship_complete(path, wdir, tmp, rel, report)
                else:
                    _ship_active(path, wdir, tmp, rel, report)
            except _Conflict as err:
                report.conflicts.append(str(err))
        _fsync_dir(wdir)
    return report


def _ship_complete(src: Path, wdir: Path, tmp: Path, rel: str, report: ShipReport) -> None:
    name = src.name
    obj, sidecar, partial = wdir / name, wdir / (name + DIGEST_SUFFIX), wdir / (name + PARTIAL_SUFFIX)
    _regular(src)
    if obj.exists():
        digest = file_sha256(src)
        if file_sha256(obj) != digest:
            raise _Conflict(f"{rel}/{name}: already at the destination with different content (tampering there, or "
                            "another replica with the same writer id); not overwritten")
        report.unchanged.append(f"{rel}/{name}")
    else:
        staged, digest, _size = _stage(src, tmp, name, cut_at_newline=False)
        try:
            if partial.exists() and not _is_prefix(partial, staged, partial.stat().st_size):
                raise _Conflict(f"{rel}/{partial.name}: the shipped partial copy is not the beginning of the "
                                "complete segment (tampering, or another replica with the same writer id)")
            if not _link_new(staged, obj):
                # a concurrent ship got there first: fine if it wrote the same bytes
                if file_sha256(obj) != digest:
                    raise _Conflict(f"{rel}/{name}: already at the destination with different content; not "
                                    "overwritten")
                report.unchanged.append(f"{rel}/{name}")
            else:
                report.copied.append(f"{rel}/{name}")
        finally:
            staged.unlink(missing_ok=True)
    _ship_sidecar(sidecar, digest, name, tmp, rel, report)
    # the partial copy is stale once the complete object is there (checked above, or by the
    # run that wrote it)
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
        report.removed_partial.append(f"{rel}/{partial.name}")


def _ship_sidecar(sidecar: Path, digest: str, name: str, tmp: Path, rel: str, report: ShipReport) -> None:
    text = f"{digest}  {name}\n".encode()
    if sidecar.exists():
        with open(sidecar, "rb") as f:
            have = f.read(len(text) + 1)
        if have != text:
            raise _Conflict(f"{rel}/{sidecar.name}: already at the destination with another digest; not overwritten")
        report.unchanged.append(f"{rel}/{sidecar.name}")
        return
    staged = _tmp_name(tmp, sidecar.name)
    try:
        _write_new(staged, text)
        if _link_new(staged, sidecar):
            report.copied.append(f"{rel}/{sidecar.name}")
        elif sidecar.read_bytes()[: len(text) + 1] != text:
            raise _Conflict(f"{rel}/{sidecar.name}: already at the destination with another digest; not overwritten")
    finally:
        staged.unlink(missing_ok=True)


def _ship_active(src: Path, wdir: Path, tmp: Path, rel: str, report: ShipReport) -> None:
    name = src.name
    obj, partial = wdir / name, wdir / (name + PARTIAL_SUFFIX)
    _regular(src)
    staged, _digest, size = _stage(src, tmp, name, cut_at_newline=True)
    try:
        if obj.exists():
            # shipped complete by an earlier run (a later segment existed then, and is gone
            # from the source now): only check that the source still agrees with it
            if not _is_prefix(staged, obj, size):
                raise _Conflict(f"{rel}/{name}: already at the destination as a complete segment that the active "
                                "segment does not begin (tampering, or another replica with the same writer id)")
            report.unchanged.append(f"{rel}/{name}")
            return
        if partial.exists():
            have = partial.stat().st_size
            if have > size or not _is_prefix(partial, staged, have):
                raise _Conflict(f"{rel}/{partial.name}: the shipped partial copy is not the beginning of the active "
                                "segment (truncated or edited source, tampering at the destination, or another "
                                "replica with the same writer id); not overwritten")
            if have == size:
                report.unchanged.append(f"{rel}/{partial.name}")
                return
        if size == 0:
            return  # no complete line yet: nothing worth an object
        # a partial object grows in place of the old one: rename is atomic, readers see the
        # old copy or the new, never a mix
        os.replace(staged, partial)
        report.partial.append(f"{rel}/{partial.name}")
    finally:
        staged.unlink(missing_ok=True)


def _regular(path: Path) -> None:
    # a symbolic link named like a segment would ship whatever it points at
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise _Conflict(f"{path}: not a regular file; not shipped")


def _tmp_name(tmp: Path, name: str) -> Path:
    return tmp / f"{name}.{os.getpid()}-{secrets.token_hex(6)}"


def _stage(src: Path, tmp: Path, name: str, *, cut_at_newline: bool) -> tuple[Path, str, int]:
    """Copy ``src`` (as large as it is now) into a new file under ``tmp``, fsynced: (its
    path, sha256 hex, size). ``cut_at_newline``: stop after the last complete line (the
    writer may be appending the next one right now)."""
    staged = _tmp_name(tmp, name)
    h = hashlib.sha256()
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(src, "rb") as f:
            limit = os.fstat(f.fileno()).st_size  # what exists now; appends after this wait for the next run
            copied = end = 0
            while copied < limit:
                chunk = f.read(min(_CHUNK, limit - copied))
                if not chunk:
                    break
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    end = copied + nl + 1
                _write_all(fd, chunk)
                h.update(chunk)
                copied += len(chunk)
        size = end if cut_at_newline else copied
        if size != copied:
            os.ftruncate(fd, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        staged.unlink(missing_ok=True)
        raise
    os.close(fd)
    # a partial object has no sidecar, so the digest of a cut copy is not needed
    return staged, "" if cut_at_newline else h.hexdigest(), size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(staged: Path, final: Path) -> bool:
    """Give ``staged`` the name ``final`` unless that name exists (False then). A hard link
    fails on an existing name, atomically; where links are not supported, a rename after
    checking is the fallback (a concurrent ship could then race, not a reader)."""
    try:
        os.link(staged, final)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
    if final.exists():
        return False
    os.rename(staged, final)
    return True


def _is_prefix(head: Path, whole: Path, n: int) -> bool:
    """The first ``n`` bytes of ``head`` and of ``whole`` are equal (and both have them)."""
    with open(head, "rb") as a, open(whole, "rb") as b:
        left = n
        while left > 0:
            x = a.read(min(_CHUNK, left))
            y = b.read(min(_CHUNK, left))
            if not x or x != y:
                return False
            left -= len(x)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_stale(tmp: Path) -> None:
    """Remove in-flight copies that a killed ship left behind (never a fresh one: another
    ship may be writing it)."""
    cutoff = time.time() - _STALE_TMP_S
    for entry in os.scandir(tmp):
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
