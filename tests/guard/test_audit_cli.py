"""``bastion audit``: verify, head, tail, export, on a log written by the real writer."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
from click.testing import CliRunner

from bastion.cli.audit import audit, parse_time
from bastion.guard.audit import AuditLog
from bastion.guard.secrets import derive_key, load_or_create_secret

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z
SEG0 = "audit-0-000000.jsonl"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A key store path whose secret exists and whose 'audit' directory holds 10 records."""
    keys = tmp_path / "keys.db"
    secret = load_or_create_secret(Path(str(keys) + ".secret"))
    with AuditLog(tmp_path / "audit", derive_key(secret, "audit-chain")) as log:
        for i in range(10):
            log.append(record(i))
    return keys


def record(i: int) -> dict[str, Any]:
    return {"ts": T0 + i, "tenant": "acme" if i % 2 == 0 else "globex", "key_id": f"k{i}", "transport": "rest",
            "action": "infer", "model": "digits", "variant": None, "version": "1", "request_id": f"req-{i}",
            "input_digest": "ab" * 16, "output_digest": "cd" * 16, "decision": "served", "status": 200,
            "reason": "ok, fine", "latency_ms": 1.5, "extra_field": i}


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(audit, list(args), env=env, catch_exceptions=False)


def tamper(store: Path, line: int) -> None:
    seg = store.parent / "audit" / SEG0
    ls = seg.read_bytes().splitlines(keepends=True)
    ls[line - 1] = ls[line - 1].replace(b'"tenant":"', b'"tenant":"x')
    seg.write_bytes(b"".join(ls))


def test_registered_on_the_main_command() -> None:
    from bastion.cli.main import cli

    assert cli.get_command(click.Context(cli), "audit") is audit


def test_verify_intact(store: Path) -> None:
    result = run("verify", "--keys", str(store))
    assert result.exit_code == 0, result.output
    assert "intact, 10 records from 1 writer(s)" in result.output
    assert "writer 0: seq 0..9 in 1 segment(s), 2025-06-15T15:06:40.000Z" in result.output


def test_verify_lists_each_problem_and_exits_1(store: Path) -> None:
    tamper(store, 3)
    tamper(store, 7)
    result = run("verify", "--keys", str(store))
    assert result.exit_code == 1
    assert f"{SEG0}:3: seq 2: mac mismatch (record edited or forged)" in result.output
    assert f"{SEG0}:7: seq 6: mac mismatch" in result.output
    assert "NOT intact: 2 problem(s) in 10 records" in result.output


def test_verify_json(store: Path) -> None:
    tamper(store, 2)
    result = run("verify", "--keys", str(store), "--json")
    assert result.exit_code == 1
    data = orjson.loads(result.stdout)
    assert data["ok"] is False and data["records"] == 10
    assert data["problems"] == [{"file": SEG0, "line": 2, "reason": "seq 1: mac mismatch (record edited or forged)"}]


def test_secret_file_and_dir_instead_of_keys(store: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "master.secret"
    moved.parent.mkdir()
    Path(str(store) + ".secret").rename(moved)
    result = run("verify", "--secret-file", str(moved), "--dir", str(tmp_path / "audit"))
    assert result.exit_code == 0, result.output
    # the key store alone now finds no secret, and must not create one
    result = run("verify", "--keys", str(store))
    assert result.exit_code == 1 and "no master secret there" in result.output
    assert not Path(str(store) + ".secret").exists()


def test_secret_beside_the_directory_without_a_key_store(store: Path, tmp_path: Path) -> None:
    # what `bastion serve --audit-dir DIR` without --keys does: the secret is DIR + ".secret"
    Path(str(store) + ".secret").rename(tmp_path / "audit.secret")
    result = CliRunner().invoke(audit, ["verify", "--dir", str(tmp_path / "audit")], env={"BASTION_KEYS": None})
    assert result.exit_code == 0, result.output


def test_wrong_secret_fails(store: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.secret"
    load_or_create_secret(other)
    result = run("verify", "--keys", str(store), "--secret-file", str(other))
    assert result.exit_code == 1
    assert "no record verifies under this key" in result.output


def test_environment_variables(store: Path, tmp_path: Path) -> None:
    result = run("verify", env={"BASTION_KEYS": str(store)})
    assert result.exit_code == 0, result.output
    result = run("tail", "-n", "1", "--json", env={"BASTION_AUDIT_DIR": str(tmp_path / "audit")})
    assert result.exit_code == 0 and orjson.loads(result.stdout)["seq"] == 9


def test_location_errors(store: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(audit, ["verify"], env={"BASTION_KEYS": None, "BASTION_AUDIT_DIR": None})
    assert result.exit_code == 2 and "--dir" in result.output
    result = CliRunner().invoke(audit, ["verify", "--dir", str(tmp_path / "audit")],
                                env={"BASTION_KEYS": None})
    assert result.exit_code == 1 and f"{tmp_path / 'audit.secret'}: no master secret there" in result.output
    result = run("tail", "--dir", str(tmp_path / "nope"))
    assert result.exit_code == 1 and "no such audit directory" in result.output


def test_head_and_anchored_verify(store: Path, tmp_path: Path) -> None:
    result = run("head", "--keys", str(store))
    assert result.exit_code == 0
    assert result.output.startswith("writer 0: seq 9 mac ") and f"({SEG0}:10)" in result.output
    result = run("head", "--keys", str(store), "--json")
    anchors = orjson.loads(result.stdout)
    assert anchors["0"]["seq"] == 9 and anchors["0"]["verified"] is True
    anchor_file = tmp_path / "anchors.json"
    anchor_file.write_text(result.stdout)

    assert run("verify", "--keys", str(store), "--anchors", str(anchor_file)).exit_code == 0
    seg = store.parent / "audit" / SEG0
    seg.write_bytes(b"".join(seg.read_bytes().splitlines(keepends=True)[:-3]))  # cut back cleanly
    assert run("verify", "--keys", str(store)).exit_code == 0  # undetectable from the files alone
    result = run("verify", "--keys", str(store), "--anchors", str(anchor_file))
    assert result.exit_code == 1
    assert "anchored seq 9 of writer '0' is gone (log ends at seq 6" in result.output

    anchor_file.write_text("[1, 2]")
    result = run("verify", "--keys", str(store), "--anchors", str(anchor_file))
    assert result.exit_code == 2 and "--anchors" in result.output


def test_tail_table_and_json(store: Path) -> None:
    result = run("tail", "--keys", str(store), "-n", "3")
    assert result.exit_code == 0
    out = result.output.splitlines()
    assert out[0].split()[:4] == ["time", "writer:seq", "tenant", "key_id"]
    assert len(out) == 4
    assert out[1].startswith("2025-06-15T15:06:47.000Z 0:7") and "globex" in out[1] and "1.50" in out[1]
    assert out[3].rstrip().endswith("ok, fine")
    result = run("tail", "--keys", str(store), "-n", "2", "--json")
    assert [orjson.loads(x)["request_id"] for x in result.stdout.splitlines()] == ["req-8", "req-9"]


def test_tail_follow(store: Path, tmp_path: Path) -> None:
    """A real process: ``tail --follow`` prints records appended after it started."""
    secret = load_or_create_secret(Path(str(store) + ".secret"))
    proc = subprocess.Popen(
        [sys.executable, "-c", "from bastion.cli.audit import audit; audit()", "tail", "-n", "1", "--json",
         "--follow", "--poll-interval", "0.05", "--dir", str(tmp_path / "audit")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert orjson.loads(proc.stdout.readline())["seq"] == 9
        with AuditLog(tmp_path / "audit", derive_key(secret, "audit-chain")) as log:
            for i in range(10, 13):
                log.append(record(i))
                time.sleep(0.02)
        assert [orjson.loads(proc.stdout.readline())["seq"] for _ in range(3)] == [10, 11, 12]
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_export_jsonl_with_filters(store: Path) -> None:
    result = run("export", "--keys", str(store), "--since", "2025-06-15T15:06:42Z", "--until", str(T0 + 8),
                 "--tenant", "acme")
    assert result.exit_code == 0, result.output
    recs = [orjson.loads(x) for x in result.stdout.splitlines()]
    assert [r["request_id"] for r in recs] == ["req-2", "req-4", "req-6"]
    assert {"seq", "writer", "prev", "mac"} <= recs[0].keys()  # the export can be matched against the log


def test_export_csv_to_file(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    result = run("export", "--keys", str(store), "--format", "csv", "--out", str(out), "--since", "2025-06-15")
    assert result.exit_code == 0
    assert f"wrote 10 records to {out}" in result.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 10
    assert rows[0]["time"] == "2025-06-15T15:06:40.000Z" and rows[0]["tenant"] == "acme"
    assert rows[0]["variant"] == "" and rows[0]["reason"] == "ok, fine" and rows[0]["status"] == "200"
    assert orjson.loads(rows[3]["extra"]) == {"extra_field": 3}
    assert "mac" not in rows[0]


def test_export_bad_time(store: Path) -> None:
    result = run("export", "--keys", str(store), "--since", "yesterday")
    assert result.exit_code == 2 and "--since" in result.output


@pytest.mark.parametrize(("text", "expected"), [
    ("1750000000", T0),
    ("1750000000.5", T0 + 0.5),
    ("2025-06-15T15:06:40Z", T0),
    ("2025-06-15T15:06:40", T0),  # naive means UTC
    ("2025-06-15T17:06:40+02:00", T0),
    ("2025-06-15", T0 - (15 * 3600 + 6 * 60 + 40)),
])
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time(text, "--since") == expected


def test_parse_time_none_and_bad() -> None:
    assert parse_time(None, "--since") is None
    with pytest.raises(click.BadParameter):
        parse_time("last tuesday", "--since")


def test_reading_needs_no_secret(store: Path) -> None:
    os.remove(str(store) + ".secret")
    assert run("tail", "--keys", str(store), "-n", "1").exit_code == 0
    assert run("export", "--keys", str(store)).exit_code == 0
    assert run("head", "--keys", str(store)).exit_code == 1
