"""Open the key store a ``--keys`` value names: a SQLite file, or a PostgreSQL URL that
every replica of a deployment shares. And the quota ledger that goes with it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bastion.guard.keystore_base import KeyStoreBase
from bastion.guard.pg_url import is_pg_url

if TYPE_CHECKING:
    from bastion.guard.limits import UsageLedger

__all__ = ["is_pg_url", "open_keystore", "open_ledger"]


def open_keystore(spec: str | Path, *, secret_file: str | Path | None = None, create: bool = False,
                  refresh_interval_s: float = 1.0, watch: bool = True, schema: str | None = None) -> KeyStoreBase:
    """``postgresql://…`` or ``postgres://…``: the PostgreSQL store (``secret_file``
    required; the password may come from the URL or libpq's ``PGPASSWORD``/``PGPASSFILE``;
    ``schema`` defaults to ``bastion``; ``watch=False`` for one-shot tools). Anything else:
    the path of the SQLite store (``secret_file`` defaults to the path + ``.secret``).

    Raises ``KeyStoreError`` (bad URL, no secret file, wrong secret, newer schema, database
    unreachable) or ``KeyStoreMissing`` (``create=False`` and nothing there yet); messages
    never contain a password.
    """
    secret = Path(secret_file) if secret_file is not None else None
    if is_pg_url(spec):
        from bastion.guard.keystore_pg import DEFAULT_SCHEMA, PgKeyStore

        return PgKeyStore(str(spec), secret_file=secret, create=create, refresh_interval_s=refresh_interval_s,
                          schema=schema or DEFAULT_SCHEMA, watch=watch)
    from bastion.guard.keystore import KeyStore

    return KeyStore(Path(spec), secret_file=secret, create=create, refresh_interval_s=refresh_interval_s)


def open_ledger(store: KeyStoreBase) -> UsageLedger:
    """The quota ledger beside ``store``: a table in the same SQLite file or PostgreSQL
    schema, so that every worker and replica counting for a tenant shares one budget."""
    from bastion.guard.keystore_pg import PgKeyStore

    if isinstance(store, PgKeyStore):
        from bastion.guard.ledger_pg import PgLedger

        return PgLedger(store.connect)
    from bastion.guard.keystore import KeyStore
    from bastion.guard.limits import SqliteLedger

    if not isinstance(store, KeyStore):
        raise TypeError(f"no ledger for {type(store).__name__}")
    return SqliteLedger(store.connect)
