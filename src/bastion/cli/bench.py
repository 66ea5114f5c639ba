"""``bastion bench``: the serving study (four scenarios x the peer frameworks), side by side."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from bastion.bench import frameworks
from bastion.bench.models import PAYLOAD_ROWS, SCENARIOS


def _split(value: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not value:
        return allowed
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in items if v not in allowed]
    if unknown:
        raise click.BadParameter(f"unknown {what} {', '.join(unknown)}; expected some of {', '.join(allowed)}")
    return items


@click.command("bench")
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
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-results"),
    show_default=True,
    help="results.json, report.md and charts/ go here.",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".bench"),
    show_default=True,
    help="Scenario builds and the frameworks' venvs (reused).",
)
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
def bench(
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
    results.json, report.md and PNG charts. Choose --all (the full study) or --quick."""
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
        try:
            config.connections = tuple(int(c) for c in connections.split(","))
        except ValueError as exc:
            raise click.BadParameter(f"--connections: {exc}") from None
    # a study is long: on SIGTERM, unwind (SystemExit) so the running server's group is stopped
    # and results.json keeps every finished run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        study = run_study(config, say=lambda line: click.echo(line, err=True), resume=resume)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    click.echo(f"wrote {out / 'results.json'} and {write_report(study, out)}")
