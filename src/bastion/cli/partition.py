"""``bastion partition``: cut a model in two for partitioned inference.

``list`` shows a model's candidate cut points (tensors every input-to-output path passes
through) with their shapes, the head's share of the FLOPs and the bytes per row that would
cross from the trusted worker to the tail; ``split`` writes ``head.onnx`` and ``tail.onnx``
and keeps them only if tail(head(x)) matches the model on sample rows. The model surgery is
``bastion.confidential.partition.graph``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click


def _load(path: str) -> Any:
    import onnx

    try:
        return onnx.load(path)
    except Exception as err:  # protobuf raises its own DecodeError, among others
        raise click.ClickException(f"{path}: not an ONNX model ({err})") from err


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # piped into a file or grep: keep the long tensor names on one line
        console = Console(width=max(console.width, 200))
    return console


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _io(values: Any) -> list[dict[str, Any]]:
    import numpy as np
    from onnx import helper

    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name if t.elem_type else "?"
        out.append({"name": v.name, "dtype": dtype, "shape": dims})
    return out


@click.group()
def partition() -> None:
    """Cut a model into a head (run in the trusted worker) and a tail (run outside)."""


@partition.command("list")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the cut points as JSON.")
def list_cuts(model: str, as_json: bool) -> None:
    """Show MODEL's candidate cut points: K, tensor, operator, shape, head FLOP share, bytes per row.

    A cut point is a tensor every path from the inputs to the outputs passes through (none
    inside a residual block). FLOPs are an estimate at batch 1 (see
    bastion.confidential.partition.graph)."""
    from bastion.confidential.partition.graph import candidate_cuts, model_flops

    onnx_model = _load(model)
    cuts = candidate_cuts(onnx_model)
    total = cuts[0].total_flops if cuts else model_flops(onnx_model)
    if as_json:
        click.echo(json.dumps({"model": model, "total_flops": total, "cuts": [c.to_dict() for c in cuts]}, indent=2))
        return
    console = _console()
    if not cuts:
        console.print(f"{model} has no single-tensor cut point: no tensor lies on every path from its inputs to "
                      "its outputs (a tree ensemble computes all its outputs in one operator); it cannot be split.",
                      markup=False, highlight=False)
        return
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table("K", "tensor", "op", "shape", "head FLOPs %", "bytes/row", box=box.SIMPLE_HEAD,
                  title=escape(f"{model}: {len(cuts)} cut points, {total:,} FLOPs per row (estimate)"))
    for c in cuts:
        table.add_row(str(c.index), escape(c.tensor), c.op_type, escape(_shape(c.shape)), f"{100 * c.flop_share:.2f}",
                      "?" if c.feature_bytes is None else f"{c.feature_bytes:,}")
    console.print(table)


def _samples(path: str | None, onnx_model: Any, rows: int, seed: int) -> tuple[dict[str, Any], str]:
    import numpy as np
    from onnx import helper

    from bastion.confidential.partition.graph import PartitionError, random_samples

    if path is None:
        try:
            return random_samples(onnx_model, rows, seed), "random"
        except PartitionError as err:
            raise click.BadParameter(str(err), param_hint="--samples") from err
    initializers = {t.name for t in onnx_model.graph.initializer}
    inputs = [v for v in onnx_model.graph.input if v.name not in initializers]
    with np.load(path, allow_pickle=False) as data:
        missing = [v.name for v in inputs if v.name not in data.files]
        if missing:
            raise click.BadParameter(f"{path} has no array for the input(s) {missing} (it has {data.files})",
                                     param_hint="--samples")
        out = {}
        for v in inputs:
            dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            # the first --rows rows: the check is about the graph, not about the data set
            out[v.name] = np.asarray(data[v.name][:rows]).astype(dtype, copy=False)
    return out, path


@partition.command("split")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--at", "at", metavar="TENSOR_OR_NODE", help="Cut at this tensor (or after the node producing it).")
@click.option("--after-layer", "layer", type=click.IntRange(min=1), metavar="K",
              help="Cut at the K-th cut point of 'bastion partition list'.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Folder for head.onnx, tail.onnx and split.json.")
@click.option("--samples", type=click.Path(exists=True, dir_okay=False),
              help="An .npz with one array per model input (named after it) to check the split on "
              "[default: random rows of the inputs' shapes].")
@click.option("--rows", type=click.IntRange(min=1), default=32, show_default=True, help="Rows to check on.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="Absolute tolerance of the composition check.")
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Relative tolerance of the composition check.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random rows.")
def split(model: str, at: str | None, layer: int | None, out: str, samples: str | None, rows: int, atol: float,
          rtol: float, seed: int) -> None:
    """Split MODEL at a cut point into DIR/head.onnx and DIR/tail.onnx.

    Writes them only if tail(head(x)) equals the model within the tolerance on the sample rows
    (every output, max abs difference reported in DIR/split.json); exits 1 with the reason
    otherwise."""
    from bastion import __version__
    from bastion.confidential.partition import graph
    from bastion.runtimes.export import write_bytes_atomic

    if (at is None) == (layer is None):
        raise click.UsageError("give exactly one of --at TENSOR_OR_NODE and --after-layer K")
    source = Path(model).read_bytes()
    onnx_model = _load(model)
    try:
        cut = graph.resolve_cut(onnx_model, at if at is not None else layer)  # type: ignore[arg-type]
    except graph.PartitionError as err:
        raise click.BadParameter(str(err), param_hint="--at" if at is not None else "--after-layer") from err
    data, origin = _samples(samples, onnx_model, rows, seed)
    try:
        result = graph.split_and_check(onnx_model, cut, data, atol=atol, rtol=rtol)
    except graph.PartitionError as err:  # CompositionError included: nothing is written
        raise click.ClickException(str(err)) from err

    folder = Path(out)
    head_bytes, tail_bytes = result.head.SerializeToString(), result.tail.SerializeToString()
    write_bytes_atomic(folder / "head.onnx", head_bytes)
    write_bytes_atomic(folder / "tail.onnx", tail_bytes)
    record = {
        "source": {"path": model, "sha256": hashlib.sha256(source).hexdigest(), "bytes": len(source)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "bastion_version": __version__,
        "cut": cut.to_dict(),
        "head": {"file": "head.onnx", "sha256": hashlib.sha256(head_bytes).hexdigest(),
                 "inputs": _io(result.head.graph.input), "outputs": _io(result.head.graph.output),
                 "nodes": len(result.head.graph.node), "flops": cut.head_flops},
        "tail": {"file": "tail.onnx", "sha256": hashlib.sha256(tail_bytes).hexdigest(),
                 "inputs": _io(result.tail.graph.input), "outputs": _io(result.tail.graph.output),
                 "nodes": len(result.tail.graph.node), "flops": cut.total_flops - cut.head_flops},
        "composition": {**result.report.to_dict(), "samples": origin, "seed": seed if origin == "random" else None},
    }
    write_bytes_atomic(folder / "split.json", (json.dumps(record, indent=2) + "\n").encode())
    report = result.report
    click.echo(f"cut K={cut.index} at {cut.tensor!r} ({cut.op_type}), shape {_shape(cut.shape)}, "
               f"head {100 * cut.flop_share:.2f} % of the FLOPs, "
               + ("? bytes" if cut.feature_bytes is None else f"{cut.feature_bytes:,} bytes") + " per row")
    click.echo(f"composition on {report.rows} {'random ' if origin == 'random' else ''}rows: "
               f"max |diff| {report.max_abs_diff:.3g} (atol {atol:g}, rtol {rtol:g})")
    click.echo(f"wrote {folder / 'head.onnx'}, {folder / 'tail.onnx'}, {folder / 'split.json'}")


@partition.command("package")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--at", "at", metavar="TENSOR_OR_NODE", help="Cut at this tensor (or after the node producing it).")
@click.option("--after-layer", "layer", type=click.IntRange(min=1), metavar="K", help="Cut at candidate K.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The partitioned model's directory in the repository (REPO/NAME).")
@click.option("--key-id", required=True, help="Master key id the heads' data keys are wrapped under (the KMS's).")
@click.option("--signing-key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ed25519 private key (PEM) that signs the head bundles.")
@click.option("--key-provider", "provider_spec", required=True, envvar="BASTION_BUNDLE_KEY_PROVIDER",
              help="Where the master key is for sealing: file:PATH or env:VAR.")
@click.option("--e2e", type=click.Choice(["required", "optional", "off"]), default="required", show_default=True)
@click.option("--rows", type=click.IntRange(min=1), default=32, show_default=True, help="Random rows to check on.")
def package(model_dir: Path, at: str | None, layer: int | None, out: Path, key_id: str, signing_key: Path,
            provider_spec: str, e2e: str, rows: int) -> None:
    """Partition MODEL_DIR (config.yaml + versions' model.onnx) for serving: each version split
    at the cut and checked, the head sealed for the trusted worker (OUT/<v>/model.bundle), the
    tail plain beside it (OUT/<v>/tail.onnx), OUT/config.yaml naming both."""
    from bastion.confidential.partition.graph import PartitionError
    from bastion.confidential.partition.package import package_partitioned
    from bastion.core.errors import BastionError
    from bastion.guard.bundles import load_private_key
    from bastion.guard.keyproviders import load_key_provider

    if (at is None) == (layer is None):
        raise click.UsageError("give exactly one of --at TENSOR_OR_NODE and --after-layer K")
    try:
        splits = package_partitioned(model_dir, out, at if at is not None else layer,  # type: ignore[arg-type]
                                     key_id=key_id, signing_key=load_private_key(signing_key),
                                     key_provider=load_key_provider(provider_spec), e2e=e2e, rows=rows)
    except (PartitionError, BastionError, OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    for version, split in sorted(splits.items()):
        click.echo(f"{out}/{version}: cut K={split.cut.index} at {split.cut.tensor!r}, head "
                   f"{100 * split.cut.flop_share:.2f} % of the FLOPs (sealed), composition max |diff| "
                   f"{split.report.max_abs_diff:.3g}")


@partition.command("advise")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="npz with the inputs and the labels (half becomes the attacker's data, half the held-out set).")
@click.option("--input", "input_name", default=None, help="Array of the inputs in --data (default: the model's input).")
@click.option("--labels", default="y", show_default=True, help="Array of the class labels in --data.")
@click.option("--kind", type=click.Choice(["image", "tabular"]), required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--cuts", default=None, help="Only these cut points K (comma-separated; default: every one).")
@click.option("--budget", type=click.Choice(["quick", "standard", "large"]), default="standard", show_default=True,
              help="Attacker training budget (recon_models.BUDGETS); large is ~4x standard.")
@click.option("--quick", is_flag=True, help="Same as --budget quick (tests, a first look).")
@click.option("--attacks", default=None, help="Comma-separated subset of pgd,mim,apgd,cw.")
@click.option("--max-recon", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Highest reconstruction score accepted, relative to the no-information baseline (0..1).")
@click.option("--max-attack", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Highest head-hidden attack success rate accepted.")
@click.option("--rows", type=click.IntRange(min=64), default=None, help="Use at most this many rows of --data.")
@click.option("--seed", type=int, default=0, show_default=True)
def advise_cmd(model: str, data: str, input_name: str | None, labels: str, kind: str, out: Path, cuts: str | None,
               budget: str, quick: bool, attacks: str | None, max_recon: float, max_attack: float, rows: int | None,
               seed: int) -> None:
    """Measure every candidate split of MODEL (TEE share, input reconstruction, gradient shielding)
    and recommend one: OUT/report.md, OUT/report.html, OUT/advice.json, OUT/*.png."""
    import sys

    import numpy as np
    from rich.progress import Progress

    from bastion.confidential.partition.advice_report import write_report
    from bastion.confidential.partition.advise import advise
    from bastion.confidential.partition.graph import PartitionError

    onnx_model = _load(model)
    name = input_name or onnx_model.graph.input[0].name
    with np.load(data) as arrays:
        if name not in arrays or labels not in arrays:
            raise click.BadParameter(f"{data} holds {', '.join(arrays.files)}; need {name!r} and {labels!r}",
                                     param_hint="--data")
        x, y = arrays[name], arrays[labels]
    if rows is not None:
        x, y = x[:rows], y[:rows]
    chosen = [int(k) for k in cuts.split(",")] if cuts else None
    with Progress(transient=True) as bar:
        task = bar.add_task("advising", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        try:
            advice, examples, x_eval = advise(
                onnx_model, x, y, kind=kind, cuts=chosen, budget="quick" if quick else budget, seed=seed,
                attacks=attacks.split(",") if attacks else None, max_recon=max_recon, max_attack=max_attack,
                progress=progress, name=Path(model).name)
        except (PartitionError, ValueError) as err:
            raise click.ClickException(str(err)) from None
    report = write_report(advice, examples, x_eval, out, command="bastion " + " ".join(sys.argv[1:]))
    rec = "none under the thresholds" if advice.recommended is None else f"K={advice.recommended}"
    click.echo(f"recommended cut: {rec}; report {report} ({advice.seconds:.0f} s)")


