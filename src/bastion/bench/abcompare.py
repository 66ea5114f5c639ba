"""Before/after: two Bastion builds side by side in one run (``bastion bench serving --baseline-ref REF``).

A refactor should lose no throughput, but two runs minutes apart on a small VM differ by
2-5 %, more than the loss worth catching. So both builds are measured in one sitting, on
the same model files, with the same venv and the same load:

* **before** is commit ``REF``: its ``src/`` exported with ``git archive`` (no worktree, no
  change to the repository's state) into ``<cache>/baseline/<sha>/src`` and put first on the
  server's ``PYTHONPATH``, ahead of the editable install;
* **after** is the working tree, as installed in the venv (``src/``, uncommitted changes
  included).

Each server prints the ``bastion/__init__.py`` it imported (``frameworks/bastion.py``'s
prelude); the run stops unless *before* came from the export and *after* from this
process's own package. Per case both servers are started and checked once, then measured
in rounds, interleaved, the order alternating (before, after; after, before; ...) so that
drift on the machine falls on both alike. Each build's figure is the median over rounds;
the verdict is the after/before ratio of those medians, next to the spread of the
per-round ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
import statistics
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

import bastion
from bastion.bench.frameworks.base import ModelSpec
from bastion.bench.frameworks.bastion import BastionFramework, bastion_python
from bastion.bench.frameworks.v2json import encode_v2
from bastion.bench.launcher import Running, check_v2, free_port, serve
from bastion.bench.models import PAYLOAD_ROWS, build_demo, build_scenario, demo_spec, eval_rows, model_spec, payload
from bastion.bench.results import utc_now
from bastion.bench.saturation import WrkError, wrk_available
from bastion.bench.serving import (
    BASTION_ARGS,
    Body,
    Load,
    Say,
    environment,
    fresh_dir,
    git_head,
    log_origin,
    make_bodies,
    saturate,
)

BEFORE, AFTER = "before", "after"


@dataclass(frozen=True)
class Case:
    """One model and request body both builds are measured on."""

    name: str
    scenario: str  # "digits" (the demo's model) or a study scenario (bench/models.py)
    payload: str  # for digits a body of serving.make_bodies; else a PAYLOAD_ROWS size


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("digits-json1", "digits", "json1"),  # the serving core: a µs model, 1-row JSON
        Case("image-small", "image", "small"),  # the image scenario's CNN, 1 row
        Case("image-large", "image", "large"),  # 16 rows: the model's share grows, batching counts
    )
}


@dataclass
class ABConfig:
    baseline_ref: str
    out: Path
    cache: Path  # the baseline export, the demo build, the scenario builds
    load: Load = field(default_factory=Load)
    rounds: int = 3
    workers: int = 1
    cases: Sequence[str] = tuple(CASES)
    repository: Path | None = None  # an already built demo repository (default: cache/demo)
    command: str = ""


def export_ref(ref: str, cache: Path, repo: Path | None = None) -> tuple[str, Path]:
    """``(sha, src)``: the ``src`` tree of commit ``ref`` in ``cache/baseline/<sha>/src``,
    exported once with ``git archive`` (read-only for the repository: no worktree, no index)."""
    cwd = str(repo) if repo else None
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=cwd, capture_output=True, text=True
    )
    sha = found.stdout.strip()
    if found.returncode != 0 or not sha:
        raise ValueError(f"--baseline-ref {ref!r} is not a commit of this repository")
    tree = cache.resolve() / "baseline" / sha
    src = tree / "src"
    done = tree / ".exported"
    if done.exists():
        return sha, src
    if tree.exists():
        shutil.rmtree(tree)  # an interrupted export
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", sha, "src"], cwd=cwd, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    if not (src / "bastion" / "__init__.py").exists():
        raise ValueError(f"{ref} ({sha[:10]}) has no src/bastion package")
    done.write_text(f"{ref}\n", encoding="utf-8")
    return sha, src


def case_input(case: Case, config: ABConfig, say: Say) -> tuple[ModelSpec, Body]:
    """The model and the body of ``case``, built (once, cached) as ``bastion bench`` builds them."""
    if case.scenario == "digits":
        model = demo_spec(config.repository or build_demo(config.cache, say=say))
        return model, make_bodies(model)[case.payload]
    repo = build_scenario(config.cache / "scenarios", case.scenario, say=say)
    model = model_spec(repo, case.scenario)
    rows = payload(eval_rows(repo, model), case.payload)
    label = f"{PAYLOAD_ROWS[case.payload]} row(s), JSON"
    return model, Body(case.payload, label, rows, encode_v2(model, rows))


def check_origins(origins: dict[str, str | None], baseline_src: Path) -> None:
    """Raise unless *before* imported ``bastion`` from the export and *after* from this
    process's package: otherwise the comparison would compare a build with itself."""
    here = Path(bastion.__file__).resolve()
    before, after = origins.get(BEFORE), origins.get(AFTER)
    if before is None or not Path(before).resolve().is_relative_to(baseline_src.resolve()):
        raise RuntimeError(f"the baseline server imported bastion from {before}, not from {baseline_src}")
    if after is None or Path(after).resolve() != here:
        raise RuntimeError(f"the current server imported bastion from {after}, not from {here}")


def round_order(index: int) -> tuple[str, str]:
    """before then after in even rounds, after then before in odd ones: drift hits both alike."""
    return (BEFORE, AFTER) if index % 2 == 0 else (AFTER, BEFORE)


@dataclass
class CaseResult:
    case: Case
    model: str
    request: str
    origins: dict[str, str | None]
    rounds: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # per round: side -> figures

    def series(self, side: str, key: str) -> list[float]:
        return [float(r[side][key]) for r in self.rounds]

    def summary(self) -> dict[str, Any]:
        """Medians per build, the after/before ratio of the medians and of each round."""
        med = {
            side: {k: statistics.median(self.series(side, k)) for k in ("rps", "p50_ms", "p99_ms", "cpu_us")}
            for side in (BEFORE, AFTER)
        }
        after, before = self.series(AFTER, "rps"), self.series(BEFORE, "rps")
        paired = [a / b if b else float("nan") for a, b in zip(after, before, strict=True)]
        return {
            "median": med,
            "ratio": med[AFTER]["rps"] / med[BEFORE]["rps"] if med[BEFORE]["rps"] else float("nan"),
            "p99_ratio": med[AFTER]["p99_ms"] / med[BEFORE]["p99_ms"] if med[BEFORE]["p99_ms"] else float("nan"),
            "round_ratios": paired,
            "errors": {side: int(sum(self.series(side, "errors"))) for side in (BEFORE, AFTER)},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": dataclasses.asdict(self.case),
            "model": self.model,
            "request": self.request,
            "origins": self.origins,
            "rounds": self.rounds,
            "summary": self.summary(),
        }


def compare_case(
    case: Case, builds: dict[str, BastionFramework], baseline_src: Path, config: ABConfig, say: Say
) -> CaseResult:
    """Both builds up at once on ``case``'s model, then ``config.rounds`` interleaved rounds."""
    model, body = case_input(case, config, say)
    with contextlib.ExitStack() as stack:
        running: dict[str, Running] = {}
        urls: dict[str, str] = {}
        for side, fw in builds.items():
            workdir = fresh_dir(config.out / "work" / f"{case.name}-{side}")
            launch = fw.prepare(model, workdir, bastion_python(), free_port(), config.workers)
            running[side] = stack.enter_context(serve(launch, workdir / "server.log"))
            urls[side] = launch.infer_url
            check_v2(
                f"{side}/{case.name}",
                model,
                launch.infer_url,
                body.payload,
                body.request_headers,
                body.rows,
                retry_503_s=60,
            )
        origins = {side: log_origin(r) for side, r in running.items()}
        check_origins(origins, baseline_src)
        say(f"  {case.name}: before = {origins[BEFORE]}\n  {case.name}: after  = {origins[AFTER]}")
        result = CaseResult(case, model.name, body.label, origins)
        for index in range(config.rounds):
            figures: dict[str, dict[str, Any]] = {}
            for side in round_order(index):
                run, _ = saturate(
                    running[side],
                    urls[side],
                    body,
                    config.load,
                    scenario=case.scenario,
                    framework=f"bastion-{side}",
                    command=config.command,
                )
                stats = run.stats
                figures[side] = {
                    "rps": stats.throughput,
                    "p50_ms": stats.latency_ms.p50,
                    "p99_ms": stats.latency_ms.p99,
                    "cpu_us": run.cpu_us_per_request or float("nan"),
                    "errors": stats.errors,
                    "peak_rss_mib": run.peak_rss_mib,
                }
            result.rounds.append(figures)
            b, a = figures[BEFORE]["rps"], figures[AFTER]["rps"]
            ratio = a / b if b else float("nan")
            say(f"  {case.name} round {index + 1}: before {b:9.0f} req/s  after {a:9.0f} req/s  ratio {ratio:.3f}")
    return result


def run_ab(config: ABConfig, say: Say = print) -> dict[str, Any]:
    """Every case of ``config``; returns the report (also written to ``OUT/ab-<date>.json``)."""
    if wrk_available() is None:
        raise WrkError("wrk is not installed (Debian package `wrk`; `make bench` installs it)")
    unknown = [c for c in config.cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; expected some of {', '.join(CASES)}")
    sha, src = export_ref(config.baseline_ref, config.cache)
    say(f"before: {config.baseline_ref} = {sha[:10]}, exported to {src}")
    builds = {
        BEFORE: BastionFramework(src=src, extra_args=BASTION_ARGS),
        AFTER: BastionFramework(extra_args=BASTION_ARGS),
    }
    started = utc_now()
    results = [compare_case(CASES[name], builds, src, config, say) for name in config.cases]
    report = {
        "date": started,
        "command": config.command,
        "baseline": {"ref": config.baseline_ref, "sha": sha, "src": str(src)},
        "current": {"git": git_head(), "src": str(Path(bastion.__file__).resolve().parent.parent)},
        "load": dataclasses.asdict(config.load),
        "rounds": config.rounds,
        "workers": config.workers,
        "environment": environment(None),
        "cases": [r.to_dict() for r in results],
    }
    config.out.mkdir(parents=True, exist_ok=True)
    stamp = started.replace(":", "").replace("-", "")[:15]
    (config.out / f"ab-{stamp}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    (config.out / f"ab-{stamp}.md").write_text(markdown(report), encoding="utf-8")
    return report


def _f(x: float, spec: str = ",.0f") -> str:
    return "n/a" if x is None or np.isnan(x) else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table: one row per case."""
    load, base, env = report["load"], report["baseline"], report["environment"]
    lines = [
        f"### Before/after: `{base['ref']}` ({base['sha'][:10]}) vs the working tree ({report['current']['git']})",
        "",
        f"- Date: {report['date']}; command: `{report['command']}`",
        f"- Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, {env['system']}",
        f"- Load: `wrk -t1`, {load['connections']} connections, {load['duration_s']:.0f} s per run after a "
        f"{load['warmup_s']:.0f} s warm-up; {report['rounds']} rounds, interleaved (before, after; after, before; "
        f"...); Bastion `--workers {report['workers']}`, one venv, the same model files",
        "",
        "| case | model | request | before req/s | after req/s | **after/before** | per round | "
        "before p99 ms | after p99 ms | before CPU µs/req | after CPU µs/req | errors |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in report["cases"]:
        s = c["summary"]
        b, a = s["median"][BEFORE], s["median"][AFTER]
        per_round = ", ".join(_f(x, ".3f") for x in s["round_ratios"])
        lines.append(
            f"| {c['case']['name']} | {c['model']} | {c['request']} | {_f(b['rps'])} | {_f(a['rps'])} "
            f"| **{_f(s['ratio'], '.3f')}** | {per_round} | {_f(b['p99_ms'], '.2f')} | {_f(a['p99_ms'], '.2f')} "
            f"| {_f(b['cpu_us'])} | {_f(a['cpu_us'])} | {s['errors'][BEFORE]} / {s['errors'][AFTER]} |"
        )
    origins = report["cases"][0]["origins"] if report["cases"] else {}
    lines += [
        "",
        f"Medians over rounds. The servers imported bastion from `{origins.get(BEFORE)}` (before) and "
        f"`{origins.get(AFTER)}` (after), checked for every case.",
        "",
    ]
    return "\n".join(lines)
