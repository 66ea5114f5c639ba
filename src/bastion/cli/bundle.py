"""``bastion bundle``: make keys, seal a model directory, verify and inspect sealed bundles.

A sealed bundle ``<model>.bundle`` dropped into a model repository is served as model
``<model>`` by a server started with ``--trusted-signer`` and ``--bundle-key-provider``
(see ``bastion.guard.bundles`` for the format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from bastion.guard.bundles import (
    BUNDLE_SUFFIX,
    BundleError,
    fingerprint,
    generate_signing_key,
    inspect_bundle,
    load_private_key,
    load_public_key,
    seal_bundle,
    verify_bundle,
    write_private_key,
    write_public_key,
)
from bastion.guard.keyproviders import (
    KeyProvider,
    KeyProviderError,
    generate_master_key,
    load_key_provider,
    write_master_key,
)

_PROVIDER_HELP = (
    "Master key provider: env:VAR, file:PATH (a key file or a directory of <key-id>.key) or module:pkg.mod:factory."
)


def _provider(spec: str) -> KeyProvider:
    try:
        return load_key_provider(spec)
    except KeyProviderError as exc:
        raise click.BadParameter(str(exc), param_hint="--key-provider") from None


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


@click.group("bundle")
def bundle() -> None:
    """Sealed model bundles: encrypted (AES-256-GCM) and signed (Ed25519) model files."""


@bundle.command()
@click.option("--signing-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a new Ed25519 private key (PEM, mode 0600) here.")
@click.option("--public-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Where its public key goes (default: the signing key path with .pub.pem).")
@click.option("--master-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a new random 32-byte master key (base64, mode 0600) here.")
def keygen(signing_key: Path | None, public_key: Path | None, master_key: Path | None) -> None:
    """Create a signing key pair and/or a master key. Never overwrites a file."""
    if signing_key is None and master_key is None:
        raise click.UsageError("nothing to do: give --signing-key and/or --master-key")
    try:
        if signing_key is not None:
            public = public_key or signing_key.with_name(signing_key.name.removesuffix(".pem") + ".pub.pem")
            key = generate_signing_key()
            write_private_key(key, signing_key)
            write_public_key(key.public_key(), public)
            click.echo(f"signing key {signing_key} (keep it secret), public key {public} ({fingerprint(key)})")
            click.echo(f"  servers trust it with: --trusted-signer {public}")
        if master_key is not None:
            write_master_key(master_key, generate_master_key())
            click.echo(f"master key {master_key}: use it with --key-provider file:{master_key}, or put its "
                       "content in an environment variable and use env:VAR")
    except (BundleError, KeyProviderError) as exc:
        raise click.ClickException(str(exc)) from None


@bundle.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help=f"The bundle file; name it <model>{BUNDLE_SUFFIX} in the repository.")
@click.option("--key-id", required=True, help="Name of the master key (recorded in the bundle).")
@click.option("--signing-key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ed25519 private key (PEM) that signs the bundle.")
@click.option("--key-provider", "provider_spec", required=True, envvar="BASTION_BUNDLE_KEY_PROVIDER",
              help=_PROVIDER_HELP)
@click.option("--name", "model_name", help="Model name sealed in the bundle (default: the directory name).")
def seal(model_dir: Path, out: Path, key_id: str, signing_key: Path, provider_spec: str,
         model_name: str | None) -> None:
    """Encrypt and sign MODEL_DIR (config.yaml and its version directories) into one file."""
    provider = _provider(provider_spec)
    try:
        header = seal_bundle(
            model_dir, out, key_id=key_id, signing_key=load_private_key(signing_key),
            key_provider=provider, model_name=model_name,
        )
    except (BundleError, KeyProviderError) as exc:
        raise click.ClickException(str(exc)) from None
    expected = f"{header.model}{BUNDLE_SUFFIX}"
    click.echo(
        f"sealed {header.model} (versions {', '.join(map(str, header.versions))}; {len(header.files)} files, "
        f"{_size(header.plaintext_bytes)}) into {out}, key id {header.key_id}, signed by {header.signer}"
    )
    if out.name != expected:
        click.echo(f"note: a repository serves this bundle only under the file name {expected}", err=True)


@bundle.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--trusted-signer", "trusted", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ed25519 public key (PEM) allowed to sign (repeatable).")
@click.option("--key-provider", "provider_spec", help=f"Also unwrap and decrypt everything (in memory). "
              f"{_PROVIDER_HELP}")
def verify(file: Path, trusted: tuple[Path, ...], provider_spec: str | None) -> None:
    """Check FILE's signature (and, with --key-provider, that every file decrypts). Exit 1 if refused."""
    provider = _provider(provider_spec) if provider_spec else None
    try:
        keys = [load_public_key(p) for p in trusted]
        verified = verify_bundle(file.read_bytes(), keys, source=file.name)
        h = verified.header
        click.echo(f"signature OK: {file.name} holds model {h.model} (versions "
                   f"{', '.join(map(str, h.versions))}), signed by {h.signer}")
        if provider is not None:
            opened = verified.unseal(provider)
            total = sum(size for _, size in opened.read_all())
            click.echo(f"decryption OK: {len(h.files)} files, {_size(total)}, every SHA-256 matches "
                       f"(key id {h.key_id})")
    except BundleError as exc:
        raise click.ClickException(f"refused: {exc}") from None


@bundle.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the header as JSON.")
def inspect_command(file: Path, as_json: bool) -> None:
    """Show FILE's header (model, versions, files, key id, signer) without keys. Nothing is verified."""
    try:
        info = inspect_bundle(file)
    except BundleError as exc:
        raise click.ClickException(str(exc)) from None
    h = info.header
    if as_json:
        data: dict[str, Any] = h.to_json()
        data.update(size=info.size, signed_by=info.signed_by, versions=list(h.versions), verified=False)
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{file} (NOT verified: use `bastion bundle verify` to check the signature)")
    click.echo(f"  model     {h.model}")
    click.echo(f"  versions  {', '.join(map(str, h.versions))}")
    click.echo(f"  created   {h.created}")
    click.echo(f"  key id    {h.key_id}")
    click.echo(f"  cipher    {h.cipher}")
    click.echo(f"  signer    {h.signer}" + ("" if info.signed_by == h.signer else
                                           f" (signature block: {info.signed_by or 'none, unsigned'})"))
    click.echo(f"  size      {_size(info.size)}")
    click.echo("  files")
    for f in h.files:
        click.echo(f"    {f.path:<40} {_size(f.size):>10}  sha256 {f.sha256[:16]}...")
