"""``bastion kms``: the key-release service (``confidential/kms.py``) and its store.

Workflow: seal a bundle with a local key file (``bastion bundle keygen --master-key K``,
``bastion bundle seal --key-provider file:K --key-id ID``), import that key here
(``bastion kms import-key ID --key-file K``), say which workers may have it
(``bastion kms policy ID --accept pcr0=...,pcr1=...,pcr2=...``), then
``bastion kms serve``. Policy changes apply to a running service at once.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

DEFAULT_DB = "bastion-kms.db"
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _store_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--secret-file",
        type=click.Path(dir_okay=False),
        help="The store's secret (default: DB + '.secret'); it seals the master keys at rest.",
    )(f)
    return click.option(
        "--db",
        "db",
        type=click.Path(dir_okay=False),
        envvar="BASTION_KMS_DB",
        default=DEFAULT_DB,
        show_default=True,
        help="The KMS store (SQLite) [env: BASTION_KMS_DB].",
    )(f)


def _admin_audit_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--audit-dir",
        type=click.Path(file_okay=False),
        envvar="BASTION_KMS_AUDIT_DIR",
        help="Also record this change in the KMS audit log (writer kms_admin) [env: BASTION_KMS_AUDIT_DIR].",
    )(f)


@contextmanager
def _store(db: str, secret_file: str | None, *, create: bool = False) -> Iterator[Any]:
    """Open the store; every error a user can cause becomes a ClickException."""
    from bastion.confidential.kms_store import KmsStore, KmsStoreError
    from bastion.core.errors import BastionError

    try:
        store = KmsStore(Path(db), secret_file=Path(secret_file) if secret_file else None, create=create)
    except (OSError, KmsStoreError) as err:
        raise click.ClickException(str(err)) from None
    try:
        yield store
    except BastionError as err:
        raise click.ClickException(str(err)) from None
    finally:
        store.close()


def _record(audit_dir: str | None, record: dict[str, Any]) -> None:
    if not audit_dir:
        return
    from bastion.confidential.kms import AUDIT_ADMIN_WRITER, audit_log_for
    from bastion.guard.audit import AuditError

    try:
        log = audit_log_for(Path(audit_dir), AUDIT_ADMIN_WRITER)
    except (AuditError, OSError, ValueError) as err:
        # the change is made already: say that it is not recorded rather than pretend it failed
        click.echo(f"warning: the change is made but not recorded in {audit_dir}: {err}", err=True)
        return
    with log:
        log.append({"ts": time.time(), "decision": "accepted", "status": 0, "reason": "", **record})


def _dumps(data: Any) -> str:
    import orjson

    return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()


@click.group("kms")
def kms() -> None:
    """The key-release service: bundle keys only for attested workers whose measurement matches a policy."""


@kms.command("serve")
@_store_options
@click.option(
    "--audit-dir",
    required=True,
    type=click.Path(file_okay=False),
    envvar="BASTION_KMS_AUDIT_DIR",
    help="The service's audit log (its chain key: DIR + '.secret', created when missing) [env: BASTION_KMS_AUDIT_DIR].",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8700, show_default=True, help="0: any free port.")
@click.option("--port-file", type=click.Path(dir_okay=False), help="Write the bound port here once listening.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="Serve https: certificate chain (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="The certificate's private key (PEM).")
@click.option("--max-nonces", type=click.IntRange(min=1), default=None, hidden=True)
def serve_cmd(
    db: str,
    secret_file: str | None,
    audit_dir: str,
    host: str,
    port: int,
    port_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    max_nonces: int | None,
) -> None:
    """Serve key release over HTTP until SIGTERM/SIGINT. The store must exist (bastion kms add-key)."""
    from bastion.confidential.kms import MAX_NONCES, run_kms
    from bastion.confidential.kms_store import KmsStoreError
    from bastion.guard.audit import AuditError

    ssl_context = None
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_cert and tls_key:
        from bastion.guard.tls import server_ssl_context

        try:
            ssl_context = server_ssl_context(Path(tls_cert), Path(tls_key), None, "none")
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--tls-cert") from None
    if host not in _LOOPBACK and ssl_context is None:
        click.echo(f"warning: serving plain http on {host}; use --tls-cert/--tls-key off loopback", err=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(url: str) -> None:
        click.echo(f"bastion kms: serving on {url} (store {db}, audit log {audit_dir})")
        sys.stdout.flush()

    try:
        code = run_kms(
            Path(db),
            Path(audit_dir),
            host=host,
            port=port,
            port_file=Path(port_file) if port_file else None,
            secret_file=Path(secret_file) if secret_file else None,
            ssl_context=ssl_context,
            max_nonces=max_nonces or MAX_NONCES,
            ready=ready,
        )
    except (OSError, KmsStoreError, AuditError) as err:
        raise click.ClickException(str(err)) from None
    sys.exit(code)


def _add(db: str, secret_file: str | None, key_id: str, key_file: str | None, audit_dir: str | None) -> None:
    with _store(db, secret_file, create=True) as store:
        info = store.import_key_file(key_id, Path(key_file)) if key_file else store.add_key(key_id)
    how = f"imported from {key_file}" if key_file else "generated"
    click.echo(
        f"key id {info.key_id}: master key {how} (check value {info.check_value}); "
        f"no release policy yet: bastion kms policy {info.key_id} --accept NAME=HEX"
    )
    _record(
        audit_dir,
        {"action": "kms.key.add", "key_id": info.key_id, "source": info.source, "check_value": info.check_value},
    )


@kms.command("add-key")
@_store_options
@click.argument("key_id")
@click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Import this master key file (as `bastion bundle keygen --master-key` writes) instead of generating one.",
)
@_admin_audit_option
def add_key_cmd(db: str, secret_file: str | None, key_id: str, key_file: str | None, audit_dir: str | None) -> None:
    """Add a master key under KEY_ID: generated, or imported with --key-file. Never overwrites."""
    _add(db, secret_file, key_id, key_file, audit_dir)


@kms.command("import-key")
@_store_options
@click.argument("key_id")
@click.option(
    "--key-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The master key file bundles were sealed with (--key-provider file:KEYFILE).",
)
@_admin_audit_option
def import_key_cmd(db: str, secret_file: str | None, key_id: str, key_file: str, audit_dir: str | None) -> None:
    """Import the master key in --key-file under KEY_ID (the key id the bundles were sealed with)."""
    _add(db, secret_file, key_id, key_file, audit_dir)


@kms.command("policy")
@_store_options
@click.argument("key_id")
@click.option(
    "--accept",
    "accept",
    multiple=True,
    required=True,
    help="A measurement a worker may have: name=hex[,name=hex...] (e.g. pcr0=..,pcr1=..,pcr2=..; "
    "a bare hex is the dev 'measurement'). Repeatable: a worker matching any one is accepted.",
)
@click.option("--allow-dev", is_flag=True, help="Accept self-signed dev evidence (development only).")
@click.option(
    "--max-age", "max_age", type=float, default=None, help="Oldest evidence accepted, in seconds [default: 300]."
)
@_admin_audit_option
def policy_cmd(
    db: str,
    secret_file: str | None,
    key_id: str,
    accept: tuple[str, ...],
    allow_dev: bool,
    max_age: float | None,
    audit_dir: str | None,
) -> None:
    """Set KEY_ID's release policy (replacing the previous one); a running service applies it at once."""
    from bastion.confidential.attestation import DEFAULT_MAX_AGE_S, AttestationError, parse_expected_measurement
    from bastion.confidential.kms_store import check_policy
    from bastion.core.errors import InvalidInput

    measurements = []
    for spec in accept:
        try:
            measurements.append(parse_expected_measurement(spec))
        except AttestationError as err:
            raise click.BadParameter(str(err), param_hint="--accept") from None
    try:
        policy = check_policy(
            measurements, allow_dev=allow_dev, max_age_s=DEFAULT_MAX_AGE_S if max_age is None else max_age
        )
    except InvalidInput as err:
        raise click.BadParameter(str(err), param_hint="--accept/--max-age") from None
    with _store(db, secret_file) as store:
        info = store.set_policy(key_id, policy)
    _print_key(info)
    _record(
        audit_dir,
        {
            "action": "kms.policy",
            "key_id": info.key_id,
            "policy": policy.digest(),
            "accept": policy.as_dict()["accept"],
            "allow_dev": policy.allow_dev,
            "max_age_s": policy.max_age_s,
        },
    )


def _print_key(info: Any) -> None:
    click.echo(f"{info.key_id}: check value {info.check_value}, {info.source} {info.created_at}")
    policy = info.policy
    if policy is None:
        click.echo("  policy: none (nothing is released)")
        return
    click.echo(
        f"  policy {policy.digest()} (set {info.policy_updated_at}): dev evidence "
        f"{'allowed' if policy.allow_dev else 'refused'}, evidence at most {policy.max_age_s:g} s old"
    )
    for m in policy.accept:
        click.echo("    accept " + ",".join(f"{name}={value}" for name, value in sorted(m.items())))


@kms.command("show")
@_store_options
@click.argument("key_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_cmd(db: str, secret_file: str | None, key_id: str | None, as_json: bool) -> None:
    """Show key ids, their check values and release policies (never key material)."""
    with _store(db, secret_file) as store:
        infos = [store.key(key_id)] if key_id else store.list_keys()
    if as_json:
        click.echo(_dumps([i.as_dict() for i in infos] if key_id is None else infos[0].as_dict()))
        return
    if not infos:
        click.echo(f"{db}: no keys (bastion kms add-key KEY_ID)")
    for info in infos:
        _print_key(info)
