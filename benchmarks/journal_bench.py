"""The journal's costs: throughput with and without it, listing a large history, bytes, recovery.

- throughput of /bin/true with the journal on and off, alternating rounds in
  the same run (goal: on >= 0.95x off);
- journal bytes per execution, from the file after those runs;
- `list_executions(limit=100)` p50/p99 over 1,000,000 rows, unfiltered and
  with each filter; the rows are written with SQL directly (executemany),
  shaped as the engine writes them, with serde JSON of a request and result;
- recovery: `start()` on a journal whose dead owner left 100,000 executions
  running, against `start()` on a journal with nothing to recover; and
  `start()` on the 1,000,000-row history, whose ids are read after it.

The journal goes on the disk (the system's temp directory), not on tmpfs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cloudops_execution_engine import (
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    ResourceUsage,
)
from cloudops_execution_engine.actors.journal import open_connection
from cloudops_execution_engine.actors.journal_schema import migrate

from .harness import Row, median, percentile
from .workloads import _LOG_DIR, TRUE, _engine_throughput, clear_logs

__all__ = ["journal"]


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="cee-bench-journal-"))


def _throughput(n: int, concurrency: int, rounds: int) -> list[Row]:
    samples: dict[str, list[float]] = {"off": [], "on": []}
    sizes: list[float] = []
    for round_ in range(rounds):
        order = ["off", "on"] if round_ % 2 == 0 else ["on", "off"]
        for mode in order:
            scratch = _scratch()
            try:
                extra: dict[str, Any] = {}
                if mode == "on":
                    extra["journal"] = scratch / "journal.sqlite3"
                samples[mode].append(asyncio.run(_engine_throughput(n, concurrency, **extra)))
                if mode == "on":
                    files = [scratch / "journal.sqlite3", scratch / "journal.sqlite3-wal"]
                    sizes.append(sum(f.stat().st_size for f in files if f.exists()) / n)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
                clear_logs()
    off, on = median(samples["off"]), median(samples["on"])
    name = f"journal /bin/true x{n} @{concurrency}"
    rounds_of = {mode: [round(v) for v in values] for mode, values in samples.items()}
    return [
        Row(name, "engine, no journal", off, "exec/s", {"rounds": rounds_of["off"]}),
        Row(
            name,
            "engine, journal",
            on,
            "exec/s",
            {"rounds": rounds_of["on"], "on_vs_off": round(on / off, 3)},
        ),
        Row("journal size", "bytes per execution", median(sizes), "B", {"executions": n}),
    ]


# -- a large history, written directly -------------------------------------------------

_INSERT = (
    "INSERT INTO entries (seq, id, kind, plan_id, idx, run, status, submitted_us, started_us, ended_us, "
    "duration_ns, pid, log_path, request, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _shaped_rows(
    count: int, first_seq: int, status_of: Any, start_us: int, run: int
) -> list[tuple[Any, ...]]:
    """Rows as the engine writes them for `true`, with real request and result JSON."""
    log_root = _LOG_DIR
    rows = []
    for offset in range(count):
        seq = first_seq + offset
        key = uuid.uuid4()
        submitted = start_us + seq * 1000
        status = status_of(seq)
        request = ExecutionRequest(id=key, command=ExecCommand(program=TRUE))
        final = status not in ("pending", "running")
        result_json = None
        if final:
            began = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=submitted + 300)
            result_json = ExecutionResult(
                id=key,
                status=ExecutionStatus(status),
                exit_code=0 if status == "completed" else 1,
                duration=timedelta(microseconds=900),
                started_at=began,
                completed_at=began + timedelta(microseconds=900),
                log_path=log_root / f"{key}.log",
                error=None if status == "completed" else "Command failed with exit code 1",
                resource_usage=ResourceUsage(user_cpu_s=0.0, system_cpu_s=0.001, max_rss_bytes=1_400_000),
            ).model_dump_json()
        rows.append(
            (
                seq,
                key.bytes,
                "command",
                None,
                -1,
                run,
                status,
                submitted,
                submitted + 300 if status != "pending" else None,
                submitted + 1200 if final else None,
                900_000 if final else None,
                4242 if status != "pending" else None,
                str(log_root / f"{key}.log"),
                request.model_dump_json(),
                result_json,
            )
        )
    return rows


def _build(path: Path, count: int, status_of: Any, dead_pid: int | None = None) -> None:
    conn = open_connection(path)
    migrate(conn, path)
    run = conn.execute(
        "INSERT INTO runs (pid, hostname, opened_us, closed_us) VALUES (?, 'bench', 0, ?) RETURNING run",
        (dead_pid or 1, None if dead_pid else 1),
    ).fetchone()[0]
    start_us = int(time.time() * 1_000_000) - count * 1000 - 10_000_000
    chunk = 50_000
    for first in range(1, count + 1, chunk):
        rows = _shaped_rows(min(chunk, count - first + 1), first, status_of, start_us, run)
        conn.execute("BEGIN")
        conn.executemany(_INSERT, rows)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _history_status(seq: int) -> str:
    return "failed" if seq % 10 == 0 else "completed"


async def _list_latencies(path: Path, samples: int) -> dict[str, list[float]]:
    engine = ExecutionEngine(ExecutionConfig(journal=path, log_dir=_LOG_DIR, workers=1))
    async with engine:
        newest = await engine.list_executions(limit=1)
        recent = newest[0].started_at - timedelta(seconds=1)
        old = newest[0].started_at - timedelta(seconds=900)
        cases: dict[str, dict[str, Any]] = {
            "limit=100": {"limit": 100},
            "status=failed, limit=100": {"status": ExecutionStatus.FAILED, "limit": 100},
            "since (last ~1000 rows), limit=100": {"since": recent, "limit": 100},
            "since (last ~900000 rows), limit=100": {"since": old, "limit": 100},
            "status=failed, since (last ~1000), limit=100": {
                "status": ExecutionStatus.FAILED,
                "since": recent,
                "limit": 100,
            },
            "plan_id (no such plan)": {"plan_id": uuid.uuid4(), "limit": 100},
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(samples):
            for name, filters in cases.items():
                began = time.perf_counter()
                await engine.list_executions(**filters)
                times[name].append(time.perf_counter() - began)
    return times


async def _start_time(path: Path) -> float:
    engine = ExecutionEngine(ExecutionConfig(journal=path, log_dir=_LOG_DIR, workers=1))
    began = time.perf_counter()
    await engine.start()
    elapsed = time.perf_counter() - began
    await engine.shutdown()
    return elapsed


def journal(
    n: int = 2000,
    concurrency: int = 10,
    rounds: int = 7,
    history: int = 1_000_000,
    interrupted: int = 100_000,
) -> list[Row]:
    rows = _throughput(n, concurrency, rounds)

    scratch = _scratch()
    try:
        path = scratch / "journal.sqlite3"
        began = time.perf_counter()
        _build(path, history, _history_status)
        built = time.perf_counter() - began
        size = path.stat().st_size
        times = asyncio.run(_list_latencies(path, 200))
        for name, values in times.items():
            extra = {"rows": history, "p99_ms": round(percentile(values, 0.99) * 1000, 3)}
            rows.append(Row("journal list_executions", f"{name} p50", median(values) * 1000, "ms", extra))
            rows.append(
                Row("journal list_executions", f"{name} p99", percentile(values, 0.99) * 1000, "ms", {})
            )
        # The ids of a large journal are read after start(), on the writer thread.
        rows.append(
            Row(
                "journal recovery",
                f"start(), {history} rows, nothing to recover",
                asyncio.run(_start_time(path)) * 1000,
                "ms",
                {},
            )
        )
        rows.append(
            Row(
                "journal size",
                f"{history} rows built with executemany",
                size / history,
                "B/row",
                {"file_mib": round(size / 2**20), "build_s": round(built, 1)},
            )
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    scratch = _scratch()
    try:
        clean = scratch / "clean.sqlite3"
        _build(clean, 1000, _history_status)
        dirty = scratch / "dirty.sqlite3"
        _build(
            dirty,
            interrupted,
            lambda seq: "running" if seq % 2 else "pending",
            dead_pid=os.getpid() + 10_000_000,
        )
        clean_start = asyncio.run(_start_time(clean))
        dirty_start = asyncio.run(_start_time(dirty))
        rows.append(Row("journal recovery", "start(), nothing to recover", clean_start * 1000, "ms", {}))
        rows.append(
            Row(
                "journal recovery",
                f"start(), {interrupted} executions left running/pending",
                dirty_start * 1000,
                "ms",
                {"recovery_ms": round((dirty_start - clean_start) * 1000)},
            )
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows
