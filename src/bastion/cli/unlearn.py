"""``bastion unlearn``: train a SISA ensemble, forget records, verify a receipt."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def unlearn() -> None:
    """Train sharded models that can forget training records (SISA)."""


@unlearn.command("train")
@click.argument("scenario", type=click.Choice(["malware", "image"]))
@click.option("--shards", type=click.IntRange(1, 256), default=5, show_default=True)
@click.option("--slices", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--family", type=click.Choice(["logreg", "mlp"]), default="mlp", show_default=True)
@click.option("--rows", type=click.IntRange(1), default=None, help="Training rows of the scenario to use.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Ensemble directory to create.")
def unlearn_train(scenario: str, shards: int, slices: int, seed: int, family: str, rows: int | None,
                  out: str) -> None:
    """Train K shard models on SCENARIO's training data; write them and the manifest to --out."""
    import time

    import numpy as np

    from bastion.unlearn.aggregate import aggregate
    from bastion.unlearn.data import load_scenario
    from bastion.unlearn.sisa import train
    from bastion.unlearn.store import write_ensemble
    from bastion.unlearn.trainers import load_state, predict_proba

    if (Path(out) / "CURRENT").exists():
        raise click.ClickException(f"{out} already holds an ensemble")
    try:
        data, x_ev, y_ev, source = load_scenario(scenario, seed, rows)
        t0 = time.perf_counter()
        m, artifacts = train(data, family=family, shards=shards, slices=slices, seed=seed, source=source)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    seconds = time.perf_counter() - t0
    write_ensemble(Path(out), m, artifacts)
    # the last checkpoint holds the shard's final weights: score the vote on the held-out rows
    probs = [predict_proba(family, load_state(family, a.checkpoints[-1]), x_ev) for a in artifacts.values()]
    truth = np.searchsorted(np.asarray(m.classes), np.asarray(y_ev))
    acc = float((aggregate(probs).labels == truth).mean())
    click.echo(json.dumps({"out": out, "version": m.version, "records": len(data.ids), "shards": shards,
                           "slices": slices, "family": family, "train_seconds": round(seconds, 3),
                           "eval_accuracy_vote": round(acc, 4)}, indent=2))


@unlearn.command("forget")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--record-id", "record_ids", multiple=True, required=True, help="Record to forget (repeatable).")
@click.option("--receipt", type=click.Path(dir_okay=False), default=None, help="Also write the receipt here.")
def unlearn_forget(directory: str, record_ids: tuple[str, ...], receipt: str | None) -> None:
    """Retrain the shards holding the records; write the next version; print the receipt (JSON)."""
    from bastion.unlearn.data import load_source
    from bastion.unlearn.manifest import ManifestError, UnknownRecordError
    from bastion.unlearn.records import RecordError
    from bastion.unlearn.store import forget, load_manifest

    try:
        data = load_source(load_manifest(Path(directory)).source)
        result = forget(Path(directory), record_ids, data)
    except (UnknownRecordError, ManifestError, RecordError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    text = json.dumps(result, indent=2)
    if receipt:
        from bastion.runtimes.export import write_bytes_atomic

        write_bytes_atomic(Path(receipt), (text + "\n").encode())
    click.echo(text)


@unlearn.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--receipt", type=click.Path(exists=True, dir_okay=False), required=True)
def unlearn_verify(directory: str, receipt: str) -> None:
    """Check a forget receipt: ids absent everywhere, retrained shards reproducible byte for byte."""
    from bastion.unlearn.data import load_source
    from bastion.unlearn.manifest import ManifestError
    from bastion.unlearn.store import VerificationError, load_manifest, verify

    try:
        doc = json.loads(Path(receipt).read_bytes()[: 64 << 20])
        data = load_source(load_manifest(Path(directory)).source)
        result = verify(Path(directory), doc, data)
    except (VerificationError, ManifestError, ValueError) as err:
        raise click.ClickException(f"verification failed: {err}") from None
    click.echo(json.dumps(result, indent=2))
