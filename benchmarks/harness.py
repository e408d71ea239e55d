"""Timing helpers and the table/JSON report."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

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


class Judged(Protocol):
    """A target beside its figure (see `targets.Verdict`)."""

    target: str
    goal: str
    measured: str
    met: bool | None

    @property
    def word(self) -> str: ...


def report(rows: list[Row], out: Path, verdicts: Sequence[Judged] = ()) -> None:
    """Print the rows, then each target beside its figure; write both, with the machine, as JSON."""
    width = max(len(r.workload) for r in rows)
    swidth = max(len(r.subject) for r in rows)
    print(f"\n{'workload':<{width}}  {'subject':<{swidth}}  {'value':>14}  unit")
    print("-" * (width + swidth + 30))
    for r in rows:
        extra = "  " + ", ".join(f"{k}={v}" for k, v in r.extra.items()) if r.extra else ""
        print(f"{r.workload:<{width}}  {r.subject:<{swidth}}  {r.value:>14.3f}  {r.unit}{extra}")
    if verdicts:
        _print_targets(verdicts)
    out.parent.mkdir(parents=True, exist_ok=True)
    judged = [{"target": v.target, "goal": v.goal, "measured": v.measured, "met": v.met} for v in verdicts]
    out.write_text(
        json.dumps({"machine": machine(), "rows": [asdict(r) for r in rows], "targets": judged}, indent=2)
    )
    print(f"\nwritten to {out}")


def _print_targets(verdicts: Sequence[Judged]) -> None:
    twidth = max(len(v.target) for v in verdicts)
    gwidth = max(len(v.goal) for v in verdicts)
    mwidth = max(len(v.measured) for v in verdicts)
    print(f"\n{'target':<{twidth}}  {'goal':<{gwidth}}  {'measured':<{mwidth}}  verdict")
    print("-" * (twidth + gwidth + mwidth + 20))
    for v in verdicts:
        print(f"{v.target:<{twidth}}  {v.goal:<{gwidth}}  {v.measured:<{mwidth}}  {v.word}")
    met = sum(v.met is True for v in verdicts)
    missed = sum(v.met is False for v in verdicts)
    print(f"{met} met, {missed} not met, {len(verdicts) - met - missed} not measured in this run")
