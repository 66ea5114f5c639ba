"""``bastion bench``: the serving study (four scenarios x the peer frameworks), side by side."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bastion.bench import frameworks
from bastion.bench.models import PAYLOAD_ROWS, SCENARIOS


def _folder(name: str, default: str, what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        name, type=click.Path(file_okay=False, path_type=Path), default=Path(default), show_default=True, help=what
    )


def _no_options_for(ctx: click.Context, what: str, why: str, names: tuple[str, ...] | None = None) -> None:
    """UsageError when an option among ``names`` (default: all of ``ctx``'s) was given on
    the command line: an option that would be ignored must not look as if it took effect."""
    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name and (names is None or param.name in names) and _given(ctx, param.name)
    ]
    if given:
        raise click.UsageError(f"{', '.join(given)} cannot be used with {what}: {why}")


def _ints(value: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"{option}: {exc}") from None


def _split(value: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not value:
        return allowed
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in items if v not in allowed]
    if unknown:
        raise click.BadParameter(f"unknown {what} {', '.join(unknown)}; expected some of {', '.join(allowed)}")
    return items


@click.group("bench", invoke_without_command=True)
@click.option(
    "--all",
    "run_all",
    is_flag=True,
    help="The whole study: 60 s open-loop runs per payload, "
    "saturation at 1/16/64 connections, every scenario and framework (hours).",
)
@click.option("--quick", is_flag=True, help="Every scenario and framework, short runs (minutes once installed).")
@click.option("--scenarios", help=f"Comma-separated subset of {', '.join(SCENARIOS)}.")
@click.option("--frameworks", "names", help=f"Comma-separated subset of {', '.join(frameworks.NAMES)}.")
@click.option("--payloads", help=f"Comma-separated subset of {', '.join(PAYLOAD_ROWS)} (open loop).")
@click.option("--rate", type=float, default=200.0, show_default=True, help="Open-loop requests per second.")
@click.option("--duration", type=float, help="Open-loop seconds per payload (default 60; --quick 5).")
@click.option("--saturation-duration", type=float, help="Seconds per saturation run (default 15; --quick 4).")
@click.option("--connections", help="Comma-separated saturation connection counts (default 1,16,64; --quick 16).")
@click.option("--workers", type=int, default=2, show_default=True, help="Serving processes per framework.")
@_folder("--out", "bench-results", "results.json, report.md and charts/ go here.")
@_folder("--cache", ".bench", "Scenario builds and the frameworks' venvs (reused).")
@click.option("--report-only", is_flag=True, help="Re-render report.md and charts from OUT/results.json.")
@click.option(
    "--resume",
    is_flag=True,
    help="Keep the complete scenario x framework cells of OUT/results.json "
    "(same load settings) and run only the rest: the full study may be spread over several sittings.",
)
@click.option(
    "--limit-probe/--no-limit-probe",
    default=True,
    show_default=True,
    help="Also saturate Bastion alone with binary-tensor requests at the in-process best and the "
    "largest batch, to show its distance from the in-process limit.",
)
@click.pass_context
def bench(
    ctx: click.Context,
    run_all: bool,
    quick: bool,
    scenarios: str | None,
    names: str | None,
    payloads: str | None,
    rate: float,
    duration: float | None,
    saturation_duration: float | None,
    connections: str | None,
    workers: int,
    out: Path,
    cache: Path,
    report_only: bool,
    resume: bool,
    limit_probe: bool,
) -> None:
    """Serve each scenario's model with Bastion and each peer framework (each in its own
    venv, installed with pinned versions), drive open-loop and saturation load, and write
    results.json, report.md and PNG charts. Choose --all (the full study) or --quick.

    `bastion bench serving` is the serving comparison (Bastion vs MLServer vs a minimal
    app) and the before/after check of two Bastion builds."""
    if ctx.invoked_subcommand is not None:
        _no_options_for(ctx, ctx.invoked_subcommand, "the study's options go without a subcommand")
        return
    from bastion.bench.report import write_report
    from bastion.bench.suite import StudyResults, SuiteConfig, command_line, run_study
    from bastion.bench.suite import quick as quick_config

    if report_only:
        study = StudyResults.load(out / "results.json")
        click.echo(f"wrote {write_report(study, out)}")
        return
    if run_all == quick and not (scenarios or names):
        raise click.UsageError("choose --all (the whole study) or --quick, or a subset with --scenarios/--frameworks")
    config = SuiteConfig(out=out.resolve(), cache=cache.resolve(), command=command_line(sys.argv[2:]))
    if quick:
        quick_config(config)
    config.scenarios = _split(scenarios, SCENARIOS, "scenario")
    config.frameworks = _split(names, frameworks.NAMES, "framework")
    if payloads:
        config.payloads = _split(payloads, tuple(PAYLOAD_ROWS), "payload")
    config.rate, config.workers, config.limit_probe = rate, workers, limit_probe
    if duration is not None:
        config.duration_s = duration
    if saturation_duration is not None:
        config.saturation_s = saturation_duration
    if connections:
        config.connections = _ints(connections, "--connections")
    # a study is long: on SIGTERM, unwind (SystemExit) so the running server's group is stopped
    # and results.json keeps every finished run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        study = run_study(config, say=lambda line: click.echo(line, err=True), resume=resume)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    click.echo(f"wrote {out / 'results.json'} and {write_report(study, out)}")


@bench.command("serving")
@click.option("--quick", is_flag=True, help="5 s rows after a 2 s warm-up: a smoke run (BENCHMARKS.md is left alone).")
@click.option("--duration", type=float, help="Measured seconds per row (default 20; --quick 5).")
@click.option("--warmup", type=float, help="Unmeasured seconds of load before each row (default 3; --quick 2).")
@click.option("--connections", type=int, default=16, show_default=True, help="Connections of the load generator.")
@click.option("--only", default="bastion,mlserver,minimal", show_default=True, help="Servers to run.")
@click.option(
    "--generators",
    default="wrk,hey",
    show_default=True,
    help="Load generators: wrk (every row) and hey (1-row JSON, Bastion and the minimal app, at hey's default "
    "headers: Accept-Encoding: gzip, keep-alive).",
)
@click.option("--workers", default="1,2", show_default=True, help="--workers values for Bastion and the minimal app.")
@click.option(
    "--mlserver-parallel-workers",
    default="0,1",
    show_default=True,
    help="MLServer parallel_workers values (0: inference inline; 1: MLServer's default pool).",
)
@click.option("--no-batch", is_flag=True, help="Skip the 64-row rows.")
@click.option("--repeat", type=int, default=1, show_default=True, help="Runs per row; the median one is reported.")
@click.option(
    "--repository",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="An already built demo repository (default: CACHE/demo, built once with `bastion demo --build-only`).",
)
@_folder("--out", "bench-results/serving", "serving-<date>.json (or ab-<date>.json/.md) and the work folders go here.")
@_folder(
    "--cache", ".bench", "The demo and scenario builds, MLServer's venv, baseline exports (shared with the study)."
)
@click.option(
    "--markdown",
    "markdown_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("BENCHMARKS.md"),
    show_default=True,
    help="The file whose serving-bench section is rewritten (not with --quick).",
)
@click.option("--no-markdown", is_flag=True, help="Leave the Markdown file alone.")
@click.option(
    "--baseline-ref",
    help="Instead of the three-server table: Bastion at this git ref (before) against the working tree "
    "(after), interleaved rounds on the same venv and model files; reports after/before.",
)
@click.option("--rounds", type=int, default=3, show_default=True, help="With --baseline-ref: rounds per case.")
@click.option(
    "--cases",
    help="With --baseline-ref: comma-separated subset of digits-json1,image-small,image-large (default all).",
)
@click.pass_context
def serving(
    ctx: click.Context,
    quick: bool,
    duration: float | None,
    warmup: float | None,
    connections: int,
    only: str,
    generators: str,
    workers: str,
    mlserver_parallel_workers: str,
    no_batch: bool,
    repeat: int,
    repository: Path | None,
    out: Path,
    cache: Path,
    markdown_file: Path,
    no_markdown: bool,
    baseline_ref: str | None,
    rounds: int,
    cases: str | None,
) -> None:
    """Bastion vs MLServer vs a minimal ASGI app on the demo's digits model (wrk, and hey
    for 1-row JSON; one server at a time): throughput, latency, CPU and memory per row, the
    ratios against the issues' targets, and BENCHMARKS.md's serving section. With --baseline-ref REF: two Bastion
    builds against each other instead (the before/after check of a refactor)."""
    import datetime as dt
    import shlex

    from bastion.bench.serving import Load

    load = Load(
        connections=connections,
        duration_s=duration if duration is not None else (5.0 if quick else 20.0),
        warmup_s=warmup if warmup is not None else (2.0 if quick else 3.0),
    )
    if load.connections < 1 or load.duration_s < 1 or load.warmup_s < 0 or repeat < 1 or rounds < 1:
        raise click.UsageError("--connections, --duration, --repeat and --rounds must be positive, --warmup >= 0")
    command = shlex.join(["bastion", *sys.argv[1:]])
    if baseline_ref:
        _no_options_for(
            ctx,
            "--baseline-ref",
            "the before/after check runs Bastion alone on its own cases",
            ("only", "generators", "mlserver_parallel_workers", "no_batch", "repeat", "markdown_file", "no_markdown"),
        )
        from bastion.bench.abcompare import CASES, ABConfig, markdown, run_ab

        # one worker unless asked: the table's default (1,2) is two configurations, this is one
        counts = _ints(workers, "--workers") if _given(ctx, "workers") else (1,)
        if len(counts) != 1:
            raise click.BadParameter("--workers: one value with --baseline-ref")
        ab = ABConfig(
            baseline_ref=baseline_ref,
            out=out.resolve(),
            cache=cache.resolve(),
            load=load,
            rounds=rounds,
            workers=counts[0],
            cases=_split(cases, tuple(CASES), "case"),
            repository=repository.resolve() if repository else None,
            command=command,
        )
        _stop_on_sigterm()
        try:
            report = run_ab(ab, _say)
        except ValueError as err:
            raise click.UsageError(str(err)) from None
        click.echo(markdown(report))
        return
    _no_options_for(ctx, "the serving table", "they belong to --baseline-ref", ("rounds", "cases"))
    from bastion.bench import serving_report
    from bastion.bench.saturation import GENERATORS
    from bastion.bench.serving import SERVERS, ServingConfig, plan, run_serving

    config = ServingConfig(
        out=out.resolve(),
        cache=cache.resolve(),
        load=load,
        servers=_split(only, SERVERS, "server"),
        generators=_split(generators, GENERATORS, "load generator"),
        workers=_ints(workers, "--workers"),
        mlserver_workers=_ints(mlserver_parallel_workers, "--mlserver-parallel-workers"),
        batch=not no_batch,
        repeat=repeat,
        repository=repository.resolve() if repository else None,
        command=command,
    )
    if not plan(config.servers, config.workers, config.mlserver_workers, config.batch, config.generators):
        # e.g. --only mlserver --generators hey: hey rows are for Bastion and the minimal app
        raise click.UsageError(f"no rows for --only {only} with --generators {generators}")
    started = dt.datetime.now(dt.timezone.utc)
    _stop_on_sigterm()
    runs, env = run_serving(config, _say)
    target = None if (no_markdown or quick) else markdown_file  # a smoke run is not for the record
    path, section = serving_report.write(config, runs, env, started, target)
    click.echo("\n" + section)
    click.echo(serving_report.console_summary(serving_report.ratios(runs), load.connections))
    click.echo(f"results: {path}" + (f"; updated {target}" if target is not None and runs else ""))
    if not runs:
        raise SystemExit(1)


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE


def _say(line: str) -> None:
    click.echo(line, err=True)


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C: the running server's process group is stopped, and the
    serving table reports the rows done so far."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
