"""Timing helpers and the table/JSON report."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil


@dataclass
class Row:
    workload: str
    subject: str
    value: float
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def report(rows: list[Row], out: Path) -> None:
    width = max(len(r.workload) for r in rows)
    swidth = max(len(r.subject) for r in rows)
    print(f"\n{'workload':<{width}}  {'subject':<{swidth}}  {'value':>14}  unit")
    print("-" * (width + swidth + 30))
    for r in rows:
        extra = "  " + ", ".join(f"{k}={v}" for k, v in r.extra.items()) if r.extra else ""
        print(f"{r.workload:<{width}}  {r.subject:<{swidth}}  {r.value:>14.3f}  {r.unit}{extra}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\nwritten to {out}")
