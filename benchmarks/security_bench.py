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
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_bench as sb

MD_START = "<!-- security-bench:start (written by benchmarks/security_bench.py; edits inside are overwritten) -->"
MD_END = "<!-- security-bench:end -->"
TARGET_RPS_LOSS = 0.05  # the issue: <= 5 % throughput loss
TARGET_P99_GAIN = 0.10  # and <= 10 % p99 increase


def make_keys(scratch: Path) -> tuple[Path, str]:
    from bastion.guard.keystore import KeyStore
    from bastion.guard.principal import Limits

    db = scratch / "keys.db"
    store = KeyStore(db)
    # limits far above what the load reaches: both are counted on every request, never hit
    token, _ = store.create_key(
        "bench", models=[sb.MODEL], limits=Limits(rate_per_s=1e6, burst=1_000_000, quota=10**9, quota_period="day")
    )
    store.close()
    return db, token


def launch(ctx: sb.Context, mode: str, keys_db: Path) -> sb.Launch:
    base = ctx.launch(sb.Row("bastion", 1, "json1"))
    argv = [a for a in base.argv if a not in ("--insecure-no-auth", "--no-audit")]
    if mode == "open":
        argv += ["--insecure-no-auth", "--no-audit"]
    elif mode == "auth-only":
        argv += ["--keys", str(keys_db), "--no-audit"]
    else:
        argv += ["--keys", str(keys_db)]
    return replace(base, argv=argv)


def wait_ready(server: sb.Server, timeout: float = sb.STARTUP_TIMEOUT_S) -> None:
    """Server readiness only: it is open, strict (every model loaded) and needs no key,
    while the model's readiness follows the key's scope."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc is not None
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if sb.http("GET", f"{server.base}/v2/health/ready", timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{server.log_tail()}")


def measure(ctx: sb.Context, mode: str, keys_db: Path, body: sb.Body, duration: float, log: Path) -> dict[str, Any]:
    with sb.Server(sb.Row("bastion", 1, f"json1-{mode}"), launch(ctx, mode, keys_db), log) as server:
        wait_ready(server)
        url = f"{server.base}{sb.infer_path()}"
        sb.run_load("wrk", url, body, 3, 16, ctx.scratch)  # warm-up
        result, _, _ = sb.run_load("wrk", url, body, duration, 16, ctx.scratch)
    if result.errors:
        raise RuntimeError(f"{mode}: {result.errors} errors ({result.status_counts}); see {log}")
    return {"rps": result.rps, "p50_ms": result.latency_ms["p50"], "p99_ms": result.latency_ms["p99"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per measurement")
    p.add_argument("--rounds", type=int, default=3, help="open/guarded pairs, alternating")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    rows: dict[str, list[dict[str, Any]]] = {"open": [], "auth-only": [], "guarded": []}
    with tempfile.TemporaryDirectory(prefix="bastion-secbench-") as tmp:
        scratch = Path(tmp)
        repository = sb.single_model_repository(sb.build_repository(scratch), scratch)
        ctx = sb.Context(repository, scratch)
        keys_db, token = make_keys(scratch)
        plain = sb.write_bodies(scratch / "bodies")["json1"]
        keyed = replace(plain, key="json1-auth", headers={**plain.headers, "Authorization": f"Bearer {token}"})
        bodies = {"open": plain, "auth-only": keyed, "guarded": keyed}
        for r in range(args.rounds):
            order = ("open", "auth-only", "guarded") if r % 2 == 0 else ("guarded", "auth-only", "open")
            for mode in order:
                m = measure(ctx, mode, keys_db, bodies[mode], args.duration, scratch / f"{mode}-{r}.log")
                rows[mode].append(m)
                print(f"round {r + 1} {mode:8s} {m['rps']:9.0f} req/s  p99 {m['p99_ms']:.2f} ms", file=sys.stderr)
        audit_records = sum(1 for f in (keys_db.parent / "audit").glob("*.jsonl") for _ in f.open("rb"))
    med = {mode: {k: statistics.median(m[k] for m in ms) for k in ("rps", "p50_ms", "p99_ms")}
           for mode, ms in rows.items()}
    rps_ratio = med["guarded"]["rps"] / med["open"]["rps"]
    p99_ratio = med["guarded"]["p99_ms"] / med["open"]["p99_ms"]
    auth_rps_ratio = med["auth-only"]["rps"] / med["open"]["rps"]
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()}, {sb.os.cpu_count()} cores",
        "command": "python benchmarks/security_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": rows,
        "median": med,
        "throughput_ratio": rps_ratio,
        "p99_ratio": p99_ratio,
        "auth_only_throughput_ratio": auth_rps_ratio,
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
        "| server | req/s | p50 | p99 |",
        "|---|---|---|---|",
    ]
    for mode in ("open", "auth-only", "guarded"):
        m = med[mode]
        lines.append(f"| {mode} | {m['rps']:,.0f} | {m['p50_ms']:.2f} ms | {m['p99_ms']:.2f} ms |")
    loss = 1 - report["throughput_ratio"]
    gain = report["p99_ratio"] - 1
    lines += [
        "",
        f"- throughput guarded/open: **{report['throughput_ratio']:.3f}** ({loss:+.1%} loss; target ≤ 5 %)",
        f"- p99 guarded/open: **{report['p99_ratio']:.3f}** ({gain:+.1%}; target ≤ +10 %)",
        f"- auth + rate limit + quota alone (`--no-audit`), throughput vs open: "
        f"**{report['auth_only_throughput_ratio']:.3f}**",
        f"- audit records written during the guarded rounds: {report['audit_records_written']:,}",
    ]
    block = f"{MD_START}\n" + "\n".join(lines) + f"\n{MD_END}"
    text = sb.BENCHMARKS_MD.read_text(encoding="utf-8")
    if MD_START in text and MD_END in text:
        head, rest = text.split(MD_START, 1)
        text = head + block + rest.split(MD_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    sb.BENCHMARKS_MD.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
