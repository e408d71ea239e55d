"""The performance targets, each beside the figure this run measured for it: met, not met, or not measured.

A target reads the rows the workloads returned; one whose workload did not run
says so and which workload measures it. Where the engine ran twice, once with
its logs on tmpfs and once in its default log directory, each gets a line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .harness import Row

# The subjects the workloads give the engine, by where its logs go.
ENGINE_TMPFS = "engine [logs on tmpfs]"
ENGINE_DEFAULT = "engine [default log dir]"
ENGINES = (ENGINE_TMPFS, ENGINE_DEFAULT)

THROUGHPUT = "throughput /bin/true x2000 @10"
LATENCY = "latency /bin/true"
OUTPUT = "output 1 GiB of 80-byte lines"
LINES = "output 2000000 lines"
CANCEL = "cancel 100-process tree"
TIMEOUT = "timeout 200 ms x100"
STARTUP = "start-up"
RAY = "backend /bin/true x2000 @10"
RAY_LATENCY = "backend execute -> completed"


@dataclass
class Verdict:
    target: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run

    @property
    def word(self) -> str:
        return {True: "met", False: "NOT MET", None: "not measured"}[self.met]


class _Rows:
    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def get(self, workload: str, subject: str) -> Row | None:
        """The row of `subject` in `workload`; an output workload is matched whatever its size."""
        sized = workload.startswith("output ")
        for row in self.rows:
            same = row.workload == workload or (sized and row.workload.split()[-1] == workload.split()[-1])
            if same and row.subject == subject:
                return row
        return None


def _missing(target: str, goal: str, workload: str) -> Verdict:
    return Verdict(target, goal, f"not measured: run `python -m benchmarks {workload}`", None)


def _throughput(rows: _Rows, peer: str, ratio: float) -> list[Verdict]:
    """The engine against one peer in every round of the same run, not only the median."""
    out = []
    for engine in ENGINES:
        target = f"2,000 x /bin/true @10, {engine} vs {peer}"
        goal = f">= {ratio}x in every round"
        mine, theirs = rows.get(THROUGHPUT, engine), rows.get(THROUGHPUT, peer)
        if mine is None or theirs is None:
            out.append(_missing(target, goal, "throughput"))
            continue
        per_round = [a / b for a, b in zip(mine.extra["rounds"], theirs.extra["rounds"], strict=False)]
        worst, middle = min(per_round), mine.value / theirs.value
        measured = f"{worst:.2f}x worst round, {middle:.2f}x median, {len(per_round)} rounds"
        out.append(Verdict(target, goal, measured, worst >= ratio))
    return out


def _latency(rows: _Rows) -> list[Verdict]:
    out = []
    asyncio_p50 = rows.get(LATENCY, "asyncio spawn+wait p50")
    for engine in ENGINES:
        call = rows.get(LATENCY, f"{engine} execute() call p50")
        target = f"execute() call p50, {engine}"
        if call is None:
            out.append(_missing(target, "< 50 us", "latency"))
        else:
            out.append(Verdict(target, "< 50 us", f"{call.value:.0f} us", call.value < 50))
        done = rows.get(LATENCY, f"{engine} execute -> completed p50")
        target = f"execute -> completed p50, {engine}"
        goal = "<= asyncio - 0.2 ms"
        if done is None or asyncio_p50 is None:
            out.append(_missing(target, goal, "latency"))
            continue
        gap = (done.value - asyncio_p50.value) / 1e3
        measured = f"{done.value:.0f} us vs asyncio {asyncio_p50.value:.0f} us: asyncio {gap:+.2f} ms"
        out.append(Verdict(target, goal, measured, gap <= -0.2))
    return out


def _output(rows: _Rows) -> list[Verdict]:
    out = []
    for engine in ENGINES:
        row = rows.get(OUTPUT, f"{engine}, to log + result")
        target = f"output to log + result vs a shell redirect to the same filesystem, {engine}"
        if row is None:
            out.append(_missing(target, ">= 0.9x", "output"))
            continue
        ratio = row.extra["vs_shell_redirect"]
        out.append(Verdict(target, ">= 0.9x", f"{ratio:.2f}x ({row.value:.0f} MiB/s)", ratio >= 0.9))
    row = rows.get(LINES, "engine, lines to a counting handler")
    target, goal = "lines per second to a counting handler", ">= 1,000,000"
    if row is None:
        out.append(_missing(target, goal, "output"))
    else:
        out.append(Verdict(target, goal, f"{row.value:,.0f}", row.value >= 1_000_000))
    return out


def _bound(
    workload: str, subject: str, target: str, limit: float, unit: str, run: str
) -> Callable[[_Rows], Verdict]:
    def check(rows: _Rows) -> Verdict:
        goal = f"<= {limit:g} {unit}"
        row = rows.get(workload, subject)
        if row is None:
            return _missing(target, goal, run)
        return Verdict(target, goal, f"{row.value:.1f} {unit}", row.value <= limit)

    return check


_BOUNDS = [
    _bound(CANCEL, "cancel() -> tree gone p50", "cancel -> 100-process tree gone, p50", 15, "ms", "cancel"),
    _bound(CANCEL, "cancel() -> tree gone p99", "cancel -> 100-process tree gone, p99", 30, "ms", "cancel"),
    _bound(TIMEOUT, "|duration - timeout| p99", "timeout precision, p99", 5, "ms", "cancel"),
    _bound(
        STARTUP,
        "import cloudops_execution_engine p50",
        "`import cloudops_execution_engine`",
        100,
        "ms",
        "startup",
    ),
    _bound(
        STARTUP,
        "cloudops-exec run -- true, wall p50",
        "`cloudops-exec run -- true`, wall",
        250,
        "ms",
        "startup",
    ),
]


def _ray(rows: _Rows) -> list[Verdict]:
    target, goal = "Ray backend vs local pool, throughput", ">= 0.8x"
    row = rows.get(RAY, "Ray, 2 worker actors")
    out = [
        _missing(target, goal, "ray")
        if row is None
        else Verdict(target, goal, f"{row.extra['vs_local']:.2f}x", row.extra["vs_local"] >= 0.8)
    ]
    target, goal = "Ray backend vs local pool, execute -> completed p50", "<= 1.5x"
    ray, local = rows.get(RAY_LATENCY, "Ray, 2 worker actors p50"), rows.get(RAY_LATENCY, "local pool p50")
    if ray is None or local is None:
        out.append(_missing(target, goal, "ray"))
    else:
        ratio = ray.value / local.value
        out.append(
            Verdict(target, goal, f"{ratio:.2f}x ({ray.value:.0f} us vs {local.value:.0f} us)", ratio <= 1.5)
        )
    return out


def evaluate(rows: list[Row]) -> list[Verdict]:
    """Every target, in the order the performance table lists them."""
    found = _Rows(rows)
    verdicts = [
        *_throughput(found, "asyncio+semaphore", 2.0),
        *_throughput(found, "ThreadPoolExecutor(10)", 1.4),
        *_throughput(found, "pebble ProcessPool(10)", 1.25),
        *_latency(found),
        *_output(found),
    ]
    verdicts += [check(found) for check in _BOUNDS]
    verdicts += _ray(found)
    return verdicts
