"""``bastion audit``: verify, read, export and ship the tamper-evident audit log
(guard/audit.py). Every reading command takes one audit directory or a tree of many
replicas' directories (guard/audit_ship.py describes the layout)."""

from __future__ import annotations

import contextlib
import csv
import sys
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import click
import orjson
from click.core import ParameterSource

CHAIN_KEY_PURPOSE = "audit-chain"

# export --format csv: these first, in this order; anything else goes into "extra" as JSON
CSV_COLUMNS = ("time", "ts", "writer", "seq", "tenant", "key_id", "transport", "action", "model", "variant",
               "version", "request_id", "decision", "status", "reason", "latency_ms", "input_digest",
               "output_digest")
_NOT_EXTRA = frozenset(CSV_COLUMNS) | {"prev", "mac"}


def _location(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.argument("dir_arg", required=False, type=click.Path(file_okay=False), metavar="[DIR]")(f)
    f = click.option("--dir", "directory", type=click.Path(file_okay=False), envvar="BASTION_AUDIT_DIR",
                     help="Audit log directory, or a root holding many replicas' directories (also the DIR "
                          "argument) [default: 'audit' beside the key store].")(f)
    f = click.option("--secret-file", type=click.Path(dir_okay=False),
                     help="Master secret file [default: KEYS + '.secret', or DIR + '.secret' without a key store].")(f)
    f = click.option("--keys", "keys_db", type=click.Path(dir_okay=False), envvar="BASTION_KEYS",
                     help="Key store; locates the secret and the audit directory.")(f)
    return f


def _directory(keys_db: str | None, directory: str | None, dir_arg: str | None = None) -> Path:
    if dir_arg:
        # an explicit DIR wins over BASTION_AUDIT_DIR; over an explicit --dir it is a mistake
        ctx = click.get_current_context(silent=True)
        from_env = ctx is not None and ctx.get_parameter_source("directory") is ParameterSource.ENVIRONMENT
        if directory and not from_env and Path(directory) != Path(dir_arg):
            raise click.UsageError("give the directory either as DIR or as --dir, not both")
        directory = dir_arg
    if directory:
        path = Path(directory)
    elif keys_db:
        path = Path(keys_db).parent / "audit"
    else:
        raise click.UsageError("give --dir (or BASTION_AUDIT_DIR), or --keys to use the 'audit' directory beside it")
    if not path.is_dir():
        raise click.ClickException(f"{path}: no such audit directory")
    return path


def _chain_key(keys_db: str | None, secret_file: str | None, directory: Path) -> bytes:
    from bastion.guard.secrets import derive_key, load_or_create_secret

    if secret_file:
        path = Path(secret_file)
    elif keys_db:
        path = Path(keys_db + ".secret")
    else:
        # a server run with --audit-dir and no key store keeps its secret beside the directory
        path = directory.with_name(directory.name + ".secret")
    try:
        secret = load_or_create_secret(path, create=False)  # never mint a new secret from a reading tool
    except FileNotFoundError:
        raise click.ClickException(f"{path}: no master secret there") from None
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    return derive_key(secret, CHAIN_KEY_PURPOSE)


def parse_time(text: str | None, option: str) -> float | None:
    """Unix seconds, or ISO 8601 (a date, or date and time; UTC unless it names an offset)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise click.BadParameter("expected unix seconds or ISO 8601 (e.g. 2025-01-31T12:00:00Z)",
                                 param_hint=option) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _iso(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return ""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@click.group("audit")
def audit() -> None:
    """Verify, read and export the tamper-evident audit log."""


@audit.command("verify")
@_location
@click.option("--anchors", type=click.Path(exists=True, dir_okay=False),
              help="JSON written earlier by `bastion audit head --json`: every anchored record must still be "
                   "there (catches deleted newest records).")
@click.option("--allow-pruned", is_flag=True, help="Accept chains whose oldest segments were removed on purpose.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def verify_cmd(keys_db: str | None, secret_file: str | None, directory: str | None, dir_arg: str | None,
               anchors: str | None, allow_pruned: bool, as_json: bool) -> None:
    """Check the HMAC chain of every writer: in DIR, or in every replica's directory below it
    (a tree `bastion audit ship` wrote). Exit 0 when intact, 1 listing each problem and the
    writers it was found in."""
    from bastion.guard.audit import AuditError, verify

    path = _directory(keys_db, directory, dir_arg)
    key = _chain_key(keys_db, secret_file, path)
    anchor_map = None
    if anchors:
        try:
            anchor_map = orjson.loads(Path(anchors).read_bytes())
            if not isinstance(anchor_map, dict):
                raise ValueError("expected an object of writer -> {seq, mac}")
        except (OSError, ValueError) as err:
            raise click.BadParameter(str(err), param_hint="--anchors") from None
    try:
        report = verify(path, key, anchors=anchor_map, allow_pruned=allow_pruned)
    except AuditError as err:
        raise click.ClickException(str(err)) from None
    except (KeyError, TypeError, ValueError) as err:
        raise click.BadParameter(f"anchors: {err}", param_hint="--anchors") from None
    if as_json:
        click.echo(orjson.dumps({
            "ok": report.ok,
            "records": report.records,
            "writers": report.writers,
            "problems": [p._asdict() for p in report.problems],
            "problems_omitted": report.problems_omitted,
            "warnings": [w._asdict() for w in report.warnings],
        }, option=orjson.OPT_INDENT_2).decode())
    else:
        for w in report.warnings:
            click.echo(f"warning: {w}", err=True)
        replicas = {s["replica"] for s in report.writers.values() if s["replica"] is not None}
        of_replicas = f" of {len(replicas)} replica(s)" if replicas else ""
        if report.ok:
            click.echo(f"{path}: intact, {report.records} records from {len(report.writers)} writer(s){of_replicas}")
            for label, s in report.writers.items():
                click.echo(f"  {_writer_line(label, s)}")
        else:
            for p in report.problems:
                click.echo(str(p))
            if report.problems_omitted:
                click.echo(f"... and {report.problems_omitted} more problems")
            # which replicas to look at: each writer's own count (problems of the tree as a
            # whole, such as a deleted anchored chain, belong to none)
            for label, s in report.writers.items():
                status = f"{s['problems']} problem(s)" if s["problems"] else "intact"
                click.echo(f"  writer {label}{_where(s)}: {status}")
            click.echo(f"{path}: NOT intact: {len(report.problems) + report.problems_omitted} problem(s) in "
                       f"{report.records} records from {len(report.writers)} writer(s){of_replicas}", err=True)
    sys.exit(0 if report.ok else 1)


def _where(s: dict[str, Any]) -> str:
    return f" (in {s['directory']})" if s.get("directory") else ""


def _writer_line(label: str, s: dict[str, Any]) -> str:
    if s["last_seq"] is None:
        return f"writer {label}{_where(s)}: no records"
    return (f"writer {label}{_where(s)}: seq {s['first_seq']}..{s['last_seq']} in {s['segments']} segment(s), "
            f"{_iso(s['first_ts'])} .. {_iso(s['last_ts'])}, head mac {s['last_mac'][:16]}…")


@audit.command("head")
@_location
@click.option("--json", "as_json", is_flag=True, help="The anchors as JSON (input for `verify --anchors`).")
def head_cmd(keys_db: str | None, secret_file: str | None, directory: str | None, dir_arg: str | None,
             as_json: bool) -> None:
    """Each writer's newest record (seq and mac): store these outside the server."""
    from bastion.guard.audit import AuditError, head

    path = _directory(keys_db, directory, dir_arg)
    try:
        anchors = head(path, _chain_key(keys_db, secret_file, path))
    except AuditError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(orjson.dumps({w: a.as_dict() for w, a in anchors.items()}, option=orjson.OPT_INDENT_2).decode())
        return
    if not anchors:
        click.echo(f"{path}: no records")
    for w, a in anchors.items():
        mark = "" if a.verified else "  (DOES NOT VERIFY)"
        click.echo(f"writer {w}: seq {a.seq} mac {a.mac} at {_iso(a.ts)} ({a.segment}:{a.line}){mark}")
    if not all(a.verified for a in anchors.values()):
        sys.exit(1)


def _cell(value: Any, width: int) -> str:
    text = "" if value is None else str(value)
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.ljust(width)


_TABLE = (("time", 24), ("writer:seq", 10), ("tenant", 12), ("key_id", 12), ("transport", 9), ("action", 8),
          ("model", 16), ("variant", 14), ("ver", 4), ("decision", 8), ("status", 6), ("ms", 8), ("reason", 0))


def _row(rec: dict[str, Any]) -> str:
    latency = rec.get("latency_ms")
    values = (
        _iso(rec.get("ts")), f"{rec.get('writer', '')}:{rec.get('seq', '')}", rec.get("tenant"), rec.get("key_id"),
        rec.get("transport"), rec.get("action"), rec.get("model"), rec.get("variant"), rec.get("version"),
        rec.get("decision"), rec.get("status"),
        f"{latency:.2f}" if isinstance(latency, (int, float)) else latency, rec.get("reason"),
    )
    cells = (_cell(v, w) if w else ("" if v is None else str(v)) for v, (_, w) in zip(values, _TABLE, strict=True))
    return " ".join(cells).rstrip()


def _header() -> str:
    return " ".join(name.ljust(w) if w else name for name, w in _TABLE)


@audit.command("tail")
@_location
@click.option("-n", "count", type=click.IntRange(min=0), default=20, show_default=True, help="Records to show.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing records as they are appended.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@click.option("--poll-interval", type=float, default=0.5, show_default=True, hidden=True)
def tail_cmd(keys_db: str | None, secret_file: str | None, directory: str | None, dir_arg: str | None, count: int,
             follow: bool, as_json: bool, poll_interval: float) -> None:
    """The newest records over all writers (reading needs no key; `verify` checks them)."""
    from bastion.guard.audit import AuditError, follow_records, tail_records

    del secret_file  # accepted for symmetry with the other commands
    path = _directory(keys_db, directory, dir_arg)
    try:
        # take the file ends before reading the tail, so nothing appended in between is lost
        stream = follow_records(path, poll_interval_s=poll_interval) if follow else None
        newest = tail_records(path, count)
    except AuditError as err:  # a tree too large to walk
        raise click.ClickException(str(err)) from None
    shown: dict[str, int] = {}

    def emit(rec: dict[str, Any]) -> None:
        writer, seq = str(rec.get("writer")), rec.get("seq")
        if isinstance(seq, int):
            if seq <= shown.get(writer, -1):
                return  # already printed by the tail
            shown[writer] = seq
        click.echo(orjson.dumps(rec).decode() if as_json else _row(rec))

    if not as_json:
        click.echo(_header())
    for rec in newest:
        emit(rec)
    if stream is not None:
        try:
            for rec in stream:
                emit(rec)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


def _write_csv(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    writer = csv.writer(out)
    writer.writerow((*CSV_COLUMNS, "extra"))
    n = 0
    for rec in records:
        row = [_iso(rec.get("ts")) if c == "time" else rec.get(c) for c in CSV_COLUMNS]
        extra = {k: v for k, v in rec.items() if k not in _NOT_EXTRA}
        writer.writerow(["" if v is None else v for v in row] + [orjson.dumps(extra).decode() if extra else ""])
        n += 1
    return n


@audit.command("export")
@_location
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--since", help="From this time on (unix seconds or ISO 8601; UTC unless an offset is given).")
@click.option("--until", help="Before this time (same forms as --since).")
@click.option("--tenant", help="Only this tenant's records.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write here instead of standard output.")
def export_cmd(keys_db: str | None, secret_file: str | None, directory: str | None, dir_arg: str | None, fmt: str,
               since: str | None, until: str | None, tenant: str | None, out: str | None) -> None:
    """Records of every writer in time order, as JSON lines (chain fields kept, so the export
    can be matched against the log) or CSV. Run `verify` to know they are genuine."""
    from bastion.guard.audit import AuditError, iter_records

    del secret_file
    path = _directory(keys_db, directory, dir_arg)
    records = iter_records(path, since=parse_time(since, "--since"), until=parse_time(until, "--until"),
                           tenant=tenant)
    try:
        with open(out, "w", encoding="utf-8", newline="") if out else contextlib.nullcontext(sys.stdout) as f:
            if fmt == "csv":
                n = _write_csv(records, f)
            else:
                n = 0
                for rec in records:
                    f.write(orjson.dumps(rec).decode())
                    f.write("\n")
                    n += 1
    except AuditError as err:  # a tree too large to walk
        raise click.ClickException(str(err)) from None
    if out:
        click.echo(f"wrote {n} records to {out}", err=True)


@audit.command("ship")
@click.option("--from", "source", required=True, type=click.Path(file_okay=False), envvar="BASTION_AUDIT_DIR",
              help="This server's audit directory (what `bastion serve` writes).")
@click.option("--to", "dest", required=True, type=click.Path(file_okay=False),
              help="Destination root, shared by every replica; sync it to object storage with your own tools.")
@click.option("--replica", help="Replica directory for plain writer ids (a server run without --replica-id); "
                                "must match the replica part of <replica>.<worker> ids.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def ship_cmd(source: str, dest: str, replica: str | None, as_json: bool) -> None:
    """Copy the audit segments to DEST/<replica>/<writer>/ as immutable objects: each
    complete (rotated) segment once, with a .sha256 sidecar; the active one as
    <segment>.partial, cut at its last complete line and only ever extended. Idempotent.
    An object already there with other content is never overwritten: it is listed and the
    exit status is 1 (tampering, or two replicas with one writer id). Then run
    `bastion audit verify DEST` to check every replica's chains."""
    from bastion.guard.audit import AuditError
    from bastion.guard.audit_ship import ship

    try:
        report = ship(Path(source), Path(dest), replica=replica)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--replica") from None
    except (AuditError, OSError) as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(orjson.dumps({"ok": report.ok, "copied": report.copied, "unchanged": report.unchanged,
                                 "partial": report.partial, "removed_partial": report.removed_partial,
                                 "conflicts": report.conflicts}, option=orjson.OPT_INDENT_2).decode())
    else:
        for name in report.copied:
            click.echo(f"copied {name}")
        for name in report.partial:
            click.echo(f"partial {name}")
        for conflict in report.conflicts:
            click.echo(f"CONFLICT {conflict}", err=True)
        click.echo(f"{dest}: {len(report.copied)} object(s) copied, {len(report.partial)} partial, "
                   f"{len(report.unchanged)} already there, {len(report.conflicts)} conflict(s)", err=True)
    sys.exit(0 if report.ok else 1)

