"""``bastion worker``: the trusted worker that serves confidential models (docs/CONFIDENTIAL.md)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click


@click.group()
def worker() -> None:
    """The trusted worker: holds confidential models and their keys (a TEE in production;
    here an ordinary process, which protects nothing from this host)."""


@worker.command("serve")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="worker.yaml: attestation, key provider, trusted signers, model pins (all measured).")
@click.option("--socket", "socket_path", default=None, type=click.Path(path_type=Path),
              help="Unix socket to listen on (the front connects with --worker-socket PATH).")
@click.option("--vsock-port", type=click.IntRange(1, 2**32 - 2), default=None,
              help="Listen on this vsock port instead (inside an enclave; the front connects with "
                   "--worker-socket vsock:CID:PORT). Untested here: no vsock transport on these machines.")
@click.option("--ready-file", type=click.Path(path_type=Path), default=None, help="Written once listening.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning")
def serve(config_path: Path, socket_path: Path | None, vsock_port: int | None, ready_file: Path | None,
          log_level: str) -> None:
    """Serve on a Unix socket (or a vsock port) until SIGTERM."""
    from bastion.confidential.worker import serve_worker
    from bastion.confidential.worker_config import load_worker_config
    from bastion.core.errors import BastionError
    from bastion.observability.logs import configure_logging

    configure_logging(log_level, "text")
    if (socket_path is None) == (vsock_port is None):
        raise click.UsageError("give exactly one of --socket and --vsock-port")
    try:
        config = load_worker_config(config_path)
        asyncio.run(serve_worker(config, socket_path, ready_file=ready_file, vsock_port=vsock_port))
    except (BastionError, OSError) as err:
        print(f"bastion worker: {err}", file=sys.stderr)
        sys.exit(2)


@worker.command("measure")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def measure(config_path: Path) -> None:
    """Print the dev measurement of a worker with this config and this code: what clients pass
    to --expect-measurement and what the key-release policy accepts. (On Nitro the enclave
    image's PCRs, printed by nitro-cli build-enclave, are the measurement instead.)"""
    from bastion.confidential.worker import dev_measurement
    from bastion.confidential.worker_config import load_worker_config

    config = load_worker_config(config_path)
    if config.attestation != "dev":
        raise click.ClickException("attestation is nitro: the measurement is the enclave image's PCRs "
                                   "(nitro-cli build-enclave prints them)")
    click.echo(dev_measurement(config).hex())


@worker.command("package")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The confidential model's directory in the repository (REPO/NAME).")
@click.option("--key-id", required=True, help="Master key id the bundles' data keys are wrapped under (the KMS's).")
@click.option("--signing-key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ed25519 private key (PEM) that signs the bundles (the worker trusts its public half).")
@click.option("--key-provider", "provider_spec", required=True, envvar="BASTION_BUNDLE_KEY_PROVIDER",
              help="Where the master key is for sealing: file:PATH or env:VAR (then import it into the KMS).")
@click.option("--e2e", type=click.Choice(["required", "optional", "off"]), default="required", show_default=True,
              help="Whether plaintext requests are accepted too (enforced by the worker from the sealed config).")
def package(model_dir: Path, out: Path, key_id: str, signing_key: Path, provider_spec: str, e2e: str) -> None:
    """Make MODEL_DIR confidential: OUT/config.yaml (public: signature, batching, the confidential
    block) and OUT/<version>/model.bundle (each version sealed and signed)."""
    from bastion.confidential.package import package_confidential
    from bastion.core.errors import BastionError
    from bastion.guard.bundles import load_private_key
    from bastion.guard.keyproviders import load_key_provider

    try:
        headers = package_confidential(model_dir, out, key_id=key_id, signing_key=load_private_key(signing_key),
                                       key_provider=load_key_provider(provider_spec), e2e=e2e)
    except (BastionError, OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    for version, header in sorted(headers.items()):
        click.echo(f"{out}/{version}/model.bundle: sealed {header.model} version {version}, key id {header.key_id}, "
                   f"signed by {header.signer}")
    click.echo(f"{out}/config.yaml: public config (confidential.e2e: {e2e})")
