"""PNG plots of a protection-vs-goodput sweep (``bastion lab tradeoff``); matplotlib, Agg only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_front_selections", "plot_goodput_vs", "write_plots"]

_COLORS = {"permute-and-flip": "tab:blue", "exponential": "tab:orange", "metric-noise": "tab:green",
           "none": "black"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    return plt


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_goodput_vs(rows: Sequence[Mapping[str, Any]], metric: str, out: Path, *, title: str = "") -> Path:
    """Goodput (y) against the fingerprinted attack's ``metric`` (``accuracy`` or ``fidelity``, x),
    one line per defense ordered by strength, the undefended point as a star."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    base = next((r for r in rows if r["defense"] == "none"), None)
    for kind in dict.fromkeys(r["defense"] for r in rows if r["defense"] != "none"):
        pts = sorted((r for r in rows if r["defense"] == kind and _finite(r.get(metric)) and _finite(r["goodput"])),
                     key=lambda r: r["strength"])
        if not pts:
            continue
        xs, ys = [r[metric] for r in pts], [r["goodput"] for r in pts]
        ax.plot(xs, ys, marker="o", color=_COLORS.get(kind), label=kind)
        for r in pts:
            ax.annotate(f"{r['strength']:g}", (r[metric], r["goodput"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=_COLORS.get(kind))
    if base is not None and _finite(base.get(metric)) and _finite(base["goodput"]):
        ax.scatter([base[metric]], [base["goodput"]], marker="*", s=160, color="black", zorder=4,
                   label="no defense")
    ax.set_xlabel(f"fingerprinted attack {metric} (held-out rows)")
    ax.set_ylabel("goodput (met / all, server counters)")
    ax.set_title(title or f"goodput vs attack {metric}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_front_selections(front: Sequence[Mapping[str, Any]], selections: Mapping[str, Mapping[str, int]],
                          out: Path, *, title: str = "") -> Path:
    """Left: the Pareto front (quality vs latency, from the zoo's profile). Right: for each
    series (a defense at one strength, or none), the share of the attacker's extraction
    requests each front variant answered (``bastion_zoo_selections_total`` deltas)."""
    plt = _plt()
    ordered = sorted(front, key=lambda v: v["latency_ms"])
    names = [v["variant"] for v in ordered]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    left.step([v["latency_ms"] for v in ordered], [v["quality"] for v in ordered], where="post", color="tab:blue",
              zorder=2)
    left.scatter([v["latency_ms"] for v in ordered], [v["quality"] for v in ordered], s=50, color="tab:blue",
                 zorder=3)
    for v in ordered:
        left.annotate(v["variant"], (v["latency_ms"], v["quality"]), textcoords="offset points", xytext=(5, -10),
                      fontsize=7)
    left.set_xscale("log")
    left.set_xlabel("profiled latency (ms, log scale)")
    left.set_ylabel("profiled accuracy")
    left.set_title("Pareto front")
    left.grid(True, which="both", alpha=0.3)
    series = list(selections.items())
    width = 0.8 / max(1, len(series))
    for k, (label, counts) in enumerate(series):
        total = sum(counts.get(n, 0) for n in names) or 1
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        kind = label.split(" ")[0]
        right.bar(xs, [counts.get(n, 0) / total for n in names], width=width, label=label,
                  color=_COLORS.get(kind))
    right.set_xticks(range(len(names)))
    right.set_xticklabels(names, rotation=20, fontsize=7)
    right.set_ylim(0, 1.05)
    right.set_ylabel("share of the attacker's extraction requests")
    right.set_title("which variant answered the victim trigger")
    right.grid(True, axis="y", alpha=0.3)
    if series:
        right.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _closest(values: Sequence[float], want: float) -> float:
    return min(values, key=lambda v: (abs(math.log(v) - math.log(want)), v))


def write_plots(result: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], out_dir: Path,
                selections_at: float | None = None) -> list[Path]:
    """The three PNGs of a sweep; ``selections_at``: the DP ε whose selection shares are
    plotted (default: the median ε swept); metric noise uses its own median scale."""
    out_dir = Path(out_dir)
    zoo = result["zoo"]
    paths = [
        plot_goodput_vs(rows, "accuracy", out_dir / "goodput_vs_accuracy.png",
                        title=f"zoo {zoo}: goodput vs fingerprinted extraction accuracy"),
        plot_goodput_vs(rows, "fidelity", out_dir / "goodput_vs_fidelity.png",
                        title=f"zoo {zoo}: goodput vs fingerprinted extraction fidelity"),
    ]
    selections: dict[str, Mapping[str, int]] = {}
    points = result["points"]
    for kind in dict.fromkeys(p["defense"] for p in points):
        mine = [p for p in points if p["defense"] == kind and p.get("extraction")]
        if not mine:
            continue
        if kind == "none":
            chosen = mine[0]
        else:
            strengths = sorted(p["strength"] for p in mine)
            want = selections_at if (selections_at and kind != "metric-noise") else strengths[len(strengths) // 2]
            s = _closest(strengths, want)
            chosen = next(p for p in mine if p["strength"] == s)
        label = "none" if kind == "none" else f"{kind} {chosen['strength']:g}"
        selections[label] = chosen["extraction"].get("selections", {})
    paths.append(plot_front_selections(result["front"], selections, out_dir / "front_selections.png",
                                       title=f"zoo {zoo}: victim {result['victim']}"))
    return paths
