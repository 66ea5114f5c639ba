"""Tenant defense classes: schema migration from version 1, and the class reaching principals."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from bastion.cli.main import cli
from bastion.core.errors import InvalidInput, NotFound
from bastion.guard import keystore
from bastion.guard.keystore import KeyStore


def test_a_version_1_store_is_migrated_and_keeps_its_keys(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    with KeyStore(db) as store:
        token, _ = store.create_key("acme")
    # turn it back into a version-1 store: no defense_class column
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE tenants DROP COLUMN defense_class")
    conn.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with KeyStore(db) as store:
        assert store.authenticate(token).defense_class == "default"
        assert store.tenant("acme").defense_class == "default"
    version = sqlite3.connect(db).execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    assert int(version) == keystore.SCHEMA_VERSION == 2


def test_defense_class_reaches_running_servers_principals(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    admin = KeyStore(db)
    token, _ = admin.create_key("acme")
    server_view = KeyStore(db, refresh_interval_s=0.0)
    assert server_view.authenticate(token).defense_class == "default"
    admin.set_defense_class("acme", "suspect")
    assert server_view.authenticate(token).defense_class == "suspect"
    with pytest.raises(InvalidInput):
        admin.set_defense_class("acme", "Not A Class")
    with pytest.raises(NotFound):
        admin.set_defense_class("nobody", "suspect")


def test_keys_set_class_cli(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    KeyStore(db).create_key("acme")
    out = CliRunner().invoke(cli, ["keys", "set-class", "--keys", str(db), "--tenant", "acme", "--class", "trusted"])
    assert out.exit_code == 0, out.output
    assert "defense class trusted" in out.output
    assert KeyStore(db).tenant("acme").defense_class == "trusted"
