"""PostgreSQL connection URLs for the guard's stores: recognise, validate, redact, connect.

A URL may carry a password (``postgresql://user:pw@host/db``); it may also come from
libpq's environment (``PGPASSWORD``, ``PGPASSFILE``), which psycopg reads on its own. The
password never appears in a message or a log line: everything shown goes through
``redact_pg_url``, and libpq's own parse errors are scrubbed of it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from bastion.guard.keystore_model import KeyStoreError

SCHEMES = ("postgresql://", "postgres://")
MAX_URL_CHARS = 2048
CONNECT_TIMEOUT_S = 3

# Applied unless the URL sets them: a dead server must fail a connection in seconds, and a
# half-open connection (server host gone, no RST) must be noticed without a query hanging
# for the kernel's 15-minute retransmission timeout.
_DEFAULTS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 5000,  # ms
}


def is_pg_url(spec: object) -> bool:
    return isinstance(spec, str) and spec[:13].lower().startswith(SCHEMES)


def redact_pg_url(url: str) -> str:
    """``scheme://user@host:port/db``: no password, no query (it may hold one too)."""
    scheme = url.partition("://")[0].lower() or "postgresql"
    try:
        parts = urlsplit(url)
        user = parts.username
    except ValueError:
        return f"{scheme}://(unparseable)"
    hosts = parts.netloc.rpartition("@")[2]
    return f"{scheme}://{unquote(user) + '@' if user else ''}{hosts}{parts.path}"


def _secrets_in(url: str) -> list[str]:
    found = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found += [parts.password, unquote(parts.password)]
        found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == "password" and v]
    except ValueError:
        pass
    return sorted({s for s in found if s}, key=len, reverse=True)


def check_pg_url(url: str) -> str:
    """``url`` with its scheme in lowercase, or ``KeyStoreError`` saying what is wrong."""
    if len(url) > MAX_URL_CHARS:
        raise KeyStoreError(f"PostgreSQL URL is {len(url)} characters long; at most {MAX_URL_CHARS} are accepted")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise KeyStoreError(f"PostgreSQL URL {redact_pg_url(url)}: no spaces or control characters "
                            "(percent-encode them)")
    scheme, _, rest = url.partition("://")
    url = scheme.lower() + "://" + rest
    shown = redact_pg_url(url)
    try:
        parts = urlsplit(url)
        # several hosts (h1:5432,h2:5432) are libpq's to check; one host is checked here to
        # give a clearer message than libpq's
        port = parts.port if "," not in parts.netloc else None
    except ValueError as err:
        raise KeyStoreError(f"PostgreSQL URL {shown}: {err} (expected postgresql://user@host:port/database)") \
            from None
    if port == 0:
        raise KeyStoreError(f"PostgreSQL URL {shown}: port must be from 1 to 65535")
    if parts.fragment:
        raise KeyStoreError(f"PostgreSQL URL {shown}: a '#' fragment means nothing here")
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except psycopg.Error as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        for secret in _secrets_in(url):
            message = message.replace(secret, "***")
        raise KeyStoreError(f"PostgreSQL URL {shown}: {message}") from None
    return url


def connect_params(url: str, application_name: str) -> dict[str, Any]:
    """Keyword arguments for ``psycopg.connect(url, ...)``: the defaults the URL leaves open."""
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(url)
    params = {k: v for k, v in _DEFAULTS.items() if k not in given}
    if "application_name" not in given:
        params["application_name"] = application_name
    return params


def one_line(err: BaseException) -> str:
    """A database error as one line (libpq's messages span several)."""
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__
