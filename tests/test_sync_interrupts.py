"""Interrupts and signal handlers on the host's main thread, and an engine dropped between runs of its loop.

Python runs a signal handler on the main thread, between any two steps of
what that thread was doing: perhaps inside one of the engine's own calls, or
inside `shutdown()`. The engine must neither deadlock on itself there nor
leave its work half done.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import PYTHON, config, gone, host_children, run, wait_until

from cloudops_execution_engine import ExecutionEngine, ExecutionStatus

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leaks")]

# A host whose SIGUSR1 handler reports a status and whose SIGTERM handler cancels or shuts down.
# Each signal is raised as the main thread enters `run_coroutine_threadsafe`, which `_call` does
# holding the engine's lock: the handler runs right there, on the thread that holds it.
SIGNAL_HOST = r"""
import json, signal, sys, time
import psutil
from cloudops_execution_engine import (
    EngineClosed, ExecutionConfig, ExecutionRequest, ShellCommand, SyncExecutionEngine,
)

scenario, log_dir = sys.argv[1], sys.argv[2]
engine = SyncExecutionEngine(ExecutionConfig(log_dir=log_dir, workers=1, kill_grace_ms=500))
eid = engine.execute(ExecutionRequest(command=ShellCommand(command="exec sleep 30")))
said = []

def on_signal(signum, frame):
    try:
        if signum == signal.SIGUSR1:
            said.append(engine.get_status(eid).value)
        elif "cancel" in scenario:
            engine.cancel(eid)
            said.append("cancel returned")
        else:
            engine.shutdown()
            said.append("shutdown returned")
    except EngineClosed:
        said.append("EngineClosed")

signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
armed = []

def land_inside_the_lock(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "run_coroutine_threadsafe" and armed:
        signal.raise_signal(armed.pop())

def with_signal(signum, call):
    armed.append(signum)
    sys.setprofile(land_inside_the_lock)
    try:
        return call()
    except EngineClosed:
        return "EngineClosed"
    finally:
        sys.setprofile(None)

signum = signal.SIGUSR1 if "status" in scenario else signal.SIGTERM
if scenario.startswith("in-shutdown"):
    outer = with_signal(signum, engine.shutdown)
else:
    outer = with_signal(signum, lambda: engine.get_status(eid).value)
final = engine.wait(eid, timeout=20).status.value if "cancel" in scenario else None
engine.shutdown()
deadline = time.monotonic() + 10
while (left := [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]):
    if time.monotonic() > deadline:
        break
    time.sleep(0.01)
print(json.dumps({"said": said, "outer": outer, "final": final, "left": len(left)}))
"""

STATUSES = {s.value for s in ExecutionStatus}


@pytest.mark.parametrize(
    ("scenario", "said", "outer"),
    [
        # A status report from inside another call: both are answered.
        ("in-call-status", {"running"}, {"running"}),
        # A cancel from inside another call: it cancels, the call is answered.
        ("in-call-cancel", {"cancel returned"}, {"running", "cancelled"}),
        # A shutdown from inside another call: it shuts down; the call it cut into is refused.
        ("in-call-shutdown", {"shutdown returned"}, {"EngineClosed"}),
        # A shutdown from inside shutdown(): the handler cannot wait for the call it interrupted,
        # and returns; that call finishes once the handler has returned.
        ("in-shutdown-shutdown", {"shutdown returned"}, {None}),
        # A status report from inside shutdown(): answered while it winds down, or refused.
        ("in-shutdown-status", STATUSES | {"EngineClosed"}, {None}),
    ],
)
def test_a_signal_handler_calling_the_engine_inside_a_call_does_not_deadlock(
    tmp_path: Path, scenario: str, said: set[str], outer: set[str | None]
) -> None:
    """A signal handler on the main thread may call the engine whatever that thread was doing in it.

    `_call` held a lock that is not reentrant while it submitted to the loop:
    a handler that landed there blocked for ever on a lock its own thread held.
    """
    try:
        done = subprocess.run(
            [PYTHON, "-c", SIGNAL_HOST, scenario, str(tmp_path / "logs")],
            capture_output=True,
            text=True,
            timeout=40,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: the host deadlocked in a signal handler that called the engine")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    outcome = json.loads(done.stdout)
    assert len(outcome["said"]) == 1, outcome
    assert outcome["said"][0] in said, outcome
    assert outcome["outer"] in outer, outcome
    if "cancel" in scenario:
        assert outcome["final"] == "cancelled"
    assert outcome["left"] == 0, "a worker or command outlived shutdown()"


# Ctrl-C twice during shutdown(): once while it waits for the engine's wind-down, once while it
# waits for the loop to be swept and stopped. Each comes as the main thread is blocked there.
TWICE_INTERRUPTED_HOST = r"""
import signal, sys, threading, time
import psutil
from cloudops_execution_engine import ExecutionConfig, ExecutionRequest, ShellCommand, SyncExecutionEngine

engine = SyncExecutionEngine(ExecutionConfig(log_dir=sys.argv[1], workers=2, kill_grace_ms=3000))
ids = [
    engine.execute(ExecutionRequest(command=ShellCommand(command="trap '' TERM; echo up; sleep 100")))
    for _ in range(2)
]
for eid in ids:
    for event in engine.events(eid):
        if event.event_type == "stdout":
            break
main = threading.main_thread().ident

def blocked_in(name):
    frame = innermost = sys._current_frames().get(main)
    names = set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return {"shutdown", name} <= names and innermost.f_code.co_filename == threading.__file__

def press_ctrl_c_twice():
    for where in ("_call", "_stop_loop"):
        deadline = time.monotonic() + 20
        while not blocked_in(where):
            if time.monotonic() > deadline:
                print("NEVER BLOCKED IN", where, flush=True)
                return
            time.sleep(0.002)
        signal.pthread_kill(main, signal.SIGINT)

presser = threading.Thread(target=press_ctrl_c_twice)
presser.start()
try:
    engine.shutdown()
    print("NOT INTERRUPTED", flush=True)
except KeyboardInterrupt:
    pass
presser.join()
deadline = time.monotonic() + 10
while (left := [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]):
    if time.monotonic() > deadline:
        break
    time.sleep(0.01)
print("LEFT", len(left), flush=True)
second = threading.Thread(target=engine.shutdown, daemon=True)
second.start()
second.join(10)
print("SECOND", "hung" if second.is_alive() else "returned", flush=True)
# The interpreter's exit shuts down open engines too (atexit): it must not hang either.
"""


def test_shutdown_interrupted_twice_still_stops_everything_and_a_later_call_returns(tmp_path: Path) -> None:
    """Two Ctrl-C during `shutdown()`: its work is finished all the same, and nothing waits for ever.

    The second interrupt stopped the loop under the engine's wind-down: the
    workers were never told to stop, and the first call never said it was
    done, so a second `shutdown()` and the interpreter's exit waited for ever.
    """
    try:
        done = subprocess.run(
            [PYTHON, "-c", TWICE_INTERRUPTED_HOST, str(tmp_path / "logs")],
            capture_output=True,
            text=True,
            timeout=75,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the host never exited; it said: {exc.stdout!r}")
    lines = done.stdout.splitlines()
    assert lines == ["LEFT 0", "SECOND returned"], (done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr


def let_go(held: list[Any]) -> None:
    """Drop the only reference to what `held` holds, and collect it."""
    held.clear()
    gc.collect()


def test_an_engine_let_go_while_its_loop_is_idle_is_stopped_without_it(tmp_path: Path) -> None:
    """A host that runs its loop now and then (`run_until_complete`) drops an engine between two runs.

    The stop was queued on the loop, which was not running: nothing stopped
    the workers or their commands, and closing the loop threw the stop away.
    The loop stays the host's, and works as before.
    """
    before = host_children()
    loop = asyncio.new_event_loop()
    try:
        held: list[ExecutionEngine] = []

        async def start_a_command() -> tuple[int, list[int]]:
            engine = ExecutionEngine(config(tmp_path, workers=1))
            held.append(engine)
            eid = await engine.execute(run("sleep", "30"))
            for _ in range(2000):
                if engine._supervisor.entry(eid).pid:  # type: ignore[union-attr]
                    break
                await asyncio.sleep(0.01)  # its pid comes with its start, on a later turn of the loop
            pid = engine._supervisor.entry(eid).pid  # type: ignore[union-attr]
            assert pid
            return pid, [w.pid for w in engine._supervisor._pool.workers]  # type: ignore[union-attr]

        sleeper, workers = loop.run_until_complete(start_a_command())
        assert not gone(sleeper)
        with pytest.warns(ResourceWarning, match="without shutdown"):
            let_go(held)
        # The loop stays idle meanwhile.
        wait_until(lambda: gone(sleeper), 10, "its command to end")
        wait_until(lambda: host_children() <= before, 10, "its workers to end")
        assert not any(map(psutil.pid_exists, workers)), "its workers were left unreaped"

        async def echo() -> Any:
            # Pipes that may get the descriptor numbers the engine's workers had.
            proc = await asyncio.create_subprocess_exec("echo", "again", stdout=subprocess.PIPE)
            return (await proc.communicate())[0]

        assert loop.run_until_complete(asyncio.wait_for(echo(), 10)) == b"again\n"
    finally:
        loop.close()
