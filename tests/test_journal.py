"""The journal: history that outlives the engine, its durability point, filters, locking, damage, resume."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import ANY
from uuid import UUID, uuid4

import psutil
import pytest
from conftest import HELPERS, PYTHON, Recorder, config, gone, host_children, shell, wait_until

from cloudops_execution_engine import (
    DependencyGraphStrategy,
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionMetadata,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    InvalidCommand,
    InvalidPlan,
    IoError,
    NotCompleted,
    NotFound,
    ParallelStrategy,
    PlanExecutionResult,
    SerialStrategy,
    ShellCommand,
    SyncExecutionEngine,
)
from cloudops_execution_engine.actors import (
    journal,
    journal_known,
    journal_recovery,
    journal_schema,
    journal_writer,
)
from cloudops_execution_engine.actors.journal import JournalStore, open_connection
from cloudops_execution_engine.actors.journal_schema import MIGRATIONS, SCHEMA_VERSION, migrate
from cloudops_execution_engine.config import default_journal_path

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

C = ExecutionStatus.COMPLETED
F = ExecutionStatus.FAILED
X = ExecutionStatus.CANCELLED


def journalled(tmp_path: Path, **overrides: Any) -> ExecutionConfig:
    return config(tmp_path, journal=tmp_path / "journal.sqlite3", **overrides)


def row(journal: Path, execution_id: UUID) -> tuple[str, str | None] | None:
    """(status, result JSON) of an execution as another reader of the journal file sees it."""
    with sqlite3.connect(journal) as conn:
        found = conn.execute(
            "SELECT status, result FROM entries WHERE id = ?", (execution_id.bytes,)
        ).fetchone()
    conn.close()
    return None if found is None else (found[0], found[1])


def plan_of(*commands: str, strategy: Any = None) -> ExecutionPlan:
    return ExecutionPlan(commands=[shell(c) for c in commands], strategy=strategy or SerialStrategy())


# -- history --------------------------------------------------------------------------


async def test_an_engine_on_the_same_journal_answers_for_what_an_earlier_one_ran(tmp_path: Path) -> None:
    """get_status, get_result, get_plan_result, wait, list_executions, read_logs, get_log_path: past runs."""
    async with ExecutionEngine(journalled(tmp_path)) as first:
        ok = await first.execute(shell("echo hello from the past"))
        bad = await first.execute(shell("echo oops >&2; exit 4"))
        plan = await first.execute_plan(plan_of("echo one", "echo two"))
        results = {eid: await first.wait(eid, timeout=20) for eid in (ok, bad, plan)}
        listing = await first.list_executions()
        log_path = first.get_log_path(ok)
        plan_logs = await first.read_logs(plan)

    other_logs = tmp_path / "elsewhere"
    async with ExecutionEngine(journalled(tmp_path, log_dir=other_logs)) as second:
        assert await second.get_status(ok) is C
        assert await second.get_status(bad) is F
        assert await second.get_status(plan) is C
        assert await second.get_result(ok) == results[ok]
        assert (await second.get_result(bad)).error == "Command failed with exit code 4"
        assert await second.get_plan_result(plan) == results[plan]
        assert await asyncio.wait_for(second.wait(ok), 1) == results[ok]
        assert await asyncio.wait_for(second.wait(plan), 1) == results[plan]
        assert await second.list_executions() == listing
        assert "hello from the past" in await second.read_logs(ok)
        assert "stdout one" in plan_logs
        assert "stdout two" in plan_logs
        assert await second.read_logs(plan) == plan_logs
        # The log is where the earlier engine wrote it, not in this engine's log_dir.
        assert second.get_log_path(ok) == log_path
        with pytest.raises(NotFound):
            await second.get_status(uuid4())


async def test_an_engine_not_yet_started_answers_from_the_journal(tmp_path: Path) -> None:
    """Queries are a use that starts the engine: it answers for what earlier engines recorded."""
    async with ExecutionEngine(journalled(tmp_path)) as first:
        eid = await first.execute(shell("echo recorded"))
        await first.wait(eid, timeout=20)
        recorded_log = first.get_log_path(eid)
    elsewhere = journalled(tmp_path, log_dir=tmp_path / "other-logs")
    fresh = ExecutionEngine(elsewhere)
    try:
        assert fresh.get_log_path(eid) == recorded_log
        assert await fresh.get_status(eid) is C
    finally:
        await fresh.shutdown()
    for ask in ("get_result", "wait", "list_executions", "read_logs"):
        engine = ExecutionEngine(elsewhere)
        try:
            if ask == "list_executions":
                assert [s.id for s in await engine.list_executions()] == [eid]
            elif ask == "read_logs":
                assert "recorded" in await engine.read_logs(eid)
            else:
                result = await getattr(engine, ask)(eid)
                assert isinstance(result, ExecutionResult)
                assert result.stdout == "recorded\n"
            with pytest.raises(NotFound):
                await engine.get_status(uuid4())
        finally:
            await engine.shutdown()


async def journalled_trues(tmp_path: Path, count: int) -> list[UUID]:
    """The ids of `count` executions an earlier engine ran and journalled."""
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        ids = [await engine.execute(shell("true")) for _ in range(count)]
        for eid in ids:
            await engine.wait(eid, timeout=20)
    return ids


async def test_ids_of_earlier_runs_stay_taken_while_the_id_filter_fills_and_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filter of a reopened journal fills in the background; no id is ever taken twice."""
    earlier = await journalled_trues(tmp_path, 12)
    # Several steps of filling, with commits between them.
    monkeypatch.setattr(journal_known, "_CHUNK", 3)
    async with ExecutionEngine(journalled(tmp_path)) as second:
        store = second._supervisor._store
        assert isinstance(store, JournalStore)
        with pytest.raises(InvalidCommand, match="already exists"):
            await second.execute(ExecutionRequest(id=earlier[0], command=ExecCommand(program="true")))
        meanwhile = await second.execute(shell("true"))
        deadline = asyncio.get_running_loop().time() + 10
        while not store._known.ready:
            assert asyncio.get_running_loop().time() < deadline, "the id filter did not fill"
            await asyncio.sleep(0.01)
        for eid in (earlier[0], earlier[-1], meanwhile):
            with pytest.raises(InvalidCommand, match="already exists"):
                await second.execute(ExecutionRequest(id=eid, command=ExecCommand(program="true")))
        fresh = await second.execute(shell("true"))
        assert (await second.wait(fresh, timeout=20)).status is C


async def test_the_id_filter_is_filled_a_chunk_at_a_time_and_keeps_what_was_added_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier = await journalled_trues(tmp_path, 7)
    monkeypatch.setattr(journal_known, "_CHUNK", 3)
    live = journal_known.KnownIds(len(earlier), ready=False)
    meanwhile = uuid4().bytes
    live.add(meanwhile)
    assert live.may_hold(uuid4().bytes), "an unfilled filter answers maybe"
    filled: list[journal_known.KnownIds] = []
    conn = sqlite3.connect(tmp_path / "journal.sqlite3")
    try:
        job = journal_known.fill_job(conn, len(earlier), filled.append)
        steps = sum(1 for _ in job)
    finally:
        conn.close()
    assert steps == 2  # 3 + 3 ids, then the last one with the end
    assert len(filled) == 1
    live.absorb(filled[0])
    assert all(live.may_hold(eid.bytes) for eid in earlier)
    assert live.may_hold(meanwhile)
    strangers = [uuid4().bytes for _ in range(1000)]
    assert sum(live.may_hold(key) for key in strangers) < 10


def test_the_id_filter_is_filled_from_the_id_index_without_reading_the_rows(tmp_path: Path) -> None:
    """A million rows are a gigabyte of JSON; their ids are 30 MB of index, all the filling reads."""
    path = tmp_path / "journal.sqlite3"
    conn = open_connection(path)
    try:
        migrate(conn, path)
        plan = conn.execute("EXPLAIN QUERY PLAN " + journal_known._NEXT_IDS, (b"", 10)).fetchall()
    finally:
        conn.close()
    assert "USING COVERING INDEX" in plan[0][-1], plan


async def test_commits_never_wait_for_the_id_filter_to_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the ids can take minutes on a cold spinning disk: results are committed meanwhile."""
    earlier = await journalled_trues(tmp_path, 3)
    release = threading.Event()
    real_add = journal_known.KnownIds.add
    loop_thread = threading.current_thread()

    def slow_add(self: journal_known.KnownIds, key: bytes) -> None:
        if threading.current_thread() is not loop_thread:
            release.wait(30)  # the ids come off a disk that takes its time
        real_add(self, key)

    monkeypatch.setattr(journal_known.KnownIds, "add", slow_add)
    try:
        async with ExecutionEngine(journalled(tmp_path)) as engine:
            ids = [await engine.execute(shell(f"echo {n}")) for n in range(3)]
            results = [await engine.wait(eid, timeout=10) for eid in ids]
            assert [r.status for r in results] == [C] * 3
            assert all(row(tmp_path / "journal.sqlite3", eid) == ("completed", ANY) for eid in ids)
            with pytest.raises(InvalidCommand, match="already exists"):
                await engine.execute(ExecutionRequest(id=earlier[0], command=ExecCommand(program="true")))
            release.set()
    finally:
        release.set()


async def test_the_last_ends_of_a_burst_are_committed_once_nothing_runs_not_a_spacing_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits are spaced while ends flow; when the engine runs dry, what is queued is committed at once."""
    monkeypatch.setattr(journal_writer, "_SPACING", 3600.0)
    async with ExecutionEngine(journalled(tmp_path, max_concurrent_executions=4)) as engine:
        for _ in range(2):  # a second burst, after the writer has seen a flow
            ids = [await engine.execute(shell("true")) for _ in range(24)]
            plan = await engine.execute_plan(plan_of("true", "true", "true"))
            results = await asyncio.wait_for(asyncio.gather(*(engine.wait(i) for i in [*ids, plan])), 30)
            assert all(result.status is C for result in results)
            assert all(row(tmp_path / "journal.sqlite3", eid) is not None for eid in ids)


async def test_history_of_earlier_engines_comes_first_and_new_work_is_listed_after_it(tmp_path: Path) -> None:
    """Submission order across engines: the journal's rows, then what this engine submitted."""
    async with ExecutionEngine(journalled(tmp_path)) as first:
        old = [await first.execute(shell("true")) for _ in range(3)]
        for eid in old:
            await first.wait(eid, timeout=20)
    async with ExecutionEngine(journalled(tmp_path)) as second:
        running = await second.execute(shell("sleep 30"))
        done = await second.execute(shell("true"))
        await second.wait(done, timeout=20)
        listing = await second.list_executions()
        assert [s.id for s in listing] == [*old, running, done]
        assert [s.status for s in listing][-2:] in (
            [ExecutionStatus.RUNNING, C],
            [ExecutionStatus.PENDING, C],
        )
        await second.cancel(running)


async def test_a_result_is_in_the_journal_before_its_terminal_event_and_before_wait_returns(
    tmp_path: Path,
) -> None:
    """The durability point: a handler told of an end, and a caller of wait(), find the result committed."""
    journal = tmp_path / "journal.sqlite3"
    seen: dict[UUID, tuple[str, str | None] | None] = {}

    async def on_event(event: Any) -> None:
        if event.event_type in ("completed", "failed", "cancelled"):
            seen[event.execution_id] = row(journal, event.execution_id)

    engine = ExecutionEngine(journalled(tmp_path)).with_event_handler(on_event)  # type: ignore[arg-type]
    async with engine:
        ids = [await engine.execute(shell(f"echo {i}; exit {i % 2}")) for i in range(20)]
        for eid in ids:
            result = await engine.wait(eid, timeout=20)
            assert isinstance(result, ExecutionResult)
            committed = row(journal, eid)
            assert committed is not None
            assert committed[0] == result.status.value
            assert committed[1] is not None
            assert ExecutionResult.model_validate_json(committed[1]) == result
        wait_until(lambda: len(seen) == len(ids), 10, "every terminal event")
    for eid in ids:
        told = seen[eid]
        assert told is not None, f"{eid}: the handler was told before the submission was committed"
        assert told[0] in ("completed", "failed"), f"{eid}: the handler was told before the end was committed"
        assert told[1] is not None


# -- list_executions ----------------------------------------------------------------------


@pytest.mark.parametrize("with_journal", [True, False])
async def test_list_executions_filters_combine_and_limit_keeps_the_newest(
    tmp_path: Path, with_journal: bool
) -> None:
    """status, plan_id, since and limit, alone and together, oldest first."""
    settings = journalled(tmp_path) if with_journal else config(tmp_path)
    async with ExecutionEngine(settings) as engine:
        early = [await engine.execute(shell("true")), await engine.execute(shell("exit 1"))]
        for eid in early:
            await engine.wait(eid, timeout=20)
        since = datetime.now(UTC)
        late = [await engine.execute(shell("true")), await engine.execute(shell("exit 1"))]
        plan = plan_of("true", "exit 2", "true", strategy=SerialStrategy(stop_on_error=False))
        await engine.execute_plan(plan)
        for eid in late:
            await engine.wait(eid, timeout=20)
        await engine.wait(plan.id, timeout=20)

        everything = await engine.list_executions()
        assert [s.id for s in everything] == [*early, *late, *(c.id for c in plan.commands), plan.id]
        completed = await engine.list_executions(status=C)
        assert [s.id for s in completed] == [early[0], late[0], plan.commands[0].id, plan.commands[2].id]
        failed = [early[1], late[1], plan.commands[1].id, plan.id]
        assert [s.id for s in await engine.list_executions(status=F)] == failed
        assert [s.id for s in await engine.list_executions(since=since)] == [s.id for s in everything][2:]
        in_plan = await engine.list_executions(plan_id=plan.id)
        assert [s.id for s in in_plan] == [c.id for c in plan.commands]
        assert all(s.plan_id == plan.id for s in in_plan)
        assert [s.id for s in await engine.list_executions(plan_id=plan.id, status=F)] == [
            plan.commands[1].id
        ]
        assert [s.id for s in await engine.list_executions(status=F, since=since, limit=2)] == failed[2:]
        assert [s.id for s in await engine.list_executions(limit=2)] == [plan.commands[2].id, plan.id]
        assert await engine.list_executions(limit=0) == []
        # A limit beyond SQLite's integers is a limit beyond every row, as without a journal.
        assert len(await engine.list_executions(limit=2**64)) == len(await engine.list_executions())
        assert await engine.list_executions(status="failed") == await engine.list_executions(status=F)
        with pytest.raises(ValueError, match="aware"):
            await engine.list_executions(since=datetime.now())
        with pytest.raises(ValueError, match="negative"):
            await engine.list_executions(limit=-1)

    if with_journal:
        async with ExecutionEngine(settings) as again:
            assert await again.list_executions() == everything
            assert await again.list_executions(status=C) == completed
            assert await again.list_executions(plan_id=plan.id) == in_plan
            assert [s.id for s in await again.list_executions(limit=2)] == [plan.commands[2].id, plan.id]


# -- one engine per journal --------------------------------------------------------------


def slow_recovery(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Recovery that says when it has begun (the first event) and goes on once told to (the second):
    a start held while the journal opens, as recovering a large journal holds it."""
    inside, go_on = threading.Event(), threading.Event()
    recover = journal_recovery.recover

    def slow_recover(conn: sqlite3.Connection) -> int:
        inside.set()
        go_on.wait(10)
        return recover(conn)

    monkeypatch.setattr(journal, "recover", slow_recover)
    return inside, go_on


@pytest.mark.parametrize("then", ["the same engine", "a new engine"])
async def test_a_start_cancelled_while_the_journal_opens_leaves_the_journal_to_whoever_starts_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """The open goes on in its thread after the caller stopped waiting: taken up, or let go of, never kept.

    A host that starts the engine on its first request, cancelled when the
    client went away, starts it again, or makes another engine, on the same journal.
    """
    inside, go_on = slow_recovery(monkeypatch)
    first = ExecutionEngine(journalled(tmp_path))
    starting = asyncio.ensure_future(first.start())
    await asyncio.to_thread(inside.wait, 10)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    go_on.set()
    engine = first if then == "the same engine" else ExecutionEngine(journalled(tmp_path))
    try:
        async with engine:
            done = await engine.wait(await engine.execute(shell("echo started")), timeout=20)
            assert isinstance(done, ExecutionResult)
            assert done.stdout == "started\n"
    finally:
        await first.shutdown()
    assert not [f for f in psutil.Process().open_files() if f.path.startswith(str(tmp_path))]
    async with ExecutionEngine(journalled(tmp_path)) as later:
        assert [s.id for s in await later.list_executions()] == [done.id]


def test_a_start_cancelled_on_a_loop_that_then_closes_leaves_the_journal_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open ends on its thread after the caller's loop is gone (a host's deadline for starting,
    then `asyncio.run` returned): it lets go of the journal itself, and a new engine starts on it."""
    inside, go_on = slow_recovery(monkeypatch)

    async def give_up() -> None:
        starting = asyncio.ensure_future(ExecutionEngine(journalled(tmp_path)).start())
        await asyncio.to_thread(inside.wait, 10)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting

    asyncio.run(give_up())
    go_on.set()

    async def start_again() -> None:
        async with ExecutionEngine(journalled(tmp_path)) as engine:
            done = await engine.wait(await engine.execute(shell("echo started")), timeout=20)
            assert isinstance(done, ExecutionResult)
            assert done.stdout == "started\n"

    asyncio.run(start_again())
    assert not [f for f in psutil.Process().open_files() if f.path.startswith(str(tmp_path))]


async def test_a_second_engine_on_a_journal_in_use_gets_io_error_naming_the_holder(tmp_path: Path) -> None:
    """Same process: the second engine is refused, naming this pid; it may open once the first shut down."""
    async with ExecutionEngine(journalled(tmp_path)):
        second = ExecutionEngine(journalled(tmp_path))
        with pytest.raises(IoError, match=rf"pid {os.getpid()}\b") as refused:
            await second.start()
        assert str(tmp_path / "journal.sqlite3") in str(refused.value)
    async with second:
        assert await second.list_executions() == []


def holder(tmp_path: Path, *mode: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Another process holding the journal (journal_holder.py), once its command has started."""
    proc = subprocess.Popen(
        [
            PYTHON,
            str(HELPERS / "journal_holder.py"),
            str(tmp_path / "journal.sqlite3"),
            str(tmp_path / "logs"),
            *mode,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == f"holding {proc.pid}"
        return proc, json.loads(proc.stdout.readline())
    except BaseException:
        # A holder that never says what it holds (the test timing out meanwhile) is not left holding it.
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        raise


async def test_another_process_holding_the_journal_is_named_and_its_sigkill_frees_it(tmp_path: Path) -> None:
    """A holder in another process is named by pid; SIGKILLed, it leaves no stuck lock."""
    proc, started = holder(tmp_path)
    try:
        with pytest.raises(IoError, match=rf"in use by another engine \(pid {proc.pid}\)"):
            await ExecutionEngine(journalled(tmp_path)).start()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        statuses = {s.id: s.status for s in await engine.list_executions()}
        assert statuses.pop(UUID(started["id"])) is F
        assert statuses.pop(UUID(started["plan"])) is F
        assert list(statuses.values()) == [F, C], "the plan's command failed; what had ended is as it was"
        result = await engine.get_result(UUID(started["id"]))
        assert result.error is not None
        assert result.error.startswith("Interrupted:")
        assert f"pid {proc.pid}" in result.error


# -- damage ------------------------------------------------------------------------------


async def test_a_file_that_is_not_a_journal_is_refused_with_its_path_and_nothing_starts(
    tmp_path: Path,
) -> None:
    """Garbage in the file: IoError naming it at start, no worker left behind, and the file untouched."""
    journal = tmp_path / "journal.sqlite3"
    garbage = os.urandom(8192)
    journal.write_bytes(garbage)
    engine = ExecutionEngine(journalled(tmp_path))
    before = host_children()
    with pytest.raises(IoError, match=str(journal)):
        await engine.start()
    assert host_children() <= before, "a worker was started for an engine that cannot start"
    assert journal.read_bytes() == garbage
    with pytest.raises(IoError, match=str(journal)):
        await engine.execute(shell("true"))
    await engine.shutdown()


async def test_a_journal_corrupted_inside_is_refused_with_its_path(tmp_path: Path) -> None:
    """Pages overwritten inside a real journal: IoError naming the file, never a half-started engine."""
    journal = tmp_path / "journal.sqlite3"
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        for eid in [await engine.execute(shell("true")) for _ in range(30)]:
            await engine.wait(eid, timeout=20)
    data = bytearray(journal.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    for offset in range(page, len(data), page):
        data[offset : offset + 64] = os.urandom(64)
    journal.write_bytes(bytes(data))
    before = host_children()
    with pytest.raises(IoError, match=str(journal)):
        await ExecutionEngine(journalled(tmp_path)).start()
    assert host_children() <= before, "a worker was started for an engine that cannot start"


async def test_a_journal_path_that_cannot_be_opened_is_refused_with_its_path(tmp_path: Path) -> None:
    """A directory where the file should be is an IoError naming it."""
    (tmp_path / "journal.sqlite3").mkdir()
    with pytest.raises(IoError, match=str(tmp_path / "journal.sqlite3")):
        await ExecutionEngine(journalled(tmp_path)).start()


async def test_a_lock_file_planted_as_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    """`<journal>.lock` is opened, truncated and written: never through a link to someone else's file."""
    victim = tmp_path / "precious"
    victim.write_bytes(b"precious\n")
    (tmp_path / "journal.sqlite3.lock").symlink_to(victim)
    before = host_children()
    with pytest.raises(IoError, match="cannot lock journal"):
        await ExecutionEngine(journalled(tmp_path)).start()
    assert host_children() <= before, "a worker was started for an engine that cannot start"
    assert victim.read_bytes() == b"precious\n"


def files_of(journal: Path) -> list[str]:
    """The journal's file and whatever lies beside it under its name (a lock, -wal, -shm)."""
    return sorted(p.name for p in journal.parent.glob(journal.name + "*"))


def history_exit_code(journal: Path) -> int:
    done = subprocess.run(
        [PYTHON, "-m", "cloudops_execution_engine", "history", "--journal", str(journal)],
        capture_output=True,
        timeout=60,
    )
    return done.returncode


@pytest.mark.parametrize("user_version", [0, 1])
async def test_another_applications_database_is_refused_and_left_as_it_was(
    tmp_path: Path, user_version: int
) -> None:
    """`journal=` naming the host's own SQLite file by mistake: none of our tables or changes go in."""
    path = tmp_path / "journal.sqlite3"
    theirs = sqlite3.connect(path)
    theirs.execute("CREATE TABLE runs (name TEXT PRIMARY KEY, score INTEGER)")
    theirs.execute("INSERT INTO runs VALUES ('first', 1)")
    theirs.execute(f"PRAGMA user_version = {user_version}")
    theirs.commit()
    schema = theirs.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    theirs.close()
    before = host_children()
    content = path.read_bytes()
    with pytest.raises(
        IoError, match=rf"journal {path} is a SQLite database of something else \(tables: runs\)"
    ):
        await ExecutionEngine(journalled(tmp_path)).start()
    assert host_children() <= before, "a worker was started for an engine that cannot start"
    # Byte for byte (its journal mode is in its header), and nothing of ours beside it.
    assert path.read_bytes() == content
    assert files_of(path) == ["journal.sqlite3"]
    # Nor does reading it with the command line's history change it.
    assert history_exit_code(path) != 0
    assert path.read_bytes() == content
    assert files_of(path) == ["journal.sqlite3"]
    theirs = sqlite3.connect(path)
    try:
        assert theirs.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema
        assert theirs.execute("PRAGMA user_version").fetchone()[0] == user_version
        assert theirs.execute("PRAGMA application_id").fetchone()[0] == 0
        assert theirs.execute("SELECT * FROM runs").fetchall() == [("first", 1)]
    finally:
        theirs.close()


async def test_a_journal_path_that_is_no_regular_file_is_refused_with_nothing_put_beside_it(
    tmp_path: Path,
) -> None:
    """`journal=/dev/null`, say: no lock file, WAL file or rollback journal is made next to it."""
    fifo = tmp_path / "journal.sqlite3"
    os.mkfifo(fifo)
    with pytest.raises(IoError, match=f"journal {fifo} is not a regular file"):
        await ExecutionEngine(journalled(tmp_path)).start()
    assert files_of(fifo) == ["journal.sqlite3"]


async def test_a_database_marked_as_another_applications_is_refused(tmp_path: Path) -> None:
    """SQLite's `application_id` says whose a file is, even while it has no table yet."""
    path = tmp_path / "journal.sqlite3"
    theirs = sqlite3.connect(path)
    theirs.execute("PRAGMA application_id = 1234")
    theirs.commit()
    theirs.close()
    content = path.read_bytes()
    with pytest.raises(IoError, match=r"of another application \(application_id 0x4d2\), not a journal"):
        await ExecutionEngine(journalled(tmp_path)).start()
    assert path.read_bytes() == content
    assert files_of(path) == ["journal.sqlite3"]
    theirs = sqlite3.connect(path)
    try:
        assert theirs.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    finally:
        theirs.close()


async def test_a_journal_written_by_a_newer_schema_is_refused_not_downgraded(tmp_path: Path) -> None:
    """user_version above what this release knows: IoError naming the path and the versions."""
    journal = tmp_path / "journal.sqlite3"
    async with ExecutionEngine(journalled(tmp_path)):
        pass
    conn = sqlite3.connect(journal)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(IoError, match="newer") as refused:
        await ExecutionEngine(journalled(tmp_path)).start()
    assert str(journal) in str(refused.value)
    conn = sqlite3.connect(journal)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    conn.close()


async def test_an_empty_file_is_created_as_a_journal_in_wal_mode_at_the_current_schema(
    tmp_path: Path,
) -> None:
    """A missing or empty file becomes a journal: WAL mode, user_version = the schema version, owner-only."""
    journal = tmp_path / "state" / "journal.sqlite3"
    async with ExecutionEngine(config(tmp_path, journal=journal)) as engine:
        await engine.wait(await engine.execute(shell("true")), timeout=20)
    conn = sqlite3.connect(journal)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    assert journal.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("made", ["by the engine", "by the engine, named by a symlink", "by the host, 0640"])
async def test_a_journals_wal_and_shm_are_as_private_as_the_journal(tmp_path: Path, made: str) -> None:
    """SQLite makes the -wal and -shm files with the database file's mode at that moment.

    A journal the engine made is owner-only from its first byte, and so are they,
    whatever the umask and the directory's mode (named by a symlink that leads
    to nothing yet, it is made where the link leads). A journal the host made
    keeps the mode the host gave it (a group that reads history, say), and they follow it.
    """
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    journal = shared / "journal.sqlite3"
    named = journal
    if made == "by the engine, named by a symlink":
        named = shared / "link.sqlite3"
        named.symlink_to(journal)
    expected = 0o600
    if made == "by the host, 0640":
        async with ExecutionEngine(config(tmp_path, journal=journal)) as engine:
            await engine.wait(await engine.execute(shell("true")), timeout=20)
        journal.chmod(0o640)
        expected = 0o640
    umask = os.umask(0o022)
    try:
        async with ExecutionEngine(config(tmp_path, journal=named)) as engine:
            await engine.wait(await engine.execute(shell("echo recorded")), timeout=20)
            files = [journal, shared / "journal.sqlite3-wal", shared / "journal.sqlite3-shm"]
            modes = {path.name: oct(path.stat().st_mode & 0o777) for path in files}
            assert modes == {path.name: oct(expected) for path in files}
    finally:
        os.umask(umask)
    assert journal.stat().st_mode & 0o777 == expected


async def test_the_directories_made_for_a_journal_are_not_writable_by_others_whatever_the_umask(
    tmp_path: Path,
) -> None:
    """Under a umask of 000, `mkdir -p` would make its parents 0777: anyone could swap its directory."""
    journal = tmp_path / "a" / "b" / "state" / "journal.sqlite3"
    umask = os.umask(0)
    try:
        async with ExecutionEngine(config(tmp_path, journal=journal)) as engine:
            await engine.wait(await engine.execute(shell("true")), timeout=20)
    finally:
        os.umask(umask)
    made = [journal.parent.parent.parent, journal.parent.parent, journal.parent]
    assert [oct(d.stat().st_mode & 0o7777) for d in made] == [oct(0o755), oct(0o755), oct(0o700)]


async def test_a_journal_made_under_a_umask_that_takes_the_owners_bits_opens_again(tmp_path: Path) -> None:
    """Under a umask of 0277 its lock file was 0400 and its directory 0500: no later engine could open it."""
    journal = tmp_path / "a" / "state" / "journal.sqlite3"
    umask = os.umask(0o277)
    try:
        async with ExecutionEngine(config(tmp_path, journal=journal)) as engine:
            first = await engine.execute(shell("true"))
            await engine.wait(first, timeout=20)
    finally:
        os.umask(umask)
    lock = journal.with_name(journal.name + ".lock")
    modes = {
        p.name: oct(p.stat().st_mode & 0o777) for p in (lock, journal, journal.parent, journal.parent.parent)
    }
    assert modes == {lock.name: oct(0o600), journal.name: oct(0o600), "state": oct(0o700), "a": oct(0o700)}
    async with ExecutionEngine(config(tmp_path, journal=journal)) as engine:
        assert (await engine.get_result(first)).status is ExecutionStatus.COMPLETED


async def test_a_journal_that_cannot_be_written_for_a_while_announces_ends_and_loses_none_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the journal's write lock: ends are announced, and written once it lets go."""
    monkeypatch.setattr(journal, "WRITER_BUSY_TIMEOUT_S", 0.2)
    monkeypatch.setattr(journal_writer, "_RETRY_S", 0.05)
    path = tmp_path / "journal.sqlite3"
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        await engine.wait(await engine.execute(shell("echo before")), timeout=20)
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # as a person in the sqlite3 shell might
            ids = [await engine.execute(shell(f"echo {n}")) for n in range(5)]
            plan = await engine.execute_plan(plan_of("echo a", "echo b"))
            results = [await engine.wait(eid, timeout=20) for eid in [*ids, plan]]
            assert [r.status for r in results] == [C] * 6
            listed = {s.id: s.status for s in await engine.list_executions()}
            assert all(listed[eid] is C for eid in [*ids, plan])
            assert all(row(path, eid) in (None, ("pending", None), ("running", None)) for eid in ids)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        deadline = asyncio.get_running_loop().time() + 10
        while not all((row(path, eid) or ("",))[0] == "completed" for eid in [*ids, plan]):
            assert asyncio.get_running_loop().time() < deadline, "the ends were never written"
            await asyncio.sleep(0.02)
    async with ExecutionEngine(journalled(tmp_path)) as later:
        again = [await later.get_result(eid) for eid in ids]
        assert [r.stdout for r in again] == [f"{n}\n" for n in range(5)]
        assert (await later.get_plan_result(plan)).status is C
    failures = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert any("written again" in r.getMessage() for r in caplog.records)


async def test_a_record_that_cannot_be_made_is_left_out_alone_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A document that can never be written (its JSON cannot be made) costs its own row, not the journal.

    It is not taken for a file that cannot be written for a while: nothing is
    retried for ever, and what comes before and after it in its batch is written.
    """
    dump = ExecutionRequest.model_dump_json

    def unwritable(request: ExecutionRequest, **kwargs: Any) -> str:
        if request.metadata.source == "unwritable":
            raise ValueError("this request cannot be written")
        return dump(request, **kwargs)

    monkeypatch.setattr(ExecutionRequest, "model_dump_json", unwritable)
    monkeypatch.setattr(journal_writer, "_SPACING", 3600.0)  # one batch for all three, while they run
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        poison = shell("echo poison").model_copy(update={"metadata": ExecutionMetadata(source="unwritable")})
        ids = [await engine.execute(shell("echo before")), await engine.execute(poison)]
        ids.append(await engine.execute(shell("echo after")))
        results = [await engine.wait(eid, timeout=20) for eid in ids]
        assert [r.status for r in results] == [C, C, C]
        assert (await engine.get_result(poison.id)).stdout == "poison\n", "still answered from memory"
    async with ExecutionEngine(journalled(tmp_path)) as later:
        assert (await later.get_result(ids[0])).stdout == "before\n"
        assert (await later.get_result(ids[2])).stdout == "after\n"
        with pytest.raises(NotFound):
            await later.get_result(poison.id)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1, said
    assert str(poison.id) in said[0]
    assert "this request cannot be written" in said[0]


async def test_what_a_journal_never_writable_again_keeps_for_it_is_bounded_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(journal, "WRITER_BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(journal_writer, "_RETRY_S", 0.05)
    monkeypatch.setattr(journal_writer, "_MAX_RETAINED", 6)
    path = tmp_path / "journal.sqlite3"
    async with ExecutionEngine(journalled(tmp_path, max_concurrent_executions=1)) as engine:
        await engine.wait(await engine.execute(shell("true")), timeout=20)
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            ids = [await engine.execute(shell(f"echo {n}")) for n in range(8)]
            results = [await engine.wait(eid, timeout=20) for eid in ids]
            assert [r.status for r in results] == [C] * 8
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        deadline = asyncio.get_running_loop().time() + 10
        while not any("written again" in r.getMessage() for r in caplog.records):
            assert asyncio.get_running_loop().time() < deadline, "the journal was never written again"
            await asyncio.sleep(0.02)
        assert (await engine.get_result(ids[0])).stdout == "0\n", "this engine still answers for it"
    # Whole submissions went, the oldest first: no row was left without its end.
    rows = [row(path, eid) for eid in ids]
    assert rows[0] is None
    assert rows[-1] == ("completed", ANY)
    assert all(found is None or found[0] == "completed" for found in rows), rows
    async with ExecutionEngine(journalled(tmp_path)) as later:
        assert {s.status for s in await later.list_executions()} == {C}, "nothing was taken as interrupted"
    dropping = [r for r in caplog.records if "being dropped" in r.getMessage()]
    assert len(dropping) == 1


async def test_a_journal_removed_under_the_engine_is_said_to_be_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A clean-up of the state directory while a service runs: its history from then on goes nowhere.

    The engine cannot keep it, but it must not lose it in silence.
    """
    monkeypatch.setattr(journal_writer, "_LOOK_AGAIN_S", 0.0)
    path = tmp_path / "journal.sqlite3"
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        await engine.wait(await engine.execute(shell("true")), timeout=20)
        assert not [r for r in caplog.records if "was removed" in r.getMessage()]
        for suffix in ("", "-wal", "-shm", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")
        result = await engine.wait(await engine.execute(shell("echo after")), timeout=20)
        assert result.status is C  # the engine goes on
    removed = [r for r in caplog.records if r.levelname == "ERROR" and "was removed" in r.getMessage()]
    assert len(removed) == 1
    assert str(path) in removed[0].getMessage()


# -- recovery --------------------------------------------------------------------------


@contextlib.contextmanager
def a_dead_holder(tmp_path: Path, *mode: str) -> Iterator[tuple[int, dict[str, Any], psutil.Process]]:
    """journal_holder.py SIGKILLed while its worker is stopped, so that nothing but recovery ends its tree.

    Yields the dead host's pid, what it printed, and its command's main process.
    """
    proc, started = holder(tmp_path, *mode)
    worker: psutil.Process | None = None
    try:
        command = psutil.Process(started["pid"])
        wait_until(lambda: len(command.children()) == 2, 10, "the command's two children")
        worker = command.parent()
        assert worker is not None
        worker.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        yield proc.pid, started, command
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        if worker is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
                worker.wait(10)


async def test_recovery_kills_what_a_dead_host_left_running_and_fails_it_naming_the_host(
    tmp_path: Path,
) -> None:
    """Host SIGKILLed while its worker is stopped (nothing cleans up): recovery kills the tree, fails it."""
    with a_dead_holder(tmp_path) as (host_pid, started, command):
        tree = [command.pid] + [p.pid for p in command.children(recursive=True)]
        assert not any(gone(pid) for pid in tree), (
            "the tree should outlive its host while its worker is stopped"
        )
        async with ExecutionEngine(journalled(tmp_path)) as engine:
            # Done by the time start() returned.
            assert all(gone(pid) for pid in tree)
            for key in (started["id"], started["plan"]):
                assert await engine.get_status(key) is F
            result = await engine.get_result(started["id"])
            assert result.error is not None
            assert result.error.startswith("Interrupted:")
            assert f"pid {host_pid}" in result.error
            plan = await engine.get_plan_result(started["plan"])
            assert plan.status is F
            assert all(r.status in (F, C) for r in plan.results)
            assert await engine.list_executions(status=ExecutionStatus.RUNNING) == []
            assert await engine.list_executions(status=ExecutionStatus.PENDING) == []


@pytest.mark.parametrize("mode", ["resumed", "resumed twice"])
async def test_a_resumed_plan_a_dead_host_left_running_is_recovered_as_the_resumption_it_was(
    tmp_path: Path, mode: str
) -> None:
    """Failed by recovery, it still says which plan it resumes, with a result for each of its commands.

    Resumed twice, both resumptions reuse the one command that completed: each has its result.
    """
    with a_dead_holder(tmp_path, mode) as (_host_pid, started, _command):
        async with ExecutionEngine(journalled(tmp_path)) as engine:
            first = await engine.get_plan_result(started["resumed_from"])
            for key in [started["plan"], *([started["again"]] if "again" in started else [])]:
                plan = await engine.get_plan_result(key)
                assert plan.status is F
                assert plan.resumed_from == UUID(started["resumed_from"])
                assert [r.status for r in plan.results] == [C, F]
                assert (plan.stats.total, plan.stats.completed, plan.stats.failed) == (2, 1, 1)
                assert plan.results[0] == first.results[0], "the completed command is the one reused"


async def test_recovery_spares_another_engines_command_of_the_same_id(tmp_path: Path) -> None:
    """The dead host's execution id is running in another engine too (ids are the host's to choose)."""
    watcher = Recorder()
    bystanders = ExecutionEngine(config(tmp_path / "other", workers=1)).with_event_handler(watcher)
    with a_dead_holder(tmp_path) as (_host_pid, started, command):
        shared = UUID(started["id"])
        async with bystanders:
            same_id = ExecutionRequest(id=shared, command=ShellCommand(command="exec sleep 30"))
            await bystanders.execute(same_id)
            await watcher.until(lambda _: "started" in watcher.types_of(shared))
            bystander = bystanders._supervisor.entry(shared).pid  # type: ignore[union-attr]
            async with ExecutionEngine(journalled(tmp_path)) as engine:
                assert gone(command.pid)
                assert await engine.get_status(shared) is F
            assert not gone(bystander), "recovery killed another engine's command of the same id"
            assert await bystanders.get_status(shared) is ExecutionStatus.RUNNING
            await bystanders.cancel(shared)
            assert (await bystanders.wait(shared, timeout=20)).status is ExecutionStatus.CANCELLED


async def test_a_journal_of_the_first_schema_is_brought_up_to_date_and_recovered(tmp_path: Path) -> None:
    """Written before engines were named: its runs have no engine id, and recovery goes by marker alone."""
    path = tmp_path / "journal.sqlite3"
    conn = open_connection(path)
    conn.execute("BEGIN")
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO runs (run, pid, hostname, opened_us) VALUES (1, 999999, 'h', 0)")
    left = ExecutionRequest(command=ShellCommand(command="true"))
    conn.execute(
        "INSERT INTO entries (seq, id, kind, run, status, submitted_us, log_path, request) "
        "VALUES (1, ?, 'command', 1, 'pending', 1000, '', ?)",
        (left.id.bytes, left.model_dump_json()),
    )
    conn.execute("COMMIT")
    conn.close()
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        result = await engine.get_result(left.id)
        assert result.status is F
        assert result.error is not None
        assert result.error.startswith("Interrupted:")
        assert "pid 999999" in result.error
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA application_id").fetchone()[0] == journal_schema.APPLICATION_ID
        runs = conn.execute("SELECT engine_id FROM runs ORDER BY run").fetchall()
        assert runs[0] == (None,)
        assert isinstance(runs[1][0], str)
        assert len(runs[1][0]) == 32
    finally:
        conn.close()


# -- resume_plan ------------------------------------------------------------------------


def flaky(tmp_path: Path, name: str) -> str:
    """A command that fails until `tmp_path/name.ok` exists, and counts its runs in `tmp_path/name.runs`."""
    return f"echo run >> {tmp_path / name}.runs; test -e {tmp_path / name}.ok"


def runs(tmp_path: Path, name: str) -> int:
    path = tmp_path / f"{name}.runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_resume_plan_reuses_what_completed_and_runs_the_rest_with_new_ids(tmp_path: Path) -> None:
    """Serial with stop_on_error: the completed first command keeps its id and result, and does not run."""
    (tmp_path / "a.ok").touch()
    (tmp_path / "c.ok").touch()
    plan = plan_of(flaky(tmp_path, "a"), flaky(tmp_path, "b"), flaky(tmp_path, "c"))
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        await engine.execute_plan(plan)
        old = await engine.wait(plan.id, timeout=20)
        assert isinstance(old, PlanExecutionResult)
        assert [r.status for r in old.results] == [C, F, X]
        (tmp_path / "b.ok").touch()
        new_id = await engine.resume_plan(plan.id)
        assert new_id != plan.id
        new = await engine.wait(new_id, timeout=20)
        assert isinstance(new, PlanExecutionResult)
        assert new.plan_id == new_id
        assert new.status is C
        assert new.resumed_from == plan.id
        assert [r.status for r in new.results] == [C, C, C]
        assert new.results[0] == old.results[0]
        assert new.results[1].id != plan.commands[1].id
        assert new.results[2].id != plan.commands[2].id
        assert (runs(tmp_path, "a"), runs(tmp_path, "b"), runs(tmp_path, "c")) == (1, 2, 1)
        assert (await engine.get_plan_result(new_id)).resumed_from == plan.id
        listed = [s.id for s in await engine.list_executions(plan_id=new_id)]
        assert sorted(listed) == sorted(r.id for r in new.results)
        assert "resumed_from" not in json.loads(old.model_dump_json())
        assert json.loads(new.model_dump_json())["resumed_from"] == str(plan.id)


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "memory"])
async def test_a_command_reused_by_a_resumed_plan_is_listed_under_both_plans(
    tmp_path: Path, journal: bool
) -> None:
    """list_executions(plan_id=) lists every command of that plan, each summary naming that plan."""
    (tmp_path / "a.ok").touch()
    plan = plan_of(flaky(tmp_path, "a"), flaky(tmp_path, "b"))
    settings = journalled(tmp_path) if journal else config(tmp_path)

    async def listed(engine: ExecutionEngine, plan_id: UUID, **filters: Any) -> list[tuple[UUID, Any]]:
        return [(s.id, s.plan_id) for s in await engine.list_executions(plan_id=plan_id, **filters)]

    async with ExecutionEngine(settings) as engine:
        await engine.execute_plan(plan)
        old = await engine.wait(plan.id, timeout=20)
        assert isinstance(old, PlanExecutionResult)
        (tmp_path / "b.ok").touch()
        new_id = await engine.resume_plan(plan.id)
        new = await engine.wait(new_id, timeout=20)
        assert isinstance(new, PlanExecutionResult)
        a, b_old, b_new = old.results[0].id, old.results[1].id, new.results[1].id
        assert new.results[0].id == a
        seen = (
            await listed(engine, plan.id),
            await listed(engine, new_id),
            await listed(engine, plan.id, status=C),
            await listed(engine, new_id, limit=1),
        )
        assert seen == (
            [(a, plan.id), (b_old, plan.id)],
            [(a, new_id), (b_new, new_id)],
            [(a, plan.id)],
            [(b_new, new_id)],
        )
        everything = [s.id for s in await engine.list_executions()]
        assert everything.count(a) == 1
    if journal:
        async with ExecutionEngine(settings) as again:
            assert (
                await listed(again, plan.id),
                await listed(again, new_id),
                await listed(again, plan.id, status=C),
                await listed(again, new_id, limit=1),
            ) == seen


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "memory"])
async def test_a_resumed_plans_commands_are_listed_in_submission_order_the_reused_first(
    tmp_path: Path, journal: bool
) -> None:
    """The first command failed and runs again; the second completed and is reused. Submitted with the
    old plan, the reused one is the older, and `limit=1` keeps the one run again, the newest."""
    (tmp_path / "b.ok").touch()
    plan = plan_of(flaky(tmp_path, "a"), flaky(tmp_path, "b"), strategy=ParallelStrategy())
    settings = journalled(tmp_path) if journal else config(tmp_path)
    async with ExecutionEngine(settings) as engine:
        await engine.execute_plan(plan)
        await engine.wait(plan.id, timeout=20)
        (tmp_path / "a.ok").touch()
        new_id = await engine.resume_plan(plan.id)
        new = await engine.wait(new_id, timeout=20)
        assert isinstance(new, PlanExecutionResult)
        rerun, reused = new.results[0].id, new.results[1].id
        assert reused == plan.commands[1].id
        assert [s.id for s in await engine.list_executions(plan_id=new_id)] == [reused, rerun]
        assert [s.id for s in await engine.list_executions(plan_id=new_id, limit=1)] == [rerun]


async def test_secrets_never_reach_the_journal_and_a_plan_needing_them_is_not_resumed_blind(
    tmp_path: Path,
) -> None:
    """secret_env and config secrets are masked in the file; an earlier run's plan needing them is refused."""
    secret, word = "s3cr3t-token-value", "passw0rd-of-the-host"
    step = shell(f'echo "$TOKEN {word}"; test -e {tmp_path / "ok"}')
    step = step.model_copy(update={"secret_env": {"TOKEN": secret}})
    plan = ExecutionPlan(commands=[shell("true"), step], strategy=SerialStrategy())
    async with ExecutionEngine(journalled(tmp_path, secrets=[word])) as first:
        await first.execute_plan(plan)
        old = await first.wait(plan.id, timeout=20)
        assert isinstance(old, PlanExecutionResult)
        assert old.results[1].stdout == "*** ***\n"
    files = [tmp_path / name for name in os.listdir(tmp_path) if name.startswith("journal.sqlite3")]
    stored = b"".join(path.read_bytes() for path in files)
    assert secret.encode() not in stored
    assert word.encode() not in stored
    async with ExecutionEngine(journalled(tmp_path, secrets=[word])) as second:
        with pytest.raises(InvalidPlan, match="give their values again"):
            await second.resume_plan(plan.id)


async def test_a_plan_recorded_with_the_engines_secrets_masked_is_not_resumed_with_asterisks(
    tmp_path: Path,
) -> None:
    """Only `ExecutionConfig.secrets` in its commands: what the journal holds is `***` where they were.

    Resumed from that, the commands ran with `***` in their arguments,
    environment and stdin. A plan in which nothing was masked resumes.
    """
    word = "passw0rd-of-the-host"
    gate = tmp_path / "ok"
    uses = shell(f'test -e {gate} && echo "$KEY $(cat) {word}"', env={"KEY": word}, stdin=word)
    needing = ExecutionPlan(commands=[shell("true"), uses], strategy=SerialStrategy())
    plain = ExecutionPlan(commands=[shell("true"), shell(f"test -e {gate}")], strategy=SerialStrategy())
    async with ExecutionEngine(journalled(tmp_path, secrets=[word])) as first:
        for plan in (needing, plain):
            await first.execute_plan(plan)
            assert (await first.wait(plan.id, timeout=20)).status is ExecutionStatus.FAILED
    gate.touch()
    async with ExecutionEngine(journalled(tmp_path, secrets=[word])) as second:
        with pytest.raises(InvalidPlan, match="recorded with the engine's secrets masked"):
            await second.resume_plan(needing.id)
        resumed = await second.wait(await second.resume_plan(plain.id), timeout=20)
        assert resumed.status is ExecutionStatus.COMPLETED


@pytest.mark.parametrize("outcome", ["all completed", "one failed"])
async def test_a_plan_whose_commands_all_ended_before_its_host_died_ends_as_they_decided(
    tmp_path: Path, outcome: str
) -> None:
    """The plan's own end is written in the batch after its last command's: a host killed between the two.

    Its every command's end is in the journal: the plan's outcome was decided,
    and a plan whose every command completed completed (SPEC 7). Recovered as
    interrupted, it said `failed`, with stats of all completed. One whose
    command failed is failed, as it would have been.
    """
    last = "true" if outcome == "all completed" else "false"
    plan = ExecutionPlan(commands=[shell("true"), shell(last)], strategy=SerialStrategy())
    async with ExecutionEngine(journalled(tmp_path)) as first:
        await first.execute_plan(plan)
        decided = await first.wait(plan.id, timeout=20)
        assert isinstance(decided, PlanExecutionResult)
    # As the journal is when the host dies after the commands' batch, before the plan's.
    with sqlite3.connect(tmp_path / "journal.sqlite3") as conn:
        conn.execute(
            "UPDATE entries SET status = 'running', ended_us = NULL, duration_ns = NULL, result = NULL "
            "WHERE id = ?",
            (plan.id.bytes,),
        )
    conn.close()
    async with ExecutionEngine(journalled(tmp_path)) as second:
        recovered = await second.get_plan_result(plan.id)
    assert recovered.status is decided.status
    assert recovered.results == decided.results
    assert recovered.stats == decided.stats


async def test_resume_plan_of_an_earlier_engine_resumes_the_dependency_graph(tmp_path: Path) -> None:
    """A graph plan from the journal: the completed branch is done, the failed one and its dependents run."""
    (tmp_path / "a.ok").touch()
    (tmp_path / "d.ok").touch()
    plan = plan_of(
        flaky(tmp_path, "a"),
        flaky(tmp_path, "b"),
        flaky(tmp_path, "c"),
        flaky(tmp_path, "d"),
        strategy=DependencyGraphStrategy(dependencies={2: [0, 1], 3: [0]}),
    )
    (tmp_path / "c.ok").touch()
    async with ExecutionEngine(journalled(tmp_path)) as first:
        await first.execute_plan(plan)
        old = await first.wait(plan.id, timeout=20)
        assert isinstance(old, PlanExecutionResult)
        assert [r.status for r in old.results] == [C, F, X, C]
    (tmp_path / "b.ok").touch()
    async with ExecutionEngine(journalled(tmp_path)) as second:
        new_id = await second.resume_plan(plan.id)
        new = await second.wait(new_id, timeout=20)
        assert isinstance(new, PlanExecutionResult)
        assert [r.status for r in new.results] == [C, C, C, C]
        assert new.results[0] == old.results[0]
        assert new.results[3] == old.results[3]
        assert (runs(tmp_path, "a"), runs(tmp_path, "b"), runs(tmp_path, "c"), runs(tmp_path, "d")) == (
            1,
            2,
            1,
            1,
        )
        assert new.resumed_from == plan.id
    async with ExecutionEngine(journalled(tmp_path)) as third:
        assert (await third.get_plan_result(new_id)).resumed_from == plan.id


async def test_resume_plan_of_a_completed_plan_ends_at_once_and_refuses_what_is_not_an_ended_plan(
    tmp_path: Path,
) -> None:
    """All completed: nothing runs. A command's or unknown id is NotFound; a running plan NotCompleted."""
    async with ExecutionEngine(config(tmp_path)) as engine:
        plan = plan_of(flaky(tmp_path, "a"))
        (tmp_path / "a.ok").touch()
        await engine.execute_plan(plan)
        await engine.wait(plan.id, timeout=20)
        again = await engine.wait(await engine.resume_plan(plan.id), timeout=20)
        assert isinstance(again, PlanExecutionResult)
        assert again.status is C
        assert runs(tmp_path, "a") == 1
        with pytest.raises(NotFound):
            await engine.resume_plan(plan.commands[0].id)
        with pytest.raises(NotFound):
            await engine.resume_plan(uuid4())
        slow = plan_of("sleep 30")
        await engine.execute_plan(slow)
        with pytest.raises(NotCompleted):
            await engine.resume_plan(slow.id)
        await engine.cancel(slow.id)


def test_the_blocking_engine_lists_with_filters_and_resumes_plans(tmp_path: Path) -> None:
    """SyncExecutionEngine has list_executions' filters and resume_plan."""
    with SyncExecutionEngine(journalled(tmp_path)) as engine:
        plan = plan_of(flaky(tmp_path, "a"))
        engine.execute_plan(plan)
        engine.wait(plan.id, timeout=20)
        (tmp_path / "a.ok").touch()
        new_id = engine.resume_plan(plan.id)
        result = engine.wait(new_id, timeout=20)
        assert isinstance(result, PlanExecutionResult)
        assert result.status is C
        assert [s.id for s in engine.list_executions(status=C, limit=1)] == [new_id]
        assert [s.id for s in engine.list_executions(plan_id=plan.id)] == [plan.commands[0].id]


def test_the_default_journal_path_follows_xdg_state_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$XDG_STATE_HOME/cloudops-execution-engine/journal.sqlite3, else ~/.local/state/..."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_journal_path() == tmp_path / "state" / "cloudops-execution-engine" / "journal.sqlite3"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".local" / "state" / "cloudops-execution-engine" / "journal.sqlite3"
    assert default_journal_path() == expected
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")  # invalid per the XDG spec: ignored
    assert default_journal_path() == expected


async def test_the_status_of_an_earlier_engines_plan_is_read_from_its_row_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rebuilding a plan of 20,000 commands (every request and result) to answer one status
    held the loop for 1.5 s, at every poll of it."""
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        plan = await engine.execute_plan(plan_of("true", "true", "exit 3"))
        await engine.wait(plan, timeout=20)

    def never(*args: Any) -> Any:
        raise AssertionError("the plan was rebuilt to answer its status")

    monkeypatch.setattr(journal, "plan_from_row", never)
    async with ExecutionEngine(journalled(tmp_path)) as later:
        assert await later.get_status(plan) is ExecutionStatus.FAILED


# -- documents past SQLite's length limit ----------------------------------------------

_VALUE_LIMIT = 2_000_000  # bytes: SQLite's billion, scaled down with the outputs
_CONTROL_BYTES = 200_000  # each six bytes of JSON: 1.2 MB a command, 3.6 MB for a plan of three


@pytest.fixture
def small_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every journal connection stores values of `_VALUE_LIMIT` bytes at most (SQLite's length limit)."""

    def limited(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
        conn = open_connection(path, readonly=readonly)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _VALUE_LIMIT)
        return conn

    monkeypatch.setattr(journal, "open_connection", limited)


@pytest.mark.usefixtures("small_values")
async def test_a_plan_whose_result_is_past_sqlites_limit_is_journalled_with_its_outputs_cut(
    tmp_path: Path,
) -> None:
    """A plan's result holds its commands' outputs: past SQLite's length limit its row could not be written.

    The plan was then left `running`, and every later start recovered it into
    the same too-long document and failed: the journal could not be opened again.
    """
    noisy = f'python3 -c "import sys; sys.stdout.write(chr(1) * {_CONTROL_BYTES} + chr(10))"'
    plan = plan_of(noisy, noisy, noisy)
    async with ExecutionEngine(journalled(tmp_path, max_output_bytes=_CONTROL_BYTES * 2)) as engine:
        await engine.execute_plan(plan)
        whole = await engine.wait(plan.id, timeout=30)
    assert isinstance(whole, PlanExecutionResult)
    assert whole.status is ExecutionStatus.COMPLETED
    async with ExecutionEngine(journalled(tmp_path)) as later:
        recorded = await later.get_plan_result(plan.id)
        first = await later.get_result(plan.commands[0].id)
    assert recorded.status is ExecutionStatus.COMPLETED
    assert first == whole.results[0], "a command's own row keeps its output whole when that fits"
    for kept, full in zip(recorded.results, whole.results, strict=True):
        assert kept.stdout_truncated
        assert 0 < len(kept.stdout) < len(full.stdout)
        assert full.stdout.endswith(kept.stdout)
        assert kept.model_copy(update={"stdout": full.stdout, "stdout_truncated": False}) == full


def test_a_result_within_the_limit_is_written_as_it_is_and_one_past_it_fits_after_its_cut(
    tmp_path: Path,
) -> None:
    from cloudops_execution_engine.actors.journal_rows import fitting_json

    result = ExecutionResult(
        id=uuid4(),
        status=ExecutionStatus.FAILED,
        stdout="\x01" * 300_000,
        stderr="é" * 300_000,
        exit_code=1,
        duration=timedelta(milliseconds=5),
        started_at=datetime.now(UTC),
        log_path=tmp_path / "x.log",
    )
    assert fitting_json(result, 10_000_000) == result.model_dump_json()
    text = fitting_json(result, 1_000_000)
    assert len(text.encode()) <= 1_000_000
    cut = ExecutionResult.model_validate_json(text)
    assert cut.stdout_truncated
    assert cut.stderr_truncated
    assert result.stdout.endswith(cut.stdout)
    assert result.stderr.endswith(cut.stderr)
    assert (
        cut.model_copy(
            update={
                "stdout": result.stdout,
                "stderr": result.stderr,
                "stdout_truncated": False,
                "stderr_truncated": False,
            }
        )
        == result
    )


_RETRYING_HOST = """
import asyncio, sys
from cloudops_execution_engine import (
    ExecutionConfig, ExecutionEngine, ExecutionRequest, RetryPolicy, ShellCommand,
)

journal, logs = sys.argv[1], sys.argv[2]
second_sleeps = 'if [ "$CLOUDOPS_ATTEMPT" = 2 ]; then sleep 60; else exit 1; fi'


async def main():
    async with ExecutionEngine(ExecutionConfig(journal=journal, log_dir=logs)) as engine:
        retry = RetryPolicy(max_attempts=3, backoff_ms=0, jitter=False)
        request = ExecutionRequest(command=ShellCommand(command=second_sleeps), retry=retry)
        print(await engine.execute(request), flush=True)
        await engine.wait(request.id)


asyncio.run(main())
"""


def _killed_in_its_second_attempt(tmp_path: Path) -> UUID:
    """A host SIGKILLed once its journal records that a retried execution's second attempt started."""
    journal_path = tmp_path / "journal.sqlite3"
    proc = subprocess.Popen(
        [PYTHON, "-c", _RETRYING_HOST, str(journal_path), str(tmp_path / "logs")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        execution_id = UUID(proc.stdout.readline().strip())

        def second_attempt_recorded() -> bool:
            with contextlib.closing(sqlite3.connect(f"{journal_path.as_uri()}?mode=ro", uri=True)) as conn:
                found = conn.execute(
                    "SELECT attempt FROM entries WHERE id = ?", (execution_id.bytes,)
                ).fetchone()
            return found is not None and found[0] == 2

        wait_until(second_attempt_recorded, 20, "the journal to record the second attempt's start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    return execution_id


async def test_recovery_says_how_many_attempts_a_retried_execution_had_started(tmp_path: Path) -> None:
    """The journal kept no attempt number: a host killed in attempt 2 was recovered with `attempts: 1`."""
    execution_id = _killed_in_its_second_attempt(tmp_path)
    async with ExecutionEngine(journalled(tmp_path)) as engine:
        result = await engine.get_result(execution_id)
    assert result.status is F
    assert result.error is not None
    assert result.error.startswith("Interrupted:")
    assert result.attempts == 2


def test_a_plan_of_many_results_that_fits_is_written_whole(tmp_path: Path) -> None:
    """Each result's allowance was taken off the limit first: past some 15,000 commands, every output
    of a plan was cut to nothing, however little it held."""
    from cloudops_execution_engine.actors.journal_rows import fitting_json

    began = datetime.now(UTC)
    results = [
        ExecutionResult(
            id=uuid4(),
            status=ExecutionStatus.COMPLETED,
            stdout="ok\n",
            exit_code=0,
            duration=timedelta(milliseconds=1),
            started_at=began,
            log_path=tmp_path / "x.log",
        )
        for _ in range(16_000)
    ]
    plan = PlanExecutionResult.model_validate(
        {
            "plan_id": str(uuid4()),
            "status": "completed",
            "results": [r.model_dump(mode="json") for r in results],
            "total_duration": {"secs": 1, "nanos": 0},
            "stats": {"total": 16_000, "completed": 16_000, "failed": 0, "cancelled": 0, "timeout": 0},
        }
    )
    whole = plan.model_dump_json()
    assert fitting_json(plan, len(whole.encode()) + 10) == whole
