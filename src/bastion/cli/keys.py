"""``bastion keys``: tenants, API keys and their limits in the key store."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from bastion.guard.principal import Limits

DEFAULT_KEYS = "bastion-keys.db"
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_QUOTA_PERIODS = {"day": "day", "d": "day", "total": "total"}
_NONE = ("none", "unlimited")


def parse_rate(text: str) -> float | None:
    """``N/s``, ``N/min``, ``N/h`` (plain ``N``: per second) → requests per second;
    ``none`` → no rate limit."""
    value = text.strip().lower()
    if value in _NONE:
        return None
    number, _, unit = value.partition("/")
    unit = unit.strip() or "s"
    try:
        n = float(number)
    except ValueError:
        n = math.nan
    if unit not in _RATE_UNITS or not math.isfinite(n) or n <= 0:
        raise click.BadParameter(f"expected N/s, N/min or N/h with N > 0 (or 'none'), got {text!r}",
                                 param_hint="--rate")
    return n / _RATE_UNITS[unit]


def parse_quota(text: str) -> tuple[int | None, str]:
    """``N/day`` or ``N/total`` (plain ``N``: per day) → (N, period); ``none`` → no quota."""
    value = text.strip().lower()
    if value in _NONE:
        return None, "day"
    number, _, period = value.partition("/")
    period = period.strip() or "day"
    if not re.fullmatch(r"[0-9]+", number.strip()) or period not in _QUOTA_PERIODS or int(number) < 1:
        raise click.BadParameter(f"expected N/day or N/total with a whole N >= 1 (or 'none'), got {text!r}",
                                 param_hint="--quota")
    return int(number), _QUOTA_PERIODS[period]


def parse_burst(text: str) -> int | None:
    value = text.strip().lower()
    if value in _NONE:
        return None
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"expected a whole number >= 1 (or 'none'), got {text!r}", param_hint="--burst")
    return int(value)


def format_rate(rate: float) -> str:
    # show 10/min as written rather than 0.166667/s
    for unit, mult in (("s", 1), ("min", 60), ("h", 3600)):
        v = rate * mult
        if v >= 1 and abs(v - round(v)) < 1e-9 * v:
            return f"{round(v)}/{unit}"
    return f"{rate:g}/s"


def format_limits(limits: Limits) -> str:
    parts = []
    if limits.rate_per_s is not None:
        parts.append(format_rate(limits.rate_per_s) + (f" burst {limits.burst}" if limits.burst else ""))
    if limits.quota is not None:
        parts.append(f"{limits.quota}/{limits.quota_period}")
    return ", ".join(parts) or "unlimited"


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # piped into a file or grep: lines are not wrapped by anyone, so keep rows whole
        console = Console(width=max(console.width, 200))
    return console


def _store_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--secret-file", type=click.Path(dir_okay=False),
                     help="Master secret file (default for SQLite: KEYS + '.secret'; required for PostgreSQL).")(f)
    return click.option("--keys", "keys_path", type=click.Path(dir_okay=False), envvar="BASTION_KEYS",
                        default=DEFAULT_KEYS, show_default=True,
                        help="Key store: a SQLite file, or a postgresql:// URL shared by every replica "
                             "(the password may come from PGPASSWORD).")(f)


@contextmanager
def _store(keys_path: str, secret_file: str | None, *, create: bool = False) -> Iterator[Any]:
    """Open the store; every error a user can cause becomes a ClickException."""
    from bastion.core.errors import BastionError
    from bastion.guard.keystore_model import KeyStoreError
    from bastion.guard.keystores import is_pg_url, open_keystore

    if is_pg_url(keys_path) and not secret_file:
        raise click.UsageError("a PostgreSQL key store needs --secret-file: the master secret stays a file on "
                               "each replica (copy the same file to every one), never in the database")
    try:
        # watch=False: a one-shot command needs no listener thread for other replicas' changes
        store = open_keystore(keys_path, secret_file=secret_file or None, create=create, watch=False)
    except (OSError, KeyStoreError) as err:
        raise click.ClickException(str(err)) from None
    try:
        yield store
    except BastionError as err:
        raise click.ClickException(str(err)) from None
    finally:
        store.close()


def _dumps(data: Any) -> str:
    import orjson

    return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()


def _limits_from_options(current: Limits, rate: str | None, burst: str | None, quota: str | None) -> Limits:
    """Options given replace the current values; the others stay. Clearing the rate
    clears its burst too (a burst without a rate means nothing)."""
    rate_per_s, burst_n = current.rate_per_s, current.burst
    quota_n, period = current.quota, current.quota_period
    if rate is not None:
        rate_per_s = parse_rate(rate)
        if rate_per_s is None and burst is None:
            burst_n = None
    if burst is not None:
        burst_n = parse_burst(burst)
    if quota is not None:
        quota_n, period = parse_quota(quota)
    if burst_n is not None and rate_per_s is None:
        raise click.BadParameter("a burst needs a rate (give --rate too)", param_hint="--burst")
    return Limits(rate_per_s, burst_n, quota_n, period)  # type: ignore[arg-type]


def _cert_fingerprint(path: str) -> str:
    from bastion.core.errors import InvalidInput
    from bastion.guard.keystore_model import cert_fingerprint_of_pem

    try:
        return cert_fingerprint_of_pem(Path(path).read_bytes())
    except InvalidInput as err:
        raise click.BadParameter(f"{path}: {err}", param_hint="--cert") from None


@click.group()
def keys() -> None:
    """Manage tenants, API keys and client certificates (the key store).

    A running server sees new keys, revocations and limit changes within about a second.
    """


@keys.command("create")
@_store_options
@click.option("--tenant", required=True, help="Tenant the key belongs to (created when new).")
@click.option("--models", help="Comma-separated models and zoos the key may call (default: all).")
@click.option("--role", type=click.Choice(["infer", "admin"]), default="infer", show_default=True,
              help="admin may also load/unload models and read metrics.")
@click.option("--rate", help="Tenant rate limit: N/s, N/min or N/h.")
@click.option("--burst", help="Tenant burst (token-bucket size; default: the rate per second, at least 1).")
@click.option("--quota", help="Tenant quota: N/day or N/total.")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False),
              help="PEM client certificate that authenticates as this key (mutual TLS).")
@click.option("--bearer/--no-bearer", default=None,
              help="Issue a bearer key. Default: yes, unless --cert is given (certificate only).")
@click.option("--description", default="", help="Free text shown in listings (who, what for).")
@click.option("--json", "as_json", is_flag=True, help="Print the key and its details as JSON.")
def keys_create(keys_path: str, secret_file: str | None, tenant: str, models: str | None, role: str,
                rate: str | None, burst: str | None, quota: str | None, cert: str | None, bearer: bool | None,
                description: str, as_json: bool) -> None:
    """Create an API key; the key is printed once, alone on stdout."""
    from bastion.core.errors import NotFound

    scope = None
    if models is not None:
        scope = [m.strip() for m in models.split(",") if m.strip()]
        if not scope:
            raise click.BadParameter("expected model names separated by commas", param_hint="--models")
    fingerprint = _cert_fingerprint(cert) if cert else None
    # syntax errors before the store is created or touched
    for value, parse in ((rate, parse_rate), (burst, parse_burst), (quota, parse_quota)):
        if value is not None:
            parse(value)
    with _store(keys_path, secret_file, create=True) as store:
        limits = None
        if rate is not None or burst is not None or quota is not None:
            try:
                current = store.tenant(tenant).limits
            except NotFound:
                current = Limits()
            limits = _limits_from_options(current, rate, burst, quota)
        token, info = store.create_key(tenant, role=role, models=scope, limits=limits,  # type: ignore[arg-type]
                                       cert_fingerprint=fingerprint, description=description, bearer=bearer)
    if as_json:
        click.echo(_dumps({"key": token, **info.as_dict()}))
    elif token is not None:
        click.echo(token)
    scope_text = ", ".join(info.models) if info.models is not None else "all models"
    parts = (["bearer key"] if info.bearer else []) + (
        [f"certificate cert:{info.cert_fingerprint[:16]}"] if info.cert_fingerprint else [])
    credential = " and ".join(parts)
    click.echo(f"created {credential} {info.key_id} for tenant {info.tenant} (role {info.role}, {scope_text}; "
               f"tenant limits: {format_limits(info.limits)})", err=True)
    if token is not None:
        click.echo("warning: this is the only time the key is shown; store it now (it cannot be recovered, "
                   "only revoked and replaced)", err=True)


@keys.command("list")
@_store_options
@click.option("--tenant", help="Only this tenant's keys.")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_list(keys_path: str, secret_file: str | None, tenant: str | None, include_revoked: bool,
              as_json: bool) -> None:
    """List keys (never their secrets)."""
    with _store(keys_path, secret_file) as store:
        rows = store.list_keys(tenant, include_revoked=include_revoked)
    if as_json:
        click.echo(_dumps([k.as_dict() for k in rows]))
        return
    if not rows:
        hint = "" if include_revoked else " (revoked keys are hidden; --all shows them)"
        click.echo("no keys" + (f" for tenant {tenant}" if tenant else "") + hint, err=True)
        return
    from rich import box
    from rich.table import Table

    # Columns that are empty for every row are left out, and the rest fold rather than
    # end in "…" (a cut key id or model name is useless), so it stays readable at 80.
    show_auth = any(k.cert_fingerprint for k in rows)
    show_description = any(k.description for k in rows)
    headers = ["key id", "tenant", "role", "models", "limits"]
    headers += ["auth"] if show_auth else []
    headers += ["created"] + (["revoked"] if include_revoked else [])
    headers += ["description"] if show_description else []
    table = Table(*headers, box=box.SIMPLE_HEAD, pad_edge=False)
    for column in table.columns:
        column.overflow = "fold"
    table.columns[0].no_wrap = True
    for k in rows:
        cells = [k.key_id, k.tenant, k.role, ", ".join(k.models) if k.models is not None else "all",
                 format_limits(k.limits)]
        if show_auth:
            cells.append(" + ".join((["bearer"] if k.bearer else [])
                                    + ([f"cert:{k.cert_fingerprint[:16]}"] if k.cert_fingerprint else [])))
        cells.append(k.created_at[:10])
        if include_revoked:
            cells.append(f"[red]{k.revoked_at[:10]}[/]" if k.revoked_at else "")
        if show_description:
            cells.append(k.description)
        table.add_row(*cells)
    _console().print(table)


@keys.command("revoke")
@_store_options
@click.argument("key_id")
def keys_revoke(keys_path: str, secret_file: str | None, key_id: str) -> None:
    """Revoke a key; servers refuse it within about a second.

    KEY_ID as shown by `bastion keys list` (or cert:<fingerprint> for a certificate).
    """
    with _store(keys_path, secret_file) as store:
        before = {k.key_id for k in store.list_keys()}
        info = store.revoke(key_id)
    if info.key_id in before:
        click.echo(f"revoked key {info.key_id} of tenant {info.tenant}")
    else:
        click.echo(f"key {info.key_id} of tenant {info.tenant} was already revoked at {info.revoked_at}")


@keys.command("tenants")
@_store_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_tenants(keys_path: str, secret_file: str | None, as_json: bool) -> None:
    """List tenants, their limits and how many keys they hold."""
    with _store(keys_path, secret_file) as store:
        rows = store.tenants()
    if as_json:
        click.echo(_dumps([t.as_dict() for t in rows]))
        return
    from rich import box
    from rich.table import Table

    table = Table("tenant", "limits", "active keys", "revoked keys", "created", box=box.SIMPLE_HEAD)
    for t in rows:
        table.add_row(t.name, format_limits(t.limits), str(t.active_keys), str(t.revoked_keys),
                      t.created_at[:10])
    _console().print(table)


@keys.command("set-limits")
@_store_options
@click.option("--tenant", required=True)
@click.option("--rate", help="N/s, N/min, N/h, or 'none' to remove the rate limit.")
@click.option("--burst", help="Token-bucket size, or 'none' for the default.")
@click.option("--quota", help="N/day, N/total, or 'none' to remove the quota.")
def keys_set_limits(keys_path: str, secret_file: str | None, tenant: str, rate: str | None, burst: str | None,
                    quota: str | None) -> None:
    """Change a tenant's limits (shared by all its keys).

    Options left out keep their current value; 'none' removes a limit.
    """
    if rate is None and burst is None and quota is None:
        raise click.UsageError("give at least one of --rate, --burst, --quota")
    with _store(keys_path, secret_file) as store:
        limits = _limits_from_options(store.tenant(tenant).limits, rate, burst, quota)
        info = store.set_limits(tenant, limits)
    click.echo(f"tenant {info.name}: {format_limits(info.limits)}")


@keys.command("set-class")
@_store_options
@click.option("--tenant", required=True)
@click.option("--class", "defense_class", required=True,
              help="Defense class, e.g. default, trusted, suspect (a zoo's `defenses` in zoo.yaml).")
def keys_set_class(keys_path: str, secret_file: str | None, tenant: str, defense_class: str) -> None:
    """Move a tenant to another defense class; running servers apply it within a second."""
    with _store(keys_path, secret_file) as store:
        info = store.set_defense_class(tenant, defense_class)
    click.echo(f"tenant {info.name}: defense class {info.defense_class}")
