"""Retention: what a RetentionPolicy deletes from the journal, log_dir and memory, and what it never touches.

Commands run one after another here, so that the order they end in, which
decides what is oldest, is the order they were submitted in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from conftest import config, shell

from cloudops_execution_engine import (
    ExecutionConfig,
    ExecutionEngine,
    ExecutionPlan,
    ExecutionStatus,
    IoError,
    NotFound,
    RetentionPolicy,
    RetryPolicy,
    SerialStrategy,
)
from cloudops_execution_engine.actors import journal, journal_writer, retention
from cloudops_execution_engine.actors.records import Record
from cloudops_execution_engine.actors.store import MemoryStore

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

DAY = 86_400.0


def journalled(tmp_path: Path, **overrides: Any) -> Any:
    return config(tmp_path, journal=tmp_path / "journal.sqlite3", **overrides)


def bystanders(log_dir: Path) -> dict[Path, bytes]:
    """Files in log_dir that are not `<uuid>.log`: retention must leave them alone, however old."""
    files = {
        log_dir / "notes.txt": b"keep me",
        log_dir / "not-a-uuid.log": b"keep me too",
        log_dir / f"{uuid4()}.log.bak": b"and me",
        log_dir / f"{str(uuid4()).upper()}.log": b"not our spelling",
    }
    for path, data in files.items():
        path.write_bytes(data)
        os.utime(path, (time.time() - 10 * DAY, time.time() - 10 * DAY))
    return files


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Poll a condition while the engine's loop runs; fail naming it if it never holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def gone(path: Path) -> bool:
    return not path.exists()


def age(path: Path, days: float) -> None:
    moment = time.time() - days * DAY
    os.utime(path, (moment, moment))


async def run_all(engine: ExecutionEngine, *commands: str) -> list[UUID]:
    """Run each command to its end, one after another."""
    ids = []
    for command in commands:
        eid = await engine.execute(shell(command))
        await engine.wait(eid, timeout=20)
        ids.append(eid)
    return ids


async def test_max_executions_keeps_the_newest_rows_and_logs_and_nothing_else_is_touched(
    tmp_path: Path,
) -> None:
    """At start: journal rows and logs beyond the newest N go, oldest first; other files in log_dir stay."""
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        ids = await run_all(engine, *(f"echo {i}" for i in range(6)))
        log_paths = [engine.get_log_path(eid) for eid in ids]
    others = bystanders(tmp_path / "logs")
    policy = RetentionPolicy(max_executions=2)
    async with ExecutionEngine(journalled(tmp_path, retention=policy)) as engine:
        assert [s.id for s in await engine.list_executions()] == ids[-2:]
        for eid in ids[:-2]:
            with pytest.raises(NotFound):
                await engine.get_status(eid)
        assert [p.exists() for p in log_paths] == [False] * 4 + [True] * 2
        assert "echo 5" in await engine.read_logs(ids[-1])
    assert {p: p.read_bytes() for p in others} == others


async def test_max_age_deletes_what_ended_long_ago_whole_plans_included(tmp_path: Path) -> None:
    """Rows and logs of executions (and plans with their commands) that ended before the cutoff go."""
    journal = tmp_path / "journal.sqlite3"
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        old = await run_all(engine, "echo old")
        plan = ExecutionPlan(commands=[shell("echo a"), shell("echo b")], strategy=SerialStrategy())
        await engine.execute_plan(plan)
        await engine.wait(plan.id, timeout=20)
        new = await run_all(engine, "echo new")
        old_logs = [engine.get_log_path(i) for i in [*old, *(c.id for c in plan.commands)]]
    # Ten days pass for the first command and the plan.
    conn = sqlite3.connect(journal)
    stale = [i.bytes for i in [*old, plan.id, *(c.id for c in plan.commands)]]
    shift = int(10 * DAY * 1_000_000)
    conn.executemany("UPDATE entries SET ended_us = ended_us - ? WHERE id = ?", [(shift, k) for k in stale])
    conn.commit()
    conn.close()
    for path in old_logs:
        age(path, 10)
    async with ExecutionEngine(journalled(tmp_path, retention=RetentionPolicy(max_age_s=DAY))) as engine:
        assert [s.id for s in await engine.list_executions()] == new
        for gone_id in [*old, plan.id, *(c.id for c in plan.commands)]:
            with pytest.raises(NotFound):
                await engine.get_status(gone_id)
        assert not any(p.exists() for p in old_logs)
        assert engine.get_log_path(new[0]).exists()


async def test_max_log_bytes_deletes_the_oldest_logs_until_the_total_fits(tmp_path: Path) -> None:
    """Without a journal: the oldest `<uuid>.log` files go until their total is within the limit."""
    async with ExecutionEngine(config(tmp_path)) as engine:
        ids = await run_all(engine, *(f"head -c 20000 /dev/zero | tr '\\0' x; echo {i}" for i in range(5)))
        paths = [engine.get_log_path(eid) for eid in ids]
    for days, path in zip([5, 4, 3, 2, 1], paths, strict=True):
        age(path, days)
    sizes = [p.stat().st_size for p in paths]
    limit = sum(sizes[-2:]) + 100
    async with ExecutionEngine(config(tmp_path, retention=RetentionPolicy(max_log_bytes=limit))):
        assert [p.exists() for p in paths] == [False, False, False, True, True]
    assert sum(p.stat().st_size for p in paths if p.exists()) <= limit


async def test_logs_dated_in_the_future_count_as_the_newest_and_go_when_over_the_limit(
    tmp_path: Path,
) -> None:
    """A clock set back (NTP at boot), or logs copied with their times, dates logs after now: they were
    left out of every count and never deleted, whatever the limit."""
    async with ExecutionEngine(config(tmp_path)) as engine:
        ids = await run_all(engine, *(f"head -c 20000 /dev/zero | tr '\\0' x; echo {i}" for i in range(5)))
        paths = [engine.get_log_path(eid) for eid in ids]
    for days, path in zip([5, 4, 3, 2, 1], paths, strict=True):
        age(path, -days)  # days ahead of now
    limit = 2 * paths[0].stat().st_size + 100
    async with ExecutionEngine(config(tmp_path, retention=RetentionPolicy(max_log_bytes=limit))):
        assert sum(p.exists() for p in paths) == 2
    assert sum(p.stat().st_size for p in paths if p.exists()) <= limit


async def test_a_running_executions_log_is_never_deleted_and_sweeps_repeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A periodic sweep deletes finished logs, however strict the policy, and never a running one's."""
    monkeypatch.setattr(retention, "SWEEP_INTERVAL", 0.05)
    policy = RetentionPolicy(max_executions=0, max_log_bytes=0, max_age_s=0.001)
    async with ExecutionEngine(config(tmp_path, retention=policy)) as engine:
        running = await engine.execute(shell("echo started; sleep 30"))
        await until(engine.get_log_path(running).exists, "the running command's log")
        age(engine.get_log_path(running), 10)
        for _ in range(3):
            [done] = await run_all(engine, "echo finished")
            log = engine.get_log_path(done)
            await until(functools.partial(gone, log), "a sweep to delete the finished log")
            assert engine.get_log_path(running).exists()
            assert await engine.get_status(running) is ExecutionStatus.RUNNING
        await engine.cancel(running)


async def test_without_a_journal_memory_is_trimmed_and_a_removed_log_is_reported_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory store forgets beyond max_executions; read_logs of a log retention removed says so."""
    monkeypatch.setattr(retention, "SWEEP_INTERVAL", 0.05)
    async with ExecutionEngine(config(tmp_path, retention=RetentionPolicy(max_log_bytes=0))) as engine:
        [eid] = await run_all(engine, "echo bye")
        await until(lambda: not engine.get_log_path(eid).exists(), "the sweep to remove the log")
        with pytest.raises(IoError, match="retention"):
            await engine.read_logs(eid)
    async with ExecutionEngine(config(tmp_path, retention=RetentionPolicy(max_executions=2))) as engine:
        ids = await run_all(engine, *(f"echo {i}" for i in range(5)))
        deadline = time.monotonic() + 10
        while [s.id for s in await engine.list_executions()] != ids[-2:]:
            assert time.monotonic() < deadline, "memory was not trimmed to the newest two"
            await asyncio.sleep(0.01)
        await until(lambda: not engine.get_log_path(ids[0]).exists(), "the sweep to remove the oldest log")
        assert engine.get_log_path(ids[-1]).exists()


@pytest.mark.parametrize("max_age_s", [1e20, 1e308, float("inf")])
async def test_an_age_beyond_any_clock_keeps_everything(tmp_path: Path, max_age_s: float) -> None:
    """No execution ended that long ago: nothing is deleted, and the engine starts and sweeps."""
    policy = RetentionPolicy(max_age_s=max_age_s)
    async with ExecutionEngine(journalled(tmp_path, retention=policy)) as engine:
        eid = await engine.execute(shell("echo kept"))
        await engine.wait(eid, timeout=20)
    async with ExecutionEngine(journalled(tmp_path, retention=policy)) as again:
        assert "kept" in await again.read_logs(eid)
    async with ExecutionEngine(config(tmp_path, retention=policy)) as without_journal:
        await without_journal.wait(await without_journal.execute(shell("true")), timeout=20)


async def test_another_engines_running_log_is_never_deleted_by_this_ones_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two engines on one log directory: a strict policy in one never deletes what the other still writes."""
    monkeypatch.setattr(retention, "SWEEP_INTERVAL", 0.05)
    policy = RetentionPolicy(max_executions=0, max_log_bytes=0, max_age_s=0.001)
    async with ExecutionEngine(config(tmp_path)) as other:
        gate = tmp_path / "gate"
        running = await other.execute(
            shell(f"echo started; until [ -e {gate} ]; do sleep 0.01; done; echo after")
        )
        log = other.get_log_path(running)
        await until(log.exists, "the other engine's running log")
        age(log, 10)
        for strict_config in (config(tmp_path, retention=policy), journalled(tmp_path, retention=policy)):
            async with ExecutionEngine(strict_config) as strict:  # a sweep at start
                [done] = await run_all(strict, "echo finished")
                await until(functools.partial(gone, strict.get_log_path(done)), "a periodic sweep")
            assert log.exists(), "the other engine's running log was deleted"
        gate.touch()
        result = await other.wait(running, timeout=20)
        assert result.status is ExecutionStatus.COMPLETED
        logs = await other.read_logs(running)
        assert logs.index("started") < logs.index("after")


async def test_another_engines_log_between_two_attempts_is_never_deleted_by_this_ones_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a retry's backoff no worker holds the log; the line its engine adds there says it is in use.

    Deleted, the execution's log would have kept its later attempts only.
    """
    monkeypatch.setattr(retention, "SWEEP_INTERVAL", 0.05)
    policy = RetentionPolicy(max_executions=0, max_log_bytes=0, max_age_s=0.001)
    async with ExecutionEngine(config(tmp_path)) as other:
        retried = shell("echo first-attempt; exit 1", retry=RetryPolicy(max_attempts=2, backoff_ms=60_000))
        waiting = await other.execute(retried)
        log = other.get_log_path(waiting)
        await until(lambda: log.exists() and "# retrying: " in log.read_text(), "the other engine's backoff")
        age(log, 10)
        for strict_config in (config(tmp_path, retention=policy), journalled(tmp_path, retention=policy)):
            async with ExecutionEngine(strict_config) as strict:  # a sweep at start
                [done] = await run_all(strict, "echo finished")
                await until(functools.partial(gone, strict.get_log_path(done)), "a periodic sweep")
            assert log.exists(), "the other engine's log was deleted between its attempts"
        await other.cancel(waiting)
        assert (await other.wait(waiting, timeout=20)).status is ExecutionStatus.CANCELLED
        assert "first-attempt" in await other.read_logs(waiting)


def test_reading_a_large_log_directory_is_done_a_step_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two steps the journal's writer commits: a directory is never read in one long piece."""
    monkeypatch.setattr(retention, "_SCAN_STEP", 10)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    logs = [log_dir / f"{uuid4()}.log" for _ in range(35)]
    for path in logs:
        path.write_bytes(b"old\n")
        age(path, 1)
    job = retention.Retention(RetentionPolicy(max_executions=0), log_dir).logs_job(set(), time.time())
    for _ in range(3):  # entries 10, 20 and 30: nothing deleted yet
        next(job)
        assert all(path.exists() for path in logs)
    retention.run_job(job)
    assert not any(path.exists() for path in logs)


async def test_finished_commands_are_counted_a_step_at_a_time_ties_and_plans_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_executions counts a million rows in steps; every count must equal SQLite's own in one go."""
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        await run_all(engine, *(f"echo {i}" for i in range(7)))
        plan = ExecutionPlan(commands=[shell("echo a"), shell("echo b")], strategy=SerialStrategy())
        await engine.execute_plan(plan)
        await engine.wait(plan.id, timeout=20)
        await engine.execute(shell("sleep 30"))  # not ended: not counted
        conn = sqlite3.connect(tmp_path / "journal.sqlite3")
        try:
            # Ends at the same microsecond, as a burst can have them, across the steps' edges.
            conn.execute("UPDATE entries SET ended_us = 1000 WHERE seq IN (2, 3, 4, 5)")
            conn.commit()
            expected = conn.execute(
                "SELECT count(*) FROM entries WHERE ended_us IS NOT NULL AND kind = 'command'"
            ).fetchone()[0]
            assert expected == 9
            for step in (1, 2, 3, 100):
                monkeypatch.setattr(retention, "_COUNT_STEP", step)
                counting = retention._count_finished_commands(conn)
                steps, counted = 0, None
                while counted is None:
                    try:
                        next(counting)
                        steps += 1
                    except StopIteration as done:
                        counted = done.value
                assert (step, counted) == (step, expected)
                assert steps == 10 // step  # ten ended rows, the plan's own among them
        finally:
            conn.close()


async def test_with_a_journal_memory_is_trimmed_too_and_agrees_with_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What retention deleted from the journal is gone from memory: not answered, not kept."""
    monkeypatch.setattr(retention, "SWEEP_INTERVAL", 0.05)
    async with ExecutionEngine(journalled(tmp_path, retention=RetentionPolicy(max_executions=2))) as engine:
        ids = await run_all(engine, *(f"echo {i}" for i in range(6)))
        plan = ExecutionPlan(commands=[shell("echo a")], strategy=SerialStrategy())
        await engine.execute_plan(plan)
        await engine.wait(plan.id, timeout=20)
        deadline = time.monotonic() + 10
        while [s.id for s in await engine.list_executions()] != [ids[-1], plan.commands[0].id, plan.id]:
            assert time.monotonic() < deadline, "the journal was not trimmed to the newest two commands"
            await asyncio.sleep(0.01)
        for eid in ids[:-1]:
            with pytest.raises(NotFound):
                await engine.get_status(eid)
        kept = engine._supervisor._store.records()
        assert {record.id for record in kept} <= {ids[-1], plan.commands[0].id}


@pytest.mark.timeout(20)
def test_trimming_memory_costs_each_entry_once() -> None:
    """30,000 finished entries trimmed to 10 at one sweep: linear, not a recount per entry forgotten."""
    store = MemoryStore(
        retention=retention.Retention(RetentionPolicy(max_executions=10), Path("/nonexistent"))
    )
    request = shell("true")
    records = []
    for _ in range(30_000):
        record = Record(
            request.model_copy(update={"id": uuid4()}), [], None, 1000, log_dir=Path("/nonexistent")
        )
        store.add(record)
        store.retire(record)
        records.append(record)
    assert store.trim(None, 10) == 29_990
    assert [record.id for record in store.records()] == [record.id for record in records[-10:]]


async def test_what_memory_lets_go_while_the_journal_cannot_be_written_is_still_answered_as_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ends not yet durable (another process holds the journal's write lock) are answered from the
    engine's own keeping after a sweep trimmed memory: never from their stale submission rows."""
    monkeypatch.setattr(journal, "WRITER_BUSY_TIMEOUT_S", 0.2)
    monkeypatch.setattr(journal_writer, "_RETRY_S", 0.05)
    monkeypatch.setattr(retention, "SWEEP_INTERVAL", 0.05)
    path = tmp_path / "journal.sqlite3"
    async with ExecutionEngine(journalled(tmp_path, retention=RetentionPolicy(max_executions=1))) as engine:
        await run_all(engine, "echo first")  # the journal exists, its rows written
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            ids = await run_all(engine, *(f"echo {i}" for i in range(4)))
            memory = engine._supervisor._store._memory  # type: ignore[attr-defined]
            await until(lambda: len(memory.records()) <= 1, "a sweep to trim memory")
            for eid in ids:
                assert await engine.get_status(eid) is ExecutionStatus.COMPLETED
                assert (await engine.get_result(eid)).status is ExecutionStatus.COMPLETED
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB filesystem of its own, for the journal and the logs to fill."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounts a filesystem")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def _on_the_small_disk(small_disk: Path) -> dict[str, Any]:
    """A journal and logs on `small_disk`, whose logs may take 300 kB."""
    return {
        "journal": small_disk / "journal.sqlite3",
        "log_dir": small_disk / "logs",
        "retention": RetentionPolicy(max_log_bytes=300_000),
    }


def _fill_with_logs(log_dir: Path) -> None:
    """Old `<uuid>.log` files until the filesystem has no room left."""
    log_dir.mkdir(exist_ok=True)
    while True:
        path = log_dir / f"{uuid4()}.log"
        try:
            path.write_bytes(b"x" * 100_000)
        except OSError:
            path.unlink(missing_ok=True)
            break
        age(path, 1)


async def test_an_engine_starts_on_a_disk_its_logs_filled_and_retention_makes_room(small_disk: Path) -> None:
    """The journal could not be written, so start() failed: before the retention that frees the room."""
    settings = _on_the_small_disk(small_disk)
    async with ExecutionEngine(ExecutionConfig(**settings)) as engine:
        await engine.wait(await engine.execute(shell("true")), timeout=20)
    _fill_with_logs(small_disk / "logs")
    async with ExecutionEngine(ExecutionConfig(**settings)) as engine:
        done = await engine.wait(await engine.execute(shell("echo room")), timeout=20)
        assert done.status is ExecutionStatus.COMPLETED
    assert sum(p.stat().st_size for p in (small_disk / "logs").glob("*.log")) <= 300_000


async def test_a_journal_its_logs_filled_the_disk_of_is_written_again_once_retention_sweeps_them(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the journal could not be written, retention's jobs waited for it, and so did the logs'
    sweep that would have made the room: the journal stayed unwritable for ever."""
    monkeypatch.setattr(retention, "SWEEP_INTERVAL", 0.2)
    settings = _on_the_small_disk(small_disk)
    async with ExecutionEngine(ExecutionConfig(**settings)) as engine:
        await engine.wait(await engine.execute(shell("true")), timeout=20)
        _fill_with_logs(small_disk / "logs")
        last = await engine.execute(shell("echo after"))
        await engine.wait(last, timeout=20)
        journal_file = small_disk / "journal.sqlite3"
        await until(lambda: row_status(journal_file, last) == "completed", "the journal to be written again")
    assert sum(p.stat().st_size for p in (small_disk / "logs").glob("*.log")) <= 300_000


def row_status(journal_file: Path, execution_id: UUID) -> str | None:
    with contextlib.closing(sqlite3.connect(journal_file)) as conn:
        found = conn.execute("SELECT status FROM entries WHERE id = ?", (execution_id.bytes,)).fetchone()
    return None if found is None else str(found[0])
