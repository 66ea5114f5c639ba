"""The key store on real SQLite files: what operators and the server rely on."""

from __future__ import annotations

import base64
import datetime
import multiprocessing
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from bastion.core.errors import InvalidInput, NotFound, Unauthenticated
from bastion.guard.keystore import KeyStore
from bastion.guard.keystore_model import (
    INVALID_KEY_MESSAGE,
    MISSING_KEY_MESSAGE,
    KeyStoreError,
    KeyStoreMissing,
    cert_fingerprint_of_der,
    cert_fingerprint_of_pem,
)
from bastion.guard.principal import Authenticator, Limits, Principal
from bastion.guard.secrets import derive_key

TOKEN_RE = re.compile(r"bst_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


@pytest.fixture
def store(db: Path):
    s = KeyStore(db)
    yield s
    s.close()


def make_cert_pem(common_name: str = "client") -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


# -- keys and what is stored --------------------------------------------------------


def test_key_format_and_entropy(store: KeyStore) -> None:
    tokens = [store.create_key("acme")[0] for _ in range(50)]
    assert len(set(tokens)) == 50
    ids = set()
    for token in tokens:
        assert token is not None
        m = TOKEN_RE.fullmatch(token)
        assert m, token
        ids.add(m.group(1))
        # 32 random bytes behind the base64url text
        assert len(base64.urlsafe_b64decode(m.group(2) + "=")) == 32
    assert len(ids) == 50
    assert {k.key_id for k in store.list_keys()} == ids


def test_key_id_in_token_matches_info(store: KeyStore) -> None:
    token, info = store.create_key("acme", description="ci pipeline")
    assert token is not None and token.startswith(f"bst_{info.key_id}_")
    assert info.tenant == "acme" and info.role == "infer" and info.models is None and info.bearer
    assert info.description == "ci pipeline" and info.revoked_at is None


def test_only_the_keyed_hash_is_stored(db: Path) -> None:
    store = KeyStore(db)
    token, info = store.create_key("acme")
    assert token is not None
    secret_part = token.split("_", 2)[2]
    store.close()
    files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
    assert files
    for f in files:
        data = f.read_bytes()
        assert token.encode() not in data, f
        assert secret_part.encode() not in data, f
    # what is there is HMAC(derive_key(master, "api-key-hash"), token)
    import hmac

    master = (db.parent / "keys.db.secret").read_bytes()
    expected = hmac.digest(derive_key(master, "api-key-hash"), token.encode(), "sha256")
    with sqlite3.connect(db) as conn:
        (stored,) = conn.execute("SELECT hash FROM keys WHERE key_id = ?", (info.key_id,)).fetchone()
    assert stored == expected
    # and the secret file is the owner's alone
    assert (db.parent / "keys.db.secret").stat().st_mode & 0o077 == 0


def test_listing_never_carries_secrets(store: KeyStore) -> None:
    token, _ = store.create_key("acme")
    assert token is not None
    for info in store.list_keys():
        text = repr(info) + repr(info.as_dict())
        assert token not in text and token.split("_", 2)[2] not in text


# -- authentication -----------------------------------------------------------------


def test_authenticate_ok(store: KeyStore) -> None:
    token, info = store.create_key("acme", role="admin", models=["simple", "digits"])
    p = store.authenticate(token)
    assert isinstance(p, Principal)
    assert p.tenant == "acme" and p.key_id == info.key_id and p.is_admin
    assert p.models == frozenset({"simple", "digits"})
    assert p.may_use("simple") and not p.may_use("other")
    auth: Authenticator = store  # what the server holds (checked by type checkers)
    assert auth.authenticate(token) == p


def test_authenticate_all_models_by_default(store: KeyStore) -> None:
    token, _ = store.create_key("acme")
    p = store.authenticate(token)
    assert p.models is None and p.may_use("anything") and p.role == "infer" and not p.is_admin


@pytest.mark.parametrize("token", [None, ""])
def test_missing_key(store: KeyStore, token: str | None) -> None:
    with pytest.raises(Unauthenticated) as err:
        store.authenticate(token)
    assert str(err.value) == MISSING_KEY_MESSAGE
    assert err.value.http_status == 401


def test_invalid_key_messages_never_echo_the_token(store: KeyStore) -> None:
    token, _ = store.create_key("acme")
    assert token is not None
    # a real key id with a wrong secret, a wrong key id, garbage, a huge header, non-ASCII
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    for bad in (tampered, "bst_000000000000_" + "x" * 43, "hello", "x" * 10_000, "bst_é\udcff"):
        with pytest.raises(Unauthenticated) as err:
            store.authenticate(bad)
        assert str(err.value) == INVALID_KEY_MESSAGE
        assert bad not in str(err.value)


def test_revoked_key_is_named_only_for_its_holder(store: KeyStore) -> None:
    token, info = store.create_key("acme")
    assert token is not None
    store.revoke(info.key_id)
    with pytest.raises(Unauthenticated) as err:
        store.authenticate(token)
    assert str(err.value) == f"API key {info.key_id} has been revoked"
    assert token.split("_", 2)[2] not in str(err.value)
    # someone guessing with the public key id learns nothing about it
    with pytest.raises(Unauthenticated) as err:
        store.authenticate(f"bst_{info.key_id}_" + "A" * 43)
    assert str(err.value) == INVALID_KEY_MESSAGE


def test_revoke_keeps_other_keys_of_the_tenant(store: KeyStore) -> None:
    _, k1 = store.create_key("acme")
    t2, _ = store.create_key("acme")
    store.revoke(k1.key_id)
    assert store.authenticate(t2).tenant == "acme"
    assert k1.key_id in {k.key_id for k in store.list_keys("acme", include_revoked=True)}
    assert k1.key_id not in {k.key_id for k in store.list_keys("acme")}


def test_revoke_unknown_and_twice(store: KeyStore) -> None:
    with pytest.raises(NotFound, match="0123456789ab"):
        store.revoke("0123456789ab")
    _, info = store.create_key("acme")
    first = store.revoke(info.key_id)
    again = store.revoke(info.key_id)
    assert first.revoked_at is not None and again.revoked_at == first.revoked_at


def test_revoke_refuses_a_pasted_token_without_echoing_it(store: KeyStore) -> None:
    token, _ = store.create_key("acme")
    assert token is not None
    with pytest.raises(InvalidInput) as err:
        store.revoke(token)
    assert token not in str(err.value) and token.split("_", 2)[2] not in str(err.value)


# -- limits -------------------------------------------------------------------------


def test_limits_belong_to_the_tenant(store: KeyStore) -> None:
    limits = Limits(rate_per_s=5.0, burst=10, quota=1000, quota_period="day")
    t1, _ = store.create_key("acme", limits=limits)
    t2, _ = store.create_key("acme")  # no limits given: the tenant's stay
    assert store.authenticate(t1).limits == limits
    assert store.authenticate(t2).limits == limits
    t3, _ = store.create_key("other")
    assert store.authenticate(t3).limits.unlimited

    tighter = Limits(rate_per_s=1.0, quota=10, quota_period="total")
    info = store.set_limits("acme", tighter)
    assert info.limits == tighter and info.active_keys == 2
    assert store.authenticate(t1).limits == tighter and store.authenticate(t2).limits == tighter
    assert all(k.limits == tighter for k in store.list_keys("acme"))


def test_tenants_listing(store: KeyStore) -> None:
    store.create_key("acme", limits=Limits(rate_per_s=2.0))
    _, k = store.create_key("acme")
    store.create_key("beta")
    store.revoke(k.key_id)
    by_name = {t.name: t for t in store.tenants()}
    assert set(by_name) == {"acme", "beta"}
    assert (by_name["acme"].active_keys, by_name["acme"].revoked_keys) == (1, 1)
    assert by_name["acme"].limits.rate_per_s == 2.0 and by_name["beta"].limits.unlimited


@pytest.mark.parametrize("limits", [
    Limits(rate_per_s=0), Limits(rate_per_s=-1), Limits(rate_per_s=float("inf")), Limits(rate_per_s=float("nan")),
    Limits(rate_per_s=1, burst=0), Limits(burst=5), Limits(quota=0), Limits(quota=1.5),  # type: ignore[arg-type]
    Limits(quota=5, quota_period="week"),  # type: ignore[arg-type]
])
def test_bad_limits_refused(store: KeyStore, limits: Limits) -> None:
    with pytest.raises(InvalidInput):
        store.create_key("acme", limits=limits)
    assert store.tenants() == []  # nothing half-written


def test_set_limits_unknown_tenant(store: KeyStore) -> None:
    with pytest.raises(NotFound, match="ghost"):
        store.set_limits("ghost", Limits(rate_per_s=1))


# -- validation ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "ten/ant", "tenant\n", "é"])
def test_tenant_names_validated(store: KeyStore, name: str) -> None:
    with pytest.raises(InvalidInput, match="tenant name"):
        store.create_key(name)


def test_tenant_name_alphabet_accepted(store: KeyStore) -> None:
    _, info = store.create_key("Team_1.prod-eu" + "x" * 50)
    assert info.tenant.startswith("Team_1.prod-eu")


def test_roles_and_models_validated(store: KeyStore) -> None:
    with pytest.raises(InvalidInput, match="role"):
        store.create_key("acme", role="root")  # type: ignore[arg-type]
    for models in (["../etc"], ["a b"], [""], [], "simple"):
        with pytest.raises(InvalidInput, match="models"):
            store.create_key("acme", models=models)  # type: ignore[arg-type]
    assert store.list_keys() == []


# -- running servers see changes ----------------------------------------------------


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_revocation_reaches_a_running_server(db: Path) -> None:
    admin = KeyStore(db)
    token, info = admin.create_key("acme")
    server = KeyStore(db, create=False, refresh_interval_s=0.2)  # another process in real life
    assert server.authenticate(token).key_id == info.key_id
    admin.revoke(info.key_id)

    def refused() -> bool:
        try:
            server.authenticate(token)
        except Unauthenticated as err:
            return "revoked" in str(err)
        return False

    started = time.monotonic()
    assert wait_for(refused, timeout=3.0)
    assert time.monotonic() - started < 2.0  # about one interval, not "after a restart"
    admin.close()
    server.close()


def test_new_keys_and_limits_reach_a_running_server(db: Path) -> None:
    admin = KeyStore(db)
    admin.create_key("acme")
    server = KeyStore(db, create=False, refresh_interval_s=0.2)
    token, _ = admin.create_key("beta")
    assert wait_for(lambda: _ok(server, token), timeout=3.0)
    admin.set_limits("beta", Limits(rate_per_s=3.0))
    assert wait_for(lambda: server.authenticate(token).limits.rate_per_s == 3.0, timeout=3.0)
    admin.close()
    server.close()


def test_other_tables_in_the_file_do_not_disturb_auth(store: KeyStore) -> None:
    token, _ = store.create_key("acme")
    conn = store.connect()
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("CREATE TABLE usage (tenant TEXT PRIMARY KEY, used INTEGER)")
        conn.execute("INSERT INTO usage VALUES ('acme', 1)")
    finally:
        conn.close()
    store.refresh()
    assert store.authenticate(token).tenant == "acme"


def _ok(store: KeyStore, token: str | None) -> bool:
    try:
        store.authenticate(token)
    except Unauthenticated:
        return False
    return True


# -- certificates -------------------------------------------------------------------


def test_cert_only_credential(store: KeyStore) -> None:
    pem = make_cert_pem()
    fp = cert_fingerprint_of_pem(pem)
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    token, info = store.create_key("acme", cert_fingerprint=fp, models=["simple"])
    assert token is None and not info.bearer and info.cert_fingerprint == fp
    p = store.authenticate(None, fp)
    assert p.tenant == "acme" and p.key_id == "cert:" + fp[:16] and p.models == frozenset({"simple"})
    # openssl's colon-separated upper-case form names the same certificate
    colons = ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
    assert store.authenticate(None, colons).tenant == "acme"


def test_cert_and_bearer_token_precedence(store: KeyStore) -> None:
    fp = cert_fingerprint_of_pem(make_cert_pem())
    cert_token, info = store.create_key("acme", cert_fingerprint=fp, bearer=True)
    other_token, _ = store.create_key("beta")
    assert cert_token is not None and info.bearer
    assert store.authenticate(cert_token).key_id == info.key_id
    assert store.authenticate(None, fp).key_id == "cert:" + fp[:16]
    # a token present decides, even on a connection with a registered certificate
    assert store.authenticate(other_token, fp).tenant == "beta"
    with pytest.raises(Unauthenticated, match=INVALID_KEY_MESSAGE):
        store.authenticate("bst_wrong", fp)


def test_unregistered_and_revoked_cert(store: KeyStore) -> None:
    fp = cert_fingerprint_of_pem(make_cert_pem())
    with pytest.raises(Unauthenticated, match="not registered"):
        store.authenticate(None, fp)
    _, info = store.create_key("acme", cert_fingerprint=fp)
    store.revoke("cert:" + fp[:16])  # the name audit logs show works for revocation too
    with pytest.raises(Unauthenticated, match="revoked"):
        store.authenticate(None, fp)
    assert store.list_keys(include_revoked=True)[0].key_id == info.key_id
    # a revoked certificate may be registered again (e.g. for another tenant)
    store.create_key("beta", cert_fingerprint=fp)
    assert store.authenticate(None, fp).tenant == "beta"


def test_cert_registered_once(store: KeyStore) -> None:
    fp = cert_fingerprint_of_pem(make_cert_pem())
    store.create_key("acme", cert_fingerprint=fp)
    with pytest.raises(InvalidInput, match="already registered"):
        store.create_key("beta", cert_fingerprint=fp)
    with pytest.raises(InvalidInput, match="fingerprint"):
        store.create_key("beta", cert_fingerprint="abc")
    with pytest.raises(InvalidInput):
        store.create_key("beta", bearer=False)


def test_der_and_pem_fingerprints_agree() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pem = make_cert_pem()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    assert cert_fingerprint_of_pem(pem) == cert_fingerprint_of_der(der) == cert_fingerprint_of_pem(der)
    with pytest.raises(InvalidInput):
        cert_fingerprint_of_pem(b"not a certificate")


# -- the file and the secret --------------------------------------------------------


def test_open_missing_store_without_create(tmp_path: Path) -> None:
    path = tmp_path / "nope.db"
    with pytest.raises(FileNotFoundError, match=r"nope\.db"):
        KeyStore(path, create=False)
    assert not path.exists()


def test_reopen_keeps_keys_and_secret(db: Path) -> None:
    s = KeyStore(db)
    token, _ = s.create_key("acme")
    master = s.master_secret
    s.close()
    s2 = KeyStore(db, create=False)
    assert s2.master_secret == master and len(master) >= 32
    assert s2.authenticate(token).tenant == "acme"
    s2.close()


def test_missing_secret_is_not_silently_recreated(db: Path) -> None:
    KeyStore(db).close()
    (db.parent / "keys.db.secret").unlink()
    with pytest.raises(KeyStoreMissing, match="secret"):
        KeyStore(db)  # even with create=True: a new secret would void every key
    assert not (db.parent / "keys.db.secret").exists()


def test_wrong_secret_file_detected(db: Path, tmp_path: Path) -> None:
    KeyStore(db).close()
    other = tmp_path / "other.secret"
    other.write_bytes(b"\x01" * 32)
    with pytest.raises(KeyStoreError, match="not the master secret"):
        KeyStore(db, secret_file=other)


def test_custom_secret_file(db: Path, tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "master.key"
    s = KeyStore(db, secret_file=secret)
    token, _ = s.create_key("acme")
    s.close()
    assert secret.exists() and not (db.parent / "keys.db.secret").exists()
    with KeyStore(db, secret_file=secret, create=False) as s2:
        assert s2.authenticate(token).tenant == "acme"


def test_newer_schema_refused(db: Path) -> None:
    KeyStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(KeyStoreError, match="schema version 99"):
        KeyStore(db)


def test_master_secret_derivations_are_independent(store: KeyStore) -> None:
    assert derive_key(store.master_secret, "audit-chain") != derive_key(store.master_secret, "api-key-hash")


# -- concurrency ----------------------------------------------------------------------


def _create_many(path: str, tenant: str, n: int, start: multiprocessing.synchronize.Event, out, ready) -> None:
    ready.put(tenant)  # imported, at the start line
    try:
        assert start.wait(60)
        store = KeyStore(Path(path))  # both processes may be the one that creates the file
        tokens = [store.create_key(tenant)[0] for _ in range(n)]
        store.close()
    except BaseException:  # the test shows the child's traceback instead of waiting out a timeout
        import traceback

        out.put(traceback.format_exc())
        raise
    out.put(tokens)


def test_two_processes_create_keys_at_once(db: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out, ready = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_create_many, args=(str(db), f"t{i}", 25, start, out, ready)) for i in range(2)]
    for p in procs:
        p.start()
    assert sorted(ready.get(timeout=60) for _ in procs) == ["t0", "t1"]  # both at the start line
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    failed = [r for r in results if isinstance(r, str)]
    assert not failed, failed[0]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    tokens = [t for r in results for t in r]
    assert len(set(tokens)) == 50
    with KeyStore(db, create=False) as store:
        assert len(store.list_keys()) == 50
        with store.connect() as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert {store.authenticate(t).tenant for t in tokens} == {"t0", "t1"}


def test_threads_share_one_store(store: KeyStore) -> None:
    tokens: list[str | None] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                token, _ = store.create_key("acme")
                tokens.append(token)
                store.authenticate(token)
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(tokens)) == 80 and len(store.list_keys()) == 80
