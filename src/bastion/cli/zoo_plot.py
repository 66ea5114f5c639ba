"""The PNG of a zoo: every variant in the accuracy/latency plane, the Pareto front joined."""

from __future__ import annotations

from pathlib import Path

import click

from bastion.repository.zoos import load_zoo
from bastion.zoo.pareto import pareto_front


def plot_zoo(repository: Path, zoo: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    loaded = load_zoo(repository / zoo)
    if loaded.spec is None or loaded.profile is None:
        raise click.ClickException(loaded.error)
    spec, prof = loaded.spec, loaded.profile
    points = prof.points(spec.latency_percentile)
    front = pareto_front(points)
    on_front = {p.name for p in front}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for p in points:
        ax.scatter(p.latency_ms, p.quality, s=60, color="tab:blue" if p.name in on_front else "tab:gray", zorder=3)
        ax.annotate(p.name, (p.latency_ms, p.quality), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.step([p.latency_ms for p in front], [p.quality for p in front], where="post", color="tab:blue",
            label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel(f"latency {spec.latency_percentile} at batch 1 (ms, log scale)")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"zoo {zoo} ({spec.task}); measured {prof.measured_at[:10]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
