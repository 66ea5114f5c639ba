"""TLS for REST and gRPC, optional mutual TLS, and client-certificate fingerprints.

A client certificate identifies a tenant by its fingerprint: the lowercase hex SHA-256
of the certificate's DER bytes (``fingerprint_der``), the same on both transports. The
REST server computes it once per connection and puts it in ``scope["bastion.client_cert_fp"]``;
gRPC handlers read it with ``grpc_peer_fingerprint(context)``.

``client_auth`` modes:

- ``none``: no client certificate is asked for (``client_ca`` is ignored).
- ``optional``: REST asks for one and verifies it against ``client_ca`` when sent, and a
  client without one still connects (it then authenticates with an API key). gRPC (the
  C core behind grpcio) can only require a certificate or not ask for one at all, so
  under ``optional`` gRPC does not ask: gRPC callers authenticate with API keys. Requiring
  it there would lock out the key-only clients that ``optional`` promises to admit.
- ``required``: the handshake fails without a certificate that chains to ``client_ca``,
  on both transports.

Imports stay light (no grpc, no cryptography at module level): the HTTP server imports
this module for ``fingerprint_der``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import ipaddress
import os
import re
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import grpc

__all__ = [
    "CIPHERS",
    "CLIENT_AUTH_MODES",
    "CLIENT_CERT_FP_SCOPE_KEY",
    "TlsFiles",
    "fingerprint_der",
    "fingerprint_pem",
    "grpc_peer_fingerprint",
    "grpc_server_credentials",
    "server_ssl_context",
    "tls_files",
    "write_dev_certificates",
]

CLIENT_AUTH_MODES = ("none", "optional", "required")
CLIENT_CERT_FP_SCOPE_KEY = "bastion.client_cert_fp"
# TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3 suites are not affected by
# set_ciphers and are all good). Shared with the uvicorn option so both HTTP servers agree.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)


class TlsFiles(NamedTuple):
    """Checked TLS settings, in the argument order of the two factories below."""

    cert: Path
    key: Path
    client_ca: Path | None
    client_auth: str


def tls_files(
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    client_ca: str | os.PathLike[str] | None,
    client_auth: str | None,
) -> TlsFiles | None:
    """Check the TLS settings of ``bastion serve``; None means plaintext.

    Raises ``ValueError`` naming the setting when they do not fit together: a
    certificate without its key (or the reverse), an unknown ``client_auth``, or client
    authentication without a CA to verify the client certificates against.
    """
    mode = client_auth or "none"
    if mode not in CLIENT_AUTH_MODES:
        raise ValueError(f"tls_client_auth: expected one of {', '.join(CLIENT_AUTH_MODES)}, got {mode!r}")
    if bool(cert) != bool(key):
        given, missing = ("tls_cert", "tls_key") if cert else ("tls_key", "tls_cert")
        raise ValueError(f"{given} is set but {missing} is not: TLS needs both the certificate chain and its key")
    if not cert:
        if mode != "none" or client_ca:
            raise ValueError("tls_client_auth/tls_client_ca need TLS: set tls_cert and tls_key too")
        return None
    if mode != "none" and not client_ca:
        raise ValueError(f"tls_client_auth={mode} needs tls_client_ca: the CA bundle client certificates must chain to")
    assert key is not None
    return TlsFiles(Path(cert), Path(key), Path(client_ca) if client_ca else None, mode)


def _check_mode(client_ca: Path | None, client_auth: str) -> None:
    if client_auth not in CLIENT_AUTH_MODES:
        raise ValueError(f"client_auth: expected one of {', '.join(CLIENT_AUTH_MODES)}, got {client_auth!r}")
    if client_auth != "none" and client_ca is None:
        raise ValueError(f"client_auth={client_auth} needs a client CA to verify client certificates against")


def server_ssl_context(cert: Path, key: Path, client_ca: Path | None, client_auth: str) -> ssl.SSLContext:
    """The server-side ``SSLContext`` for REST: TLS 1.2 or later, forward-secret AEAD
    ciphers, ALPN ``http/1.1``, and client certificates per ``client_auth``."""
    _check_mode(client_ca, client_auth)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    # renegotiation is a DoS lever and TLS compression leaks secrets (CRIME)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    # no h2: the server speaks HTTP/1.1 only, and a client must not be told otherwise
    ctx.set_alpn_protocols(["http/1.1"])
    _load(ctx, cert, key, client_ca if client_auth != "none" else None)
    if client_auth != "none":
        ctx.verify_mode = ssl.CERT_REQUIRED if client_auth == "required" else ssl.CERT_OPTIONAL
    return ctx


def _load(ctx: ssl.SSLContext, cert: Path, key: Path, client_ca: Path | None) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"cannot load the TLS certificate {cert} with key {key}: {err}") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"cannot load the client CA bundle {client_ca}: {err}") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read the {what} {path}: {err}") from None


def grpc_server_credentials(
    cert: Path, key: Path, client_ca: Path | None, client_auth: str
) -> grpc.ServerCredentials:
    """``grpc.ssl_server_credentials`` for the same settings.

    ``optional`` does not ask gRPC clients for a certificate (see the module docstring):
    grpcio offers only "require and verify" or "do not request".
    """
    import grpc

    _check_mode(client_ca, client_auth)
    required = client_auth == "required"
    # gRPC reports a bad file only as "failed to bind": check it here, with a clear message
    _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key, client_ca if required else None)
    chain, private_key = _read(cert, "TLS certificate"), _read(key, "TLS key")
    roots = _read(client_ca, "client CA bundle") if required and client_ca is not None else None
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=roots, require_client_auth=required)


def fingerprint_der(der: bytes) -> str:
    """A certificate's identity for the key store: lowercase hex SHA-256 of its DER bytes."""
    return hashlib.sha256(der).hexdigest()


def fingerprint_pem(pem: bytes | str) -> str:
    """``fingerprint_der`` of the first certificate in a PEM text."""
    if isinstance(pem, str):
        pem = pem.encode("ascii")
    match = _PEM_CERT.search(pem)
    if match is None:
        raise ValueError("no PEM certificate found (expected -----BEGIN CERTIFICATE-----)")
    try:
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except binascii.Error as err:
        raise ValueError(f"malformed PEM certificate: {err}") from None
    return fingerprint_der(der)


# gRPC hands over the PEM on every call; the same few client certificates come back
# again and again, so their fingerprints are kept (bounded) rather than re-hashed.
_fingerprint_pem_cached = functools.lru_cache(maxsize=4096)(fingerprint_pem)

# the auth-context property grpcio fills with the verified peer's leaf certificate
GRPC_PEER_CERT_KEY = "x509_pem_cert"


def grpc_peer_fingerprint(context: Any) -> str | None:
    """The client certificate's fingerprint in a gRPC handler (``grpc.aio.ServicerContext``
    or ``grpc.ServicerContext``); None for plaintext, or TLS without a client certificate."""
    pems = context.auth_context().get(GRPC_PEER_CERT_KEY)
    if not pems:
        return None
    return _fingerprint_pem_cached(bytes(pems[0]))


# ---- development certificates ------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED = {"ca", "server"}


def write_dev_certificates(
    out_dir: Path,
    *,
    hosts: Iterable[str] = ("127.0.0.1", "localhost"),
    clients: Iterable[str] = ("client",),
    days: int = 365,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a throwaway CA, a server certificate for ``hosts`` and one client
    certificate per name, all signed by that CA: for tests and trying TLS locally.

    Returns the paths: ``ca``, ``ca_key``, ``server``, ``server_key``, and ``NAME`` and
    ``NAME_key`` per client. Keys are ECDSA P-256, written readable by the owner only.
    Refuses to replace existing files unless ``overwrite``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts, clients = list(hosts), list(clients)
    if not hosts:
        raise ValueError("at least one host name or address is needed for the server certificate")
    for name in clients:
        if not _NAME.match(name) or name in _RESERVED:
            raise ValueError(f"client name {name!r}: use letters, digits, '.', '_' or '-', and not 'ca' or 'server'")
    if len(set(clients)) != len(clients):
        raise ValueError("client names must be distinct")
    out_dir = Path(out_dir)
    paths = {"ca": out_dir / "ca.pem", "ca_key": out_dir / "ca-key.pem",
             "server": out_dir / "server.pem", "server_key": out_dir / "server-key.pem"}
    for name in clients:
        paths[name] = out_dir / f"{name}.pem"
        paths[f"{name}_key"] = out_dir / f"{name}-key.pem"
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise FileExistsError(f"refusing to overwrite {', '.join(existing)}")
    out_dir.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=days)

    def subject(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bastion dev"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file

    def write_cert(path: Path, cert: x509.Certificate) -> None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = subject("Bastion dev CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject(cn)).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(aki, critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    write_key(paths["ca_key"], ca_key)
    write_cert(paths["ca"], ca_cert)
    server_key, server_cert = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
    write_key(paths["server_key"], server_key)
    write_cert(paths["server"], server_cert)
    for name in clients:
        client_key, client_cert = leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, [])
        write_key(paths[f"{name}_key"], client_key)
        write_cert(paths[name], client_cert)
    return paths
