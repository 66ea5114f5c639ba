"""The advisor's report: advice.json, risk.png, one reconstruction grid per image cut, and
the same table and recommendation as Markdown (report.md) and as a self-contained HTML page
(report.html, the pictures beside it), so an operator can read it in a browser or a review.

Both documents are rendered from one list of rows, so they cannot disagree.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bastion.confidential.partition.advise import Advice, CutRisk

__all__ = ["load_advice", "render_html", "write_report"]

_HEADERS = ("K", "tensor", "TEE FLOPs", "TEE latency", "reconstruction (decoder / c-GAN)", "relative",
            "head-hidden attacks")


def _score_key(kind: str) -> str:
    return "ssim" if kind == "image" else "balanced_accuracy"


def _rows(advice: Advice) -> list[tuple[str, ...]]:
    key = _score_key(advice.kind)
    rows = []
    for r in advice.cuts:
        rec = " / ".join(f"{r.reconstruction.get(a, {}).get(key, float('nan')):.3f}" for a in ("decoder", "cgan"))
        att = ", ".join(f"{a} {s:.2f}" for a, s in r.attacks.items())
        rows.append((str(r.cut["index"]), str(r.cut["tensor"]), f"{100 * r.flop_share:.1f} %",
                     f"{100 * r.latency_share:.1f} %", f"{key} {rec}", f"{r.recon_relative:.2f}", att))
    return rows


def _verdict(advice: Advice) -> str:
    if advice.recommended is None:
        return (f"No cut meets the thresholds (relative reconstruction ≤ "
                f"{advice.thresholds['max_recon_relative']}, attack success ≤ "
                f"{advice.thresholds['max_attack_success']}): keep the whole model in the worker.")
    r = next(c for c in advice.cuts if c.cut["index"] == advice.recommended)
    return (f"Recommended: K={advice.recommended} ({r.cut['tensor']}): the shallowest cut under the "
            f"thresholds, keeping {100 * r.flop_share:.1f} % of the FLOPs in the TEE.")


def _summary(advice: Advice, command: str) -> list[str]:
    key = _score_key(advice.kind)
    lines = [f"Budget {advice.budget}, seed {advice.seed}, {advice.seconds:.0f} s."
             + (f" Command: {command}" if command else ""),
             "White-box attack success (whole model known): "
             + (", ".join(f"{a} {s:.2f}" for a, s in advice.white_box.items()) or "none run"),
             f"No-information baseline: {key} {advice.baseline.get(key, float('nan')):.3f}."]
    if advice.budget == "quick":
        lines.append("quick budget: the attackers are under-trained, so risks are understated; decide on standard.")
    return lines


def _plot_risk(advice: Advice, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    ks = [int(r.cut["index"]) for r in advice.cuts]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(ks, [r.recon_relative for r in advice.cuts], "o-", label="reconstruction (relative to baseline)")
    ax.plot(ks, [r.attack_max for r in advice.cuts], "s-", label="head-hidden attack success (max)")
    ax.plot(ks, [r.flop_share for r in advice.cuts], "^--", label="head FLOP share (TEE)")
    ax.plot(ks, [r.latency_share for r in advice.cuts], "v--", label="head latency share (TEE)")
    ax.axhline(advice.thresholds["max_recon_relative"], color="grey", lw=0.8, ls=":")
    if advice.recommended is not None:
        ax.axvline(advice.recommended, color="green", lw=0.8, ls="--")
    ax.set_xlabel("cut K")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"{advice.model}: risk and TEE share per cut")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _markdown(advice: Advice, command: str, pictures: list[Path]) -> str:
    summary = _summary(advice, command)
    lines = [f"# Partition advice: {advice.model}", "", summary[0], "", "![risk per cut](risk.png)", "",
             summary[1], "", "| " + " | ".join(_HEADERS) + " |", "|---:|---|---:|---:|---|---:|---|"]
    for row in _rows(advice):
        cells = list(row)
        cells[1] = f"`{cells[1]}`"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", summary[2], "", f"**{_verdict(advice)}**"]
    if len(summary) > 3:
        lines += ["", summary[3]]
    for pic in pictures:
        lines += ["", f"![{pic.stem}]({pic.name})"]
    return "\n".join(lines) + "\n"


def render_html(advice: Advice, *, command: str = "", pictures: list[Path] | None = None) -> str:
    """The report as one HTML page; every value is escaped (tensor names come from the model file)."""
    e = html.escape
    summary = _summary(advice, command)
    head = "".join(f"<th>{e(h)}</th>" for h in _HEADERS)
    body = []
    for row in _rows(advice):
        mark = ' class="rec"' if advice.recommended is not None and row[0] == str(advice.recommended) else ""
        body.append(f"<tr{mark}>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    figs = "".join(f'<figure><img src="{e(p.name)}" alt="{e(p.stem)}"><figcaption>{e(p.stem)}</figcaption></figure>'
                   for p in pictures or [])
    notes = "".join(f"<p>{e(s)}</p>" for s in summary[1:])
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Partition advice: {e(advice.model)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.25rem .5rem;font-size:.9rem}"
        "tr.rec{background:#e3f6e3}.verdict{font-weight:bold}figure{display:inline-block;margin:.5rem}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>Partition advice: {e(advice.model)}</h1><p>{e(summary[0])}</p>"
        '<img src="risk.png" alt="risk per cut">'
        f"{notes}<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f'<p class="verdict">{e(_verdict(advice))}</p>{figs}</body></html>\n'
    )


def write_report(advice: Advice, examples: dict[int, dict[str, np.ndarray]], x_eval: np.ndarray | None,
                 out: Path, *, command: str = "") -> Path:
    """advice.json, risk.png, reconstruction-K*.png, report.md and report.html in ``out``;
    returns the Markdown file."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "advice.json").write_text(json.dumps(asdict(advice), indent=2) + "\n")
    _plot_risk(advice, out / "risk.png")
    pictures: list[Path] = []
    if advice.kind == "image" and x_eval is not None:
        from bastion.confidential.partition.reconstruct import plot_examples

        for k, recons in examples.items():
            pictures.append(out / f"reconstruction-K{k}.png")
            plot_examples(x_eval, recons, pictures[-1], title=f"cut K={k}")
    (out / "report.html").write_text(render_html(advice, command=command, pictures=pictures))
    path = out / "report.md"
    path.write_text(_markdown(advice, command, pictures))
    return path


def load_advice(path: Path) -> Advice:
    """advice.json back into an Advice (to re-render a report without re-measuring)."""
    raw = json.loads(path.read_text())
    raw["cuts"] = [CutRisk(**c) for c in raw["cuts"]]
    return Advice(**raw)
