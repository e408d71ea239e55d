"""The spare worker: started before its engine, taken by the first pool of its own process only.

The command line starts one while it imports the models, so that the
worker's start and the host's overlap; whatever the command, it leaves no
worker behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import HELPERS, PYTHON, config, gone, result_of, run, wait_until

from cloudops_execution_engine import ExecutionEngine
from cloudops_execution_engine.actors import spare_worker

pytestmark = pytest.mark.timeout(60)

CLI = [PYTHON, "-m", "cloudops_execution_engine"]


def worker_pids(engine: ExecutionEngine) -> list[int]:
    pool = engine._supervisor._pool
    assert pool is not None
    return [worker.pid for worker in pool.workers]


@pytest.fixture
def no_spare_left() -> Any:
    yield
    spare_worker.discard()


async def test_the_first_engine_of_the_process_runs_on_the_spare_and_a_second_starts_its_own(
    tmp_path: Path, no_spare_left: None
) -> None:
    spare = spare_worker.start()
    assert spare is not None
    first = ExecutionEngine(config(tmp_path / "a", workers=1))
    second = ExecutionEngine(config(tmp_path / "b", workers=1))
    async with first, second:
        assert worker_pids(first) == [spare]
        assert spare not in worker_pids(second)
        for engine in (first, second):
            result = await result_of(engine, await engine.execute(run("echo", "served")), timeout=30)
            assert result.stdout == "served\n", result.error
    assert gone(spare)


async def test_a_spare_that_died_before_an_engine_took_it_is_replaced_not_used(
    tmp_path: Path, no_spare_left: None
) -> None:
    spare = spare_worker.start()
    assert spare is not None
    os.kill(spare, signal.SIGKILL)
    wait_until(lambda: gone(spare), 10, "the spare to die")
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        assert worker_pids(engine) != [spare]
        result = await result_of(engine, await engine.execute(run("echo", "served")), timeout=30)
        assert result.stdout == "served\n", result.error


def test_a_spare_no_engine_took_is_ended_and_its_pipes_closed(no_spare_left: None) -> None:
    """`discard` kills and reaps it; the autouse leak check sees no process or fd left."""
    spare = spare_worker.start()
    assert spare is not None
    assert spare_worker.start() == spare  # one spare at a time
    spare_worker.discard()
    assert gone(spare)
    assert spare_worker.take() is None


def test_a_forked_child_never_takes_its_parents_spare(no_spare_left: None) -> None:
    spare = spare_worker.start()
    assert spare is not None
    child = os.fork()
    if child == 0:
        # A pre-forking server's child: the spare's pipes are its parent's to use.
        os._exit(0 if spare_worker.take() is None else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    taken = spare_worker.take()
    assert taken is not None
    assert taken[0].pid == spare
    process, to_worker, from_worker = taken
    os.close(to_worker)
    os.close(from_worker)
    process.kill()
    process.join()
    process.close()


def watched(*words: str, tmp_path: Path) -> dict[str, Any]:
    """Run the command line under `orphan_watch`: its exit code, its output, and what it left running."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(HELPERS / "orphan_watch.py"), *CLI, *words],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
        check=True,
    )
    report: dict[str, Any] = json.loads(done.stdout)
    return report


CLI_CASES = {
    "runs": (("run", "--", "echo", "from the spare"), 0),
    "help": (("run", "--help"), 0),
    "refused option": (("run", "--timeout", "0", "--", "true"), 2),
    "does not start": (("run", "--", "no-such-program-xyz"), 127),
    "fails": (("run", "--shell", "--", "exit 3"), 3),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_the_command_line_leaves_no_worker_behind_and_keeps_its_exit_code(case: str, tmp_path: Path) -> None:
    words, code = CLI_CASES[case]
    report = watched(*words, tmp_path=tmp_path)
    assert report["left"] == []
    assert report["code"] == code
    if case == "runs":
        assert report["stdout"] == "from the spare\n"
