"""What the guard costs: the serving-core benchmark with auth + rate limit + audit on vs
all off, side by side in one run.

    .venv/bin/python benchmarks/security_bench.py [--duration 20] [--rounds 3]

Both servers serve the same digits ONNX model (1-row JSON requests, wrk, 16
connections). "guarded" runs with a key store: every request carries an API key
(authenticated by keyed hash), its tenant has a rate limit and a daily quota that the
load never reaches (so both are counted on every request, never refused), and each
request is written to the hash-chained audit log. "open" runs with
``--insecure-no-auth --no-audit``; "auth-only" is "guarded" with ``--no-audit``, to show
which part costs what. Rounds alternate the order so drift on this noisy
machine hits both alike; the figures are medians over rounds and the ratios are
guarded / open. Results go to BENCHMARKS.md between this script's markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bastion.bench.frameworks.bastion import BastionFramework
from bastion.bench.models import DEMO_MODEL, build_demo, demo_spec
from bastion.bench.results import machine_info, write_marked_section
from bastion.bench.serving import Body, fresh_dir, make_bodies, measure_bastion

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
CACHE = ROOT / ".bench"  # the demo build, shared with `bastion bench serving`
TARGET_RPS_LOSS = 0.05  # the issue: <= 5 % throughput loss
TARGET_P99_GAIN = 0.10  # and <= 10 % p99 increase


def make_keys(scratch: Path) -> tuple[Path, str]:
    from bastion.guard.keystore import KeyStore
    from bastion.guard.principal import Limits

    db = scratch / "keys.db"
    store = KeyStore(db)
    # limits far above what the load reaches: both are counted on every request, never hit
    token, _ = store.create_key(
        "bench", models=[DEMO_MODEL], limits=Limits(rate_per_s=1e6, burst=1_000_000, quota=10**9, quota_period="day")
    )
    store.close()
    return db, token


def server(mode: str, keys_db: Path) -> BastionFramework:
    """Bastion as the serving benchmark runs it, with the guard switched per mode."""
    auth = ("--insecure-no-auth",) if mode == "open" else ("--keys", str(keys_db))
    audit = ("--audit",) if mode == "guarded" else ("--no-audit",)
    return BastionFramework(extra_args=("--poll-interval", "0", *audit), auth=auth)


def measure(mode: str, keys_db: Path, body: Body, duration: float, workdir: Path) -> dict[str, Any]:
    return measure_bastion(server(mode, keys_db), demo_spec(build_demo(CACHE)), body, duration, workdir, mode)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per measurement")
    p.add_argument("--rounds", type=int, default=3, help="open/guarded pairs, alternating")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    rows: dict[str, list[dict[str, Any]]] = {"open": [], "auth-only": [], "guarded": []}
    scratch = fresh_dir(CACHE / "security-bench")
    keys_db, token = make_keys(scratch)
    plain = make_bodies(demo_spec(build_demo(CACHE)))["json1"]
    keyed = dataclasses.replace(plain, headers={**plain.headers, "Authorization": f"Bearer {token}"})
    bodies = {"open": plain, "auth-only": keyed, "guarded": keyed}
    for r in range(args.rounds):
        order = ("open", "auth-only", "guarded") if r % 2 == 0 else ("guarded", "auth-only", "open")
        for mode in order:
            m = measure(mode, keys_db, bodies[mode], args.duration, scratch / f"{mode}-{r}")
            rows[mode].append(m)
            print(f"round {r + 1} {mode:8s} {m['rps']:9.0f} req/s  p99 {m['p99_ms']:.2f} ms  "
                  f"server CPU {m['cpu_us']:.0f} µs/request", file=sys.stderr)
    audit_records = sum(1 for f in (keys_db.parent / "audit").glob("*.jsonl") for _ in f.open("rb"))
    med = {
        mode: {k: statistics.median(m[k] for m in ms) for k in ("rps", "p50_ms", "p99_ms", "cpu_us")}
        for mode, ms in rows.items()
    }
    rps_ratio = med["guarded"]["rps"] / med["open"]["rps"]
    p99_ratio = med["guarded"]["p99_ms"] / med["open"]["p99_ms"]
    auth_rps_ratio = med["auth-only"]["rps"] / med["open"]["rps"]
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": "{cpu}, {logical_cpus} cores".format(**machine_info()),
        "command": "python benchmarks/security_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": rows,
        "median": med,
        "throughput_ratio": rps_ratio,
        "p99_ratio": p99_ratio,
        "auth_only_throughput_ratio": auth_rps_ratio,
        "cpu_per_request_ratio": med["guarded"]["cpu_us"] / med["open"]["cpu_us"],
        "audit_records_written": audit_records,
    }
    print(json.dumps(report, indent=2))
    if not args.no_write:
        write_markdown(report)
    ok = rps_ratio >= 1 - TARGET_RPS_LOSS and p99_ratio <= 1 + TARGET_P99_GAIN
    return 0 if ok else 1


def write_markdown(report: dict[str, Any]) -> None:
    med = report["median"]
    lines = [
        "## The guard's overhead (auth + rate limit + quota + audit vs all off)",
        "",
        f"{report['date']}, {report['machine']}. Command: `{report['command']}`. Digits ONNX model,",
        f"1-row JSON, wrk with 16 connections, median of {len(report['rounds']['open'])} alternating rounds.",
        "",
        "| server | req/s | p50 | p99 | server CPU per request |",
        "|---|---|---|---|---|",
    ]
    for mode in ("open", "auth-only", "guarded"):
        m = med[mode]
        lines.append(
            f"| {mode} | {m['rps']:,.0f} | {m['p50_ms']:.2f} ms | {m['p99_ms']:.2f} ms | {m['cpu_us']:.0f} µs |"
        )
    loss = 1 - report["throughput_ratio"]
    gain = report["p99_ratio"] - 1
    lines += [
        "",
        f"- throughput guarded/open: **{report['throughput_ratio']:.3f}** ({loss:+.1%} loss; target ≤ 5 %)",
        f"- p99 guarded/open: **{report['p99_ratio']:.3f}** ({gain:+.1%}; target ≤ +10 %)",
        f"- auth + rate limit + quota alone (`--no-audit`), throughput vs open: "
        f"**{report['auth_only_throughput_ratio']:.3f}**",
        f"- server CPU per request guarded/open: {report['cpu_per_request_ratio']:.3f}",
        f"- audit records written during the guarded rounds: {report['audit_records_written']:,}",
    ]
    write_marked_section(BENCHMARKS_MD, "security-bench", "\n".join(lines), "benchmarks/security_bench.py")


if __name__ == "__main__":
    raise SystemExit(main())
