"""guard/tls.py: settings checks, SSL contexts, gRPC credentials, fingerprints, dev
certificates; and the fingerprint reaching the app's scope on both HTTP servers."""

from __future__ import annotations

import asyncio
import socket
import ssl
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from bastion.guard.tls import (
    CLIENT_CERT_FP_SCOPE_KEY,
    fingerprint_der,
    fingerprint_pem,
    grpc_peer_fingerprint,
    grpc_server_credentials,
    server_ssl_context,
    tls_files,
    write_dev_certificates,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_dev_certificates(tmp_path_factory.mktemp("tls"), clients=("alice", "bob"))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Another CA, with a client certificate of the same name."""
    return write_dev_certificates(tmp_path_factory.mktemp("rogue"), clients=("alice",))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ---- dev certificates ----------------------------------------------------------------------


def test_dev_certificates_chain_to_their_ca(certs: dict[str, Path]) -> None:
    ca = _cert(certs["ca"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("server", "alice", "bob"):
        cert = _cert(certs[name])
        cert.verify_directly_issued_by(ca)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert set(certs) == {"ca", "ca_key", "server", "server_key", "alice", "alice_key", "bob", "bob_key"}


def test_dev_server_certificate_names_and_usages(certs: dict[str, Path]) -> None:
    import ipaddress

    server = _cert(certs["server"])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    client_eku = _cert(certs["alice"]).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(client_eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_dev_certificates_pass_strict_verification(certs: dict[str, Path]) -> None:
    """X509_STRICT (Python 3.13's client default) wants well-formed CA and key identifiers."""
    client = ssl.create_default_context(cafile=str(certs["ca"]))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    server = server_ssl_context(certs["server"], certs["server_key"], None, "none")
    _handshake(server, client, "127.0.0.1")
    _handshake(server, client, "localhost")


def test_dev_keys_are_private_and_files_not_overwritten(tmp_path: Path) -> None:
    paths = write_dev_certificates(tmp_path, hosts=("example.test",), clients=())
    for key in ("ca_key", "server_key"):
        assert stat.S_IMODE(paths[key].stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_dev_certificates(tmp_path, hosts=("example.test",), clients=())
    again = write_dev_certificates(tmp_path, hosts=("example.test",), clients=(), overwrite=True)
    assert again["ca"].read_bytes() != b"" and stat.S_IMODE(again["ca_key"].stat().st_mode) == 0o600


@pytest.mark.parametrize("clients", [("ca",), ("server",), ("../x",), ("a", "a"), ("",)])
def test_dev_certificates_refuse_bad_client_names(tmp_path: Path, clients: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        write_dev_certificates(tmp_path, clients=clients)


# ---- fingerprints ----------------------------------------------------------------------------


def test_fingerprints_are_sha256_of_der(certs: dict[str, Path]) -> None:
    cert = _cert(certs["alice"])
    expected = cert.fingerprint(hashes.SHA256()).hex()
    der = ssl.PEM_cert_to_DER_cert(certs["alice"].read_text())
    assert fingerprint_der(der) == expected
    assert fingerprint_pem(certs["alice"].read_bytes()) == expected
    assert fingerprint_pem(certs["alice"].read_text()) == expected
    assert expected == expected.lower() and len(expected) == 64
    # a chain file: the first certificate (the leaf) is the identity
    chain = certs["alice"].read_bytes() + certs["ca"].read_bytes()
    assert fingerprint_pem(chain) == expected
    assert fingerprint_pem(certs["bob"].read_bytes()) != expected


def test_fingerprint_pem_refuses_non_certificates(certs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="no PEM certificate"):
        fingerprint_pem(certs["alice_key"].read_bytes())
    with pytest.raises(ValueError, match="malformed"):
        fingerprint_pem(b"-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n")


# ---- settings and contexts ----------------------------------------------------------------------


def test_tls_files_checks_combinations(certs: dict[str, Path]) -> None:
    assert tls_files(None, None, None, "none") is None
    assert tls_files(None, None, None, None) is None
    files = tls_files(str(certs["server"]), str(certs["server_key"]), str(certs["ca"]), "required")
    assert files == (certs["server"], certs["server_key"], certs["ca"], "required")
    with pytest.raises(ValueError, match="tls_cert is set but tls_key is not"):
        tls_files(certs["server"], None, None, "none")
    with pytest.raises(ValueError, match="tls_key is set but tls_cert is not"):
        tls_files(None, certs["server_key"], None, "none")
    with pytest.raises(ValueError, match="needs tls_client_ca"):
        tls_files(certs["server"], certs["server_key"], None, "optional")
    with pytest.raises(ValueError, match="need TLS"):
        tls_files(None, None, certs["ca"], "required")
    with pytest.raises(ValueError, match="tls_client_auth: expected"):
        tls_files(certs["server"], certs["server_key"], certs["ca"], "sometimes")


def test_server_ssl_context_modes(certs: dict[str, Path]) -> None:
    plain = server_ssl_context(certs["server"], certs["server_key"], None, "none")
    assert plain.minimum_version == ssl.TLSVersion.TLSv1_2
    assert plain.verify_mode == ssl.CERT_NONE
    assert plain.options & ssl.OP_NO_COMPRESSION
    assert all("ECDHE" in c["name"] or c["protocol"] == "TLSv1.3" for c in plain.get_ciphers())
    optional = server_ssl_context(certs["server"], certs["server_key"], certs["ca"], "optional")
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    required = server_ssl_context(certs["server"], certs["server_key"], certs["ca"], "required")
    assert required.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ValueError, match="needs a client CA"):
        server_ssl_context(certs["server"], certs["server_key"], None, "required")
    with pytest.raises(ValueError, match="client_auth: expected"):
        server_ssl_context(certs["server"], certs["server_key"], certs["ca"], "yes")


def test_server_ssl_context_names_bad_files(certs: dict[str, Path], rogue: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load the TLS certificate"):
        server_ssl_context(certs["server"], rogue["server_key"], None, "none")  # key does not match
    with pytest.raises(ValueError, match="cannot load the TLS certificate"):
        server_ssl_context(tmp_path / "missing.pem", certs["server_key"], None, "none")
    with pytest.raises(ValueError, match="cannot load the client CA bundle"):
        server_ssl_context(certs["server"], certs["server_key"], tmp_path / "missing.pem", "required")


def test_alpn_is_http11(certs: dict[str, Path]) -> None:
    server = server_ssl_context(certs["server"], certs["server_key"], None, "none")
    client = ssl.create_default_context(cafile=str(certs["ca"]))
    client.set_alpn_protocols(["h2", "http/1.1"])
    assert _handshake(server, client, "127.0.0.1")["alpn"] == "http/1.1"


def test_required_client_auth_at_the_handshake(certs: dict[str, Path], rogue: dict[str, Path]) -> None:
    server = server_ssl_context(certs["server"], certs["server_key"], certs["ca"], "required")
    good = _client_ctx(certs, certs["alice"], certs["alice_key"])
    assert _handshake(server, good, "127.0.0.1")["peer_fp"] == fingerprint_pem(certs["alice"].read_bytes())
    with pytest.raises(ssl.SSLError):
        _handshake(server, _client_ctx(certs), "127.0.0.1")
    with pytest.raises(ssl.SSLError):
        _handshake(server, _client_ctx(certs, rogue["alice"], rogue["alice_key"]), "127.0.0.1")


def test_optional_client_auth_admits_clients_without_certificate(
    certs: dict[str, Path], rogue: dict[str, Path]
) -> None:
    server = server_ssl_context(certs["server"], certs["server_key"], certs["ca"], "optional")
    assert _handshake(server, _client_ctx(certs), "127.0.0.1")["peer_fp"] is None
    good = _client_ctx(certs, certs["bob"], certs["bob_key"])
    assert _handshake(server, good, "127.0.0.1")["peer_fp"] == fingerprint_pem(certs["bob"].read_bytes())
    # a certificate that is sent must verify, even when it is optional
    with pytest.raises(ssl.SSLError):
        _handshake(server, _client_ctx(certs, rogue["alice"], rogue["alice_key"]), "127.0.0.1")


def _client_ctx(certs: dict[str, Path], cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> dict[str, Any]:
    """A TLS handshake plus one application-data round trip (TLS 1.3 reports a refused client
    certificate only after the client's side of the handshake is done) in memory."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    srv_done = cli_done = False
    for _ in range(20):
        if not cli_done:
            try:
                cli.do_handshake()
                cli_done = True
                cli.write(b"ping")
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not srv_done:
            try:
                srv.do_handshake()
                srv_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if srv_done and cli_done:
            break
    assert srv.read(4) == b"ping"
    srv.write(b"pong")
    c_in.write(s_out.read())
    assert cli.read(4) == b"pong"
    der = srv.getpeercert(binary_form=True)
    return {"alpn": srv.selected_alpn_protocol(), "peer_fp": fingerprint_der(der) if der else None}


# ---- the fingerprint in the HTTP scope ---------------------------------------------------------------


async def scope_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = f"{scope['scheme']} {scope.get(CLIENT_CERT_FP_SCOPE_KEY)}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def _listening_socket() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock, sock.getsockname()[1]


async def _bastion_http(sock: socket.socket, ctx: ssl.SSLContext | None) -> Callable[[], Awaitable[None]]:
    from bastion.transport.http_server import HttpServer

    server = HttpServer(scope_app)
    await server.start([sock], ssl=ctx)
    return lambda: server.shutdown(5)


def _run_server(certs: dict[str, Path], client_auth: str, check: Callable[[int], Awaitable[None]]) -> None:
    async def main() -> None:
        sock, port = _listening_socket()
        ctx = server_ssl_context(certs["server"], certs["server_key"], certs["ca"], client_auth)
        stop = await _bastion_http(sock, ctx)
        try:
            await check(port)
        finally:
            await stop()

    asyncio.run(main())


def test_http_server_puts_the_fingerprint_in_the_scope(certs: dict[str, Path]) -> None:
    alice_fp = fingerprint_pem(certs["alice"].read_bytes())

    async def check(port: int) -> None:
        url = f"https://127.0.0.1:{port}/"
        async with httpx.AsyncClient(verify=_client_ctx(certs, certs["alice"], certs["alice_key"])) as client:
            for _ in range(3):  # keep-alive: the same connection, the same fingerprint each request
                r = await client.get(url)
                assert r.text == f"https {alice_fp}"
        async with httpx.AsyncClient(verify=_client_ctx(certs)) as client:
            assert (await client.get(url)).text == "https None"

    _run_server(certs, "optional", check)


def test_http_server_plaintext_scope_has_no_fingerprint() -> None:
    async def main() -> None:
        sock, port = _listening_socket()
        stop = await _bastion_http(sock, None)
        try:
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://127.0.0.1:{port}/")).text == "http None"
        finally:
            await stop()

    asyncio.run(main())


def test_http_server_required_client_auth_refuses_at_handshake(certs: dict[str, Path]) -> None:
    async def check(port: int) -> None:
        url = f"https://127.0.0.1:{port}/"
        async with httpx.AsyncClient(verify=_client_ctx(certs)) as client:
            with pytest.raises(httpx.TransportError):
                await client.get(url)
        async with httpx.AsyncClient(verify=_client_ctx(certs, certs["bob"], certs["bob_key"])) as client:
            r = await client.get(url)
            assert r.text == f"https {fingerprint_pem(certs['bob'].read_bytes())}"

    _run_server(certs, "required", check)


def test_http_server_drops_stalled_handshakes(certs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.transport import http_server

    monkeypatch.setattr(http_server, "TLS_HANDSHAKE_TIMEOUT_S", 0.3)

    async def check(port: int) -> None:
        # a peer that connects and never starts the handshake: others are still served...
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with httpx.AsyncClient(verify=_client_ctx(certs, certs["bob"], certs["bob_key"])) as client:
            assert (await client.get(f"https://127.0.0.1:{port}/")).status_code == 200
        # ...and it is disconnected once the handshake timeout has passed
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
        writer.close()

    _run_server(certs, "optional", check)


def test_uvicorn_option_puts_the_fingerprint_in_the_scope(certs: dict[str, Path]) -> None:
    from bastion.cli.serve import ServeOptions, _UvicornHttp

    opts = ServeOptions(tls_cert=str(certs["server"]), tls_key=str(certs["server_key"]),
                        tls_client_ca=str(certs["ca"]), tls_client_auth="required", http_impl="uvicorn")

    async def main() -> None:
        sock, port = _listening_socket()
        http = _UvicornHttp(scope_app, opts, sock)
        await http.start()
        url = f"https://127.0.0.1:{port}/"
        try:
            async with httpx.AsyncClient(verify=_client_ctx(certs, certs["alice"], certs["alice_key"])) as client:
                deadline = time.monotonic() + 30
                while True:  # uvicorn starts serving in a task
                    try:
                        r = await client.get(url)
                        break
                    except httpx.ConnectError:
                        assert time.monotonic() < deadline, "uvicorn did not start serving"
                        await asyncio.sleep(0.01)
                assert r.text == f"https {fingerprint_pem(certs['alice'].read_bytes())}"
            async with httpx.AsyncClient(verify=_client_ctx(certs)) as client:
                with pytest.raises(httpx.TransportError):
                    await client.get(url)
        finally:
            await http.shutdown(5)

    asyncio.run(main())


def test_uvicorn_option_checks_settings_when_built(certs: dict[str, Path]) -> None:
    from bastion.cli.serve import ServeOptions, _UvicornHttp

    with pytest.raises(ValueError, match="tls_cert is set but tls_key is not"):
        _UvicornHttp.make(scope_app, ServeOptions(tls_cert=str(certs["server"])))
    with pytest.raises(ValueError, match="cannot load the TLS certificate"):
        _UvicornHttp.make(scope_app, ServeOptions(tls_cert=str(certs["server"]), tls_key=str(certs["alice_key"])))


# ---- gRPC -------------------------------------------------------------------------------------------


def _grpc_round_trip(certs: dict[str, Path], client_auth: str, cert: Path | None, key: Path | None) -> str:
    """One RPC to a server whose handler answers ``grpc_peer_fingerprint(context)``."""

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return str(grpc_peer_fingerprint(context)).encode()

    async def main() -> str:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)})])
        creds = grpc_server_credentials(certs["server"], certs["server_key"], certs["ca"], client_auth)
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        try:
            channel_creds = grpc.ssl_channel_credentials(
                certs["ca"].read_bytes(),
                key.read_bytes() if key else None,
                cert.read_bytes() if cert else None,
            )
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_creds) as channel:
                reply = await channel.unary_unary("/t.T/M")(b"", timeout=10)
                return reply.decode()
        finally:
            await server.stop(0)

    return asyncio.run(main())


def test_grpc_peer_fingerprint_with_required_client_auth(certs: dict[str, Path], rogue: dict[str, Path]) -> None:
    fp = _grpc_round_trip(certs, "required", certs["alice"], certs["alice_key"])
    assert fp == fingerprint_pem(certs["alice"].read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _grpc_round_trip(certs, "required", None, None)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError):
        _grpc_round_trip(certs, "required", rogue["alice"], rogue["alice_key"])


def test_grpc_optional_does_not_ask_for_certificates(certs: dict[str, Path]) -> None:
    # grpcio cannot ask without requiring: under "optional" gRPC callers use API keys
    assert _grpc_round_trip(certs, "optional", certs["alice"], certs["alice_key"]) == "None"
    assert _grpc_round_trip(certs, "optional", None, None) == "None"
    assert _grpc_round_trip(certs, "none", None, None) == "None"


def test_grpc_server_credentials_checks(certs: dict[str, Path], tmp_path: Path) -> None:
    assert isinstance(grpc_server_credentials(certs["server"], certs["server_key"], None, "none"),
                      grpc.ServerCredentials)
    with pytest.raises(ValueError, match="needs a client CA"):
        grpc_server_credentials(certs["server"], certs["server_key"], None, "required")
    with pytest.raises(ValueError, match="cannot load the TLS certificate"):
        grpc_server_credentials(certs["server"], tmp_path / "missing.pem", None, "none")
    with pytest.raises(ValueError, match="cannot load the TLS certificate"):
        grpc_server_credentials(certs["server"], certs["alice_key"], None, "none")  # not its key
    with pytest.raises(ValueError, match="cannot load the client CA bundle"):
        grpc_server_credentials(certs["server"], certs["server_key"], tmp_path / "missing.pem", "required")


def test_grpc_peer_fingerprint_without_tls() -> None:
    class Ctx:
        def auth_context(self) -> dict[str, list[bytes]]:
            return {}

    assert grpc_peer_fingerprint(Ctx()) is None


# ---- CLI ----------------------------------------------------------------------------------------------


def test_cli_dev_certs_and_fingerprint(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bastion.cli.main import cli

    runner = CliRunner()
    out = tmp_path / "certs"
    result = runner.invoke(cli, ["tls", "dev-certs", str(out), "--client", "alice", "--host", "localhost"])
    assert result.exit_code == 0, result.output
    fp = fingerprint_pem((out / "alice.pem").read_bytes())
    assert fp in result.output
    assert f"--tls-cert {out / 'server.pem'} --tls-key {out / 'server-key.pem'}" in result.output
    assert f"curl --cacert {out / 'ca.pem'} --cert {out / 'alice.pem'}" in result.output
    assert "https://localhost:8000/" in result.output
    result = runner.invoke(cli, ["tls", "fingerprint", str(out / "alice.pem")])
    assert result.exit_code == 0 and result.output.strip() == fp
    result = runner.invoke(cli, ["tls", "dev-certs", str(out), "--client", "alice"])
    assert result.exit_code != 0 and "--force" in result.output
    assert runner.invoke(cli, ["tls", "dev-certs", str(out), "--client", "alice", "--force"]).exit_code == 0
    result = runner.invoke(cli, ["tls", "fingerprint", str(out / "alice-key.pem")])
    assert result.exit_code != 0 and "no PEM certificate" in result.output
