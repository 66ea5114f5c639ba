"""`bastion keys` through click's runner, on real key-store files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from bastion.cli.keys import format_rate, keys, parse_quota, parse_rate
from bastion.core.errors import Unauthenticated
from bastion.guard.keystore import KeyStore
from bastion.guard.keystore_model import cert_fingerprint_of_pem
from tests.guard.test_keystore import TOKEN_RE, make_cert_pem


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


def run(db: Path, *args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(keys, [args[0], "--keys", str(db), *args[1:]])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_create_list_revoke_round_trip(db: Path) -> None:
    created = run(db, "create", "--tenant", "acme", "--models", "image, simple", "--rate", "50/s",
                  "--burst", "100", "--quota", "100000/day", "--description", "batch jobs")
    token = created.stdout.strip()
    m = TOKEN_RE.fullmatch(token)
    assert m, created.stdout  # the key alone on stdout, for scripts
    key_id = m.group(1)
    assert "only time" in created.stderr and token not in created.stderr

    with KeyStore(db, create=False) as store:
        p = store.authenticate(token)
    assert (p.tenant, p.key_id, p.role) == ("acme", key_id, "infer")
    assert p.models == frozenset({"image", "simple"})
    assert (p.limits.rate_per_s, p.limits.burst, p.limits.quota, p.limits.quota_period) == (50.0, 100, 100000, "day")

    listed = run(db, "list")
    assert key_id in listed.stdout and "acme" in listed.stdout and "50/s" in listed.stdout
    assert token not in listed.output and m.group(2) not in listed.output

    rows = json.loads(run(db, "list", "--json").stdout)
    assert [r["key_id"] for r in rows] == [key_id]
    assert rows[0]["models"] == ["image", "simple"] and rows[0]["limits"]["burst"] == 100
    assert token not in json.dumps(rows)

    revoked = run(db, "revoke", key_id)
    assert f"revoked key {key_id}" in revoked.stdout
    assert json.loads(run(db, "list", "--json").stdout) == []
    rows = json.loads(run(db, "list", "--all", "--json").stdout)
    assert rows[0]["revoked_at"] is not None
    assert key_id in run(db, "list", "--all").stdout

    with KeyStore(db, create=False) as store, pytest.raises(Unauthenticated, match="revoked"):
        store.authenticate(token)


def test_create_json(db: Path) -> None:
    data = json.loads(run(db, "create", "--tenant", "acme", "--role", "admin", "--json").stdout)
    assert TOKEN_RE.fullmatch(data["key"]) and data["key"].startswith(f"bst_{data['key_id']}_")
    assert data["role"] == "admin" and data["models"] is None
    with KeyStore(db, create=False) as store:
        assert store.authenticate(data["key"]).is_admin


def test_keys_envvar_and_secret_file(tmp_path: Path) -> None:
    db, secret = tmp_path / "env.db", tmp_path / "sec" / "master"
    runner = CliRunner(env={"BASTION_KEYS": str(db)})
    result = runner.invoke(keys, ["create", "--tenant", "acme", "--secret-file", str(secret)])
    assert result.exit_code == 0, result.output
    assert db.exists() and secret.exists()
    with KeyStore(db, secret_file=secret, create=False) as store:
        assert store.authenticate(result.stdout.strip()).tenant == "acme"


def test_create_with_cert(db: Path, tmp_path: Path) -> None:
    pem = tmp_path / "client.pem"
    pem.write_bytes(make_cert_pem())
    fp = cert_fingerprint_of_pem(pem.read_bytes())
    result = run(db, "create", "--tenant", "acme", "--cert", str(pem))
    assert result.stdout == ""  # certificate only: there is no key to print
    assert fp[:16] in result.stderr
    with KeyStore(db, create=False) as store:
        assert store.authenticate(None, fp).key_id == "cert:" + fp[:16]
    assert "cert:" + fp[:16] in run(db, "list").stdout

    other = tmp_path / "other.pem"
    other.write_bytes(make_cert_pem("other"))
    both = run(db, "create", "--tenant", "beta", "--cert", str(other), "--bearer")
    with KeyStore(db, create=False) as store:
        assert store.authenticate(both.stdout.strip()).tenant == "beta"
        assert store.authenticate(None, cert_fingerprint_of_pem(other.read_bytes())).tenant == "beta"

    run(db, "revoke", "cert:" + fp[:16])
    with KeyStore(db, create=False) as store, pytest.raises(Unauthenticated, match="revoked"):
        store.authenticate(None, fp)


def test_bad_cert_file(db: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    result = run(db, "create", "--tenant", "acme", "--cert", str(bad), ok=False)
    assert result.exit_code == 2 and "not a PEM or DER" in result.output
    assert not db.exists()


def test_tenants_and_set_limits(db: Path) -> None:
    run(db, "create", "--tenant", "acme", "--rate", "10/min", "--quota", "500/total")
    run(db, "create", "--tenant", "beta")
    text = run(db, "tenants").stdout
    assert "acme" in text and "10/min" in text and "500/total" in text and "unlimited" in text

    run(db, "set-limits", "--tenant", "acme", "--rate", "2/s", "--burst", "4")
    acme = {t["name"]: t for t in json.loads(run(db, "tenants", "--json").stdout)}["acme"]
    assert acme["limits"] == {"rate_per_s": 2.0, "burst": 4, "quota": 500, "quota_period": "total"}
    assert acme["active_keys"] == 1

    out = run(db, "set-limits", "--tenant", "acme", "--rate", "none").stdout
    assert "500/total" in out
    acme = {t["name"]: t for t in json.loads(run(db, "tenants", "--json").stdout)}["acme"]
    assert acme["limits"] == {"rate_per_s": None, "burst": None, "quota": 500, "quota_period": "total"}

    # a key created later with only --rate keeps the tenant's quota
    run(db, "create", "--tenant", "acme", "--rate", "1/h")
    acme = {t["name"]: t for t in json.loads(run(db, "tenants", "--json").stdout)}["acme"]
    assert acme["limits"]["quota"] == 500 and acme["limits"]["rate_per_s"] == pytest.approx(1 / 3600)


@pytest.mark.parametrize("args, message", [
    (["create", "--tenant", "acme", "--rate", "fast"], "--rate"),
    (["create", "--tenant", "acme", "--rate", "5/fortnight"], "--rate"),
    (["create", "--tenant", "acme", "--rate", "-1/s"], "--rate"),
    (["create", "--tenant", "acme", "--quota", "1.5/day"], "--quota"),
    (["create", "--tenant", "acme", "--quota", "10/week"], "--quota"),
    (["create", "--tenant", "acme", "--burst", "0", "--rate", "1/s"], "--burst"),
    (["create", "--tenant", "acme", "--burst", "5"], "burst needs a rate"),
    (["create", "--tenant", "acme", "--role", "root"], "root"),
    (["create", "--tenant", "bad name"], "tenant name"),
    (["create", "--tenant", "acme", "--models", "../x"], "models"),
    (["create", "--tenant", "acme", "--models", ","], "--models"),
])
def test_bad_syntax_is_a_clear_error(db: Path, args: list[str], message: str) -> None:
    result = run(db, *args, ok=False)
    assert result.exit_code in (1, 2), result.output
    assert message in result.output
    assert "Traceback" not in result.output
    if db.exists():
        with KeyStore(db) as store:
            assert store.list_keys() == []


def test_errors_on_existing_store(db: Path) -> None:
    token = run(db, "create", "--tenant", "acme").stdout.strip()
    result = run(db, "revoke", "0123456789ab", ok=False)
    assert result.exit_code == 1 and "unknown key id '0123456789ab'" in result.output
    result = run(db, "revoke", token, ok=False)
    assert result.exit_code == 1 and "not the key itself" in result.output and token not in result.output
    result = run(db, "set-limits", "--tenant", "ghost", "--rate", "1/s", ok=False)
    assert result.exit_code == 1 and "ghost" in result.output
    result = run(db, "set-limits", "--tenant", "acme", ok=False)
    assert result.exit_code == 2 and "--rate" in result.output


def test_commands_other_than_create_do_not_create_a_store(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    for args in (["list"], ["tenants"], ["revoke", "0123456789ab"], ["set-limits", "--tenant", "a", "--rate", "1"]):
        result = run(db, *args, ok=False)
        assert result.exit_code == 1 and "missing.db" in result.output and "does not exist" in result.output
    assert not db.exists()


def test_registered_on_the_bastion_command() -> None:
    from bastion.cli.main import cli

    result = CliRunner().invoke(cli, ["keys", "--help"])
    assert result.exit_code == 0 and "create" in result.output and "revoke" in result.output


def test_rate_and_quota_syntax() -> None:
    assert parse_rate("50/s") == 50.0 and parse_rate("50") == 50.0
    assert parse_rate("120/min") == 2.0 and parse_rate("36/h") == 0.01
    assert parse_rate("none") is None
    assert parse_quota("100000/day") == (100000, "day") and parse_quota("7") == (7, "day")
    assert parse_quota("10/total") == (10, "total") and parse_quota("none") == (None, "day")
    assert [format_rate(parse_rate(r)) for r in ("50/s", "10/min", "3/h")] == ["50/s", "10/min", "3/h"]  # type: ignore[arg-type]
    assert format_rate(0.37) == "1332/h" and re.fullmatch(r"0\.\d+/s", format_rate(1 / 7))
