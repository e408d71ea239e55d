"""A host that forks after starting its engine, as a pre-forking server does; it reports what each side saw.

    fork_host.py DIR MODE

The parent starts a `SyncExecutionEngine` (two workers, a journal in DIR),
starts a command that prints `started <its pid>` and then waits for the file
DIR/gate, and forks. What the child does, MODE:

    exit    nothing: it exits normally, so its exit handlers run
    use     calls the engine it inherited: execute(), get_status(), shutdown()
    async   the same on an `ExecutionEngine` the parent runs on a loop in a thread
            of its own, each call under a new loop in the child
    own     starts an engine of its own on DIR/own, runs `echo kid`, shuts it down
    drop    lets go of both inherited engines (the sync one and, as with `async`, one
            the parent runs on a loop of its own), as if they were garbage collected
    linger  prints a JSON line (the parent's worker pids, the command's pid) and
            waits until its stdin closes; the parent waits too, to be killed

The child writes its findings to DIR/child.json and its stderr to
DIR/child.err. Except with `linger`, the parent then waits for the child,
opens the gate, waits for the command and runs one more, and prints one JSON
line with all of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import psutil

from cloudops_execution_engine import (
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionRequest,
    SyncExecutionEngine,
)

# A call that hangs in the child ends it by SIGALRM instead, which the test reports.
_CHILD_ALARM_S = 20


def shell(command: str) -> ExecutionRequest:
    return ExecutionRequest(command=ExecCommand(program="/bin/sh", args=["-c", command]))


def workers() -> list[int]:
    return sorted(child.pid for child in psutil.Process().children())


def attempt(call: Any) -> str:
    try:
        call()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "returned"


def child(mode: str, directory: Path, engine: SyncExecutionEngine, eid: Any, report: dict[str, Any]) -> None:
    signal.alarm(_CHILD_ALARM_S)
    err = os.open(directory / "child.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(err, 2)
    found: dict[str, Any] = {"pid": os.getpid()}
    if mode == "use":
        found["execute"] = attempt(lambda: engine.execute(shell("echo child")))
        found["get_status"] = attempt(lambda: engine.get_status(eid))
        found["shutdown"] = attempt(engine.shutdown)
    elif mode == "async":
        inner = report.pop("async_engine")
        found["execute"] = attempt(lambda: asyncio.run(inner.execute(shell("echo child"))))
        found["get_status"] = attempt(lambda: asyncio.run(inner.get_status(report["async_id"])))
        found["shutdown"] = attempt(lambda: asyncio.run(inner.shutdown()))
    elif mode == "drop":
        inner = report.pop("async_engine")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine._let_go()  # what garbage collection calls
            inner._let_go()
        found["warnings"] = [str(w.message) for w in caught]
    elif mode == "own":
        own = directory / "own"
        with SyncExecutionEngine(ExecutionConfig(log_dir=own / "logs", journal=own / "j.sqlite3")) as mine:
            result = mine.wait(mine.execute(shell("echo kid")), timeout=20)
            found["own"] = result.stdout  # type: ignore[union-attr]
    elif mode == "linger":
        print(json.dumps({**report, "child": os.getpid()}), flush=True)
        sys.stdin.read()
    (directory / "child.json").write_text(json.dumps(found))
    sys.exit(0)  # a normal exit: atexit and multiprocessing's exit handler run


def main() -> None:
    directory, mode = Path(sys.argv[1]), sys.argv[2]
    gate = directory / "gate"
    config = ExecutionConfig(log_dir=directory / "logs", journal=directory / "j.sqlite3", workers=2)
    engine = SyncExecutionEngine(config)
    engine.start()
    eid = engine.execute(shell(f"echo started $$; until [ -e {gate} ]; do sleep 0.01; done; echo done"))
    command = 0
    for event in engine.events(eid):
        if event.event_type == "stdout":
            command = int(event.line.split()[1])
            break
    report: dict[str, Any] = {"parent": os.getpid(), "workers_before": workers(), "command": command}
    loop = None
    if mode in ("async", "drop"):
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        inner = ExecutionEngine(ExecutionConfig(log_dir=directory / "logs", workers=1))
        asyncio.run_coroutine_threadsafe(inner.start(), loop).result(30)
        ran = asyncio.run_coroutine_threadsafe(inner.execute(shell("true")), loop).result(30)
        asyncio.run_coroutine_threadsafe(inner.wait(ran, timeout=20), loop).result(30)
        report["workers_before"] = workers()
        report["async_engine"], report["async_id"] = inner, ran
    pid = os.fork()
    if pid == 0:
        child(mode, directory, engine, eid, report)
    if mode == "linger":
        sys.stdin.read()
        return
    _, status = os.waitpid(pid, 0)
    report["child_exit"] = os.waitstatus_to_exitcode(status)
    gate.touch()
    result = engine.wait(eid, timeout=20)
    report["status"] = result.status.value
    report["stdout"] = result.stdout  # type: ignore[union-attr]
    report["error"] = result.error  # type: ignore[union-attr]
    report["workers_after"] = workers()
    again = engine.wait(engine.execute(shell("echo again")), timeout=20)
    report["again"] = again.stdout  # type: ignore[union-attr]
    report["child"] = json.loads((directory / "child.json").read_text())
    report["child_err"] = (directory / "child.err").read_text()
    began = time.monotonic()
    if loop is not None:
        inner = report.pop("async_engine")
        report.pop("async_id")
        asyncio.run_coroutine_threadsafe(inner.shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
    engine.shutdown()
    report["shutdown_s"] = time.monotonic() - began
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
