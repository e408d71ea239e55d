"""Cancel and timeout end a command's whole tree, including escaped descendants."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
from conftest import HELPERS, PYTHON, Recorder, config, gone, result_of, run, shell, wait_until

from cloudops_execution_engine import ExecutionEngine, ExecutionRequest, ExecutionResult, ExecutionStatus
from cloudops_execution_engine.actors import process_tree

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


def tree(*flags: str, **kwargs: Any) -> ExecutionRequest:
    return run(PYTHON, str(HELPERS / "tree.py"), *flags, **kwargs)


async def started_tree(
    engine: ExecutionEngine, recorder: Recorder, request: object
) -> tuple[object, list[int]]:
    eid = await engine.execute(request)  # type: ignore[arg-type]

    def pids() -> list[int]:
        return [int(e.line.split()[1]) for e in recorder.of(eid) if e.event_type == "stdout"]

    await recorder.until(lambda _: len(pids()) == 3)
    return eid, pids()


@pytest.mark.parametrize("flags", [(), ("--close-stdio",)], ids=["holding-pipes", "detached-stdio"])
async def test_cancel_kills_three_levels_including_a_double_forked_setsid_grandchild(
    engine: ExecutionEngine, recorder: Recorder, flags: tuple[str, ...]
) -> None:
    eid, pids = await started_tree(engine, recorder, tree(*flags))
    assert not any(gone(pid) for pid in pids)
    await engine.cancel(eid)  # type: ignore[arg-type]
    result = await engine.wait(eid, timeout=20)  # type: ignore[arg-type]
    assert result.status is ExecutionStatus.CANCELLED
    survivors = [pid for pid in pids if not gone(pid)]
    assert survivors == [], "cancel left processes of the tree running"


async def test_timeout_kills_the_whole_tree(engine: ExecutionEngine, recorder: Recorder) -> None:
    eid, pids = await started_tree(engine, recorder, tree("--close-stdio", timeout_ms=1500))
    result = await engine.wait(eid, timeout=20)  # type: ignore[arg-type]
    assert result.status is ExecutionStatus.TIMEOUT
    assert [pid for pid in pids if not gone(pid)] == []


@pytest.mark.parametrize("ending", ["cancel", "timeout"])
async def test_each_process_of_a_tree_gets_one_sigterm(
    engine: ExecutionEngine, recorder: Recorder, tmp_path: Path, ending: str
) -> None:
    """The group's signal and the tree's each reach a process: a handler must not run twice.

    A second SIGTERM is how many programs are told to stop without cleaning up.
    """
    counts = tmp_path / "counts"
    counts.mkdir()
    timeout = {"timeout_ms": 1500} if ending == "timeout" else {}
    eid, pids = await started_tree(engine, recorder, tree("--count-term", str(counts), **timeout))
    if ending == "cancel":
        await engine.cancel(eid)  # type: ignore[arg-type]
    result = await engine.wait(eid, timeout=20)  # type: ignore[arg-type]
    assert isinstance(result, ExecutionResult)
    assert result.status is (ExecutionStatus.CANCELLED if ending == "cancel" else ExecutionStatus.TIMEOUT)
    assert [pid for pid in pids if not gone(pid)] == []
    assert {int(path.name): path.read_text() for path in counts.iterdir()} == {pid: "1" for pid in pids}


async def test_sigterm_ignoring_tree_is_killed_after_the_grace_period(
    tmp_path: Path, recorder: Recorder
) -> None:
    """Processes that ignore SIGTERM get SIGKILL once kill_grace_ms has passed."""
    async with ExecutionEngine(config(tmp_path, kill_grace_ms=400)).with_event_handler(recorder) as engine:
        eid, pids = await started_tree(engine, recorder, tree("--ignore-term"))
        await engine.cancel(eid)  # type: ignore[arg-type]
        result = await engine.wait(eid, timeout=20)  # type: ignore[arg-type]
        assert isinstance(result, ExecutionResult)
        assert result.status is ExecutionStatus.CANCELLED
        assert result.exit_code == -9, "the main process only dies of SIGKILL"
        assert result.duration.total_seconds() >= 0.4
        assert [pid for pid in pids if not gone(pid)] == []


async def test_processes_left_behind_by_a_finished_command_are_ended(
    engine: ExecutionEngine, tmp_path: Path
) -> None:
    """A command that exits leaving a daemon behind does not leak it into the host."""
    pidfile = tmp_path / "daemon.pid"
    eid = await engine.execute(
        run("bash", "-c", f"(setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}); exit 0")
    )
    result = await engine.wait(eid, timeout=20)
    assert result.status is ExecutionStatus.COMPLETED
    daemon = int(pidfile.read_text())
    wait_until(lambda: gone(daemon), 10, "the left-behind daemon to be ended")


async def test_daemons_still_starting_when_their_command_ends_are_ended(
    engine: ExecutionEngine, tmp_path: Path
) -> None:
    """A daemon caught in its `exec` at its command's end (its environment unreadable) is not missed.

    Each command starts `setsid sleep` and exits at once, so the daemon is often
    still becoming `sleep` when the worker looks at what the command left.
    """
    count = 40
    script = "(setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {}); exit 0"
    ids = [await engine.execute(run("bash", "-c", script.format(tmp_path / str(i)))) for i in range(count)]
    for eid in ids:
        assert (await result_of(engine, eid, timeout=30)).status is ExecutionStatus.COMPLETED
    daemons = [int((tmp_path / str(i)).read_text()) for i in range(count)]
    wait_until(lambda: all(gone(pid) for pid in daemons), 10, "every daemon to be ended")


async def test_a_daemon_whose_environment_reads_empty_for_a_moment_is_still_found(
    engine: ExecutionEngine, tmp_path: Path
) -> None:
    """An `exec` seen from outside, stretched to 50 ms: empty environment, then the marker.

    The daemon leaves the session and starts with an empty environment, so at
    its command's end nothing yet ties it to the command; 50 ms later it execs
    with the command's marker. The worker must look again rather than decide.
    """
    pidfile, fifo = tmp_path / "daemon.pid", tmp_path / "left-the-session"
    os.mkfifo(fifo)
    # The daemon tells the command through the fifo once it is out of the session and env-less.
    later = f'echo > {fifo}; sleep 0.05; exec env CLOUDOPS_EXECUTION_ID="$0" sleep 300'
    script = f"(setsid env -i sh -c '{later}' \"$CLOUDOPS_EXECUTION_ID\" </dev/null >/dev/null 2>&1 & "
    script += f"read -r _ < {fifo}; echo $! > {pidfile}); exit 0"
    result = await result_of(engine, await engine.execute(run("bash", "-c", script)), timeout=20)
    assert result.status is ExecutionStatus.COMPLETED
    daemon = int(pidfile.read_text())
    wait_until(lambda: gone(daemon), 10, "the daemon to be ended")


async def test_output_of_a_grandchild_after_the_main_process_exits_is_kept(
    engine: ExecutionEngine,
) -> None:
    """A descendant still holding the pipe after the main process exits is read to the end."""
    eid = await engine.execute(run("bash", "-c", "(sleep 0.3; echo from-grandchild) & echo from-main"))
    result = await engine.wait(eid, timeout=20)
    assert isinstance(result, ExecutionResult)
    assert result.status is ExecutionStatus.COMPLETED
    assert result.stdout == "from-main\nfrom-grandchild\n"


class _Unsignallable:
    """Stands in for a process that refuses a signal the way psutil reports it."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def send_signal(self, sig: int) -> None:
        raise self.error


def test_signalling_passes_over_only_vanished_and_forbidden_processes() -> None:
    """As the module says: gone or not ours to signal is passed over, and the rest still get the signal."""
    got: list[int] = []

    class Listener:
        def send_signal(self, sig: int) -> None:
            got.append(sig)

    procs: list[Any] = [
        _Unsignallable(psutil.NoSuchProcess(1)),
        _Unsignallable(psutil.ZombieProcess(2)),
        _Unsignallable(psutil.AccessDenied(3)),
        _Unsignallable(ProcessLookupError()),
        Listener(),
    ]
    process_tree.signal_processes(procs, signal.SIGTERM)
    process_tree.stop_and_kill(procs)
    assert got == [signal.SIGTERM, signal.SIGSTOP, signal.SIGKILL]
    with pytest.raises(ValueError, match="pid 0"):
        process_tree.signal_processes([cast(Any, _Unsignallable(ValueError("pid 0")))], signal.SIGTERM)


def test_descendants_are_listed_deepest_first_and_stop_and_kill_ends_them() -> None:
    """What a worker that stops at once kills: every descendant, children before their parents."""
    script = "sh -c 'sleep 30 & wait' & sleep 30 & wait"  # a child sh with its sleep, and a sleep
    top = subprocess.Popen(["sh", "-c", script])
    try:
        wait_until(lambda: len(process_tree.descendants(top.pid)) == 3, 10, "the tree to be started")
        found = process_tree.descendants(top.pid)
        position = {proc.pid: i for i, proc in enumerate(found)}
        for proc in found:
            parent = proc.ppid()
            if parent in position:
                assert position[proc.pid] < position[parent], "a child comes before its parent"
        process_tree.stop_and_kill(found)
        wait_until(lambda: all(gone(proc.pid) for proc in found), 10, "the descendants to die")
    finally:
        top.kill()
        top.wait(10)
    assert process_tree.descendants(top.pid) == []


@pytest.mark.parametrize("ending", ["cancel", "timeout"])
async def test_a_stopped_tree_is_woken_to_hear_its_sigterm(
    tmp_path: Path, recorder: Recorder, ending: str
) -> None:
    """A stopped process keeps SIGTERM pending until it runs again: it gets SIGCONT after it, as from systemd.

    Else its handler never runs and it dies only of SIGKILL, a whole grace period later.
    """
    script = (
        "trap 'echo got-term; exit 3' TERM; sleep 30 & kill -STOP $!; echo ready; kill -STOP $$; echo resumed"
    )
    async with ExecutionEngine(config(tmp_path, kill_grace_ms=5000)).with_event_handler(recorder) as engine:
        timeout = {"timeout_ms": 500} if ending == "timeout" else {}
        eid = await engine.execute(shell(script, **timeout))
        await recorder.until(lambda events: any(getattr(e, "line", None) == "ready" for e in events))
        if ending == "cancel":
            await engine.cancel(eid)
        result = await engine.wait(eid, timeout=20)
    assert isinstance(result, ExecutionResult)
    assert result.status is (ExecutionStatus.CANCELLED if ending == "cancel" else ExecutionStatus.TIMEOUT)
    assert (result.exit_code, result.stdout) == (3, "ready\ngot-term\n"), "its SIGTERM handler did not run"
    assert result.duration.total_seconds() < 4, "it waited out the grace period"


def test_an_abandoned_process_counts_as_ended_once_dead_not_once_reaped() -> None:
    """A dead worker's orphans go to init (or the host's subreaper), which reaps when it will.

    Their executions fail once they are dead: the kill does not wait for a reaper.
    """
    marker = "abandoned-by-a-test"
    keeper = subprocess.Popen(
        [
            PYTHON,
            "-c",
            "import os, subprocess, time\n"
            f"env = {{**os.environ, {process_tree.MARKER_ENV!r}: {marker!r}}}\n"
            "p = subprocess.Popen(['sleep', '30'], env=env)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(30)  # never reaps it\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert keeper.stdout is not None
        orphan = int(keeper.stdout.readline())
        started = time.monotonic()
        assert process_tree.kill_abandoned({marker}, set()) == 1
        took = time.monotonic() - started
        assert gone(orphan)
        assert psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE, "its keeper reaped it"
        assert took < 0.3, f"the kill waited {took:.2f} s for a reaper"
    finally:
        keeper.kill()
        keeper.communicate(timeout=10)


def test_an_abandoned_process_is_taken_by_its_engine_or_by_no_engine_but_not_by_another() -> None:
    """`kill_abandoned` after a worker's death: the same execution id may be another engine's.

    A process whose engine id was removed (a command that cleared it) goes by its marker alone.
    """
    marker = "shared-execution-id"
    keepers = []
    for engine in ("ours", "theirs", None):
        env = {**os.environ, process_tree.MARKER_ENV: marker}
        env.pop(process_tree.ENGINE_ENV, None)
        if engine is not None:
            env[process_tree.ENGINE_ENV] = engine
        keepers.append(subprocess.Popen(["sleep", "30"], env=env))
    try:
        ours, theirs, unnamed = keepers
        wait_until(lambda: all(psutil.Process(k.pid).environ() for k in keepers), 10, "the sleeps to exec")
        assert process_tree.kill_abandoned({process_tree.marker_key(marker, "ours")}, set()) == 2
        for keeper in (ours, unnamed):
            assert keeper.wait(10) == -signal.SIGKILL
        assert theirs.poll() is None, "another engine's process of the same id was killed"
    finally:
        for keeper in keepers:
            keeper.kill()
            keeper.wait(10)
