"""What leaving one machine costs: the shared limiter (Redis) and key store (PostgreSQL)
against the embedded defaults (SQLite), side by side in one run, and a calculation of how
the design scales to 10, 100 and 1,000 replicas from the figures measured here.

    .venv/bin/python benchmarks/scale_bench.py [--duration 10] [--rounds 2] [--models digits,image_cnn]

Per model (the demo's digits, the image scenario's CNN from ``.bench/scenarios``), one
``bastion serve`` per mode, wrk with 16 connections, 1-row JSON, every request keyed by a
tenant whose rate limit and daily budget the load never reaches (so both are counted on
every request, never refused); ``--no-audit`` everywhere, so the difference is the
limiter and the key store alone:

* ``embedded``: SQLite key store and budget ledger, in-process token bucket;
* ``redis``: the same key store, rates and budgets in Redis (``--redis``);
* ``pg+redis``: keys and tenants in PostgreSQL (``--keys postgresql://``) and ``--redis``;
* ``ray``: ``embedded``, with the model's batches sent to 2 replica actors on a local Ray
  cluster of 2 node processes (``placement: {engine: ray, replicas: 2}``): the Ray hop.

Then, in this process: the Lua scripts' capacity on one Redis (``redis-benchmark``
EVALSHA, 50 clients), one round trip's latency, ``Limiter.admit`` per request at the
block sizes that rates of 100 to 100,000/s give, a PostgreSQL snapshot reload of 1,000
keys, and ``bench.scale_model``'s table. Redis and PostgreSQL are real servers started on
free loopback ports (``bench/services.py``). Results go to BENCHMARKS.md between this
script's markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bastion.bench.frameworks.base import ModelSpec
from bastion.bench.frameworks.bastion import BastionFramework
from bastion.bench.models import build_demo, demo_spec, model_spec
from bastion.bench.results import machine_info, write_marked_section
from bastion.bench.scale_model import ScaleInputs, scale_table
from bastion.bench.services import PostgresServer, RedisServer
from bastion.bench.serving import Body, make_bodies, measure_bastion
from bastion.guard.principal import Limits

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
CACHE = ROOT / ".bench"
SCENARIOS = CACHE / "scenarios"
MODES = ("embedded", "redis", "pg+redis", "ray")
UNREACHED = Limits(rate_per_s=1e6, burst=1_000_000, quota=10**9, quota_period="day")


def model_for(name: str) -> ModelSpec:
    if name == "digits":
        return demo_spec(build_demo(CACHE))
    if name == "image_cnn":
        if not (SCENARIOS / "image" / "image_cnn").is_dir():
            raise SystemExit(f"no image_cnn under {SCENARIOS} (build the scenarios first: `bastion bench scenarios`)")
        return model_spec(SCENARIOS / "image", "image", "image_cnn", output="probabilities")
    raise SystemExit(f"unknown model {name!r}: digits or image_cnn")


def one_row_body(model: ModelSpec) -> Body:
    if model.name == "digits":
        return make_bodies(model)["json1"]
    import numpy as np

    from bastion.bench.frameworks.v2json import encode_v2

    rows = np.random.default_rng(0).random((1, *model.row_shape), dtype=np.float32)
    return Body("json1", "1 row, JSON", rows, encode_v2(model, rows))


@dataclasses.dataclass
class Stores:
    sqlite_db: Path
    sqlite_token: str
    pg_url: str
    pg_secret: Path
    pg_token: str


def make_stores(scratch: Path, pg: PostgresServer, models: list[str]) -> Stores:
    from bastion.guard.keystores import open_keystore

    db = scratch / "keys.db"
    store = open_keystore(db, create=True)
    token, _ = store.create_key("bench", models=models, limits=UNREACHED)
    store.close()
    secret = scratch / "pg.secret"
    pgstore = open_keystore(pg.url, secret_file=secret, create=True, watch=False)
    pg_token, _ = pgstore.create_key("bench", models=models, limits=UNREACHED)
    # a realistic table for the reload figure: 1,000 keys
    for i in range(999):
        pgstore.create_key(f"tenant-{i % 100}")
    pgstore.close()
    assert token is not None and pg_token is not None
    return Stores(db, token, pg.url, secret, pg_token)


def placed_copy(model: ModelSpec, repo: Path, address: str) -> ModelSpec:
    """The model's directory copied into ``repo`` with a Ray placement in its config."""
    import shutil

    import yaml

    target = repo / model.name
    if not target.exists():
        shutil.copytree(model.onnx_path.parent.parent, target)
        config = yaml.safe_load((target / "config.yaml").read_text())
        config.pop("instance_count", None)  # the placement's default: 4 batches in flight per replica
        config["placement"] = {"engine": "ray", "replicas": 2, "num_cpus": 0.5, "address": address}
        (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dataclasses.replace(model, onnx_path=(target / "1" / "model.onnx").resolve())


def measure(mode: str, model: ModelSpec, stores: Stores, redis: RedisServer, duration: float,
            workdir: Path, ray_address: str) -> dict[str, Any]:
    if mode == "pg+redis":
        auth: tuple[str, ...] = ("--keys", stores.pg_url, "--secret-file", str(stores.pg_secret))
        token = stores.pg_token
    else:
        auth, token = ("--keys", str(stores.sqlite_db)), stores.sqlite_token
    extra = ("--poll-interval", "0", "--no-audit") + (("--redis", redis.url) if mode in ("redis", "pg+redis") else ())
    if mode == "ray":
        model = placed_copy(model, workdir.parent / f"ray-repo-{model.name}", ray_address)
    body = one_row_body(model)
    body = dataclasses.replace(body, headers={**body.headers, "Authorization": f"Bearer {token}"})
    return measure_bastion(BastionFramework(extra_args=extra, auth=auth), model, body, duration, workdir, mode,
                           warmup_s=2.0)


def redis_capacity(redis: RedisServer) -> float:
    """EVALSHA of the rate script from 50 redis-benchmark clients: the server's side alone."""
    import redis as redis_py

    from bastion.guard import redis_state

    client = redis_py.Redis.from_url(redis.url)
    sha = client.script_load(redis_state._TAKE)  # the script every lease runs
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(redis.port), "-a", redis.password, "-c", "50", "-n",
         "200000", "-q", "--csv", "EVALSHA", sha, "1", "bench:rate:t", "1000000", "1000000", "1000", "0"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    client.close()
    # --csv: "test","rps",...; the last line holds the figure
    line = [ln for ln in out.strip().splitlines() if ln.startswith('"EVALSHA')][-1]
    return float(line.split(",")[1].strip('"'))


def admit_costs(redis: RedisServer) -> dict[str, float]:
    """µs per ``Limiter.admit`` for a tenant's rate of 100 .. 100,000/s (its block size),
    the rate never reached; and the embedded limiter."""
    from bastion.guard.limits import Limiter
    from bastion.guard.principal import Principal
    from bastion.guard.redis_state import shared_limits_from_url

    costs: dict[str, float] = {}
    embedded = Limiter()
    for label, rate, n in (("embedded", 1e9, 200_000), ("rate 100,000/s", 1e5, 100_000),
                           ("rate 10,000/s", 1e4, 50_000), ("rate 1,000/s", 1e3, 10_000),
                           ("rate 100/s", 1e2, 2_000)):
        if label == "embedded":
            limiter = embedded
        else:
            ledger, rates = shared_limits_from_url(redis.url, fail="closed", replicas=1)
            limiter = Limiter(ledger, rates=rates)
        # burst as large as the run, so that nothing is refused: what is timed is the
        # bookkeeping at the block size the rate gives (block = rate x 10 ms)
        principal = Principal(f"admit-{label}", "k", "infer", None, Limits(rate_per_s=rate, burst=10**9), "default")
        t0 = time.perf_counter()
        for _ in range(n):
            limiter.admit(principal)
        costs[label] = 1e6 * (time.perf_counter() - t0) / n
        limiter.close()
    return costs


def round_trip_ms(redis: RedisServer) -> float:
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    times = []
    for _ in range(2000):
        t0 = time.perf_counter()
        client.ping()
        times.append(time.perf_counter() - t0)
    client.close()
    return 1000 * statistics.median(times)


def reload_ms(stores: Stores) -> float:
    from bastion.guard.keystores import open_keystore

    store = open_keystore(stores.pg_url, secret_file=stores.pg_secret, watch=False)
    times = []
    for _ in range(20):
        store._generation = -1  # as if another replica had changed a key: the whole table is read again
        t0 = time.perf_counter()
        store.refresh()  # what every replica does on a key change
        times.append(time.perf_counter() - t0)
    store.close()
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    p.add_argument("--rounds", type=int, default=2, help="rounds, the order of the modes rotated each round")
    p.add_argument("--models", default="digits,image_cnn")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    names = args.models.split(",")
    specs = {n: model_for(n) for n in names}
    scratch = Path(tempfile.mkdtemp(prefix="bastion-scale-bench-"))
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {n: {m: [] for m in MODES} for n in names}
    from bastion.bench.ray_cluster import ray_cluster

    with RedisServer.running() as redis, PostgresServer.running() as pg, ray_cluster(2) as ray:
        stores = make_stores(scratch, pg, [s.name for s in specs.values()])
        for r in range(args.rounds):
            order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
            for name, spec in specs.items():
                for mode in order:
                    m = measure(mode, spec, stores, redis, args.duration, scratch / f"{name}-{mode}-{r}",
                                ray.address)
                    rows[name][mode].append(m)
                    print(f"round {r + 1} {name:9s} {mode:9s} {m['rps']:8.0f} req/s  p99 {m['p99_ms']:.2f} ms  "
                          f"CPU {m['cpu_us']:.0f} µs/request", file=sys.stderr)
        capacity = redis_capacity(redis)
        rtt = round_trip_ms(redis)
        costs = admit_costs(redis)
        reload = reload_ms(stores)
    med = {n: {mode: {k: statistics.median(x[k] for x in ms) for k in ("rps", "p50_ms", "p99_ms", "cpu_us")}
               for mode, ms in per.items()} for n, per in rows.items()}
    per_replica = med[names[0]]["pg+redis"]["rps"]
    inputs = ScaleInputs(per_replica_rps=per_replica, redis_ops_per_s=capacity, rtt_ms=rtt, reload_ms=reload,
                         keys=1000)
    tables = {
        "1,000 tenants, round robin": scale_table(inputs),
        "1,000 tenants, each on 4 replicas (sticky)": scale_table(dataclasses.replace(inputs, tenant_spread=4)),
        "1,000 tenants, sticky, 8 Redis shards": scale_table(dataclasses.replace(inputs, tenant_spread=4,
                                                                                  redis_shards=8)),
    }
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": "{cpu}, {logical_cpus} cores".format(**machine_info()),
        "command": "python benchmarks/scale_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": rows, "median": med, "redis_evalsha_per_s": capacity, "redis_rtt_ms": rtt,
        "admit_us": costs, "pg_reload_ms_1000_keys": reload, "inputs": dataclasses.asdict(inputs),
        "tables": {k: [dataclasses.asdict(r) for r in v] for k, v in tables.items()},
    }
    print(json.dumps(report, indent=2, default=str))
    if not args.no_write:
        write_markdown(report, tables)
    return 0


def write_markdown(report: dict[str, Any], tables: dict[str, list[Any]]) -> None:
    lines = [
        "## Beyond one machine: shared limiter and key store vs embedded (issue 17)",
        "",
        f"{report['date']}, {report['machine']}. Command: `{report['command']}`. 1-row JSON, wrk with 16",
        "connections, a keyed tenant whose rate limit and daily budget are counted on every request and never",
        "reached, `--no-audit`; Redis and PostgreSQL are real servers on loopback, on the same 2 cores as the",
        "server and wrk. Medians over rounds; ratios against `embedded` (SQLite keys and ledger, in-process bucket).",
        "`ray` is `embedded` with the model's batches sent to 2 replica actors on a local 2-node Ray cluster",
        "(`placement: {engine: ray, replicas: 2}`): the actors and Ray's own processes share the same 2 cores, so",
        "it shows the Ray hop's cost, not what replicas on other machines would add.",
        "",
        "| model | mode | req/s | x embedded | p50 | p99 | server CPU per request |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, per in report["median"].items():
        base = per["embedded"]["rps"]
        for mode, m in per.items():
            lines.append(f"| {name} | {mode} | {m['rps']:,.0f} | {m['rps'] / base:.2f} | {m['p50_ms']:.2f} ms | "
                         f"{m['p99_ms']:.2f} ms | {m['cpu_us']:.0f} µs |")
    costs = report["admit_us"]
    lines += [
        "",
        "`Limiter.admit` per request, in one process (the rate never reached; the block is 10 ms of the rate):",
        "",
        "| limiter | µs per request |",
        "|---|---:|",
        *[f"| {k} | {v:.2f} |" for k, v in costs.items()],
        "",
        f"- Redis: {report['redis_evalsha_per_s']:,.0f} EVALSHA/s of the rate script (redis-benchmark, 50 clients, "
        f"this machine); a PING round trip from Python {report['redis_rtt_ms']:.3f} ms.",
        f"- PostgreSQL: a snapshot reload of 1,000 keys takes {report['pg_reload_ms_1000_keys']:.1f} ms (every "
        "replica does one per key change).",
        "",
        "**Calculated, not measured** (`bench/scale_model.py`, assumptions in its docstring): each replica serving "
        f"{report['inputs']['per_replica_rps']:,.0f} req/s (the pg+redis figure above), 1,000 tenants with "
        "unbinding rates, a network round trip of 0.2 ms, one key change a second.",
    ]
    for title, rows in tables.items():
        lines += ["", f"*{title}*", "",
                  "| replicas | fleet req/s | Redis ops/s | Redis load | added per request (mean) | added p99 "
                  "| PostgreSQL reads/s | key-cache hit rate |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            p99 = f"{r.added_p99_ms:.2f} ms" if r.added_p99_ms is not None else "saturated"
            mean = f"{r.added_mean_us:.1f} µs" if r.added_p99_ms is not None else "—"
            lines.append(f"| {r.replicas:,} | {r.fleet_rps:,.0f} | {r.redis_ops_per_s:,.0f} | "
                         f"{r.redis_utilisation:.2f} | {mean} | {p99} | {r.pg_reads_per_s:,.0f} | "
                         f"{r.key_cache_hit_rate:.3f} |")
    write_marked_section(BENCHMARKS_MD, "scale-bench", "\n".join(lines), "benchmarks/scale_bench.py")


if __name__ == "__main__":
    raise SystemExit(main())
