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
@click.option("--socket", "socket_path", required=True, type=click.Path(path_type=Path),
              help="Unix socket to listen on (the front connects with --worker-socket).")
@click.option("--ready-file", type=click.Path(path_type=Path), default=None, help="Written once listening.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning")
def serve(config_path: Path, socket_path: Path, ready_file: Path | None, log_level: str) -> None:
    """Serve on a Unix socket until SIGTERM."""
    from bastion.confidential.worker import serve_worker
    from bastion.confidential.worker_config import load_worker_config
    from bastion.core.errors import BastionError
    from bastion.observability.logs import configure_logging

    configure_logging(log_level, "text")
    try:
        config = load_worker_config(config_path)
        asyncio.run(serve_worker(config, socket_path, ready_file=ready_file))
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
