"""Reading the audit log: every writer's records merged in time order (``iter_records``,
``export``), the newest ones (``tail_records``), and new ones as they are written
(``follow_records``). Each takes one directory or a tree of them (many replicas' chains,
as ``audit_format.chains`` walks it; shipped ``.partial`` copies included)."""

from __future__ import annotations

import contextlib
import heapq
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bastion.guard.audit_format import (
    chains,
    parse_line,
    read_lines,
    record_ts,
    tail_lines,
)

# a displaced record (ts taken at request start, appended at the end) is put back in time
# order as long as fewer than this many records of its writer overtook it
_REORDER_WINDOW = 4096


def _writer_records(segs: Iterable[tuple[int, Path]]) -> Iterator[dict[str, Any]]:
    for _n, path in segs:
        with open(path, "rb") as f:
            for _lineno, raw in read_lines(f):
                # a line still being written, a fragment, or an overlong line is not a record
                if raw is not None and raw.endswith(b"\n"):
                    rec = parse_line(raw)
                    if rec is not None:
                        yield rec


def _time_ordered(records: Iterator[dict[str, Any]], window: int) -> Iterator[tuple[float, int, dict[str, Any]]]:
    heap: list[tuple[float, int, dict[str, Any]]] = []
    for i, rec in enumerate(records):
        heapq.heappush(heap, (record_ts(rec), i, rec))
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
    streams = [_tagged(w, _time_ordered(_writer_records(chain.segments), _REORDER_WINDOW))
               for w, chain in enumerate(chains(Path(directory)))]
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
    for chain in chains(Path(directory)):
        segs = chain.segments
        need = n
        mine: list[dict[str, Any]] = []
        for _k, path in reversed(segs):
            lines, _partial = tail_lines(path, need)
            recs = [r for r in map(parse_line, lines) if r is not None]
            mine[:0] = recs
            need -= len(recs)
            if need <= 0:
                break
        found.extend(mine)
    found.sort(key=lambda r: (record_ts(r), str(r.get("writer")), r.get("seq") if isinstance(r.get("seq"), int) else 0))
    return found[-n:]


def follow_records(directory: Path, *, poll_interval_s: float = 0.5) -> Iterator[dict[str, Any]]:
    """Records appended from now on, as they arrive (forever; new segments included). The
    end of every existing segment is taken when this is called, not at the first ``next``."""
    directory = Path(directory)
    offsets: dict[Path, int] = {}
    for chain in chains(directory):
        for _n, path in chain.segments:
            with contextlib.suppress(FileNotFoundError):
                offsets[path] = path.stat().st_size

    def poll() -> Iterator[dict[str, Any]]:
        while True:
            batch: list[dict[str, Any]] = []
            for chain in chains(directory):
                for _n, path in chain.segments:
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
                        batch.extend(r for r in map(parse_line, data[:end].splitlines()) if r is not None)
            batch.sort(key=record_ts)
            yield from batch
            if not batch:
                time.sleep(poll_interval_s)

    return poll()
