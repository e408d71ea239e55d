"""Reading logs back: a command may replace its own log with anything, or make it as long as it likes.

A command knows its log's name (`$CLOUDOPS_EXECUTION_ID` in the log
directory), so what `read_logs` and the command line find there is the
command's choice: a FIFO, a symlink to `/dev/zero` or to a file of secrets, a
file far longer than any result. Each must be a clear `IoError` for that
execution, read without blocking and within a bounded amount of memory.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest
from conftest import config, result_of, shell

from cloudops_execution_engine import (
    ExecutionConfig,
    ExecutionEngine,
    ExecutionPlan,
    ExecutionStatus,
    IoError,
    PlanExecutionResult,
    SerialStrategy,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

# Run by the command itself: its log is replaced by whatever $MAKE makes at $LOG.
REPLACE_OWN_LOG = 'LOG="$LOG_DIR/$CLOUDOPS_EXECUTION_ID.log"; rm -f "$LOG"; eval "$MAKE"'


def replacing(log_dir: Path, make: str) -> dict[str, str]:
    return {"LOG_DIR": str(log_dir), "MAKE": make}


@pytest.mark.parametrize(
    ("make", "said"),
    [
        ('mkfifo "$LOG"', "not a file"),
        ('ln -s /dev/zero "$LOG"', "symlink"),
        ('ln -s "$SECRETS" "$LOG"', "symlink"),
        ('mkdir "$LOG"', "not a file"),
    ],
    ids=["fifo", "symlink to /dev/zero", "symlink to a file", "directory"],
)
async def test_a_log_the_command_replaced_is_not_read(tmp_path: Path, make: str, said: str) -> None:
    """Not opened (a FIFO would block the read for ever), not followed (secrets, an endless device)."""
    secrets = tmp_path / "secrets"
    secrets.write_text("token=hunter2\n")
    log_dir = tmp_path / "logs"
    async with ExecutionEngine(config(tmp_path, log_dir=log_dir, workers=1)) as engine:
        env = {**replacing(log_dir, make), "SECRETS": str(secrets)}
        execution_id = await engine.execute(shell(REPLACE_OWN_LOG, env=env))
        result = await result_of(engine, execution_id, 20)
        assert result.status is ExecutionStatus.COMPLETED, result.error
        with pytest.raises(IoError, match=said) as raised:
            await asyncio.wait_for(engine.read_logs(execution_id), 10)
        assert str(log_dir / f"{execution_id}.log") in str(raised.value)
        assert "hunter2" not in str(raised.value)
        # The engine serves on: another command's log reads as before.
        other = await engine.execute(shell("echo still-here"))
        await result_of(engine, other, 20)
        assert "stdout still-here" in await engine.read_logs(other)


async def test_a_log_longer_than_the_read_limit_is_refused_and_one_within_it_read(tmp_path: Path) -> None:
    limit = 64 * 1024
    async with ExecutionEngine(config(tmp_path, workers=1, max_log_read_bytes=limit)) as engine:
        long = await engine.execute(shell("head -c 200000 /dev/zero | tr '\\0' x; echo"))
        short = await engine.execute(shell("echo short"))
        assert (await result_of(engine, long, 20)).status is ExecutionStatus.COMPLETED
        await result_of(engine, short, 20)
        size = engine.get_log_path(long).stat().st_size
        with pytest.raises(IoError, match=f"holds {size} bytes, more than the {limit}"):
            await engine.read_logs(long)
        assert "stdout short" in await engine.read_logs(short)


async def test_a_plans_logs_are_read_within_one_limit_together(tmp_path: Path) -> None:
    """Each command's log fits; all of them together do not: the plan's read is refused."""
    each = "head -c 30000 /dev/zero | tr '\\0' y; echo"
    plan = ExecutionPlan(commands=[shell(each) for _ in range(4)], strategy=SerialStrategy())
    async with ExecutionEngine(config(tmp_path, workers=1, max_log_read_bytes=64 * 1024)) as engine:
        plan_id = await engine.execute_plan(plan)
        result = await engine.wait(plan_id, timeout=30)
        assert isinstance(result, PlanExecutionResult)
        assert result.status is ExecutionStatus.COMPLETED
        for item in result.results:
            assert len(await engine.read_logs(item.id)) > 30000
        with pytest.raises(IoError, match="max_log_read_bytes"):
            await engine.read_logs(plan_id)
    async with ExecutionEngine(config(tmp_path, workers=1, max_log_read_bytes=1024 * 1024)) as engine:
        plan_id = await engine.execute_plan(plan.model_copy(update={"id": uuid4()}))
        await engine.wait(plan_id, timeout=30)
        assert (await engine.read_logs(plan_id)).count("# finished: ") == 4


def test_the_read_limit_is_checked_as_a_size() -> None:
    with pytest.raises(ValueError, match="max_log_read_bytes"):
        ExecutionConfig(max_log_read_bytes=-1)


def test_history_lists_a_command_whose_log_was_replaced_by_a_fifo(tmp_path: Path) -> None:
    """`history` reads each log's header: a FIFO there must not hold it for ever."""
    log_dir = tmp_path / "logs"
    journal = tmp_path / "journal.sqlite3"
    cli = [sys.executable, "-m", "cloudops_execution_engine"]
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    ran = subprocess.run(
        [*cli, "run", "--journal", str(journal), "--log-dir", str(log_dir)]
        + [f"--env={name}={value}" for name, value in replacing(log_dir, 'mkfifo "$LOG"').items()]
        + ["--shell", REPLACE_OWN_LOG],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert ran.returncode == 0, ran.stderr
    listed = subprocess.run(
        [*cli, "history", "--journal", str(journal)], capture_output=True, text=True, timeout=30, env=env
    )
    assert listed.returncode == 0, listed.stderr
    assert "(its log cannot be read)" in listed.stdout
