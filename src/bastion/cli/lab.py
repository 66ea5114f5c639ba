"""``bastion lab``: attack a live zoo from outside (fingerprinting, extraction).

Everything goes through the server's public REST protocol with an API key, like any
client; the attacker's inputs come from its own query pool (``bastion.lab.pools``).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

DEFAULT_URL = "http://127.0.0.1:8000"


def _connection(f: Any) -> Any:
    f = click.option("--ca-cert", envvar="BASTION_CA_CERT", type=click.Path(exists=True, dir_okay=False),
                     help="CA bundle to verify an https server with.")(f)
    f = click.option("--key", "--api-key", "key", envvar="BASTION_API_KEY",
                     help="The attacker's API key [env: BASTION_API_KEY].")(f)
    f = click.option("--zoo", required=True, help="The zoo to attack (the only name the attacker needs).")(f)
    return click.option("--url", default=DEFAULT_URL, show_default=True, envvar="BASTION_URL",
                        help="Server REST address.")(f)


def _pool_options(f: Any) -> Any:
    f = click.option("--seed", type=int, default=0, show_default=True,
                     help="Order of the pool rows (the same for every attacker) and training seed.")(f)
    f = click.option("--pool-seed", type=int, default=0, show_default=True,
                     help="The scenario build seed the built-in pool is drawn for.")(f)
    f = click.option("--pool", "pool_file", type=click.Path(exists=True, dir_okay=False),
                     help="Query pool .npz (the zoo's input array, or 'x'); default: the scenario's pool.")(f)
    return click.option("--scenario", type=click.Choice(["image", "malware"]),
                        help="Built-in query pool (default: the zoo's name when it is one of these).")(f)


def _output_options(f: Any) -> Any:
    f = click.option("--out", type=click.Path(dir_okay=False), help="Also write the JSON record here.")(f)
    return click.option("--json", "as_json", is_flag=True, help="Print the JSON record.")(f)


@click.group()
def lab() -> None:
    """Attack a live zoo through its public API: fingerprint it, extract its variants."""


def _rows(zoo: str, scenario: str | None, pool_file: str | None, pool_seed: int, seed: int,
          input_name: str | None = None) -> tuple[Any, dict[str, Any]]:
    from bastion.lab.pools import POOLS, load_pool, pool_for

    if pool_file:
        pool = load_pool(Path(pool_file), input_name)
    else:
        name = scenario or (zoo if zoo in POOLS else None)
        if name is None:
            raise click.UsageError(f"no built-in query pool for zoo '{zoo}': give --scenario or --pool FILE.npz")
        pool = pool_for(name, pool_seed)
    return pool.ordered(seed), pool.describe()


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int | None], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int | None) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(f"{phase} (rows)", total=total)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        yield update


def _emit(doc: dict[str, Any], as_json: bool, out: str | None) -> None:
    import orjson

    text = orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode()
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
        click.echo(f"wrote {out}", err=True)
    if as_json:
        click.echo(text)


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


@lab.command("fingerprint")
@_connection
@click.option("--budget", type=int, default=2000, show_default=True, help="Most rows the attacker may send.")
@click.option("--probes", type=int, default=4, show_default=True, help="Probe rows per query.")
@click.option("--candidates", type=int, default=32, show_default=True, help="Pool rows the probes are chosen from.")
@click.option("--repeats", type=int, default=10, show_default=True, help="Replays of each trigger (consistency).")
@click.option("--accuracy-tol", type=float, default=1e-4, show_default=True)
@click.option("--latency-tol", type=float, default=0.01, show_default=True, help="Relative.")
@click.option("--method", type=click.Choice(["auto", "staircase", "grid"]), default="auto", show_default=True)
@_pool_options
@_output_options
def fingerprint_cmd(url: str, zoo: str, key: str | None, ca_cert: str | None, budget: int, probes: int,
                    candidates: int, repeats: int, accuracy_tol: float, latency_tol: float, method: str,
                    scenario: str | None, pool_file: str | None, pool_seed: int, seed: int, as_json: bool,
                    out: str | None) -> None:
    """How many variants answer behind zoo ZOO, and targets that trigger each one."""
    from bastion.lab.fingerprint import fingerprint
    from bastion.lab.oracle import Oracle, OracleError
    from bastion.lab.report import record

    started = dt.datetime.now(dt.timezone.utc)
    verify: str | bool = ca_cert or True
    try:
        with _progress() as progress, Oracle(url, zoo, api_key=key, budget=budget, verify=verify,
                                             progress=lambda d, t: progress("fingerprint", d, t)) as oracle:
            rows, pool_doc = _rows(zoo, scenario, pool_file, pool_seed, seed, oracle.input_name)
            result = fingerprint(oracle, rows, probes=probes, candidates=candidates, repeats=repeats,
                                 accuracy_tol=accuracy_tol, latency_rel_tol=latency_tol, method=method)
    except (OracleError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    config = {"url": url, "zoo": zoo, "budget": budget, "probes": probes, "candidates": candidates,
              "repeats": repeats, "accuracy_tol": accuracy_tol, "latency_rel_tol": latency_tol, "method": method,
              "pool": pool_doc}
    doc = record("fingerprint", config, seed, result, started)
    _emit(doc, as_json, out)
    if as_json:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("#", "trigger", "consistency", "quality", "latency ms", "rtt ms", "",
                  title=f"zoo {zoo}: {len(result.variants)} variant(s) found ({result.method})")
    for i, v in enumerate(result.variants):
        trig = ", ".join(f"{'acc' if k == 'accuracy' else 'lat'} {val:.4g}" for k, val in v.trigger.items())
        table.add_row(str(v.rank), trig or "(none)", f"{_fmt(v.consistency, '.2f')} ({v.repeats})",
                      f"{v.quality_range[0]:.4f}" if v.quality_range else "-",
                      f"{v.latency_range_ms[1]:.4g}" if v.latency_range_ms else "-",
                      _fmt(v.client_latency_ms, ".3f"), "[bold]victim[/]" if i == result.victim else "")
    console = Console()
    console.print(table)
    console.print(f"{result.queries} rows in {result.requests} requests ({result.rejected} refused), "
                  f"{result.signatures_seen} response signature(s) seen"
                  + ("" if result.complete else " [yellow](budget ran out)[/]"))
    console.print("quality and latency: the server's profiled figures as the walk bounded them; rtt: the "
                  "client's median round trip (a secondary signal)")
    for note in result.notes:
        console.print(f"note: {note}")


def _eval_set(path: str, input_name: str) -> tuple[Any, Any]:
    import numpy as np

    from bastion.lab.pools import load_pool

    with np.load(path, allow_pickle=False) as data:
        if "y" not in data.files:
            raise click.BadParameter(f"{path}: no labels (array 'y')", param_hint="--eval")
        y = np.asarray(data["y"])
    return load_pool(Path(path), input_name).x, y


@lab.command("extract")
@_connection
@click.option("--budget", type=int, required=True, help="Rows the attacker queries (its training set size).")
@click.option("--attacker", type=click.Choice(["explicit", "naive", "fingerprinted", "all"]), default="fingerprinted",
              show_default=True, help="Where the queries go: the victim by name, the zoo blindly, or the zoo with "
              "the victim's trigger; 'all' runs the three on the same rows.")
@click.option("--victim-model", help="The victim variant's model name (explicit attacker; fidelity reference).")
@click.option("--victim-key", envvar="BASTION_VICTIM_KEY",
              help="Experimenter key that may query the victim by name (default: --key).")
@click.option("--eval", "eval_file", type=click.Path(exists=True, dir_okay=False),
              help="Labelled held-out rows (.npz with the input array and y), e.g. the zoo's eval.npz.")
@click.option("--trigger", help='Victim trigger from an earlier fingerprint, as JSON: {"accuracy": 0.99}.')
@click.option("--fingerprint-budget", type=int, default=2000, show_default=True)
@click.option("--naive-targets", type=click.Choice(["none", "random"]), default="none", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Rows per request.")
@click.option("--steps", type=int, default=600, show_default=True, help="Surrogate training steps.")
@click.option("--hidden", default="128", show_default=True, help="Surrogate hidden layer widths, comma-separated.")
@click.option("--target", "train_target", type=click.Choice(["soft", "hard"]), default="soft", show_default=True,
              help="Surrogate training target: the returned probabilities (soft) or the one-hot of their argmax "
              "(hard: the adaptive attacker against output hardening).")
@_pool_options
@_output_options
def extract_cmd(url: str, zoo: str, key: str | None, ca_cert: str | None, budget: int, attacker: str,
                victim_model: str | None, victim_key: str | None, eval_file: str | None, trigger: str | None,
                fingerprint_budget: int, naive_targets: str, batch_size: int, steps: int, hidden: str,
                train_target: str, scenario: str | None, pool_file: str | None, pool_seed: int, seed: int,
                as_json: bool, out: str | None) -> None:
    """Train a surrogate of zoo ZOO's victim variant from the server's answers; report its
    accuracy and its fidelity to the victim."""
    import orjson

    from bastion.lab.extract import TrainConfig, run_extraction, victim_answers
    from bastion.lab.oracle import Oracle, OracleError
    from bastion.lab.report import record

    attackers = ["explicit", "naive", "fingerprinted"] if attacker == "all" else [attacker]
    if "explicit" in attackers and not victim_model:
        raise click.UsageError("the explicit attacker queries the victim by name: give --victim-model")
    targets = None
    if trigger:
        try:
            targets = {str(k): float(v) for k, v in orjson.loads(trigger).items()}
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise click.BadParameter('expected JSON like {"accuracy": 0.99}', param_hint="--trigger") from None
    try:
        widths = tuple(int(w) for w in hidden.split(",") if w.strip())
    except ValueError:
        raise click.BadParameter("expected widths like 128 or 256,128", param_hint="--hidden") from None
    train = TrainConfig(hidden=widths, steps=steps)
    started = dt.datetime.now(dt.timezone.utc)
    verify: str | bool = ca_cert or True
    results = []
    try:
        with Oracle(url, zoo, api_key=key, verify=verify) as probe:  # public metadata only: the input name
            input_name = probe.input_name
        rows, pool_doc = _rows(zoo, scenario, pool_file, pool_seed, seed, input_name)
        eval_x = eval_y = victim_probs = None
        if eval_file:
            eval_x, eval_y = _eval_set(eval_file, input_name)
            if victim_model:
                victim_probs = victim_answers(url, victim_model, victim_key or key, eval_x, batch_size=batch_size,
                                              verify=verify)
        with _progress() as progress:
            for name in attackers:
                results.append(run_extraction(
                    url, zoo, key, rows, attacker=name, budget=budget, batch_size=batch_size,
                    victim_model=victim_model, eval_x=eval_x, eval_y=eval_y, victim_probs=victim_probs,
                    trigger=targets, fingerprint_budget=fingerprint_budget, naive_targets=naive_targets, seed=seed,
                    train=train, progress=progress, verify=verify, target=train_target,
                ))
    except (OracleError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    config = {"url": url, "zoo": zoo, "budget": budget, "attackers": attackers, "victim_model": victim_model,
              "eval": eval_file, "trigger": targets, "fingerprint_budget": fingerprint_budget,
              "naive_targets": naive_targets, "batch_size": batch_size,
              "train": {"hidden": list(widths), "steps": steps}, "target": train_target, "pool": pool_doc}
    doc = record("extract", config, seed, {"attacks": [r.as_dict() for r in results]}, started)
    _emit(doc, as_json, out)
    if as_json:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("attacker", "queried", "targets", "queries", "fp queries", "accuracy", "fidelity",
                  title=f"extraction of zoo {zoo}'s victim {victim_model or ''} (budget {budget} rows, seed {seed})")
    for r in results:
        tg = r.targets if isinstance(r.targets, str) else (
            ", ".join(f"{'acc' if k == 'accuracy' else 'lat'} {v:.4g}" for k, v in r.targets.items())
            if r.targets else "(none)")
        table.add_row(r.attacker, r.queried, tg, str(r.queries), str(r.fingerprint_queries),
                      _fmt(r.accuracy), _fmt(r.fidelity))
    console = Console()
    console.print(table)
    if results and results[0].eval_rows:
        console.print(f"on {results[0].eval_rows} held-out rows; the victim's own accuracy there: "
                      f"{_fmt(results[0].victim_accuracy)}")


def _parse_strengths(values: tuple[str, ...], defenses: list[str], quick: bool) -> dict[str, tuple[float, ...]]:
    """``--strengths 0.5,1,2`` (every DP defense) or ``--strengths metric-noise=0.01,0.02`` (one defense)."""
    from bastion.lab.tradeoff import DEFAULT_STRENGTHS, QUICK_STRENGTHS

    table = dict(QUICK_STRENGTHS if quick else DEFAULT_STRENGTHS)
    out = {d: table[d] for d in defenses}
    for value in values:
        kind, sep, text = value.rpartition("=")
        try:
            nums = tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected numbers like 0.5,1,2, got {value!r}",
                                     param_hint="--strengths") from None
        if not nums:
            raise click.BadParameter(f"no strength in {value!r}", param_hint="--strengths")
        kinds = [kind] if sep else [d for d in defenses if d != "metric-noise"]
        for k in kinds:
            if k not in out:
                raise click.BadParameter(f"{k!r} is not among --defenses {','.join(defenses)}",
                                         param_hint="--strengths")
            out[k] = nums
    return out


def _front_of(repo: Path, zoo: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Path]:
    """The zoo's profiled variants and Pareto front (the experimenter's own repository), and its eval file."""
    from bastion.repository.zoos import load_zoo
    from bastion.zoo.pareto import pareto_front

    loaded = load_zoo(repo / zoo)
    if loaded.spec is None or loaded.profile is None:
        raise click.ClickException(loaded.error)
    points = loaded.profile.points(loaded.spec.latency_percentile)
    on_front = {p.name for p in pareto_front(points)}
    variants = [{"variant": p.name, "quality": p.quality, "latency_ms": p.latency_ms, "pareto": p.name in on_front}
                for p in points]
    front = sorted((v for v in variants if v["pareto"]), key=lambda v: v["latency_ms"])
    return variants, front, repo / zoo / loaded.spec.evaluation


def _detector_run(copy: Path, keys_db: Path, work: Path, admin_key: str, config: Any, result: dict[str, Any],
                  rows: Any, eval_x: Any, eval_y: Any, action: str, max_refused: int, hardening: Any,
                  console: Any) -> dict[str, Any]:
    """The detector point on its own server (the sweep's attacker would be refused at its first point)."""
    import yaml

    from bastion.client import AdminClient, ClientError
    from bastion.lab import tradeoff as tr
    from bastion.lab.extract import victim_answers
    from bastion.lab.oracle import OracleError
    from bastion.lab.probing import detector_point, probe_settings

    settings = work / "probe-monitor.yaml"
    settings.write_text(yaml.safe_dump(probe_settings(action, max_refused)), encoding="utf-8")
    log = work / f"server-probe-monitor-{hardening.name}.log"
    console.print(f"detector point: probe_monitor action {action}, max_refused {max_refused}, hardening "
                  f"{hardening.name}")
    lo, hi = result["workload"]["latency_ms"]
    workload = tr.reachable_workload(result["front"], config.goodput_requests, config.seed, (float(lo), float(hi)))
    try:
        with tr.serve(copy, config.zoo, keys_db, log=log, extra_args=["--config", str(settings)]) as url, \
                _progress() as progress, AdminClient(url, admin_key) as admin:
            victim_probs = victim_answers(url, result["victim"], admin_key, eval_x, batch_size=config.batch_size)
            doc = detector_point(url, config.zoo, admin, config, action=action, max_refused=max_refused,
                                 rows=rows, eval_x=eval_x, eval_y=eval_y, victim_probs=victim_probs,
                                 workload=workload, victim=result["victim"], progress=progress)
            doc["hardening"], doc["hardening_spec"] = hardening.name, hardening.block
            return doc
    # RuntimeError / TimeoutError: the server exited before it was ready, or never was (the launcher's)
    except (OracleError, ClientError, RuntimeError, TimeoutError, ValueError) as err:
        raise click.ClickException(f"{err} (server log: {log})") from None


@lab.command("tradeoff")
@click.option("--repo", "repo", required=True, type=click.Path(exists=True, file_okay=False),
              help="The model repository holding the zoo (copied; the original is not touched).")
@click.option("--zoo", required=True, help="The zoo to defend and attack.")
@click.option("--scenario", type=click.Choice(["image", "malware"]),
              help="Built-in attacker query pool (default: the zoo's name when it is one of these).")
@click.option("--pool", "pool_file", type=click.Path(exists=True, dir_okay=False), help="Query pool .npz instead.")
@click.option("--pool-seed", type=int, default=0, show_default=True)
@click.option("--budget", type=int, help="Extraction rows per attack [default: 512, --quick 128].")
@click.option("--fingerprint-budget", type=int, default=2000, show_default=True)
@click.option("--goodput-requests", type=int, help="Benign workload size [default: 200, --quick 80].")
@click.option("--latency-ms", "lat_range", help="Benign latency targets LO:HI (ms, log-uniform) "
              "[default: calibrated from the benign client's round trips].")
@click.option("--defenses", default="permute-and-flip,exponential,metric-noise", show_default=True,
              help="Defense kinds to sweep, comma-separated.")
@click.option("--strengths", multiple=True,
              help="ε list for the DP defenses (0.25,0.5,1), or KIND=list for one defense "
              "(metric-noise=0.005,0.01: scale_accuracy; scale_latency is --noise-latency-ratio times it). "
              "Repeatable.")
@click.option("--noise-latency-ratio", type=float, default=10.0, show_default=True)
@click.option("--selections-at", type=float, default=2.0, show_default=True,
              help="The ε whose selection shares the front plot shows (metric noise: its median scale).")
@click.option("--steps", type=int, help="Surrogate training steps [default: 600, --quick 200].")
@click.option("--repeats", type=int, default=10, show_default=True, help="Replays per trigger (consistency).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="tradeoff-out", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quick", is_flag=True, help="3 strengths per defense, small budgets: a few minutes.")
@click.option("--hardening", "hardening_opts", multiple=True,
              help="Output hardening settings, comma-separated, repeatable: none, round=D, top_k=K, "
              "reverse_sigmoid=BETA:GAMMA, label_only, or 'default' (none,round=1,reverse_sigmoid=0.5:0.5,"
              "reverse_sigmoid=1:1,reverse_sigmoid=1:4,top_k=1,label_only). Written into every variant's "
              "config.yaml of the copy; one server per setting. [default: none]")
@click.option("--hardened-points", "hardened_points",
              help="Selection classes (e.g. noise-0p01,exp-8) swept under each hardening setting other than none; "
              "the baseline always is [default: every planned class].")
@click.option("--escalate-quota", "escalate_quota", type=click.IntRange(min=1),
              help="Also run each --hardened-points class (every hardening setting, none included) for an escalated "
              "attacker: a fresh tenant whose quota is N requests in total (fingerprint included), set through the "
              "admin API; the server's 429 ends its queries.")
@click.option("--probe-monitor", "probe_action", type=click.Choice(["block", "throttle", "escalate", "alert"]),
              help="Also run the detector point: a server with the zoo-probing detector (this action), a fresh "
              "benign tenant, fingerprinted attacker and naive attacker.")
@click.option("--probe-max-refused", type=click.IntRange(min=1), default=8, show_default=True,
              help="The detector's threshold: distinct refused targets in a tenant's last 200 zoo requests.")
@click.option("--probe-hardening", "probe_hardening", multiple=True,
              help="Output hardening setting(s) of the detector point's server (as --hardening; one detector "
              "point per setting) [default: none].")
def tradeoff_cmd(repo: str, zoo: str, scenario: str | None, pool_file: str | None, pool_seed: int, budget: int | None,
                 fingerprint_budget: int, goodput_requests: int | None, lat_range: str | None, defenses: str,
                 strengths: tuple[str, ...],
                 noise_latency_ratio: float, selections_at: float, steps: int | None, repeats: int, out_dir: str,
                 seed: int, quick: bool, hardening_opts: tuple[str, ...], hardened_points: str | None,
                 escalate_quota: int | None, probe_action: str | None, probe_max_refused: int,
                 probe_hardening: tuple[str, ...]) -> None:
    """Sweep zoo ZOO's selection defenses on a served copy of REPO: goodput of a benign tenant
    against fingerprinting and extraction by an attacker tenant, per defense and strength.
    Writes tradeoff.json, tradeoff.md and PNG plots under --out."""
    import shlex
    import sys

    import numpy as np
    import orjson
    from rich.console import Console

    from bastion.client import ClientError
    from bastion.guard.keystore import KeyStore
    from bastion.lab import tradeoff as tr
    from bastion.lab.extract import TrainConfig
    from bastion.lab.oracle import OracleError
    from bastion.lab.plots import write_plots
    from bastion.lab.report import record
    from bastion.zoo.spec import load_zoo_spec

    kinds = [d.strip() for d in defenses.split(",") if d.strip()]
    bad = [d for d in kinds if d not in tr.KIND_PREFIX]
    if bad:
        raise click.BadParameter(f"unknown defense {', '.join(bad)}; have {', '.join(tr.KIND_PREFIX)}",
                                 param_hint="--defenses")
    try:
        points = tr.plan_points(_parse_strengths(strengths, kinds, quick), noise_latency_ratio)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--strengths") from None
    texts = [t.strip() for opt in hardening_opts for t in opt.split(",") if t.strip()] or ["none"]
    texts = [d for t in texts for d in (tr.DEFAULT_HARDENING if t == "default" else (t,))]
    try:
        parsed = {h.name: h for h in (tr.parse_hardening_setting(t) for t in texts)}
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--hardening") from None
    # the unhardened server always runs first: its baseline is what every drop is measured against
    settings = [tr.NO_HARDENING, *(h for name, h in parsed.items() if name != "none")]
    hardened = [p for p in points if p.defense_class == tr.BASELINE]
    wanted = [c.strip() for c in (hardened_points or "").split(",") if c.strip()]
    unknown = [c for c in wanted if c not in {p.defense_class for p in points}]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)} not among the planned classes "
                                 f"{', '.join(p.defense_class for p in points)}", param_hint="--hardened-points")
    hardened += [p for p in points if p.defense_class != tr.BASELINE and (not wanted or p.defense_class in wanted)]
    latency_ms = None
    if lat_range:
        try:
            lo, hi = (float(v) for v in lat_range.split(":"))
        except ValueError:
            raise click.BadParameter("expected LO:HI", param_hint="--latency-ms") from None
        latency_ms = (lo, hi)
    config = tr.SweepConfig(
        zoo=zoo, latency_ms=latency_ms, budget=budget or (128 if quick else 512), fingerprint_budget=fingerprint_budget,
        goodput_requests=goodput_requests or (80 if quick else 200), repeats=repeats,
        train=TrainConfig(steps=steps or (200 if quick else 600)), seed=seed, selections_at=selections_at,
        escalate_quota=escalate_quota,
    )
    escalate = [p.defense_class for p in hardened if p.defense_class != tr.BASELINE] if escalate_quota else []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    console = Console(stderr=True)
    started = dt.datetime.now(dt.timezone.utc)
    try:
        copy = tr.prepare_copy(Path(repo), zoo, work, points)
        spec = load_zoo_spec(copy / zoo)  # the rewritten zoo.yaml must parse as the server will
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    variants, front, eval_path = _front_of(copy, zoo)
    with np.load(eval_path, allow_pickle=False) as data:
        names = [n for n in data.files if n != "y"]
        eval_x = np.ascontiguousarray(data[names[0]], dtype=np.float32)
        eval_y = np.asarray(data["y"])
    rows, pool_doc = _rows(zoo, scenario, pool_file, pool_seed, seed)
    keys_db = work / "keys.db"
    keys_db.unlink(missing_ok=True)
    with KeyStore(keys_db) as store:
        admin_key, _ = store.create_key("tradeoff-admin", role="admin", description="tradeoff orchestrator")
    assert admin_key is not None
    console.print(f"{len(points)} points ({', '.join(p.defense_class for p in points)}); zoo {zoo} "
                  f"(on_infeasible {spec.on_infeasible}, policy {spec.policy}); serving {copy}")
    import dataclasses

    from bastion.repository.zoos import load_zoo

    zoo_variants = list(load_zoo(copy / zoo).spec.variants)  # type: ignore[union-attr]
    result: dict[str, Any] = {}
    escalated = tr.EscalatedTenants()  # one for every server: they share keys_db, so no tenant name may come back
    for k, setting in enumerate(settings):
        log = work / ("server.log" if setting.name == "none" else f"server-{setting.name}.log")
        try:
            tr.apply_hardening(copy, zoo_variants, setting)
            console.print(f"hardening {setting.name}: {setting.block or 'none'} in {len(zoo_variants)} variants")
            mine = points if setting.name == "none" else hardened
            with tr.serve(copy, zoo, keys_db, log=log) as url, _progress() as progress:
                part = tr.run_sweep(url, admin_key, config, mine, front=front, rows=rows, eval_x=eval_x,
                                    eval_y=eval_y, progress=progress, step=lambda msg: console.print(msg),
                                    hardening=setting, baseline_attacks=k == 0, escalate=escalate,
                                    escalated=escalated)
        except (OracleError, ClientError, RuntimeError, TimeoutError, ValueError) as err:
            raise click.ClickException(f"{err} (server log: {log})") from None
        if not result:
            result = part
            # the same benign targets on every server: no recalibration per hardening setting
            lo_ms, hi_ms = part["workload"]["latency_ms"]
            config = dataclasses.replace(config, latency_ms=(float(lo_ms), float(hi_ms)))
        else:
            result["points"] += part["points"]
            result["hardening"] += part["hardening"]
    tr.apply_hardening(copy, zoo_variants, tr.NO_HARDENING)
    if probe_action:
        probe_texts = [t.strip() for opt in probe_hardening for t in opt.split(",") if t.strip()] or ["none"]
        try:
            probe_settings = [tr.parse_hardening_setting(t) for t in probe_texts]
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--probe-hardening") from None
        for setting in probe_settings:
            tr.apply_hardening(copy, zoo_variants, setting)
            try:
                result["points"].append(_detector_run(copy, keys_db, work, admin_key, config, result, rows, eval_x,
                                                      eval_y, probe_action, probe_max_refused, setting, console))
            finally:
                tr.apply_hardening(copy, zoo_variants, tr.NO_HARDENING)
    result["variants"] = variants
    full = {**config.as_dict(), "repo": str(Path(repo).resolve()), "copy": str(copy), "defenses": kinds,
            "strengths": {k: [p.strength for p in points if p.defense == k] for k in kinds},
            "noise_latency_ratio": noise_latency_ratio, "classes": {p.defense_class: p.spec for p in points},
            "on_infeasible": spec.on_infeasible, "policy": spec.policy, "pool": pool_doc, "quick": quick,
            "hardening": {h.name: h.block for h in settings},
            "hardened_points": [p.defense_class for p in hardened],
            "probe_monitor": {"action": probe_action, "max_refused": probe_max_refused,
                              "hardening": [t.strip() for o in probe_hardening for t in o.split(",") if t.strip()]
                              or ["none"]} if probe_action else None}
    doc = record("tradeoff", full, seed, result, started)
    argv = sys.argv[1:]
    doc["command"] = shlex.join(["bastion", *argv]) if argv[:2] == ["lab", "tradeoff"] else shlex.join(
        ["bastion", "lab", "tradeoff", "--repo", repo, "--zoo", zoo, "--out", out_dir, "--seed", str(seed)]
        + (["--quick"] if quick else []))
    rows_summary = tr.summary_rows(doc["result"])
    # the plots are of the selection defenses alone (the unhardened server)
    plain = {**doc["result"], "points": [p for p in doc["result"]["points"] if p.get("hardening", "none") == "none"]}
    plots = write_plots(plain, [r for r in rows_summary if r["hardening"] == "none"], out,
                        selections_at=selections_at)
    doc["plots"] = [p.name for p in plots]
    doc["summary"] = rows_summary
    (out / "tradeoff.json").write_text(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n", encoding="utf-8")
    (out / "tradeoff.md").write_text(tr.markdown_report(doc) + "\n", encoding="utf-8")
    console.print(f"wrote {out / 'tradeoff.json'}, {out / 'tradeoff.md'}, {', '.join(p.name for p in plots)}")
    click.echo(tr.markdown_report(doc))
