"""Every lab result is a record: what ran (configuration and seed), where, when, and what it found."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import sys
from typing import Any

__all__ = ["machine", "record"]


def machine() -> dict[str, Any]:
    """The attacker's machine, best effort (the lab measures from the client side)."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")), "")
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "torch": _version("torch"),
    }
    try:
        import bastion

        info["bastion"] = bastion.__version__
    except (ImportError, AttributeError):
        pass
    return info


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return None


def _clean(value: Any) -> Any:
    """NaN is not JSON: a metric that could not be measured is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def record(kind: str, config: dict[str, Any], seed: int, result: Any, started: dt.datetime) -> dict[str, Any]:
    """``{"kind", "config", "seed", "machine", "started_at", "seconds", "result"}``; ``result``
    is a dict or has ``as_dict()``."""
    finished = dt.datetime.now(dt.timezone.utc)
    body = result.as_dict() if hasattr(result, "as_dict") else result
    return _clean({
        "kind": kind,
        "config": config,
        "seed": seed,
        "machine": machine(),
        "started_at": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "seconds": round((finished - started).total_seconds(), 3),
        "result": body,
    })
