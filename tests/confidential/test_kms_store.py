"""The KMS store: master keys sealed at rest, never overwritten; release policies validated; the CLI."""

from __future__ import annotations

import base64
import sqlite3
import stat
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from bastion.cli.main import cli
from bastion.confidential.kms_store import (
    SCHEMA_VERSION,
    KeyExists,
    KmsStore,
    KmsStoreError,
    KmsStoreMissing,
    ReleasePolicy,
    check_policy,
    key_check_value,
)
from bastion.core.errors import InvalidInput, NotFound
from bastion.guard.keyproviders import encode_master_key, generate_master_key, write_master_key

PCRS = {"pcr0": "aa" * 48, "pcr1": "bb" * 48, "pcr2": "cc" * 48}


@pytest.fixture
def store(tmp_path: Path) -> KmsStore:
    with KmsStore(tmp_path / "kms.db") as s:
        yield s


def test_generated_key_is_sealed_at_rest_and_files_are_private(tmp_path: Path, store: KmsStore) -> None:
    info = store.add_key("models-v1")
    key = store.master_key("models-v1")
    assert len(key) == 32 and info.source == "generated" and info.check_value == key_check_value(key)
    assert info.policy is None
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("kms.db") and p.is_file())
    # neither the key nor its base64 appears in the database or its WAL
    assert key not in raw and encode_master_key(key).encode() not in raw
    for name in ("kms.db", "kms.db.secret"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_import_key_file_and_refuse_overwrite(tmp_path: Path, store: KmsStore) -> None:
    master = generate_master_key()
    write_master_key(tmp_path / "m.key", master)
    info = store.import_key_file("bundles.2025", tmp_path / "m.key")
    assert info.source == "imported" and store.master_key("bundles.2025") == master
    raw = generate_master_key()
    (tmp_path / "raw.key").write_bytes(raw)  # 32 raw bytes, as keyproviders also reads them
    store.import_key_file("raw", tmp_path / "raw.key")
    assert store.master_key("raw") == raw
    with pytest.raises(KeyExists, match="refusing to overwrite"):
        store.add_key("bundles.2025")
    assert store.master_key("bundles.2025") == master  # untouched
    (tmp_path / "bad.key").write_text("not a key\n")
    with pytest.raises(InvalidInput, match="not base64"):
        store.import_key_file("bad", tmp_path / "bad.key")
    with pytest.raises(InvalidInput, match="key id"):
        store.add_key("../escape")
    with pytest.raises(NotFound):
        store.master_key("missing")
    assert [k.key_id for k in store.list_keys()] == ["bundles.2025", "raw"]


def test_secret_file_is_checked(tmp_path: Path) -> None:
    with KmsStore(tmp_path / "kms.db") as s:
        s.add_key("k")
    other = tmp_path / "other.secret"
    other.write_bytes(b"x" * 32)
    with pytest.raises(KmsStoreError, match="is not the secret"):
        KmsStore(tmp_path / "kms.db", secret_file=other)
    (tmp_path / "kms.db.secret").rename(tmp_path / "moved.secret")
    with pytest.raises(KmsStoreMissing, match="is missing"):
        KmsStore(tmp_path / "kms.db")  # never a fresh secret beside an existing store
    with KmsStore(tmp_path / "kms.db", secret_file=tmp_path / "moved.secret") as s:
        assert len(s.master_key("k")) == 32
    with pytest.raises(KmsStoreMissing, match="does not exist"):
        KmsStore(tmp_path / "nope.db", create=False)


def test_schema_version_and_a_moved_sealed_key(tmp_path: Path) -> None:
    with KmsStore(tmp_path / "kms.db") as s:
        s.add_key("a")
        s.add_key("b")
    conn = sqlite3.connect(tmp_path / "kms.db")
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == SCHEMA_VERSION
    # b's row now holds a's sealed key: the key id is bound into the seal
    conn.execute("UPDATE master_keys SET sealed = (SELECT sealed FROM master_keys WHERE key_id = 'a') WHERE key_id='b'")
    conn.commit()
    with KmsStore(tmp_path / "kms.db") as s:
        assert len(s.master_key("a")) == 32
        with pytest.raises(KmsStoreError, match="does not open"):
            s.master_key("b")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(KmsStoreError, match="upgrade Bastion"):
        KmsStore(tmp_path / "kms.db")


def test_policies(store: KmsStore) -> None:
    store.add_key("k")
    with pytest.raises(NotFound, match="add its master key first"):
        store.set_policy("missing", check_policy([PCRS]))
    policy = check_policy([{k: v.upper() for k, v in PCRS.items()}, PCRS, {"measurement": "0a" * 48}], max_age_s=60)
    assert policy.accept == (PCRS, {"measurement": "0a" * 48})  # lowercased, duplicates dropped
    info = store.set_policy("k", policy)
    assert info.policy == policy and store.policy("k") == policy and info.policy_updated_at
    assert store.policy("missing") is None
    assert policy.digest() == check_policy([PCRS, {"measurement": "0a" * 48}], max_age_s=60).digest()
    assert policy.digest() != check_policy([PCRS], max_age_s=60).digest()
    # replaced whole
    store.set_policy("k", check_policy([{"measurement": "01"}], allow_dev=True))
    assert store.policy("k") == ReleasePolicy(({"measurement": "01"},), True, 300.0)


@pytest.mark.parametrize(
    ("accept", "kwargs", "match"),
    [
        ([], {}, "at least one measurement"),
        ([{}], {}, "non-empty mapping"),
        ([{"pcr0": "xyz"}], {}, "hex"),
        ([{"pcr0": "abc"}], {}, "hex"),  # odd length
        ([{"pcr0": "aa,pcr1=bb"}], {}, "not a name=hex pair"),  # no smuggling a second entry
        ([{"0bad": "aa"}], {}, "bad name"),
        ({"pcr0": "aa"}, {}, "list of measurements"),
        ([PCRS], {"max_age_s": 0}, "max_age_s"),
        ([PCRS], {"max_age_s": float("inf")}, "max_age_s"),
        ([PCRS], {"allow_dev": "yes"}, "allow_dev"),
        ([{"measurement": f"{i:02x}"} for i in range(65)], {}, "at most 64"),
    ],
)
def test_policy_validation(accept: object, kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        check_policy(accept, **kwargs)  # type: ignore[arg-type]


def test_cli_add_import_policy_show(tmp_path: Path) -> None:
    runner = CliRunner()
    db = str(tmp_path / "kms.db")
    audit_dir = tmp_path / "kms-audit"
    master = generate_master_key()
    write_master_key(tmp_path / "m.key", master)

    r = runner.invoke(
        cli,
        [
            "kms",
            "import-key",
            "--db",
            db,
            "models",
            "--key-file",
            str(tmp_path / "m.key"),
            "--audit-dir",
            str(audit_dir),
        ],
    )
    assert r.exit_code == 0, r.output
    assert key_check_value(master) in r.output
    r = runner.invoke(cli, ["kms", "add-key", "--db", db, "fresh"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["kms", "add-key", "--db", db, "models"])
    assert r.exit_code == 1 and "refusing to overwrite" in r.output

    r = runner.invoke(
        cli,
        [
            "kms",
            "policy",
            "--db",
            db,
            "models",
            "--accept",
            f"pcr0={'AA' * 48},pcr1={'bb' * 48}",
            "--accept",
            "0a" * 48,
            "--allow-dev",
            "--max-age",
            "90",
            "--audit-dir",
            str(audit_dir),
        ],
    )
    assert r.exit_code == 0, r.output
    assert f"accept measurement={'0a' * 48}" in r.output and "dev evidence allowed" in r.output
    r = runner.invoke(cli, ["kms", "policy", "--db", db, "models", "--accept", "pcr0=zz"])
    assert r.exit_code == 2 and "hex" in r.output
    r = runner.invoke(cli, ["kms", "policy", "--db", db, "nope", "--accept", "aa"])
    assert r.exit_code == 1 and "unknown key id" in r.output

    r = runner.invoke(cli, ["kms", "show", "--db", db, "--json"])
    assert r.exit_code == 0, r.output
    shown = {k["key_id"]: k for k in orjson.loads(r.output)}
    assert shown["models"]["policy"] == {
        "accept": [{"pcr0": "aa" * 48, "pcr1": "bb" * 48}, {"measurement": "0a" * 48}],
        "allow_dev": True,
        "max_age_s": 90.0,
    }
    assert shown["fresh"]["policy"] is None
    r2 = runner.invoke(cli, ["kms", "show", "--db", db])
    assert r2.exit_code == 0 and "policy: none" in r2.output
    for text in (r.output, r2.output):  # never key material
        assert encode_master_key(master) not in text and master.hex() not in text
        assert base64.urlsafe_b64encode(master).decode() not in text

    # the changes are in the KMS audit chain (writer kms_admin), which verifies
    records = [
        orjson.loads(line)
        for p in sorted(audit_dir.glob("audit-kms_admin-*.jsonl"))
        for line in p.read_bytes().splitlines()
    ]
    assert [rec["action"] for rec in records] == ["kms.key.add", "kms.policy"]
    assert records[1]["policy"] == shown["models"]["policy_digest"]
    r = runner.invoke(cli, ["audit", "verify", "--dir", str(audit_dir)])
    assert r.exit_code == 0, r.output
