"""Audit logs of many server replicas: ``<replica>.<worker>`` writer ids, ``verify`` /
``head`` / ``export`` over a tree of replicas' directories, and ``bastion audit ship`` to an
object-storage-like directory (guard/audit_ship.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
from click.testing import CliRunner

from bastion.cli.audit import audit
from bastion.guard.audit import AuditLog, head, iter_records, verify
from bastion.guard.audit_format import MAX_TREE_DEPTH, chains, replica_of, segments
from bastion.guard.audit_ship import TMP_DIR, ship
from bastion.guard.secrets import derive_key, load_or_create_secret

T0 = 1_750_000_000.0


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.secret"
    load_or_create_secret(path)
    return path


@pytest.fixture
def key(secret_file: Path) -> bytes:
    return derive_key(load_or_create_secret(secret_file, create=False), "audit-chain")


def record(i: int, tenant: str = "acme") -> dict[str, Any]:
    return {"ts": T0 + i, "tenant": tenant, "action": "infer", "model": "digits", "decision": "served",
            "status": 200, "reason": ""}


def write(directory: Path, key: bytes, writer: str, count: int, *, start: int = 0, seg_bytes: int = 1024) -> None:
    """``count`` records by ``writer`` (1 KiB segments: three records each)."""
    with AuditLog(directory, key, writer_id=writer, max_segment_bytes=seg_bytes) as log:
        for i in range(start, start + count):
            log.append(record(i, tenant=writer))


@pytest.fixture
def root(tmp_path: Path, key: bytes) -> Path:
    """Three replicas: front-a (two workers) and front-b in a directory each, front-c's
    segments in the root itself."""
    root = tmp_path / "audit-root"
    write(root / "front-a", key, "front-a.0", 10)
    write(root / "front-a", key, "front-a.1", 6)
    write(root / "front-b", key, "front-b.0", 8)
    write(root, key, "front-c.0", 5)
    return root


def run(*args: str) -> Any:
    return CliRunner().invoke(audit, list(args), catch_exceptions=False,
                              env={"BASTION_KEYS": None, "BASTION_AUDIT_DIR": None})


def tamper(path: Path, line: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1].replace(b'"decision":"served"', b'"decision":"refused"')
    path.write_bytes(b"".join(lines))


def tree(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``directory``: content and inode (a rewrite changes the inode)."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_ino)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- writer ids


def test_replica_writer_ids_name_segments_that_parse_back(tmp_path: Path, key: bytes) -> None:
    write(tmp_path, key, "front-a.0", 9)
    write(tmp_path, key, "a-000001", 2)  # a '-' and digits in the id: the segment number is after the last '-'
    found = segments(tmp_path)
    assert set(found) == {"front-a.0", "a-000001"}
    assert found["front-a.0"][0][1].name == "audit-front-a.0-000000.jsonl"
    assert len(found["front-a.0"]) > 1 and [n for n, _ in found["front-a.0"]] == list(range(len(found["front-a.0"])))
    assert [p.name for _n, p in found["a-000001"]] == ["audit-a-000001-000000.jsonl"]
    assert replica_of("front-a.0") == "front-a" and replica_of("eu.west.3.12") == "eu.west.3"
    assert replica_of("0") is None and replica_of("front-a") is None
    assert verify(tmp_path, key).ok


# -- verify and read a tree of replicas


def test_verify_over_a_root_of_replicas(root: Path, key: bytes) -> None:
    report = verify(root, key)
    assert report.ok, report.problems
    assert report.records == 29
    assert set(report.writers) == {"front-a.0", "front-a.1", "front-b.0", "front-c.0"}
    a0, b0, c0 = report.writers["front-a.0"], report.writers["front-b.0"], report.writers["front-c.0"]
    assert (a0["directory"], a0["replica"], a0["last_seq"], a0["problems"]) == ("front-a", "front-a", 9, 0)
    assert (b0["directory"], b0["replica"], b0["records"]) == ("front-b", "front-b", 8)
    assert (c0["directory"], c0["replica"], c0["records"]) == ("", "front-c", 5)

    result = run("verify", str(root), "--secret-file", str(root.parent / "master.secret"))
    assert result.exit_code == 0, result.output
    assert "intact, 29 records from 4 writer(s) of 3 replica(s)" in result.output
    assert "writer front-a.1 (in front-a): seq 0..5" in result.output
    assert "writer front-c.0: seq 0..4" in result.output


def test_tampering_is_reported_for_that_replica_only(root: Path, key: bytes) -> None:
    seg = sorted((root / "front-b").glob("audit-front-b.0-*.jsonl"))[1]
    tamper(seg, 1)
    report = verify(root, key)
    assert not report.ok
    assert [p.file for p in report.problems] == [f"front-b/{seg.name}"]
    assert "mac mismatch" in report.problems[0].reason
    assert {w: s["problems"] for w, s in report.writers.items()} == {
        "front-a.0": 0, "front-a.1": 0, "front-b.0": 1, "front-c.0": 0}

    result = run("verify", "--dir", str(root), "--secret-file", str(root.parent / "master.secret"))
    assert result.exit_code == 1
    assert f"front-b/{seg.name}:1: seq " in result.output
    assert "writer front-b.0 (in front-b): 1 problem(s)" in result.output
    assert "writer front-a.0 (in front-a): intact" in result.output


def test_one_id_in_two_directories_is_two_chains_and_a_warning(tmp_path: Path, key: bytes) -> None:
    write(tmp_path / "m1", key, "0", 3)
    write(tmp_path / "m2", key, "0", 4)
    report = verify(tmp_path, key)
    assert report.ok
    assert {w: s["records"] for w, s in report.writers.items()} == {"0@m1": 3, "0@m2": 4}
    assert any("writer id '0' has chains in 2 directories" in w.reason for w in report.warnings)


def test_anchors_keyed_by_writer_catch_a_deleted_replica(root: Path, key: bytes) -> None:
    anchors = head(root, key)
    assert set(anchors) == {"front-a.0", "front-a.1", "front-b.0", "front-c.0"}
    assert anchors["front-b.0"].segment.startswith("front-b/audit-front-b.0-") and anchors["front-b.0"].verified
    assert verify(root, key, anchors=anchors).ok
    for seg in (root / "front-b").glob("audit-*.jsonl"):
        seg.unlink()
    assert verify(root, key).ok  # a whole replica gone: invisible without anchors
    report = verify(root, key, anchors=anchors)
    assert [p.reason for p in report.problems] == [
        "anchored writer 'front-b.0' (seq 7) has no segments left (deleted)"]


def test_the_walk_is_bounded(tmp_path: Path, key: bytes) -> None:
    deep = tmp_path.joinpath(*[f"d{i}" for i in range(MAX_TREE_DEPTH)])
    write(deep, key, "r.0", 2)
    write(deep / "too-deep", key, "r.1", 2)
    write(tmp_path / ".hidden", key, "r.2", 2)
    (tmp_path / "link").symlink_to(deep, target_is_directory=True)  # a loop or a detour: not followed
    assert [c.writer for c in chains(tmp_path)] == ["r.0"]


def test_export_over_a_root_merges_every_replica(root: Path) -> None:
    result = run("export", str(root))
    assert result.exit_code == 0, result.output
    recs = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len(recs) == 29
    assert [r["ts"] for r in recs] == sorted(r["ts"] for r in recs)
    assert {r["writer"] for r in recs} == {"front-a.0", "front-a.1", "front-b.0", "front-c.0"}
    assert len(list(iter_records(root, tenant="front-b.0"))) == 8


# -- ship


def test_ship_layout_then_verify_dest(root: Path, key: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "bucket"
    report = ship(root / "front-a", dest)
    assert report.ok and report.copied and not report.unchanged
    for writer in ("front-a.0", "front-a.1"):
        src = segments(root / "front-a")[writer]
        wdir = dest / "front-a" / writer
        for _n, path in src[:-1]:  # complete segments: the same bytes, and a sha256sum-style sidecar
            assert (wdir / path.name).read_bytes() == path.read_bytes()
            digest, name = (wdir / (path.name + ".sha256")).read_text().split()
            assert name == path.name and len(digest) == 64
        active = src[-1][1]
        assert not (wdir / active.name).exists()
        assert (wdir / (active.name + ".partial")).read_bytes() == active.read_bytes()
    assert os.listdir(dest / TMP_DIR) == []
    ship(root / "front-b", dest)

    report = verify(dest, key)
    assert report.ok, report.problems
    assert {w: s["records"] for w, s in report.writers.items()} == {"front-a.0": 10, "front-a.1": 6, "front-b.0": 8}
    assert report.writers["front-a.0"]["directory"] == "front-a/front-a.0"
    result = run("verify", str(dest), "--secret-file", str(tmp_path / "master.secret"))
    assert result.exit_code == 0, result.output
    assert "intact, 24 records from 3 writer(s) of 2 replica(s)" in result.output


def test_ship_twice_is_idempotent(root: Path, tmp_path: Path) -> None:
    dest = tmp_path / "bucket"
    first = ship(root / "front-a", dest)
    before = tree(dest)
    second = ship(root / "front-a", dest)
    assert second.ok and second.copied == [] and second.partial == []
    assert sorted(second.unchanged) == sorted(first.copied + first.partial)
    assert tree(dest) == before  # not a byte or an inode rewritten


def test_ship_follows_the_writer_partial_grows_then_completes(root: Path, key: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "bucket"
    ship(root / "front-b", dest)
    wdir = dest / "front-b" / "front-b.0"
    active = segments(root / "front-b")["front-b.0"][-1][1]
    partial = wdir / (active.name + ".partial")
    old = partial.read_bytes()

    write(root / "front-b", key, "front-b.0", 1, start=8)  # still fits the active segment
    assert active.stat().st_size > len(old)
    report = ship(root / "front-b", dest)
    assert report.partial == [f"front-b/front-b.0/{partial.name}"]
    assert partial.read_bytes().startswith(old) and partial.read_bytes() == active.read_bytes()

    write(root / "front-b", key, "front-b.0", 12, start=9)  # rotates: the old active segment is complete
    report = ship(root / "front-b", dest)
    assert report.ok and f"front-b/front-b.0/{active.name}" in report.copied
    assert report.removed_partial == [f"front-b/front-b.0/{partial.name}"]
    assert (wdir / active.name).read_bytes() == active.read_bytes()
    assert verify(dest, key).writers["front-b.0"]["records"] == 21
    assert verify(dest, key).ok


def test_active_segment_is_shipped_up_to_its_last_complete_line(tmp_path: Path, key: bytes) -> None:
    src, dest = tmp_path / "front-a", tmp_path / "bucket"
    write(src, key, "front-a.0", 2)
    active = segments(src)["front-a.0"][-1][1]
    complete = active.read_bytes()
    with open(active, "ab") as f:
        f.write(b'{"ts":1,"half a line')  # the writer in the middle of a write (or a crash)
    assert ship(src, dest).ok
    partial = dest / "front-a" / "front-a.0" / (active.name + ".partial")
    assert partial.read_bytes() == complete
    assert verify(dest, key).ok  # the fragment never reaches DEST
    assert not verify(src, key).ok  # while in the source it is an unexplained partial line

    # the writer restarts: the fragment is noted in a new segment, the old one is complete
    write(src, key, "front-a.0", 1, start=2)
    report = ship(src, dest)
    assert report.ok and report.removed_partial
    assert (dest / "front-a" / "front-a.0" / active.name).read_bytes().endswith(b"half a line")
    dest_report = verify(dest, key)
    assert dest_report.ok and dest_report.writers["front-a.0"]["records"] == 4
    assert any("recovered in" in w.reason for w in dest_report.warnings)


def test_a_changed_object_at_the_destination_is_never_overwritten(root: Path, key: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "bucket"
    ship(root / "front-a", dest)
    shipped = dest / "front-a" / "front-a.0" / "audit-front-a.0-000001.jsonl"
    tamper(shipped, 2)
    edited = shipped.read_bytes()
    report = ship(root / "front-a", dest)
    assert not report.ok
    assert len(report.conflicts) == 1 and report.conflicts[0].startswith(
        "front-a/front-a.0/audit-front-a.0-000001.jsonl: already at the destination with different content")
    assert shipped.read_bytes() == edited
    problems = verify(dest, key).problems
    assert {p.file for p in problems} == {"front-a/front-a.0/audit-front-a.0-000001.jsonl"}
    assert any("differs from its shipped digest" in p.reason for p in problems)
    assert any("mac mismatch" in p.reason for p in problems)

    result = run("ship", "--from", str(root / "front-a"), "--to", str(dest))
    assert result.exit_code == 1
    assert "CONFLICT front-a/front-a.0/audit-front-a.0-000001.jsonl" in result.output


def test_an_edited_partial_object_is_refused(root: Path, tmp_path: Path, key: bytes) -> None:
    dest = tmp_path / "bucket"
    ship(root / "front-b", dest)
    partial = next((dest / "front-b" / "front-b.0").glob("*.partial"))
    tamper(partial, 1)
    edited = partial.read_bytes()
    write(root / "front-b", key, "front-b.0", 1, start=8)
    report = ship(root / "front-b", dest)
    assert [c.split(":")[0] for c in report.conflicts] == [f"front-b/front-b.0/{partial.name}"]
    assert partial.read_bytes() == edited


def test_two_replicas_with_one_writer_id_clash(tmp_path: Path, key: bytes) -> None:
    dest = tmp_path / "bucket"
    write(tmp_path / "host1", key, "front-a.0", 9)
    write(tmp_path / "host2", key, "front-a.0", 9, start=100)  # same id, other records
    assert ship(tmp_path / "host1", dest).ok
    before = tree(dest)
    report = ship(tmp_path / "host2", dest)
    assert not report.ok and report.copied == []
    assert all("front-a/front-a.0/audit-front-a.0-" in c for c in report.conflicts)
    assert tree(dest) == before


def test_plain_writer_ids_need_a_replica(tmp_path: Path, key: bytes) -> None:
    src, dest = tmp_path / "audit", tmp_path / "bucket"
    write(src, key, "0", 2)
    result = run("ship", "--from", str(src), "--to", str(dest))
    assert result.exit_code == 2 and "pass --replica NAME" in result.output
    assert not dest.exists()
    result = run("ship", "--from", str(src), "--to", str(dest), "--replica", "host-1", "--json")
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout)["partial"] == ["host-1/0/audit-0-000000.jsonl.partial"]
    for bad in ("../x", ".", "-r", "a/b"):
        result = run("ship", "--from", str(src), "--to", str(dest), "--replica", bad)
        assert result.exit_code == 2 and "--replica" in result.output

    write(tmp_path / "a", key, "front-a.0", 1)
    result = run("ship", "--from", str(tmp_path / "a"), "--to", str(dest), "--replica", "front-b")
    assert result.exit_code == 2 and "belongs to replica 'front-a'" in result.output


def test_the_destination_must_be_outside_the_source(root: Path) -> None:
    for dest in (root / "front-a", root / "front-a" / "shipped", root):
        result = run("ship", "--from", str(root / "front-a"), "--to", str(dest))
        assert result.exit_code == 1 and "must be outside" in result.output


def test_ship_is_on_the_main_command() -> None:
    from bastion.cli.main import cli

    group = cli.get_command(click.Context(cli), "audit")
    assert isinstance(group, click.Group) and group.get_command(click.Context(group), "ship") is not None


def test_dir_argument_and_option(root: Path, secret_file: Path) -> None:
    secret = ["--secret-file", str(secret_file)]
    env = {"BASTION_KEYS": None, "BASTION_AUDIT_DIR": str(root / "front-b")}
    # DIR wins over the environment's directory, not over an explicit --dir
    result = CliRunner().invoke(audit, ["verify", str(root), *secret], env=env)
    assert result.exit_code == 0 and "from 4 writer(s)" in result.output, result.output
    result = CliRunner().invoke(audit, ["verify", *secret], env=env)
    assert result.exit_code == 0 and "from 1 writer(s)" in result.output, result.output
    result = run("verify", str(root), "--dir", str(root / "front-a"), *secret)
    assert result.exit_code == 2 and "not both" in result.output
    result = run("head", str(root), *secret)
    assert result.exit_code == 0 and "writer front-b.0: seq 7 mac " in result.output
    assert "(front-b/audit-front-b.0-000002.jsonl:2)" in result.output
