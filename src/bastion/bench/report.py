"""The study's report: Markdown tables per scenario, the targets judged, PNG charts.

Everything is rendered from ``results.json`` (:class:`~bastion.bench.suite.StudyResults`),
so a report can be rebuilt without measuring again (``bastion bench --report-only``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.bench.inprocess import rows_ceiling
from bastion.bench.limitprobe import MODE as PROBE_MODE
from bastion.bench.results import BenchResult
from bastion.bench.suite import StudyResults

OURS = "bastion"
# the in-process share the issue asks of Bastion at saturation for these scenarios
LIMIT_SHARE_TARGET = 0.9
LIMIT_SCENARIOS = ("image", "malware")


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _by(results: Iterable[BenchResult], **match: object) -> list[BenchResult]:
    out = []
    for r in results:
        if all((r.load.get(k) if k in ("payload", "connections") else getattr(r, k)) == v for k, v in match.items()):
            out.append(r)
    return out


@dataclass
class Verdict:
    target: str
    scenario: str
    met: bool | None  # None: not measurable (Bastion or every peer missing)
    detail: str


def _usable(r: BenchResult) -> bool:
    # a run where most requests failed says nothing about latency
    return r.stats.ok > 0 and r.stats.error_rate <= 0.01


def verdicts(study: StudyResults) -> list[Verdict]:
    out: list[Verdict] = []
    scenarios = list(dict.fromkeys(r.scenario for r in study.results))
    for scenario in scenarios:
        open_runs = _by(study.results, scenario=scenario, mode="open-loop")
        for size in dict.fromkeys(r.load.get("payload") for r in open_runs):
            runs = [r for r in open_runs if r.load.get("payload") == size]
            out.append(_lowest(f"lowest p99 at {study.config.get('rate', 200):.0f} req/s, {size}", scenario, runs))
        sat = _by(study.results, scenario=scenario, mode="saturation")
        limit = next((lim for lim in study.limits if lim["scenario"] == scenario), None)
        json_shares: list[tuple[int, tuple[float, str]]] = []  # (rows per request, (share, detail))
        for size in dict.fromkeys(r.load.get("payload") for r in sat):
            best: dict[str, float] = {}
            rows = 1
            for r in sat:
                if r.load.get("payload") == size and r.stats.ok:
                    best[r.framework] = max(best.get(r.framework, 0.0), r.stats.throughput)
                    rows = int(r.load.get("rows", 1))
            out.append(_highest(f"highest saturation throughput, {size}", scenario, best))
            if limit is not None and OURS in best:
                json_shares.append((rows, _share(f"JSON {size}", best[OURS], rows, limit)))
        if scenario in LIMIT_SCENARIOS and limit is not None:
            out += _limit_verdicts(study, scenario, limit, [s for _, s in sorted(json_shares)])
    return out


def _limit_verdicts(
    study: StudyResults, scenario: str, limit: dict[str, Any], json_shares: list[tuple[float, str]]
) -> list[Verdict]:
    """The in-process target in each request form. JSON (shares by rows per request) is
    judged at its largest payload: with one row per request the HTTP exchange, not the
    model, is the work, and no server approaches a limit that has no exchange. The binary
    probe is judged at its best run."""
    probed = [_share(f"binary {n} rows", tput, n, limit, ceiling) for n, tput, ceiling in _probe_best(study, scenario)]
    forms = []
    if json_shares:
        forms.append(("JSON, the study's payloads", json_shares, json_shares[-1][0]))
    if probed:
        forms.append(("binary tensors, Bastion alone", probed, max(share for share, _ in probed)))
    return [
        Verdict(
            f">= {LIMIT_SHARE_TARGET:.0%} of the in-process limit ({form})",
            scenario,
            judged >= LIMIT_SHARE_TARGET,
            "; ".join(detail for _, detail in shown),
        )
        for form, shown, judged in forms
    ]


def _share(
    label: str, throughput: float, rows: int, limit: dict[str, Any], ceiling: float | None = None
) -> tuple[float, str]:
    ceiling = ceiling or rows_ceiling(limit)
    share = throughput * rows / ceiling if ceiling else math.nan
    return share, f"{label}: {throughput * rows:,.0f} of {ceiling:,.0f} rows/s = {share:.1%}"


def _probe_best(study: StudyResults, scenario: str) -> list[tuple[int, float, float | None]]:
    """Bastion's limit probe: (rows per request, best throughput over connections, the
    in-process ceiling measured with it), by rows."""
    best: dict[int, tuple[float, float | None]] = {}
    for r in _by(study.results, scenario=scenario, mode=PROBE_MODE):
        if r.stats.ok and r.stats.error_rate <= 0.01:
            rows = int(r.load.get("rows", 1))
            if r.stats.throughput > best.get(rows, (0.0, None))[0]:
                best[rows] = (r.stats.throughput, r.load.get("ceiling_rows_per_s"))
    return [(rows, tput, ceiling) for rows, (tput, ceiling) in sorted(best.items())]


def _lowest(target: str, scenario: str, runs: list[BenchResult]) -> Verdict:
    ours = [r for r in runs if r.framework == OURS and _usable(r)]
    peers = [r for r in runs if r.framework != OURS]
    if not ours or not peers:
        return Verdict(target, scenario, None, "Bastion or every peer missing")
    mine = ours[0].stats.latency_ms.p99
    rivals = [(r.stats.latency_ms.p99 if _usable(r) else math.inf, r.framework) for r in peers]
    best_p99, best_name = min(rivals)
    met = mine < best_p99
    ratio = "inf" if math.isinf(best_p99) else f"{best_p99 / mine:.2f}x"
    return Verdict(
        target,
        scenario,
        met,
        f"Bastion {mine:.2f} ms; best peer {best_name} "
        f"{_f(best_p99 if not math.isinf(best_p99) else None)} ms ({ratio})",
    )


def _highest(target: str, scenario: str, best: dict[str, float]) -> Verdict:
    if OURS not in best or len(best) < 2:
        return Verdict(target, scenario, None, "Bastion or every peer missing")
    name, value = max(((v, k) for k, v in best.items() if k != OURS))[::-1]
    mine = best[OURS]
    return Verdict(
        target,
        scenario,
        mine > value,
        f"Bastion {mine:,.0f} req/s; best peer {name} {value:,.0f} req/s ({mine / value:.2f}x)",
    )


def _open_table(runs: list[BenchResult]) -> list[str]:
    cols = ("min", "p25", "p50", "p75", "p90", "p99", "max")
    lines = [
        "| framework | payload | rows | "
        + " | ".join(f"{c} ms" for c in cols)
        + " | ok/s | errors % | CPU µs/req | RSS MiB |",
        "|---|---|---:|" + "---:|" * (len(cols) + 4),
    ]
    for r in runs:
        lat = r.stats.latency_ms
        cells = [
            r.framework,
            str(r.load.get("payload")),
            str(r.load.get("rows")),
            *(_f(lat.get(c)) for c in cols),
            _f(r.stats.throughput, 1),
            _f(100 * r.stats.error_rate, 1),
            _f(r.cpu_us_per_request, 0),
            _f(r.peak_rss_mib, 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sat_table(runs: list[BenchResult]) -> list[str]:
    lines = [
        "| framework | payload | connections | req/s | rows/s | p50 ms | p99 ms | max ms | errors % | CPU µs/req "
        "| server cores | RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lat = r.stats.latency_ms
        cells = [
            r.framework,
            str(r.load.get("payload")),
            str(r.load.get("connections")),
            _f(r.stats.throughput, 0),
            _f(r.stats.throughput * int(r.load.get("rows", 1)), 0),
            _f(lat.p50),
            _f(lat.p99),
            _f(lat.max),
            _f(100 * r.stats.error_rate, 1),
            _f(r.cpu_us_per_request, 0),
            _f(r.server_cores),
            _f(r.peak_rss_mib, 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(study: StudyResults) -> str:
    cfg = study.config
    m = study.machine
    lines = [
        "# Serving frameworks, side by side",
        "",
        f"Started {study.started} on {m.get('cpu', '?')} ({m.get('logical_cpus')} logical CPUs, "
        f"{m.get('memory_gib')} GiB), {m.get('system')}, Python {m.get('python')}.",
        "",
        f"Command: `{cfg.get('command') or 'bastion bench'}`",
        "",
        f"Open loop: {cfg.get('rate'):.0f} req/s fixed-interval arrivals for {cfg.get('duration_s'):.0f} s after "
        f"{cfg.get('warmup_s'):.0f} s of warm-up, latency from each request's scheduled time. Saturation: wrk, "
        f"{', '.join(str(c) for c in cfg.get('connections', []))} connections, {cfg.get('saturation_s'):.0f} s, "
        f"{', '.join(cfg.get('saturation_payloads', []))} payloads. Each server got {cfg.get('workers')} workers "
        "(its own notion of them, below). Rows per payload: small 1, medium 4, large 16 (held-out rows of the "
        "scenario).",
        "",
        "## Targets",
        "",
        "| scenario | target | met | figures |",
        "|---|---|---|---|",
    ]
    for v in verdicts(study):
        met = "n/a" if v.met is None else ("yes" if v.met else "**no**")
        lines.append(f"| {v.scenario} | {v.target} | {met} | {v.detail} |")
    lines += ["", "## Summary", "", *summary_table(study)]
    lines += ["", "## Versions and settings", "", "| framework | versions | settings |", "|---|---|---|"]
    for name, versions in study.versions.items():
        vs = ", ".join(f"{k} {v}" for k, v in versions.items())
        lines.append(f"| {name} | {vs} | {study.launches.get(name, '')} |")
    if study.skipped:
        lines += ["", "## Not measured", "", "| scenario | framework | why |", "|---|---|---|"]
        for s in study.skipped:
            lines.append(f"| {s.scenario} | {s.framework} | {s.reason.splitlines()[0][:300] if s.reason else ''} |")
    scenarios = list(dict.fromkeys([*(lim["scenario"] for lim in study.limits), *(r.scenario for r in study.results)]))
    for scenario in scenarios:
        lines += ["", f"## {scenario}", ""]
        limit = next((lim for lim in study.limits if lim["scenario"] == scenario), None)
        if limit:
            b1, best = limit["batch1"], limit["best"]
            lines += [
                f"Model `{limit['model']}`. In-process limit (ONNX Runtime, one thread, no server): batch 1 "
                f"p50 {b1['p50_ms']:.3f} ms ({b1['rows_per_s']:,.0f} rows/s per core); best {best['rows_per_s']:,.0f} "
                f"rows/s per core at batch {best['batch']} (x{limit['cores']} cores).",
                "",
            ]
        runs = _by(study.results, scenario=scenario, mode="open-loop")
        if runs:
            lines += [f"Open loop, {cfg.get('rate'):.0f} req/s:", "", *_open_table(runs), ""]
        sat = _by(study.results, scenario=scenario, mode="saturation")
        if sat:
            lines += ["Saturation:", "", *_sat_table(sat), ""]
        probe = _by(study.results, scenario=scenario, mode=PROBE_MODE)
        if probe:
            ceiling = probe[0].load.get("ceiling_rows_per_s")
            measured = f"; in-process ceiling measured just before: {ceiling:,.0f} rows/s, all cores" if ceiling else ""
            lines += [
                "Limit probe: Bastion alone, binary-tensor requests (tritonclient's default form) at the "
                f"in-process best batch and the largest batch the model accepts, wrk saturation{measured}:",
                "",
                *_sat_table(probe),
                "",
            ]
        lines += [f"![latency](charts/{scenario}-latency.png) ![throughput](charts/{scenario}-throughput.png)"]
    return "\n".join(lines) + "\n"


def summary_table(study: StudyResults) -> list[str]:
    """One row per scenario x framework: open-loop p50 / p99 / max per payload (ms) and
    saturation req/s per payload at each connection count, with the day it was measured
    (a study resumed over several sittings says which cell came from which)."""
    cfg = study.config
    payloads = [str(p) for p in cfg.get("payloads", ())]
    sat_payloads = [str(p) for p in cfg.get("saturation_payloads", ())]
    conns = [int(c) for c in cfg.get("connections", ())]
    head = ["scenario", "framework", "measured", *payloads]
    head += [f"sat. {p} {' / '.join(map(str, conns))}" for p in sat_payloads]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---|" * len(payloads) + "---:|" * len(sat_payloads)]
    order = {name: i for i, name in enumerate([*cfg.get("scenarios", ()), *cfg.get("frameworks", ())])}
    # the limit probe is Bastion alone, in its own table: no cell of the study
    cell_runs = [r for r in study.results if r.mode != PROBE_MODE]
    cells = sorted(
        dict.fromkeys((r.scenario, r.framework) for r in cell_runs),
        key=lambda c: (order.get(c[0], len(order)), order.get(c[1], len(order))),
    )
    for scenario, framework in cells:
        mine = [r for r in cell_runs if (r.scenario, r.framework) == (scenario, framework)]
        days = sorted({r.date[:10] for r in mine if r.date})
        row = [scenario, f"**{framework}**" if framework == OURS else framework, ", ".join(days)]
        for size in payloads:
            run = next((r for r in _by(mine, mode="open-loop", payload=size)), None)
            if run is None:
                row.append("n/a")
                continue
            lat = run.stats.latency_ms
            if _usable(run):
                row.append(f"{_f(lat.p50)} / {_f(lat.p99)} / {_f(lat.max, 1)}")
            else:  # the latency of a run that mostly failed is its timeout, not the server's
                row.append(f"{100 * run.stats.error_rate:.0f} % errors")
        for size in sat_payloads:
            by_conn = {int(r.load.get("connections", 0)): r for r in _by(mine, mode="saturation", payload=size)}
            row.append(" / ".join(_f(by_conn[c].stats.throughput, 0) if c in by_conn else "n/a" for c in conns))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _throughput_of(runs: list[BenchResult], framework: str, point: tuple[str, int]) -> float:
    for r in runs:
        if r.framework == framework and (r.load.get("payload"), r.load.get("connections")) == point:
            return r.stats.throughput
    return 0.0


def write_charts(study: StudyResults, folder: Path) -> list[Path]:
    """Per scenario: latency distribution per framework and payload (min, p25-p75 box, p50,
    p90, p99, max), and saturation throughput bars per framework and connections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for scenario in dict.fromkeys(r.scenario for r in study.results):
        runs = _by(study.results, scenario=scenario, mode="open-loop")
        if runs:
            fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(runs)), 4.0))
            stats = []
            for r in runs:
                lat = r.stats.latency_ms
                stats.append(
                    {
                        "label": f"{r.framework}\n{r.load.get('payload')}",
                        "whislo": lat.min,
                        "q1": lat.p25,
                        "med": lat.p50,
                        "q3": lat.p75,
                        "whishi": lat.p99,
                        "fliers": [lat.max],
                    }
                )
            ax.bxp(stats, showfliers=True)
            ax.set_yscale("log")
            ax.set_ylabel("latency ms (box p25-p75, whiskers min-p99, dot max)")
            ax.set_title(f"{scenario}: open loop {study.config.get('rate', 200):.0f} req/s")
            ax.tick_params(axis="x", labelsize=7)
            fig.tight_layout()
            path = folder / f"{scenario}-latency.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        sat = _by(study.results, scenario=scenario, mode="saturation")
        if sat:
            names = list(dict.fromkeys(r.framework for r in sat))
            conns = sorted({(str(r.load.get("payload")), int(r.load.get("connections", 0))) for r in sat})
            fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) * len(conns)), 4.0))
            width = 0.8 / len(conns)
            for k, c in enumerate(conns):
                values = [_throughput_of(sat, n, c) for n in names]
                ax.bar([i + k * width for i in range(len(names))], values, width, label=f"{c[0]}, {c[1]} conn")
            ax.set_xticks([i + width * (len(conns) - 1) / 2 for i in range(len(names))], names, fontsize=8)
            ax.set_ylabel("req/s (2xx)")
            ax.set_title(f"{scenario}: saturation throughput")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = folder / f"{scenario}-throughput.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def write_report(study: StudyResults, out: Path) -> Path:
    write_charts(study, out / "charts")
    path = out / "report.md"
    path.write_text(render(study), encoding="utf-8")
    return path
