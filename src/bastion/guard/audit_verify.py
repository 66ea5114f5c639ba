"""Verifying the audit log: every writer's chain, line by line, against the chain key and
optional anchors (``head``) recorded elsewhere. What it finds and what the files alone
cannot show: ``guard/audit.py``'s module docstring. ``verify`` and ``head`` take one
directory or a tree of them (many replicas' chains: ``audit_format.chains``); each chain
is checked on its own and reported under its label (the writer id)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from bastion.guard.audit_format import (
    DIGEST_SUFFIX,
    GENESIS_MAC,
    HEX_DIGITS,
    MAX_LINE_BYTES,
    PARTIAL_SUFFIX,
    RECOVERED_ACTION,
    Chain,
    ChainMac,
    chains,
    parse_line,
    read_lines,
    record_ts,
    replica_of,
    segment_name,
    split_line,
    tail_lines,
)


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
    """``ok`` when no problem was found. ``writers``: per chain label (the writer id),
    ``segments``, ``records``, ``first_seq``, ``last_seq``, ``last_mac``, ``first_ts``,
    ``last_ts``, ``directory`` (relative to the verified root, '' for the root itself),
    ``replica`` (of a ``<replica>.<worker>`` id, else None), ``problems`` (how many were
    found in this chain). ``warnings``: acknowledged events that are not tampering (a
    recovered partial line), and writer ids found in more than one directory."""

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
        self.mac = ChainMac(chain_key)
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

    def writer(self, chain: Chain, anchor: tuple[int, str] | None) -> dict[str, Any]:
        writer, segs = chain.writer, chain.segments
        summary: dict[str, Any] = {"segments": len(segs), "records": 0, "first_seq": None, "last_seq": None,
                                   "last_mac": None, "first_ts": None, "last_ts": None,
                                   "directory": chain.directory, "replica": replica_of(writer), "problems": 0}
        problems_before = len(self.problems) + self.omitted
        last_seq: int | None = None
        last_mac = GENESIS_MAC.hex()
        # a line without its newline at a segment's end: (file, line, size) until the next record explains it
        fragment: tuple[str, int, int] | None = None
        anchor_seen = False
        prev_n: int | None = None
        for n, path in segs:
            name = chain.display(path)
            if prev_n is not None and n != prev_n + 1:
                missing = ", ".join(segment_name(writer, k) for k in range(prev_n + 1, min(n, prev_n + 4)))
                more = "" if n - prev_n - 1 <= 3 else f" and {n - prev_n - 4} more"
                self.problem(name, 0, f"segment(s) missing before this one: {missing}{more}")
            prev_n = n
            self._check_digest(path, name)
            with open(path, "rb") as f:
                for lineno, raw in read_lines(f):
                    if raw is None:
                        self.problem(name, lineno, f"line longer than {MAX_LINE_BYTES} bytes: not an audit record")
                        continue
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
            where = chain.display(segs[-1][1]) if segs else "(no segments)"
            self.problem(where, 0, f"anchored seq {anchor[0]} of writer {writer!r} is gone (log ends at seq "
                                   f"{last_seq}: newest records deleted or truncated)")
        summary["last_seq"] = last_seq
        summary["last_mac"] = last_mac if last_seq is not None else None
        summary["problems"] = len(self.problems) + self.omitted - problems_before
        return summary

    def _check_digest(self, path: Path, name: str) -> None:
        """A shipped segment's ``.sha256`` sidecar (guard/audit_ship.py), when there is one,
        must match: the chain finds edited records too, but a sidecar that disagrees shows
        the object was replaced after it was shipped."""
        if path.name.endswith(PARTIAL_SUFFIX):
            return  # a partial copy grows between ships: it has no sidecar
        sidecar = path.with_name(path.name + DIGEST_SUFFIX)
        try:
            with open(sidecar, "rb") as f:
                text = f.read(256)  # "<64 hex>  <name>\n": anything longer is not ours
        except FileNotFoundError:
            return
        expected = text.split(maxsplit=1)[0] if text.strip() else b""
        if len(expected) != 64 or not HEX_DIGITS.issuperset(expected):
            self.problem(name + DIGEST_SUFFIX, 0, "not a sha256 digest")
            return
        if file_sha256(path) != expected.decode():
            self.problem(name, 0, f"content differs from its shipped digest ({path.name}{DIGEST_SUFFIX}): "
                                  "object replaced after it was shipped")

    def _record(self, name: str, lineno: int, line: bytes) -> dict[str, Any] | None:
        """The parsed record with its MAC checked (a mismatch is reported, the record still
        returned so that the chain checks go on), or None for a line that is no record."""
        split = split_line(line)
        rec = parse_line(line) if split is not None else None
        if split is None or rec is None:
            self.problem(name, lineno, "not an audit record (malformed line, or no mac)")
            return None
        body, mac_hex = split
        seq, prev_hex = rec.get("seq"), rec.get("prev")
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev_hex, str) \
                or len(prev_hex) != 64 or not HEX_DIGITS.issuperset(prev_hex.encode()):
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
        # the recovery record names the bare file name; pfile may carry the replica's directory
        elif rec.get("segment") == pfile.rpartition("/")[2] and rec.get("partial_bytes") == psize:
            self.warnings.append(Problem(pfile, pline, f"partial line ({psize} bytes) left by a crash or a failed "
                                                       f"write; recovered in {name}"))
        else:
            self.problem(pfile, pline, f"partial line ({psize} bytes) does not match the recovery record in {name} "
                                       f"({rec.get('segment')!r}, {rec.get('partial_bytes')} bytes)")

    def _unexplained(self, fragment: tuple[str, int, int]) -> None:
        self.problem(fragment[0], fragment[1], f"partial line ({fragment[2]} bytes) in the middle of the chain, "
                                               "no recovery record")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
    """Check every writer's chain in ``directory`` and in its subdirectories (one
    replica's directory, or a tree of many replicas': ``audit_format.chains``). Finds
    edited fields (mac mismatch), deleted lines (seq gap), reordered, duplicated or
    inserted lines, partial lines, missing middle segments, and shipped segments that no
    longer match their ``.sha256`` sidecar. Problems name files relative to ``directory``.
    ``anchors`` (chain label, i.e. writer id -> ``Anchor`` or ``{"seq", "mac"}``, as
    ``head`` returned them earlier) also catch deleted newest records and deleted chains,
    which the files alone cannot show. ``allow_pruned`` accepts chains whose oldest
    segments were removed on purpose (retention). Problems beyond ``max_problems`` are only
    counted. Raises ``AuditError`` for a tree too large to walk."""
    directory = Path(directory)
    v = _Verifier(chain_key, max_problems, allow_pruned)
    anchored = _normalise_anchors(anchors)
    writers: dict[str, dict[str, Any]] = {}
    found = chains(directory)
    places: dict[str, list[str]] = {}
    for chain in found:
        places.setdefault(chain.writer, []).append(chain.directory or ".")
        writers[chain.label] = v.writer(chain, anchored.get(chain.label))
    for writer, dirs in places.items():
        if len(dirs) > 1:
            # each chain still verifies on its own; but two replicas run with one id (or a
            # chain copied twice) is a deployment error an auditor should see
            v.warnings.append(Problem("(directory)", 0, f"writer id {writer!r} has chains in {len(dirs)} "
                                      f"directories ({', '.join(dirs[:4])}): reported as {writer}@<directory>; "
                                      "give each replica its own id (bastion serve --replica-id)"))
    for label, (seq, _mac) in anchored.items():
        if label not in writers:
            v.problem("(directory)", 0, f"anchored writer {label!r} (seq {seq}) has no segments left (deleted)")
    if v.records and not v.verified:
        v.problem("(directory)", 0, "no record verifies under this key: wrong master secret, or every line forged")
    return VerifyReport(ok=not v.problems and not v.omitted, records=v.records, writers=writers,
                        problems=v.problems, warnings=v.warnings, problems_omitted=v.omitted)


def head(directory: Path, chain_key: bytes) -> dict[str, Anchor]:
    """Each writer's newest complete record, keyed by chain label (the writer id; see
    ``verify``): the anchors to store outside the server (a log cut back at a line boundary
    still verifies on its own; compared with an older anchor it does not). ``verified``
    says whether that record's MAC checks out. ``segment`` is relative to ``directory``."""
    mac = ChainMac(chain_key)
    out: dict[str, Anchor] = {}
    for chain in chains(Path(directory)):
        writer = chain.writer
        for _n, path in reversed(chain.segments):
            lines, _partial = tail_lines(path, 1)
            if not lines:
                continue
            split = split_line(lines[-1])
            rec = parse_line(lines[-1]) if split else None
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
            out[chain.label] = Anchor(writer=writer, seq=rec["seq"], mac=mac_hex, ts=record_ts(rec),
                                      segment=chain.display(path), line=lineno, verified=ok)
            break
    return out
