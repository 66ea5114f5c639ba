"""The settings of ``bastion serve``, each declared once.

A ``ServeOptions`` field is a YAML key of ``--config`` files; a field whose metadata holds
a ``Flag`` is also a command-line option. The click options, the set of YAML keys and the
flag-to-field mapping are all derived from the dataclass, so adding a setting is one
field, not three edits that can drift apart.

Precedence: the field's default < the ``--config`` file < a flag given on the command
line (or its environment variable).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cache
from types import UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import click
from click.core import ParameterSource

from bastion.core.limits import DEFAULT_LIMITS, RequestLimits

HttpImpl = Literal["bastion", "uvicorn"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]
TlsClientAuth = Literal["none", "optional", "required"]
SharedStateFail = Literal["closed", "open"]

# the request-limit defaults live once, in core/limits.py (an instance: the dataclass has
# slots, so its class attributes are descriptors, not the defaults)
_LIMIT_DEFAULTS = DEFAULT_LIMITS

_FLAG = "bastion.flag"
_INTERNAL = "bastion.internal"


@dataclass(frozen=True)
class Flag:
    """How one ``ServeOptions`` field is spelled on the command line.

    The click type is derived from the field's annotation (``Literal`` → a choice,
    ``list[X]`` → X) unless ``type`` names one (for paths); a bool field becomes an on/off
    flag; the shown default is the field's default.
    """

    decl: str  # "--http-port", or "--audit/--no-audit" for a flag with an explicit off switch
    help: str | None = None
    type: click.ParamType | None = None
    multiple: bool = False
    envvar: str | None = None


def flag(
    decl: str,
    *,
    help: str | None = None,
    type: click.ParamType | None = None,
    multiple: bool = False,
    envvar: str | None = None,
) -> dict[str, Any]:
    """Field metadata making a ``ServeOptions`` field a command-line option too."""
    return {_FLAG: Flag(decl, help=help, type=type, multiple=multiple, envvar=envvar)}


# set by the supervisor for its workers: neither a flag nor a YAML key
_internal: dict[str, Any] = {_INTERNAL: True}


@dataclass
class ServeOptions:
    """Every knob of ``bastion serve``; also read from a YAML ``--config`` file."""

    repository: str = "."  # the REPOSITORY argument (``demo``: --out), which wins over the file
    host: str = field(default="127.0.0.1", metadata=flag("--host", help="Address to bind."))
    http_port: int = field(default=8000, metadata=flag("--http-port"))
    # None: no gRPC listener (-1 or "off" in a flag or file, see from_mapping)
    grpc_port: int | None = field(default=8001, metadata=flag("--grpc-port", help="-1 disables gRPC."))
    workers: int = field(default=1, metadata=flag(
        "--workers", help="Worker processes sharing the ports (use the cores)."))
    poll_interval_s: float | None = field(default=5.0, metadata=flag(  # None or 0: no hot reload
        "--poll-interval", help="Seconds between repository scans for hot reload; 0 disables."))
    # Triton's explicit mode: only these load at start
    explicit_models: list[str] | None = field(default=None, metadata=flag(
        "--model", multiple=True, help="Explicit mode: load only these models at start (repeatable)."))
    max_body_bytes: int = field(default=_LIMIT_DEFAULTS.max_body_bytes, metadata=flag("--max-body-bytes"))
    # answers below this size are not gzipped even for clients that accept it (transport/rest.py)
    compress_min_bytes: int = field(default=1024, metadata=flag(
        "--compress-min-bytes", help="Smallest JSON/text answer worth compressing for clients that accept gzip."))
    # "bastion" (transport/http_server.py) or "uvicorn"
    http_impl: HttpImpl = field(default="bastion", metadata=flag(
        "--http-impl", help="HTTP/1.1 server: Bastion's own lean one, or uvicorn."))
    executor_threads: int = 4
    strict_readiness: bool = True
    drain_timeout_s: float = 30.0
    log_level: LogLevel = field(default="info", metadata=flag("--log-level"))
    log_format: LogFormat = field(default="json", metadata=flag("--log-format"))
    # ---- security (guard/) ----
    # SQLite key store (tenants, API keys); required unless insecure_no_auth
    keys_db: str | None = field(default=None, metadata=flag(
        "--keys", type=click.Path(dir_okay=False), envvar="BASTION_KEYS",
        help="Key store with tenants and API keys: a SQLite file, or a postgresql:// URL shared by replicas "
             "(password from PGPASSWORD); see `bastion keys`."))
    # ---- beyond one machine (docs/SCALING.md) ----
    # rate limits and query budgets shared by every replica; None: per machine (the key store's SQLite)
    redis_url: str | None = field(default=None, metadata=flag(
        "--redis", envvar="BASTION_REDIS_URL",
        help="Redis URL (redis:// or rediss://) holding the rate limits and query budgets shared by replicas."))
    shared_state_fail: SharedStateFail = field(default="closed", metadata=flag(
        "--shared-state-fail",
        help="When Redis is unreachable: closed refuses with 503 + Retry-After, open falls back to local limits."))
    # this replica's name: its audit chains are written as <replica>.<worker>; None: <worker> (one machine)
    replica_id: str | None = field(default=None, metadata=flag(
        "--replica-id", envvar="BASTION_REPLICA_ID",
        help="This replica's name, unique among replicas: audit writer ids become NAME.WORKER (default: WORKER)."))
    # how many front replicas share the limits: the open fail mode splits rates by it
    replicas: int = field(default=1, metadata=flag(
        "--replicas", help="Front replicas sharing --redis (the open fail mode gives each 1/N of a rate)."))
    # serve without authentication; refused unless host is loopback
    insecure_no_auth: bool = field(default=False, metadata=flag(
        "--insecure-no-auth", help="Serve without authentication (loopback addresses only)."))
    # master secret; default: KEYS_DB + ".secret"
    secret_file: str | None = field(default=None, metadata=flag(
        "--secret-file", type=click.Path(dir_okay=False), help="Master secret file (default: KEYS + '.secret')."))
    # /metrics without a key (default: admin keys only)
    open_metrics: bool = field(default=False, metadata=flag("--open-metrics", help="Serve /metrics without a key."))
    # the hash-chained audit log (needs a key store or audit_dir)
    audit: bool = field(default=True, metadata=flag("--audit/--no-audit", help="Write the hash-chained audit log."))
    audit_dir: str | None = field(default=None, metadata=flag(  # default: "audit" beside the key store
        "--audit-dir", type=click.Path(file_okay=False),
        help="Audit log directory (default: 'audit' beside the key store)."))
    audit_fsync_interval_s: float = 0.2
    # PEM certificate chain; with tls_key, REST and gRPC speak TLS only
    tls_cert: str | None = field(default=None, metadata=flag(
        "--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate chain."))
    tls_key: str | None = field(default=None, metadata=flag(
        "--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key."))
    # PEM CA bundle for client certificates (mutual TLS)
    tls_client_ca: str | None = field(default=None, metadata=flag(
        "--tls-client-ca", type=click.Path(exists=True, dir_okay=False),
        help="PEM CA bundle that client certificates must chain to (mutual TLS)."))
    tls_client_auth: TlsClientAuth = field(default="none", metadata=flag(
        "--tls-client-auth", help="Ask clients for a certificate."))
    # Ed25519 public keys (PEM files) allowed to sign sealed bundles
    trusted_signers: list[str] | None = field(default=None, metadata=flag(
        "--trusted-signer", multiple=True, type=click.Path(exists=True),
        help="Ed25519 public key (PEM) allowed to sign sealed bundles (repeatable)."))
    # env:VAR | file:PATH | module:pkg.mod:factory
    bundle_key_provider: str | None = field(default=None, metadata=flag(
        "--bundle-key-provider",
        help="Where the bundle master key comes from: env:VAR, file:PATH or module:pkg.mod:factory."))
    # ---- confidential models (docs/CONFIDENTIAL.md) ----
    worker_socket: str | None = field(default=None, metadata=flag(
        "--worker-socket",
        help="The trusted worker that serves confidential models: a Unix socket path, or vsock:CID:PORT."))
    worker_config: str | None = field(default=None, metadata=flag(
        "--worker-config", type=click.Path(exists=True, dir_okay=False),
        help="Start and supervise a local trusted worker with this worker.yaml on --worker-socket "
             "(an ordinary process: no TEE protects it)."))
    worker_expect: str | None = field(default=None, metadata=flag(
        "--worker-expect",
        help="Measurement the trusted worker must attest (name=hex,...); without it any worker's evidence "
             "is accepted for the channel and its measurement logged."))
    extraction_monitor: dict[str, Any] | None = None  # PRADA settings (guard/monitor.py); None = off
    probe_monitor: dict[str, Any] | None = None  # zoo-probing detector (guard/probes.py); None = off
    # ---- request limits (core/limits.py) ----
    max_elements: int = field(default=_LIMIT_DEFAULTS.max_elements, metadata=flag(
        "--max-elements", help="Elements over all input tensors of one request."))
    max_batch_size: int | None = field(default=_LIMIT_DEFAULTS.max_batch_size, metadata=flag(
        "--max-batch-size", help="Server-wide cap on rows per request."))
    max_string_bytes: int = field(default=_LIMIT_DEFAULTS.max_string_bytes, metadata=flag(
        "--max-string-bytes", help="Bytes in one BYTES element."))
    max_json_depth: int = field(default=_LIMIT_DEFAULTS.max_json_depth, metadata=flag(
        "--max-json-depth", help="Nesting depth of a JSON request body."))
    request_timeout_s: float | None = field(default=_LIMIT_DEFAULTS.request_timeout_s, metadata=flag(
        "--request-timeout", help="Seconds a request may spend queued and computing; 0 disables."))
    control_dir: str | None = field(default=None, repr=False, metadata=_internal)
    worker_index: int = field(default=0, repr=False, metadata=_internal)
    # set by the supervisor for every worker but the first one it starts: accept connections
    # only once the models are loaded, since the kernel hands a listening worker its share of
    # them and the others already serve (the first one listens at once, so that liveness
    # probes are answered while the initial load runs)
    listen_when_ready: bool = field(default=False, repr=False, metadata=_internal)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "config") -> ServeOptions:
        """Options from YAML-style settings; unknown keys are an error that names them."""
        known = yaml_keys()
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        data = dict(data)
        # `grpc_port: off` unquoted is YAML 1.1's False; compared by identity because 0 == False
        if "grpc_port" in data and (data["grpc_port"] is False or data["grpc_port"] in (-1, "off")):
            data["grpc_port"] = None
        return cls(**data)

    def check_security(self) -> None:
        """Refuse settings that would serve unprotected by accident (ValueError says why)."""
        if self.keys_db is None and not self.insecure_no_auth:
            raise ValueError(
                "refusing to serve without authentication: pass --keys PATH (a key store made with "
                "`bastion keys create --keys PATH --tenant NAME`), or --insecure-no-auth on a loopback address"
            )
        if self.replica_id is not None:
            from bastion.guard.audit_format import REPLICA_RE

            # the writer id NAME.WORKER must fit the audit's 64 characters
            if len(self.replica_id) > 63 or not REPLICA_RE.fullmatch(self.replica_id):
                raise ValueError(f"--replica-id {self.replica_id!r}: letters, digits, '_', '.' and '-', at most 63 "
                                 "characters, starting with a letter, digit or '_'")
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if self.redis_url is not None:
            if self.keys_db is None:
                raise ValueError("--redis shares the limits of the key store's tenants: it needs --keys")
            from bastion.guard.redis_state import parse_redis_url

            parse_redis_url(self.redis_url)
        if self.keys_db is not None and self.insecure_no_auth:
            raise ValueError("--keys and --insecure-no-auth contradict each other; pass one")
        if self.insecure_no_auth and not _is_loopback(self.host):
            raise ValueError(
                f"--insecure-no-auth is allowed on loopback addresses only (127.0.0.1, ::1, localhost), "
                f"not {self.host!r}"
            )
        from bastion.guard.tls import server_ssl_context, tls_files

        tls = tls_files(self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_client_auth)
        if tls is not None:
            server_ssl_context(*tls)  # loads the files: a bad one stops the start, not the first handshake
        if self.extraction_monitor is not None:
            from bastion.guard.monitor import parse_monitor

            parse_monitor(self.extraction_monitor, "extraction_monitor")
        if self.probe_monitor is not None:
            from bastion.guard.probes import parse_probe_monitor

            parse_probe_monitor(self.probe_monitor, "probe_monitor")
        if not 4 <= self.max_json_depth <= 250:
            # every V2 JSON body is 4 deep; orjson parses 1024 levels but writes only ~254
            raise ValueError(f"max_json_depth must be between 4 and 250, got {self.max_json_depth}")
        if self.bundle_key_provider:
            from bastion.guard.keyproviders import load_key_provider

            load_key_provider(self.bundle_key_provider)
        if self.worker_config and not self.worker_socket:
            raise ValueError("--worker-config needs --worker-socket: the path the supervised worker listens on")
        if self.worker_config and self.workers > 1:
            raise ValueError("--worker-config supervises one worker from one process: with --workers > 1, start "
                             "`bastion worker serve` yourself and give every process --worker-socket")
        if self.worker_expect:
            from bastion.confidential.attestation import parse_expected_measurement

            parse_expected_measurement(self.worker_expect)

    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_body_bytes=self.max_body_bytes,
            max_elements=self.max_elements,
            max_batch_size=self.max_batch_size,
            max_string_bytes=self.max_string_bytes,
            max_json_depth=self.max_json_depth,
            request_timeout_s=self.request_timeout_s or None,  # 0 on the command line: no timeout
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---- what is derived from the declaration ----

def yaml_keys() -> frozenset[str]:
    """The keys a ``--config`` file may hold: every field the supervisor does not set."""
    return frozenset(f.name for f in fields(ServeOptions) if not f.metadata.get(_INTERNAL))


def flag_fields() -> list[tuple[Field[Any], Flag]]:
    """The fields that are command-line options, in declaration (and ``--help``) order.

    The click parameter of each is named after its field, so ``ctx.params`` keys are
    the YAML keys: the flag-to-key mapping is the identity.
    """
    return [(f, f.metadata[_FLAG]) for f in fields(ServeOptions) if _FLAG in f.metadata]


@cache
def _hints() -> dict[str, Any]:
    return get_type_hints(ServeOptions)


def _click_type(f: Field[Any], spec: Flag) -> Any:
    """The click type a field's annotation implies: Literal → Choice, list[X] → X, X | None → X."""
    if spec.type is not None:
        return spec.type
    hint = _hints()[f.name]
    if get_origin(hint) in (Union, UnionType):  # `int | None`, or `Optional[int]`
        hint = next(a for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is list:
        (hint,) = get_args(hint)
    if get_origin(hint) is Literal:
        return click.Choice(list(get_args(hint)))
    if hint in (int, float, str, bool):
        return hint
    raise TypeError(f"ServeOptions.{f.name}: no click type for {hint!r}; give Flag.type")


def _click_option(f: Field[Any], spec: Flag) -> Callable[[Any], Any]:
    default = None if f.default is MISSING else f.default
    kwargs: dict[str, Any] = {
        "type": _click_type(f, spec),
        "default": default,
        "show_default": True,  # click shows nothing for None and for off flags without an off switch
        "help": spec.help,
        "multiple": spec.multiple,
        "envvar": spec.envvar,
    }
    if isinstance(default, bool):
        kwargs["is_flag"] = True
        del kwargs["type"]
    return click.option(spec.decl, f.name, **kwargs)


_CONFIG_OPTION = click.option(
    "--config", type=click.Path(exists=True, dir_okay=False), help="YAML file with the same settings (flags win)."
)
# --help lists --config after the general settings and before the security ones, where
# it always stood
_CONFIG_AFTER = "log_format"

F = TypeVar("F", bound=Callable[..., Any])


def serve_flags(f: F) -> F:
    """Decorate a click command with ``--config`` and every flag of ``ServeOptions``."""
    options: list[Callable[[Any], Any]] = []
    for fld, spec in flag_fields():
        options.append(_click_option(fld, spec))
        if fld.name == _CONFIG_AFTER:
            options.append(_CONFIG_OPTION)
    for opt in reversed(options):  # the first decorator applied is the last listed
        f = opt(f)
    return f


def load_config_file(path: str | None) -> dict[str, Any]:
    """The settings mapping of a ``--config`` YAML file ({} without one)."""
    if not path:
        return {}
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a mapping of settings", param_hint="--config")
    return data


def options_from_context(ctx: click.Context, repository: str | None) -> ServeOptions:
    """Defaults < --config file < flags given on the command line (or by environment variable)."""
    config = ctx.params.get("config")
    data = load_config_file(config)
    if repository is not None:
        data["repository"] = repository
    for fld, _spec in flag_fields():
        name = fld.name
        given = ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
        if not given and name in data:
            continue  # the file's value stands
        value = ctx.params[name]
        if isinstance(value, tuple):  # multiple=True options: none given is "not set"
            value = list(value) or None
        if value is None:
            continue  # the dataclass default, not None, is the unset value
        data[name] = value
    try:
        return ServeOptions.from_mapping(data, config or "options")
    except (TypeError, ValueError) as err:
        raise click.UsageError(str(err)) from None
