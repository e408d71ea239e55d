"""A host that forks after starting an engine (a pre-forking server): the child can neither use nor harm it.

Each test runs helpers/fork_host.py, which starts an engine with a command
running, forks, lets the child act, and reports what both sides saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import HELPERS, PYTHON, config, gone, shell, wait_until

from cloudops_execution_engine import ExecutionConfig, ExecutionEngine, SyncExecutionEngine

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leaks")]


def helper_report(script: str, *args: str) -> tuple[dict[str, Any], str]:
    """Run a helper host; the JSON line it reports, and what it wrote on stderr."""
    done = subprocess.run(
        [PYTHON, str(HELPERS / script), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report, done.stderr


def fork_host(tmp_path: Path, mode: str) -> dict[str, Any]:
    return helper_report("fork_host.py", str(tmp_path), mode)[0]


def assert_parent_untouched(report: dict[str, Any]) -> None:
    """The command that ran across the fork ended normally, on the same workers, and the engine serves on."""
    assert report["child_exit"] == 0, report["child_err"]
    assert report["child_err"] == ""
    assert (report["status"], report["error"]) == ("completed", None)
    assert report["stdout"] == f"started {report['command']}\ndone\n"
    assert report["workers_after"] == report["workers_before"], "the parent's workers were replaced"
    assert report["again"] == "again\n"
    assert report["shutdown_s"] < 10


def test_a_forked_child_that_exits_leaves_the_parents_engine_and_workers_alone(tmp_path: Path) -> None:
    """multiprocessing's exit handler in the child would otherwise SIGTERM the parent's workers."""
    assert_parent_untouched(fork_host(tmp_path, "exit"))


@pytest.mark.parametrize("mode", ["use", "async"])
def test_a_forked_child_calling_the_inherited_engine_is_refused_at_once(tmp_path: Path, mode: str) -> None:
    report = fork_host(tmp_path, mode)
    assert_parent_untouched(report)
    refusal = (
        f"EngineClosed: Engine is shut down: it belongs to process {report['parent']}; "
        "a forked process starts an engine of its own"
    )
    assert report["child"]["execute"] == refusal
    assert report["child"]["get_status"] == refusal
    assert report["child"]["shutdown"] == "returned"


def test_a_forked_child_letting_go_of_the_inherited_engines_leaves_them_alone(tmp_path: Path) -> None:
    """Their copies in the child are the parent's: collecting them there stops nothing and says nothing."""
    report = fork_host(tmp_path, "drop")
    assert_parent_untouched(report)
    assert report["child"]["warnings"] == []


def test_a_forked_child_runs_an_engine_of_its_own(tmp_path: Path) -> None:
    report = fork_host(tmp_path, "own")
    assert_parent_untouched(report)
    assert report["child"]["own"] == "kid\n"


def test_a_sigkilled_host_takes_its_workers_and_commands_along_though_its_forked_child_lives(
    tmp_path: Path,
) -> None:
    """The child's copies of the worker pipes and of the journal's lock would keep both alive."""
    host = subprocess.Popen(
        [PYTHON, str(HELPERS / "fork_host.py"), str(tmp_path), "linger"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = 0
    try:
        assert host.stdout is not None
        report = json.loads(host.stdout.readline())
        child = report["child"]
        os.kill(host.pid, signal.SIGKILL)
        host.wait(10)
        doomed = [*report["workers_before"], report["command"]]
        wait_until(lambda: all(gone(pid) for pid in doomed), 10, "the dead host's workers and command to end")
        assert psutil.pid_exists(child), "the forked child was still meant to be running"
        with SyncExecutionEngine(
            ExecutionConfig(log_dir=tmp_path / "logs", journal=tmp_path / "j.sqlite3")
        ) as e:
            assert e.list_executions(limit=1), "the journal opens while the forked child lives"
    finally:
        host.kill()
        host.wait(10)
        if host.stdin is not None:
            host.stdin.close()  # the lingering child's stdin: it exits
        if host.stdout is not None:
            host.stdout.close()
        if child:
            wait_until(lambda: gone(child), 10, "the forked child to exit")


async def test_a_fork_after_an_engine_stopped_leaves_the_childs_files_alone(tmp_path: Path) -> None:
    """The numbers of the stopped engine's pipes name other files by now: the child must not close them."""
    engine = ExecutionEngine(config(tmp_path, workers=2))
    async with engine:
        await engine.wait(await engine.execute(shell("true")), timeout=20)
    pipes = [os.pipe() for _ in range(4)]  # the lowest free numbers: the engine's, a moment ago
    try:
        pid = os.fork()
        if pid == 0:  # write on every pipe, and say by the exit code whether each write worked
            failed = 0
            for _, w in pipes:
                try:
                    os.write(w, b"x")
                except OSError:
                    failed += 1
            os._exit(failed)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the forked child lost files it had opened"
        assert [os.read(r, 1) for r, _ in pipes] == [b"x"] * 4
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_child_forked_on_the_engines_loop_that_ends_through_asyncio_run_leaves_the_parent_alone(
    tmp_path: Path,
) -> None:
    """The child's copy of the loop runs as `asyncio.run` ends there: it must not read, report or kill.

    Its epoll instance is the parent's, and its callbacks are the engine's: a
    worker's pipe read there was a worker "death", and the clean-up after it
    killed the parent's commands.
    """
    report, said = helper_report("fork_on_loop.py", str(tmp_path))
    assert report["child_exit"] == 0
    assert report["results"] == [["completed", None, 60]] * 3, said
    assert report["workers_after"] == report["workers_before"], "the parent's workers were replaced"
    assert "died" not in said, said
