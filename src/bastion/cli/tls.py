"""``bastion tls``: development certificates and certificate fingerprints."""

from __future__ import annotations

import shlex
from pathlib import Path

import click


@click.group()
def tls() -> None:
    """TLS helpers: throwaway certificates for trying TLS, and client-certificate fingerprints."""


@tls.command("dev-certs")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", "hosts", multiple=True,
              help="Name or address the server certificate is valid for (repeatable; "
                   "default 127.0.0.1 and localhost).")
@click.option("--client", "clients", multiple=True,
              help="Name of a client certificate to issue (repeatable; default 'client').")
@click.option("--days", type=int, default=365, show_default=True, help="Validity of every certificate.")
@click.option("--force", is_flag=True, default=False, help="Replace files that already exist.")
def dev_certs(out_dir: Path, hosts: tuple[str, ...], clients: tuple[str, ...], days: int, force: bool) -> None:
    """Write a throwaway CA, a server certificate and client certificates to OUT_DIR.

    For tests and local trials only: the CA key lies beside the certificates.
    """
    from bastion.guard.tls import fingerprint_pem, write_dev_certificates

    try:
        paths = write_dev_certificates(
            out_dir, hosts=hosts or ("127.0.0.1", "localhost"), clients=clients or ("client",),
            days=days, overwrite=force,
        )
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    except FileExistsError as err:
        raise click.ClickException(f"{err} (--force replaces them)") from None
    names = list(clients or ("client",))
    host = (hosts or ("127.0.0.1",))[0]
    url_host = f"[{host}]" if ":" in host else host

    def q(p: Path) -> str:
        return shlex.quote(str(p))

    click.echo(f"CA:      {paths['ca']}  (key {paths['ca_key']})")
    click.echo(f"server:  {paths['server']}  (key {paths['server_key']})")
    for name in names:
        fp = fingerprint_pem(paths[name].read_bytes())
        click.echo(f"client:  {paths[name]}  (key {paths[f'{name}_key']})  sha256 {fp}")
    first = names[0]
    tls_flags = f"--tls-cert {q(paths['server'])} --tls-key {q(paths['server_key'])}"
    mtls_flags = f"{tls_flags} --tls-client-ca {q(paths['ca'])} --tls-client-auth required"
    client_flags = f"--cert {q(paths[first])} --key {q(paths[f'{first}_key'])}"
    click.echo("")
    click.echo("# serve over TLS")
    click.echo(f"bastion serve REPO --keys keys.db {tls_flags}")
    click.echo(f"curl --cacert {q(paths['ca'])} https://{url_host}:8000/v2/health/ready")
    click.echo("# or with mutual TLS (clients must present a certificate from this CA); the certificate")
    click.echo("# registered for a tenant is then its credential, no bearer key needed")
    click.echo(f"bastion keys create --keys keys.db --tenant {first} --cert {q(paths[first])}")
    click.echo(f"bastion serve REPO --keys keys.db {mtls_flags}")
    click.echo(f"curl --cacert {q(paths['ca'])} {client_flags} https://{url_host}:8000/v2/models/simple")


@tls.command("fingerprint")
@click.argument("cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def fingerprint(cert: Path) -> None:
    """Print the SHA-256 fingerprint of CERT.pem (its first certificate), as the key store uses it."""
    from bastion.guard.tls import fingerprint_pem

    try:
        click.echo(fingerprint_pem(cert.read_bytes()))
    except ValueError as err:
        raise click.ClickException(f"{cert}: {err}") from None
