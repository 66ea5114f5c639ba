"""The ``bastion`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from bastion import __version__
from bastion.cli.serve_options import ServeOptions, options_from_context, serve_flags

DEFAULT_URL = "http://127.0.0.1:8000"


def _progress_bar() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        transient=True,
    )


def _serve_with_progress(opts: ServeOptions) -> int:
    from bastion.cli.launch import run

    if opts.workers > 1 or not sys.stderr.isatty():
        return run(opts)
    bar = _progress_bar()
    task = bar.add_task("loading models", total=None)

    def progress(name: str, done: int, total: int) -> None:
        bar.update(task, description=f"loading {name}", completed=done, total=total)
        if done >= total:
            bar.stop()

    bar.start()
    try:
        return run(opts, progress=progress)
    finally:
        bar.stop()


def _remember(name: str) -> Any:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        ctx.meta[f"bastion.{name}"] = value
        return value

    return callback


def _url_option(f: Any) -> Any:
    """--url, plus the credentials every client command needs (kept in ctx.meta, see _client)."""
    f = click.option("--ca-cert", envvar="BASTION_CA_CERT", expose_value=False, callback=_remember("ca_cert"),
                     type=click.Path(exists=True, dir_okay=False),
                     help="CA bundle to verify an https server with.")(f)
    f = click.option("--api-key", envvar="BASTION_API_KEY", expose_value=False, callback=_remember("api_key"),
                     help="API key, sent as 'Authorization: Bearer' [env: BASTION_API_KEY].")(f)
    return click.option("--url", default=DEFAULT_URL, show_default=True, envvar="BASTION_URL",
                        help="Server REST address.")(f)


def _client(url: str) -> Any:
    from bastion.client import Client

    meta = click.get_current_context().meta
    return Client(url, api_key=meta.get("bastion.api_key"), verify=meta.get("bastion.ca_cert") or True)


def _auth_headers() -> dict[str, str]:
    key = click.get_current_context().meta.get("bastion.api_key")
    return {"authorization": f"Bearer {key}"} if key else {}


class _LazyGroup(click.Group):
    """Command groups that live in their own modules are imported when they are called (or
    listed by --help): `bastion serve` then does not import the key store's CLI, the bundles'
    crypto, the lab or the benchmarks (about 0.1 s of its start)."""

    LAZY = {name: f"bastion.cli.{name}"
            for name in ("tls", "keys", "audit", "bundle", "lab", "bench", "kms", "worker", "partition", "unlearn")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY and cmd_name not in self.commands:
            import importlib

            self.add_command(getattr(importlib.import_module(self.LAZY[cmd_name]), cmd_name))
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bastion")
def cli() -> None:
    """Bastion: a secure inference server for machine-learning models."""


@cli.command()
@click.argument("repository", type=click.Path(exists=True, file_okay=False))
@serve_flags
@click.pass_context
def serve(ctx: click.Context, repository: str, **_: Any) -> None:
    """Serve the model repository REPOSITORY over REST and gRPC."""
    opts = options_from_context(ctx, repository)
    sys.exit(_serve_with_progress(opts))


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo-repository", show_default=True,
              help="Where to write the demo model repository.")
@click.option("--build-only", is_flag=True, help="Build the repository and exit.")
@click.option("--seed", type=int, default=0, show_default=True)
@serve_flags
@click.pass_context
def demo(ctx: click.Context, out: str, build_only: bool, seed: int, **_: Any) -> None:
    """Build a demo repository (Triton's `simple`, a digits classifier) and serve it."""
    from rich.console import Console

    from bastion.scenarios.demo import build_demo_repository

    console = Console(stderr=True)
    with console.status("building the demo repository") as status:
        names = build_demo_repository(Path(out), progress=lambda msg: status.update(msg), seed=seed)
    console.print(f"[green]built[/] {len(names)} models in {out}: {', '.join(names)}")
    if build_only:
        return
    opts = options_from_context(ctx, out)
    token = None
    if opts.keys_db is None and not opts.insecure_no_auth:
        opts.keys_db, token = _demo_key(Path(out))
    scheme = "https" if opts.tls_cert else "http"
    base = f"{scheme}://{opts.host}:{opts.http_port}"
    auth = ' -H "Authorization: Bearer $BASTION_API_KEY"' if opts.keys_db else ""
    lines = []
    if token:
        lines += [
            f"API key of tenant 'demo' (admin role), shown once; store: {opts.keys_db}",
            f"  export BASTION_API_KEY={token}",
            "",
        ]
    # plain echo: rich would wrap the commands at the terminal width and break copy-paste
    lines += [
        "try:",
        f"  curl{auth} {base}/v2/models/simple",
        f"  curl{auth} -X POST {base}/v2/models/simple/infer -H 'content-type: application/json' \\",
        "    -d '{\"inputs\":[{\"name\":\"INPUT0\",\"datatype\":\"INT32\",\"shape\":[1,16],\"data\":"
        "[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]},{\"name\":\"INPUT1\",\"datatype\":\"INT32\",\"shape\":[1,16],"
        "\"data\":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}]}'",
        f"  bastion infer digits --url {base} --input {out}/digits/sample.npy",
        "  python - <<'EOF'",
        "import os, numpy as np, tritonclient.http as httpclient",
        f"c = httpclient.InferenceServerClient('{opts.host}:{opts.http_port}')",
        "a = httpclient.InferInput('INPUT0', [1, 16], 'INT32'); "
        "a.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))",
        "b = httpclient.InferInput('INPUT1', [1, 16], 'INT32'); b.set_data_from_numpy(np.ones((1, 16), np.int32))",
        "r = c.infer('simple', [a, b], headers={'authorization': 'Bearer ' + os.environ['BASTION_API_KEY']})"
        if opts.keys_db else "r = c.infer('simple', [a, b])",
        "print(r.as_numpy('OUTPUT0'))",
        "EOF",
    ]
    click.echo("\n".join(lines), err=True)
    sys.exit(_serve_with_progress(opts))


def _demo_key(repository: Path) -> tuple[str, str]:
    """A key store beside the demo repository with a fresh admin key for tenant 'demo'."""
    from bastion.guard.keystore import KeyStore

    db = repository.with_name(repository.name + ".keys") / "keys.db"
    with KeyStore(db) as store:
        token, _ = store.create_key("demo", role="admin", description="created by bastion demo")
    assert token is not None
    return str(db), token


@cli.command()
@click.argument("repository", type=click.Path(exists=True, file_okay=False))
@click.option("--zoo", "zoo", required=True, help="The zoo to measure.")
@click.option("--iterations", type=int, default=200, show_default=True, help="Timed calls per latency figure.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def profile(repository: str, zoo: str, iterations: int, as_json: bool) -> None:
    """Measure a zoo's variants (quality on its evaluation set, latency) into profile.json."""
    from bastion.cli.profile import profile_zoo
    from bastion.core.errors import BastionError

    bar = _progress_bar()
    task = bar.add_task("profiling", total=None)

    def progress(name: str, done: int, total: int) -> None:
        bar.update(task, description=f"profiling {name}", completed=done, total=total)

    try:
        with bar:
            result = profile_zoo(Path(repository), zoo, iterations=iterations, progress=progress)
    except BastionError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        from bastion.zoo.profiles import profile_to_dict

        click.echo(_dumps(profile_to_dict(result)))
        return
    _print_zoo(repository, zoo)


def _print_zoo(repository: str, zoo: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from bastion.repository.zoos import load_zoo
    from bastion.zoo.pareto import dominated_by, pareto_front

    loaded = load_zoo(Path(repository) / zoo)
    if loaded.spec is None or loaded.profile is None:
        raise click.ClickException(loaded.error)
    spec, prof = loaded.spec, loaded.profile
    points = prof.points(spec.latency_percentile)
    front = {p.name for p in pareto_front(points)}
    table = Table("variant", spec.metric, f"latency {spec.latency_percentile} ms (batch 1)", "Pareto front",
                  title=f"zoo {zoo}: {spec.task}, policy {spec.policy}, on infeasible {spec.on_infeasible}")
    for p in sorted(points, key=lambda p: p.latency_ms):
        mark = "[green]yes[/]" if p.name in front else "no (dominated by " + ", ".join(dominated_by(p, points)) + ")"
        table.add_row(p.name, f"{p.quality:.4f}", f"{p.latency_ms:.3f}", mark)
    console = Console()
    console.print(table)
    console.print(f"measured {prof.measured_at} on {prof.machine}")


@cli.group("scenario")
def scenario_group() -> None:
    """Build the reference scenario zoos."""


@scenario_group.command("build")
@click.argument("name", type=click.Choice(["image", "sentiment", "malware", "crypto", "all"]))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Model repository to write into.")
@click.option("--small", is_flag=True, help="Smaller data and models: builds in about a minute.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--profile/--no-profile", "measure", default=True, show_default=True,
              help="Measure the zoo's profile right after building it.")
def scenario_build(name: str, out: str, small: bool, seed: int, measure: bool) -> None:
    """Build scenario NAME (deterministic for a seed) into a model repository."""
    from rich.console import Console

    from bastion.scenarios import SCENARIOS, scenario

    console = Console(stderr=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    for item in SCENARIOS if name == "all" else (name,):
        module = scenario(item)
        with console.status(f"building {item}") as status:
            names = module.build(Path(out), small=small, seed=seed, progress=lambda msg: status.update(msg))
        console.print(f"[green]built[/] {item}: {', '.join(names)}")
        if measure:
            from bastion.cli.profile import profile_zoo

            with console.status(f"profiling {module.ZOO}") as status:
                profile_zoo(Path(out), module.ZOO,
                            progress=lambda v, done, total: status.update(f"profiling {v} ({done}/{total})"))
            _print_zoo(out, module.ZOO)


@cli.group()
def zoo() -> None:
    """Inspect model zoos and measure their goodput."""


@zoo.command("show")
@click.argument("name")
@click.option("--repository", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of the variants and the Pareto front.")
def zoo_show(name: str, repository: str, as_json: bool, plot: str | None) -> None:
    """Show a zoo's variants, their measured profile and the Pareto front."""
    if plot:
        from bastion.cli.zoo_plot import plot_zoo

        plot_zoo(Path(repository), name, Path(plot))
        click.echo(f"wrote {plot}", err=True)
    if not as_json:
        _print_zoo(repository, name)
        return
    from bastion.repository.zoos import load_zoo
    from bastion.zoo.pareto import pareto_front

    loaded = load_zoo(Path(repository) / name)
    if loaded.spec is None or loaded.profile is None:
        raise click.ClickException(loaded.error)
    points = loaded.profile.points(loaded.spec.latency_percentile)
    front = {p.name for p in pareto_front(points)}
    click.echo(_dumps({
        "zoo": name,
        "task": loaded.spec.task,
        "metric": loaded.spec.metric,
        "variants": [
            {"variant": p.name, "quality": p.quality, "latency_ms": p.latency_ms, "pareto": p.name in front}
            for p in points
        ],
        "measured_at": loaded.profile.measured_at,
        "machine": loaded.profile.machine,
    }))


@zoo.command("goodput")
@click.argument("name")
@_url_option
@click.option("--workload", type=click.Path(exists=True, dir_okay=False),
              help='JSON lines of {"accuracy": a, "latency_ms": l}; default: random targets.')
@click.option("--requests", "n", type=int, default=200, show_default=True, help="Random workload size.")
@click.option("--accuracy", "acc_range", default="0.5:0.99", show_default=True, help="Random accuracy targets LO:HI.")
@click.option("--latency-ms", "lat_range", default="0.05:20", show_default=True,
              help="Random latency targets LO:HI (log-uniform).")
@click.option("--sample", type=click.Path(exists=True, dir_okay=False),
              help="A .npz with arrays named after the zoo's inputs to draw rows from (e.g. its eval.npz).")
@click.option("--concurrency", type=int, default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def zoo_goodput(name: str, url: str, workload: str | None, n: int, acc_range: str, lat_range: str,
                sample: str | None, concurrency: int, seed: int, as_json: bool) -> None:
    """Replay targets against zoo NAME on a live server; report goodput from the server's records."""
    import asyncio

    from bastion.bench.goodput import load_workload, random_workload, run_goodput

    def pair(text: str, option: str) -> tuple[float, float]:
        try:
            lo, hi = (float(x) for x in text.split(":"))
        except ValueError:
            raise click.BadParameter("expected LO:HI", param_hint=option) from None
        return lo, hi

    if workload:
        targets = load_workload(Path(workload))
        described = {"file": workload}
    else:
        acc, lat = pair(acc_range, "--accuracy"), pair(lat_range, "--latency-ms")
        targets = random_workload(n, acc, lat, seed)
        described = {"random": n, "accuracy": acc, "latency_ms": lat, "seed": seed}
    try:
        report = asyncio.run(run_goodput(url, name, targets, sample=Path(sample) if sample else None,
                                         concurrency=concurrency, seed=seed, headers=_auth_headers()))
    except Exception as err:  # httpx errors, a zoo the server does not know
        raise click.ClickException(f"goodput run failed: {err}") from None
    report.workload = described
    if as_json:
        click.echo(_dumps(report.as_dict()))
        return
    click.echo(f"zoo {name}: goodput {report.goodput:.1%} over {sum(report.server_outcomes.values())} requests "
               f"the server counted ({report.requests} sent in {report.seconds:.1f} s)")
    for outcome, count in report.server_outcomes.items():
        click.echo(f"  {outcome:16s} {count}")
    click.echo(f"  client saw HTTP {dict(sorted(report.client_statuses.items()))}, "
               f"latency p50 {report.client_latency_ms['p50']:.2f} ms, p99 {report.client_latency_ms['p99']:.2f} ms")


@cli.group()
def models() -> None:
    """List, load and unload models on a running server."""


@models.command("list")
@_url_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_list(url: str, as_json: bool) -> None:
    """Show every model of the repository and its state."""

    rows = _client(url).repository_index()
    if as_json:
        click.echo(_dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "version", "state", "reason")
    for r in rows:
        color = "green" if r.get("state") == "READY" else "yellow"
        table.add_row(r.get("name", ""), r.get("version", ""), f"[{color}]{r.get('state', '')}[/]", r.get("reason", ""))
    Console().print(table)


@models.command("load")
@_url_option
@click.argument("name")
def models_load(url: str, name: str) -> None:
    """Load (or reload) model NAME."""

    _client(url).load(name)
    click.echo(f"loaded {name}")


@models.command("unload")
@_url_option
@click.argument("name")
def models_unload(url: str, name: str) -> None:
    """Unload model NAME (it stays unloaded until `models load`)."""

    _client(url).unload(name)
    click.echo(f"unloaded {name}")


@cli.command()
@_url_option
@click.argument("model")
@click.option("--input", "inputs", multiple=True, required=True,
              help="FILE.npy / FILE.json, or NAME=FILE for models with several inputs (repeatable). "
                   "A .json file is a full V2 request body or a (nested) list of values.")
@click.option("--model-version", default=None, help="Version to call (default: latest).")
@click.option("--json", "as_json", is_flag=True, help="Print the V2 response JSON.")
@click.option("--binary/--no-binary", default=True, show_default=True,
              help="Send tensors with the binary data extension.")
@click.option("--confidential", is_flag=True,
              help="End-to-end encrypted: verify the trusted worker's attestation, seal the inputs to its key.")
@click.option("--expect-measurement", default=None,
              help="With --confidential: the measurement the worker must attest (name=hex,... or a dev hex digest).")
@click.option("--allow-dev-attestation", is_flag=True,
              help="With --confidential: accept self-signed DEV evidence (development only: proves nothing).")
def infer(url: str, model: str, inputs: tuple[str, ...], model_version: str | None, as_json: bool,
          binary: bool, confidential: bool, expect_measurement: str | None, allow_dev_attestation: bool) -> None:
    """Call MODEL on a running server with inputs from files."""
    from bastion.client import ClientError
    from bastion.core.datatypes import datatype_of
    from bastion.core.errors import BastionError
    from bastion.core.tensors import InferenceResponse, InferTensor

    client = _client(url)
    try:
        if confidential:
            if not expect_measurement:
                raise click.UsageError("--confidential needs --expect-measurement: a client trusts only a worker "
                                       "whose measurement it expects")
            if allow_dev_attestation:
                click.echo("WARNING: accepting DEV attestation (self-signed, no TEE): never with real data",
                           err=True)
            session = client.confidential(model, expect=expect_measurement, allow_dev=allow_dev_attestation,
                                          version=model_version)
            arrays = client.arrays_from_files(model, list(inputs), version=model_version)
            outputs = client.infer_confidential(session, arrays, version=model_version)
            response = InferenceResponse(model, model_version, [
                InferTensor(n, datatype_of(a), tuple(a.shape), a) for n, a in outputs.items()])
        else:
            response = client.infer_files(model, list(inputs), version=model_version, binary=binary)
    except (ClientError, BastionError) as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(_dumps(client.response_as_json(response)))
        return
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{response.model_name}[/] version {response.model_version}")
    for t in response.outputs:
        console.print(f"[cyan]{t.name}[/] {t.datatype} {list(t.shape)}")
        console.print(t.data)


def _dumps(data: Any) -> str:
    import orjson

    return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode()




def main() -> None:
    cli(prog_name="bastion")


if __name__ == "__main__":
    main()
