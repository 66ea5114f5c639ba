"""The result of one benchmark cell (scenario x framework x load mode), as JSON and Markdown.

Each result carries what is needed to judge and reproduce its figures: the load
parameters, the versions, the machine and the exact command, next to the statistics.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import orjson

from bastion.bench.stats import RunStats

Mode = Literal["open-loop", "saturation", "limit-probe"]  # limit-probe: Bastion, binary, limitprobe.py
SCHEMA = 1


def machine_info() -> dict[str, Any]:
    """Enough about the host to tell two runs' machines apart."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    with_pages = hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names
    if with_pages:
        mem_gib = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "loadavg_before": list(load) if load else None,
    }


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class BenchResult:
    scenario: str  # malware | crypto | image | sentiment
    framework: str  # bastion, ...
    mode: Mode
    payload_bytes: int
    load: dict[str, Any]  # open loop: rate, duration_s, warmup_s, arrival; saturation: connections, ...
    stats: RunStats
    generator: str = "openloop"  # openloop | wrk | hey: their percentiles are computed differently
    cpu_s: float | None = None  # server tree CPU over the measured window
    peak_rss_mib: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=machine_info)
    command: str = ""
    date: str = field(default_factory=utc_now)
    notes: str = ""

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.cpu_s is None or math.isnan(self.cpu_s) or not self.stats.ok:
            return None
        return self.cpu_s / self.stats.ok * 1e6

    @property
    def server_cores(self) -> float | None:
        if self.cpu_s is None or self.stats.duration_s <= 0:
            return None
        return self.cpu_s / self.stats.duration_s

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "scenario": self.scenario,
            "framework": self.framework,
            "mode": self.mode,
            "payload_bytes": self.payload_bytes,
            "load": self.load,
            "generator": self.generator,
            "stats": self.stats.to_dict(samples=samples),
            "cpu_s": self.cpu_s,
            "cpu_us_per_request": self.cpu_us_per_request,
            "peak_rss_mib": self.peak_rss_mib,
            "versions": self.versions,
            "machine": self.machine,
            "command": self.command,
            "date": self.date,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        if d.get("schema", SCHEMA) != SCHEMA:
            raise ValueError(f"result schema {d.get('schema')} is not {SCHEMA}")
        mode = d["mode"]
        if mode not in get_args(Mode):
            raise ValueError(f"unknown mode {mode!r}")
        return cls(
            scenario=d["scenario"],
            framework=d["framework"],
            mode=mode,
            payload_bytes=int(d["payload_bytes"]),
            load=dict(d.get("load", {})),
            stats=RunStats.from_dict(d["stats"]),
            generator=d.get("generator", "openloop"),
            cpu_s=d.get("cpu_s"),
            peak_rss_mib=d.get("peak_rss_mib"),
            versions=dict(d.get("versions", {})),
            machine=dict(d.get("machine", {})),
            command=d.get("command", ""),
            date=d.get("date", ""),
            notes=d.get("notes", ""),
        )

    def to_json(self, *, samples: bool = False) -> str:
        # NaN is not JSON: orjson writes null for it, which from_dict reads back as None.
        return orjson.dumps(self.to_dict(samples=samples), option=orjson.OPT_INDENT_2).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> BenchResult:
        return cls.from_dict(orjson.loads(text))


def save_results(path: Path, results: Sequence[BenchResult], *, samples: bool = False) -> None:
    payload = {"schema": SCHEMA, "results": [r.to_dict(samples=samples) for r in results]}
    path.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))


def load_results(path: Path) -> list[BenchResult]:
    payload = orjson.loads(path.read_bytes())
    return [BenchResult.from_dict(d) for d in payload["results"]]


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _load_label(r: BenchResult) -> str:
    if r.mode == "open-loop":
        return f"{_fmt(r.load.get('rate'), 0)} req/s {r.load.get('arrival', 'fixed')}"
    return f"{r.load.get('connections', '?')} conn"


LATENCY_COLUMNS: tuple[str, ...] = ("min", "p25", "p50", "p75", "p90", "p99", "max")


def render_markdown(results: Iterable[BenchResult]) -> str:
    """One table row per result, in the order given; latency in ms."""
    header = [
        "scenario",
        "framework",
        "mode",
        "load",
        "payload B",
        *(f"{c} ms" for c in LATENCY_COLUMNS),
        "req/s",
        "errors %",
        "server CPU µs/req",
        "peak RSS MiB",
    ]
    align = ["---"] * 4 + ["---:"] * (len(header) - 4)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for r in results:
        lat = r.stats.latency_ms
        cells = [
            r.scenario,
            r.framework,
            r.mode,
            _load_label(r),
            f"{r.payload_bytes:,}",
            *(_fmt(lat.get(c)) for c in LATENCY_COLUMNS),
            _fmt(r.stats.throughput, 1),
            _fmt(100 * r.stats.error_rate, 2),
            _fmt(r.cpu_us_per_request, 0),
            _fmt(r.peak_rss_mib, 0),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_marked_section(path: Path, name: str, section: str, writer: str) -> None:
    """Put ``section`` between ``<!-- NAME:start ... -->`` and ``<!-- NAME:end -->`` in the
    Markdown file ``path``: in place of what was there, or appended (the file is created
    if missing). The start marker is found by its name alone, so a renamed writer still
    replaces its old section instead of adding a second one."""
    start = f"<!-- {name}:start (written by {writer}; edits inside are overwritten) -->"
    end = f"<!-- {name}:end -->"
    block = f"{start}\n{section.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    found = re.search(rf"<!-- {re.escape(name)}:start\b[^\n]*-->", text)
    if found and end in text[found.end() :]:
        text = text[: found.start()] + block + text[found.end() :].split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
