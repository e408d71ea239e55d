"""The workloads: each returns rows for the engine and its peers, measured in the same run."""

from __future__ import annotations

import asyncio
import atexit
import compileall
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

import cloudops_execution_engine
from cloudops_execution_engine import (
    DependencyGraphStrategy,
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionResult,
    ShellCommand,
)
from cloudops_execution_engine.config import default_log_dir
from cloudops_execution_engine.plans import check_plan, schedule_for

from .harness import Row, median, percentile
from .targets import ENGINE_DEFAULT, ENGINE_TMPFS, LATENCY, STARTUP, THROUGHPUT

TRUE = shutil.which("true") or "/bin/true"


# One fresh log directory per run, removed at exit: the workloads write hundreds
# of thousands of logs. It is on tmpfs (/dev/shm) unless CEE_BENCH_LOG_ROOT says
# otherwise, so the figures measure the engine rather than the disk: creating a
# file on this VM's ext4 disk took from 40 us to 1 ms depending on its state.
_LOG_ROOT = os.environ.get("CEE_BENCH_LOG_ROOT") or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
_LOG_DIR = Path(tempfile.mkdtemp(prefix="cee-bench-logs-", dir=_LOG_ROOT))
atexit.register(shutil.rmtree, _LOG_DIR, ignore_errors=True)


def clear_logs() -> None:
    """Empty the log directory between workloads, so none runs on memory another one left in tmpfs."""
    for entry in os.scandir(_LOG_DIR):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


def _config(**extra: Any) -> ExecutionConfig:
    return ExecutionConfig(log_dir=_LOG_DIR, **extra)


def _filesystem(path: Path) -> str:
    """The type of the filesystem `path` is on, from the longest mount point above it."""
    best, kind = "", "unknown"
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def _log_places() -> dict[str, str]:
    """Where each engine subject's logs go, as the rows say."""
    default = default_log_dir()
    return {
        ENGINE_TMPFS: f"{_LOG_DIR} ({_filesystem(_LOG_DIR)})",
        ENGINE_DEFAULT: f"{default} ({_filesystem(default)})",
    }


@contextmanager
def _default_logs() -> Iterator[None]:
    """The engine's own default log directory; the logs this run adds there are removed after it."""
    place = default_log_dir()
    place.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(place))
    try:
        yield
    finally:
        for name in set(os.listdir(place)) - before:
            path = place / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _engine_config(engine: str, **extra: Any) -> ExecutionConfig:
    """The tmpfs engine's config, or the default log directory's (`log_dir` unset)."""
    return _config(**extra) if engine == ENGINE_TMPFS else ExecutionConfig(**extra)


def _with_logs(engine: str, fn: Callable[[], Any]) -> Any:
    if engine == ENGINE_TMPFS:
        return fn()
    with _default_logs():
        return fn()


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    async def on_event(self, event: object) -> None:
        self.count += 1


# -- throughput -----------------------------------------------------------------


async def _engine_throughput(
    n: int, concurrency: int, *, engine_kind: str = ENGINE_TMPFS, **extra: Any
) -> float:
    counter = _Counter()
    config = _engine_config(engine_kind, max_concurrent_executions=concurrency, **extra)
    engine = ExecutionEngine(config).with_event_handler(counter)
    async with engine:
        start = time.perf_counter()
        ids = [await engine.execute(ExecutionRequest(command=ExecCommand(program=TRUE))) for _ in range(n)]
        for eid in ids:
            await engine.wait(eid)
        elapsed = time.perf_counter() - start
    return n / elapsed


async def _default_dir_throughput(n: int, concurrency: int) -> float:
    return await _engine_throughput(n, concurrency, engine_kind=ENGINE_DEFAULT)


async def _asyncio_throughput(n: int, concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            proc = await asyncio.create_subprocess_exec(
                TRUE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            await proc.communicate()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - start)


def _run_true(_: int = 0) -> int:
    return subprocess.run([TRUE], capture_output=True, check=False).returncode


def _loop_throughput(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        _run_true()
    return n / (time.perf_counter() - start)


def _pool_throughput(n: int, pool: Any) -> float:
    with pool:
        list(pool.map(_run_true, range(min(n, 20))))  # warm the pool up
        start = time.perf_counter()
        list(pool.map(_run_true, range(n), chunksize=1))
        return n / (time.perf_counter() - start)


def _pebble_throughput(n: int, concurrency: int) -> float:
    from pebble import ProcessPool

    with ProcessPool(max_workers=concurrency) as pool:
        for future in [pool.schedule(_run_true) for _ in range(min(n, 20))]:
            future.result()  # warm the pool up
        start = time.perf_counter()
        for future in [pool.schedule(_run_true) for _ in range(n)]:
            future.result()
        return n / (time.perf_counter() - start)


def ensure_gnu_parallel() -> bool:
    """Install GNU parallel with apt-get when it is missing and we may; say whether it is there."""
    if shutil.which("parallel") is not None:
        return True
    apt = shutil.which("apt-get")
    if apt is None:
        return False
    command = [apt, "install", "-y", "-q", "parallel"]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return False
        command = ["sudo", "-n", *command]
    print("installing GNU parallel with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in ([*command[:-3], "update", "-q"], command):
        done = subprocess.run(step, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 and step is command:
            print(f"could not install GNU parallel: {done.stderr.strip()[-300:]}", flush=True)
    return shutil.which("parallel") is not None


def _xargs_throughput(n: int, concurrency: int) -> float:
    data = "\n".join("x" for _ in range(n)) + "\n"
    start = time.perf_counter()
    subprocess.run(["xargs", "-P", str(concurrency), "-n", "1", TRUE], input=data, text=True, check=True)
    return n / (time.perf_counter() - start)


def _parallel_throughput(n: int, concurrency: int) -> float | None:
    if not ensure_gnu_parallel():
        return None
    data = "\n".join("x" for _ in range(n)) + "\n"
    start = time.perf_counter()
    subprocess.run(
        ["parallel", "--will-cite", "-j", str(concurrency), TRUE],
        input=data,
        text=True,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return n / (time.perf_counter() - start)


def _posix_spawn_limit(n: int) -> float:
    """The machine's limit: a tight posix_spawn + waitpid loop in one process per core, all at once.

    Each process times its own loop after a start barrier, so interpreter start-up is not counted.
    """
    cores = os.cpu_count() or 1
    per = n // cores
    code = (
        "import os,sys,time\n"
        "sys.stdin.readline()\n"
        f"t=time.perf_counter()\nfor _ in range({per}):\n"
        f"    os.waitpid(os.posix_spawn({TRUE!r},[{TRUE!r}],{{}}),0)\n"
        "print(time.perf_counter()-t)"
    )
    procs = [
        subprocess.Popen(["python3", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(cores)
    ]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outs = [proc.communicate()[0] for proc in procs]
    return per * cores / max(float(out) for out in outs)


def throughput(n: int = 2000, concurrency: int = 10, rounds: int = 7) -> list[Row]:
    """Executions per second of /bin/true; every subject once per round, alternating.

    Each round starts one subject later than the one before, so that no subject
    always runs first, or always right after the same neighbour.
    """
    subjects: dict[str, Any] = {
        ENGINE_TMPFS: lambda: asyncio.run(_engine_throughput(n, concurrency)),
        ENGINE_DEFAULT: lambda: _with_logs(
            ENGINE_DEFAULT, lambda: asyncio.run(_default_dir_throughput(n, concurrency))
        ),
        "asyncio+semaphore": lambda: asyncio.run(_asyncio_throughput(n, concurrency)),
        "subprocess.run loop": lambda: _loop_throughput(n),
        "ThreadPoolExecutor(10)": lambda: _pool_throughput(n, ThreadPoolExecutor(concurrency)),
        # The same 10 workers as its siblings, not one per core.
        "ProcessPoolExecutor(10)": lambda: _pool_throughput(n, ProcessPoolExecutor(concurrency)),
        "pebble ProcessPool(10)": lambda: _pebble_throughput(n, concurrency),
        "xargs -P 10": lambda: _xargs_throughput(n, concurrency),
        "GNU parallel -j 10": lambda: _parallel_throughput(n, concurrency),
        "posix_spawn loop per core (limit)": lambda: _posix_spawn_limit(n),
    }
    samples: dict[str, list[float]] = {name: [] for name in subjects}
    names = list(subjects)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            value = subjects[name]()
            if value is not None:
                samples[name].append(value)
    rows = []
    places = _log_places()
    for name, values in samples.items():
        if not values:
            continue
        rate = median(values)
        extra: dict[str, Any] = {}
        if name in places:
            extra["logs"] = places[name]
        else:
            # The engine's ratio to this subject: the median's, and the worst round's.
            for engine, label in ((ENGINE_TMPFS, "tmpfs"), (ENGINE_DEFAULT, "default_dir")):
                per_round = [a / b for a, b in zip(samples[engine], values, strict=False)]
                extra[f"{label}_engine_vs"] = round(median(samples[engine]) / rate, 2)
                extra[f"{label}_engine_vs_worst_round"] = round(min(per_round), 2)
        extra["rounds"] = [round(v) for v in values]
        rows.append(Row(THROUGHPUT, name, rate, "exec/s", extra))
    return rows


# -- latency ----------------------------------------------------------------------


async def _engine_latency(n: int, engine_kind: str = ENGINE_TMPFS) -> dict[str, list[float]]:
    started_at: dict[object, float] = {}
    got_started: dict[object, float] = {}

    class Stamp:
        async def on_event(self, event: Any) -> None:
            if event.event_type == "started":
                got_started[event.execution_id] = time.perf_counter()

    out: dict[str, list[float]] = {"execute() call": [], "execute -> started": [], "execute -> completed": []}
    async with ExecutionEngine(_engine_config(engine_kind)).with_event_handler(Stamp()) as engine:
        for i in range(n + 50):
            request = ExecutionRequest(command=ExecCommand(program=TRUE))
            t0 = time.perf_counter()
            eid = await engine.execute(request)
            t1 = time.perf_counter()
            await engine.wait(eid)
            t2 = time.perf_counter()
            started_at[eid] = t0
            if i >= 50:  # warm-up
                out["execute() call"].append(t1 - t0)
                out["execute -> completed"].append(t2 - t0)
        await asyncio.sleep(0.2)
        for key, t0 in list(started_at.items())[50:]:
            if key in got_started:
                out["execute -> started"].append(got_started[key] - t0)
    return out


async def _asyncio_latency(n: int) -> list[float]:
    out = []
    for i in range(n + 50):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            TRUE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        await proc.communicate()
        if i >= 50:
            out.append(time.perf_counter() - t0)
    return out


def latency(n: int = 1000) -> list[Row]:
    """One command at a time: the engine with its logs on tmpfs and in its default directory, and asyncio."""
    places = _log_places()
    engines = {
        kind: _with_logs(kind, lambda: asyncio.run(_engine_latency(n, kind)))  # noqa: B023
        for kind in (ENGINE_TMPFS, ENGINE_DEFAULT)
    }
    peer = asyncio.run(_asyncio_latency(n))
    rows = []
    for kind, measured in engines.items():
        for name, values in measured.items():
            logs = {"logs": places[kind]}
            rows.append(Row(LATENCY, f"{kind} {name} p50", median(values) * 1e6, "us", logs))
            rows.append(Row(LATENCY, f"{kind} {name} p99", percentile(values, 0.99) * 1e6, "us", logs))
    rows.append(Row(LATENCY, "asyncio spawn+wait p50", median(peer) * 1e6, "us"))
    rows.append(Row(LATENCY, "asyncio spawn+wait p99", percentile(peer, 0.99) * 1e6, "us"))
    return rows


# -- plans ------------------------------------------------------------------------------


def _graph_plan(n: int, edges_per_node: int) -> ExecutionPlan:
    deps: dict[int, list[int]] = {}
    for i in range(1, n):
        deps[i] = sorted({max(0, i - 1 - k * 7) for k in range(edges_per_node)})
    commands = [ExecutionRequest(command=ExecCommand(program=TRUE)) for _ in range(n)]
    return ExecutionPlan(commands=commands, strategy=DependencyGraphStrategy(dependencies=deps))


def _schedule_all(plan: ExecutionPlan) -> int:
    schedule = schedule_for(plan)
    ready = list(schedule.initial())
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        newly, _ = schedule.ended(index, True)
        ready.extend(newly)
    return done


def plans() -> list[Row]:
    rows = []
    for n in (10_000, 20_000):
        plan = _graph_plan(n, 2)
        assert isinstance(plan.strategy, DependencyGraphStrategy)
        edges = sum(len(v) for v in plan.strategy.dependencies.values())
        validate = min(_time(lambda: check_plan(plan)) for _ in range(5))  # noqa: B023
        schedule = min(_time(lambda: _schedule_all(plan)) for _ in range(5))  # noqa: B023
        label = f"plan graph {n} cmds/{edges} edges"
        rows.append(Row(label, "validation (check_plan)", validate * 1e3, "ms"))
        rows.append(Row(label, "scheduling, per command", schedule / n * 1e6, "us"))
    rows.append(_plan_end_to_end())
    return rows


def _plan_end_to_end(n: int = 2000) -> Row:
    """Supervisor overhead per command of a real graph plan, beyond running the commands."""
    plan = _graph_plan(n, 2)

    async def go() -> tuple[float, float]:
        async with ExecutionEngine(_config()) as engine:
            t0 = time.perf_counter()
            await engine.wait(await engine.execute_plan(plan))
            graph_time = time.perf_counter() - t0
            flat = ExecutionPlan(
                commands=[ExecutionRequest(command=ExecCommand(program=TRUE)) for _ in range(n)],
                strategy=DependencyGraphStrategy(dependencies={i: [i - 1] for i in range(1, n)}),
            )
            t0 = time.perf_counter()
            await engine.wait(await engine.execute_plan(flat))
            return graph_time, time.perf_counter() - t0

    graph_time, chain_time = asyncio.run(go())
    return Row(
        f"plan graph {n} cmds end to end",
        "engine wall time per command",
        graph_time / n * 1e6,
        "us",
        {"chain_per_cmd_us": round(chain_time / n * 1e6, 1)},
    )


def _time(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- memory ---------------------------------------------------------------------------


async def _retain(engine: ExecutionEngine, count: int) -> None:
    ids = []
    for _ in range(count):
        ids.append(await engine.execute(ExecutionRequest(command=ExecCommand(program=TRUE))))
        if len(ids) >= 200:
            for eid in ids:
                await engine.wait(eid)
            ids.clear()
    for eid in ids:
        await engine.wait(eid)


def memory(retained: int = 100_000, limit: int = 1_000) -> list[Row]:
    """Supervisor and worker memory idle and after `retained` finished executions, kept or bounded."""

    async def go(max_retained: int | None) -> tuple[float, float, list[int], list[int]]:
        me = psutil.Process()
        config = _config(stream_output=False, max_retained_executions=max_retained)
        async with ExecutionEngine(config) as engine:
            workers = [c for c in me.children() if c.is_running()]
            idle_workers = [w.memory_full_info().uss for w in workers]
            started = me.memory_info().rss
            await _retain(engine, retained)
            after = me.memory_info().rss
            busy_workers = [w.memory_full_info().uss for w in workers]
        return started, after, idle_workers, busy_workers

    # Bounded first: the unbounded run leaves the heap large behind it.
    bounded_start, bounded_after, _, _ = asyncio.run(go(limit))
    started, after, idle_workers, busy_workers = asyncio.run(go(None))
    return [
        Row("memory", "supervisor RSS, engine idle", started / 2**20, "MiB"),
        Row("memory", f"supervisor RSS after {retained} retained", after / 2**20, "MiB"),
        Row(
            "memory",
            "per-worker USS idle",
            median(idle_workers) / 2**20,
            "MiB",
            {"workers": len(idle_workers)},
        ),
        Row("memory", f"per-worker USS after {retained} runs", median(busy_workers) / 2**20, "MiB"),
        Row("memory", "bytes per retained execution", (after - started) / retained, "B"),
        Row(
            "memory",
            f"supervisor RSS growth, {retained} runs, max_retained_executions={limit}",
            (bounded_after - bounded_start) / 2**20,
            "MiB",
        ),
    ]


# -- output ------------------------------------------------------------------------------


def output(gib: float = 1.0, handler_lines: int = 2_000_000, rounds: int = 3) -> list[Row]:
    """Bytes per second to log and result, and lines per second to a counting handler; medians of rounds."""
    size = int(gib * 2**30)
    line = "x" * 79
    produce = f"yes {line} | head -c {size}"

    async def to_log(kind: str) -> float:
        async with ExecutionEngine(_engine_config(kind, stream_output=False)) as engine:
            t0 = time.perf_counter()
            eid = await engine.execute(ExecutionRequest(command=ShellCommand(command=produce)))
            await engine.wait(eid)
            rate = size / (time.perf_counter() - t0)
            engine.get_log_path(eid).unlink()
            return rate

    async def to_handler() -> tuple[float, int]:
        counter = _Counter()
        async with ExecutionEngine(_config()).with_event_handler(counter) as engine:
            command = f"yes {line} | head -n {handler_lines}"
            t0 = time.perf_counter()
            eid = await engine.execute(ExecutionRequest(command=ShellCommand(command=command)))
            await engine.wait(eid)
            await engine.shutdown()  # drains the handler
            return handler_lines / (time.perf_counter() - t0), counter.count

    def shell_redirect(kind: str) -> float:
        # The same filesystem as that engine's log.
        place = _LOG_DIR if kind == ENGINE_TMPFS else default_log_dir()
        with tempfile.TemporaryDirectory(dir=place) as scratch:
            t0 = time.perf_counter()
            subprocess.run(["bash", "-c", f"{produce} > {scratch}/out"], check=True)
            return size / (time.perf_counter() - t0)

    kinds = (ENGINE_TMPFS, ENGINE_DEFAULT)
    baselines: dict[str, list[float]] = {kind: [] for kind in kinds}
    engine_rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    line_rates, delivered = [], 0
    for _ in range(rounds):
        for kind in kinds:
            baselines[kind].append(_with_logs(kind, lambda: shell_redirect(kind)))  # noqa: B023
            engine_rates[kind].append(_with_logs(kind, lambda: asyncio.run(to_log(kind))))  # noqa: B023
        rate, delivered = asyncio.run(to_handler())
        line_rates.append(rate)
    lines_rate = median(line_rates)
    places = _log_places()
    rows = []
    for kind in kinds:
        baseline, engine_rate = median(baselines[kind]), median(engine_rates[kind])
        logs = places[kind]
        rows.append(
            Row(
                f"output {gib:g} GiB of 80-byte lines",
                f"{kind}, to log + result",
                engine_rate / 2**20,
                "MiB/s",
                {"vs_shell_redirect": round(engine_rate / baseline, 2), "logs": logs},
            )
        )
        rows.append(
            Row(
                f"output {gib:g} GiB of 80-byte lines",
                f"shell redirect to a file beside the {kind} logs",
                baseline / 2**20,
                "MiB/s",
                {"file": logs},
            )
        )
    return [
        *rows,
        Row(
            f"output {handler_lines} lines",
            "engine, lines to a counting handler",
            lines_rate,
            "lines/s",
            {"events": delivered},
        ),
    ]


# -- cancel and timeout ---------------------------------------------------------------


def cancel_and_timeout(trees: int = 20, timeouts: int = 100) -> list[Row]:
    async def go() -> tuple[list[float], list[float]]:
        cancel_times: list[float] = []
        errors: list[float] = []
        async with ExecutionEngine(_config(max_concurrent_executions=10)) as engine:
            for _ in range(trees):
                eid = await engine.execute(
                    ExecutionRequest(
                        command=ShellCommand(
                            command="for i in $(seq 99); do sleep 60 & done; echo ready; wait"
                        )
                    )
                )
                async for event in engine.events(eid):
                    if event.event_type == "stdout":
                        break
                t0 = time.perf_counter()
                await engine.cancel(eid)
                await engine.wait(eid)  # reported only once every process of the tree is gone
                cancel_times.append(time.perf_counter() - t0)
            ids = [
                await engine.execute(
                    ExecutionRequest(command=ExecCommand(program="sleep", args=["5"]), timeout_ms=200)
                )
                for _ in range(timeouts)
            ]
            for eid in ids:
                result = await engine.wait(eid)
                assert isinstance(result, ExecutionResult)
                errors.append(result.duration.total_seconds() - 0.2)
        return cancel_times, errors

    cancel_times, signed = asyncio.run(go())
    errors = [abs(error) for error in signed]
    # Diagnostics beside the p99: the spread of the tail, and the earliest end (never before the timeout).
    spread = {
        "p90_ms": round(percentile(errors, 0.9) * 1e3, 2),
        "max_ms": round(max(errors) * 1e3, 2),
        "earliest_ms": round(min(signed) * 1e3, 2),
    }
    return [
        Row("cancel 100-process tree", "cancel() -> tree gone p50", median(cancel_times) * 1e3, "ms"),
        Row(
            "cancel 100-process tree", "cancel() -> tree gone p99", percentile(cancel_times, 0.99) * 1e3, "ms"
        ),
        Row("timeout 200 ms x100", "|duration - timeout| p50", median(errors) * 1e3, "ms"),
        Row("timeout 200 ms x100", "|duration - timeout| p99", percentile(errors, 0.99) * 1e3, "ms", spread),
    ]


# -- start-up -------------------------------------------------------------------------


def _wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=True)
    return time.perf_counter() - t0


def startup(runs: int = 15) -> list[Row]:
    """A fresh interpreter's `import cloudops_execution_engine`, and the CLI running `true`, wall clock."""
    timed_import = (
        "import time; t = time.perf_counter(); import cloudops_execution_engine; "
        "print(time.perf_counter() - t)"
    )
    # Compiled as pip compiles an installed package: with PYTHONDONTWRITEBYTECODE set, or a
    # source changed since its bytecode was written, every run would compile modules again.
    compileall.compile_dir(Path(cloudops_execution_engine.__file__).parent, quiet=1)
    imports, bare, cli_runs = [], [], []
    cli = shutil.which("cloudops-exec") or str(Path(sys.executable).with_name("cloudops-exec"))
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", timed_import], capture_output=True, text=True, check=True
        )
        imports.append(float(done.stdout))
        bare.append(_wall([sys.executable, "-c", "pass"]))
        with _default_logs():
            cli_runs.append(_wall([cli, "run", "--", TRUE]))
    return [
        Row(STARTUP, "import cloudops_execution_engine p50", median(imports) * 1e3, "ms"),
        Row(STARTUP, "cloudops-exec run -- true, wall p50", median(cli_runs) * 1e3, "ms"),
        Row(STARTUP, "python -c pass, wall p50 (for scale)", median(bare) * 1e3, "ms"),
    ]


# -- the Ray backend ----------------------------------------------------------------


async def _engine_round_trip(n: int, **extra: Any) -> list[float]:
    out = []
    async with ExecutionEngine(_config(**extra)) as engine:
        for i in range(n + 20):
            t0 = time.perf_counter()
            await engine.wait(await engine.execute(ExecutionRequest(command=ExecCommand(program=TRUE))))
            if i >= 20:
                out.append(time.perf_counter() - t0)
    return out


def ray_backend(n: int = 2000, concurrency: int = 10, rounds: int = 3) -> list[Row]:
    """The same workload on the local pool and on worker actors of a Ray cluster on this machine."""
    # Read by Ray when imported: keep the local cluster on loopback.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from cloudops_execution_engine import RayConfig

    # A cluster of its own: without an address, Ray joins the last one started on this machine.
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        remote: dict[str, Any] = {"ray": RayConfig(workers=2)}
        subjects: dict[str, Any] = {
            "local pool": lambda: asyncio.run(_engine_throughput(n, concurrency)),
            "Ray, 2 worker actors": lambda: asyncio.run(_engine_throughput(n, concurrency, **remote)),
        }
        samples: dict[str, list[float]] = {name: [] for name in subjects}
        for _ in range(rounds):
            for name, fn in subjects.items():
                samples[name].append(fn())
        local_rate = median(samples["local pool"])
        rows = [
            Row(
                "backend /bin/true x2000 @10",
                name,
                median(values),
                "exec/s",
                {"vs_local": round(median(values) / local_rate, 2)},
            )
            for name, values in samples.items()
        ]
        for name, extra in (("local pool", {}), ("Ray, 2 worker actors", remote)):
            trips = asyncio.run(_engine_round_trip(200, **extra))
            rows.append(Row("backend execute -> completed", f"{name} p50", median(trips) * 1e6, "us"))
            rows.append(
                Row("backend execute -> completed", f"{name} p99", percentile(trips, 0.99) * 1e6, "us")
            )
        return rows
    finally:
        ray.shutdown()
