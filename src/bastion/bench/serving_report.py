"""The serving comparison's ratios and its section of BENCHMARKS.md (``bastion bench serving``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from bastion.bench.results import write_marked_section

if TYPE_CHECKING:  # serving's types, for annotations only: this module needs none of its code
    from bastion.bench.serving import ServingConfig, ServingRun

SECTION = "serving-bench"  # BENCHMARKS.md's markers: <!-- serving-bench:start ... --> ... <!-- serving-bench:end -->
WRITER = "bastion bench serving"

# The issue's targets, all on 1-row JSON requests with one worker each.
TARGET_VS_MLSERVER_RPS = 3.0  # Bastion throughput >= 3x MLServer's
TARGET_VS_MINIMAL_RPS = 0.9  # Bastion throughput >= 0.9x the minimal app's, with wrk and with hey (issue 14)
TARGET_P99_VS_MLSERVER = 1 / 3  # Bastion p99 <= 1/3 of MLServer's
MINIMAL_RATIO = "Bastion / minimal app throughput"  # the stem of every such ratio's name
# what each generator sends that matters here (issue 14: compression is negotiated per request)
CLIENT = {
    "wrk": "`wrk -t1`, no Accept-Encoding",
    "hey": "`hey` at its default headers (Accept-Encoding: gzip, keep-alive)",
}


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float | None
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""
    generator: str = "wrk"  # the rows' load generator

    @property
    def met(self) -> bool | None:
        if self.value is None or self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "met": self.met}


def _pick(
    runs: Sequence[ServingRun], server: str, body: str, workers: int | None = None, generator: str = "wrk"
) -> list[ServingRun]:
    return [
        r
        for r in runs
        if r.row.server == server
        and r.row.body == body
        and (workers is None or r.row.workers == workers)
        and r.row.generator == generator
    ]


def minimal_ratio_name(generator: str, workers: int) -> str:
    """The name of Bastion / minimal app throughput for one generator and --workers value;
    wrk's keep the names they had before hey rows existed."""
    qualifiers = ([] if generator == "wrk" else [generator]) + ([] if workers == 1 else [f"workers={workers}"])
    return MINIMAL_RATIO + (f" ({', '.join(qualifiers)})" if qualifiers else "")


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(runs: Sequence[ServingRun]) -> list[Ratio]:
    """The issue's three targets (workers=1, 1-row JSON, wrk), Bastion / minimal app again
    with hey (issue 14's target for clients that accept gzip), and the informative extras.

    MLServer is taken at its best per metric over the parallel_workers settings tried (the
    highest throughput, the lowest p99), so a "met" never rests on MLServer's worse setting.
    """
    out: list[Ratio] = []
    mls = _pick(runs, "mlserver", "json1")
    mls_rps = max((r.rps for r in mls), default=None)
    mls_p99 = min((r.p99_ms for r in mls), default=None)
    for w in sorted({r.row.workers for r in _pick(runs, "bastion", "json1")} or {1}):
        b = _pick(runs, "bastion", "json1", w)
        m = _pick(runs, "minimal", "json1", w)
        b_rps = b[0].rps if b else None
        b_p99 = b[0].p99_ms if b else None
        primary = w == 1  # the issue's targets are stated for one worker against one worker
        suffix = "" if primary else f" (workers={w})"
        out += [
            Ratio(
                f"Bastion / MLServer throughput{suffix}",
                _div(b_rps, mls_rps),
                TARGET_VS_MLSERVER_RPS if primary else None,
            ),
            Ratio(
                minimal_ratio_name("wrk", w),
                _div(b_rps, m[0].rps if m else None),
                TARGET_VS_MINIMAL_RPS if primary else None,
                note=f"minimal app with --workers {w}",
            ),
            Ratio(
                f"Bastion p99 / MLServer p99{suffix}",
                _div(b_p99, mls_p99),
                TARGET_P99_VS_MLSERVER if primary else None,
                higher_is_better=False,
            ),
        ]
    # the same ratio with hey: what clients that accept gzip by default see (issue 14)
    for w in sorted({r.row.workers for r in _pick(runs, "bastion", "json1", generator="hey")}):
        b = _pick(runs, "bastion", "json1", w, "hey")
        m = _pick(runs, "minimal", "json1", w, "hey")
        out.append(
            Ratio(
                minimal_ratio_name("hey", w),
                _div(b[0].rps, m[0].rps if m else None),
                TARGET_VS_MINIMAL_RPS if w == 1 else None,
                note=f"hey at its default headers (Accept-Encoding: gzip); minimal app with --workers {w}",
                generator="hey",
            )
        )
    # batch 64: Bastion binary vs the others' JSON (MLServer's REST has no binary-tensor extension)
    bb = _pick(runs, "bastion", "bin64", 1)
    bj = _pick(runs, "bastion", "json64", 1)
    mls64 = max((r.rps for r in _pick(runs, "mlserver", "json64")), default=None)
    mls64_p99 = min((r.p99_ms for r in _pick(runs, "mlserver", "json64")), default=None)
    mn64 = _pick(runs, "minimal", "json64", 1)
    if bb:
        out += [
            Ratio("batch 64: Bastion binary / MLServer JSON throughput", _div(bb[0].rps, mls64)),
            Ratio(
                "batch 64: Bastion binary p99 / MLServer JSON p99",
                _div(bb[0].p99_ms, mls64_p99),
                higher_is_better=False,
            ),
            Ratio("batch 64: Bastion binary / Bastion JSON throughput", _div(bb[0].rps, bj[0].rps if bj else None)),
            Ratio(
                "batch 64: Bastion binary / minimal app JSON throughput",
                _div(bb[0].rps, mn64[0].rps if mn64 else None),
            ),
        ]
    return out


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def markdown(report: dict[str, Any], runs: Sequence[ServingRun], computed: Sequence[Ratio]) -> str:
    """The section between the markers: how it was run, one row per run, the ratios."""
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    load, repeat = report["load"], report["repeat"]
    loadavg = " / ".join(f"{x:.2f}" for x in env.get("loadavg_before") or [])
    generators = [g for g in CLIENT if any(r.row.generator == g for r in runs)] or ["wrk"]
    both = f"{CLIENT['wrk']}; rows marked (hey): {CLIENT['hey']}"
    clients = CLIENT[generators[0]] if len(generators) == 1 else both
    how = (
        f"{clients}; {load['connections']} connections, {load['duration_s']:.0f} s per row "
        f"after a {load['warmup_s']:.0f} s warm-up, {repeat} run(s) per row"
        + (" (the run with the median throughput is shown)" if repeat > 1 else "")
        + "; load generator and servers on the same machine, one server at a time"
    )
    lines = [
        f"### Run of {report['date']}",
        "",
        f"- Command: `{report['command']}` (Bastion at {env.get('git', '?')})",
        f"- Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, {env['memory_gib']:.0f} GiB, "
        f"{env['system']}; before the run: load average {loadavg or 'n/a'}, "
        f"{env.get('busy_cores_before', 'n/a')} cores busy",
        f"- Versions: {versions}, python {env['python']}",
        f"- Load: {how}.",
        "- Model: `digits` from `bastion demo --build-only` (ONNX, input FP32 [-1, 64]), the only model "
        "each server loads; the same file for all three servers; ONNX Runtime with 1 intra-op and "
        "1 inter-op thread everywhere.",
        "",
        "| server | config | request | req/s | rows/s | p50 ms | p90 ms | p99 ms | errors "
        "| server CPU µs/req | server cores busy | load-gen cores | machine busy (cores) | peak RSS MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        d = r.stats.duration_s or 1.0
        lat = r.stats.latency_ms
        cores = f"{(r.result.cpu_s or 0.0) / d:.2f} | {r.host.children_cpu_s / d:.2f} | {r.host.machine_busy_s / d:.2f}"
        label = r.body_label if r.row.generator == "wrk" else f"{r.body_label} ({r.row.generator})"
        lines.append(
            f"| {r.row.server} | {r.row.config} | {label} | {r.rps:,.0f} | {r.rps * r.rows_per_request:,.0f} "
            f"| {_fmt(lat.p50)} | {_fmt(lat.p90)} | {_fmt(lat.p99)} | {r.stats.errors} "
            f"| {_fmt(r.result.cpu_us_per_request, ',.0f')} | {cores} | {_fmt(r.result.peak_rss_mib, ',.0f')} |"
        )
    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|:---:|"]
    for q in computed:
        target = "" if q.target is None else f"{'≥' if q.higher_is_better else '≤'} {q.target:.2f}"
        met = {True: "yes", False: "**no**", None: ""}[q.met]
        lines.append(f"| {q.name} | {_fmt(q.value)} | {target} | {met} |")
    lines.append("")
    return "\n".join(lines)


def console_summary(computed: Sequence[Ratio], connections: int) -> str:
    """Bastion / minimal app per generator, one line each, for the end of the console output."""
    lines = [f"Bastion / minimal app, 1-row JSON, {connections} connections:"]
    for q in computed:
        if not q.name.startswith(MINIMAL_RATIO):
            continue
        target = "" if q.target is None else f"  target >= {q.target:.2f}: {'met' if q.met else 'NOT met'}"
        lines.append(f"  {q.generator:<4} {q.name:<52} {_fmt(q.value)}x{target}")
    return "\n".join(lines)


def write(
    config: ServingConfig,
    runs: Sequence[ServingRun],
    env: dict[str, Any],
    started: dt.datetime,
    markdown_file: Path | None,
) -> tuple[Path, str]:
    """``OUT/serving-<date>.json`` with every figure, and the section in ``markdown_file``
    (None: not written). Returns the JSON's path and the section's text."""
    computed = ratios(runs)
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": config.command,
        "load": dataclasses.asdict(config.load),
        "repeat": config.repeat,
        "environment": env,
        "rows": [r.to_dict() for r in runs],
        "ratios": [q.to_dict() for q in computed],
    }
    section = markdown(report, runs, computed)
    config.out.mkdir(parents=True, exist_ok=True)
    path = config.out / f"serving-{started.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    if markdown_file is not None and runs:
        write_marked_section(markdown_file, SECTION, section, WRITER)
    return path, section
