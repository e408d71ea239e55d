"""A host that forks from a coroutine on its engine's loop, whose child then ends through `asyncio.run`.

    fork_on_loop.py DIR

The parent runs an `ExecutionEngine` (log files in DIR) with three commands
printing a line every 10 ms, and forks from the coroutine that started them.
The child works a while (the parent, blocked in `waitpid` on its loop, reads
nothing meanwhile, so the workers' frames wait in the pipes) and ends with
`sys.exit(0)`: `asyncio.run` then runs the child's copy of the loop, whose
epoll instance is the parent's and whose callbacks are the engine's, to
cancel its tasks. The parent waits for its commands and prints one JSON line:
each one's status, error and line count, the child's exit status, and its
workers before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from uuid import UUID

import psutil

from cloudops_execution_engine import (
    ExecutionConfig,
    ExecutionEngine,
    ExecutionEvent,
    ExecutionRequest,
    ExecutionResult,
    ShellCommand,
)

LINES = 60
COMMAND = f"for i in $(seq {LINES}); do echo $i; sleep 0.01; done"


class Printing:
    """Set once every command has printed: their output is flowing through the workers' pipes."""

    def __init__(self) -> None:
        self.printed: set[UUID] = set()
        self.all = asyncio.Event()
        self.expected = 0

    async def on_event(self, event: ExecutionEvent) -> None:
        if event.event_type == "stdout":
            self.printed.add(event.execution_id)
            if len(self.printed) == self.expected:
                self.all.set()


async def main(directory: Path) -> None:
    printing = Printing()
    engine = ExecutionEngine(ExecutionConfig(log_dir=directory / "logs", workers=2))
    engine.with_event_handler(printing)
    await engine.start()
    workers = sorted(p.pid for p in psutil.Process().children())
    ids = [await engine.execute(ExecutionRequest(command=ShellCommand(command=COMMAND))) for _ in range(3)]
    printing.expected = len(ids)
    await asyncio.wait_for(printing.all.wait(), 20)
    pid = os.fork()
    if pid == 0:
        time.sleep(0.3)  # noqa: ASYNC251  # the child's own work, with its loop's copy idle
        sys.exit(0)
    # Blocking on purpose: the loop reads nothing meanwhile, so the workers' frames wait in the pipes.
    _, status = os.waitpid(pid, 0)  # noqa: ASYNC222
    results = []
    for eid in ids:
        result = await engine.wait(eid, timeout=20)
        assert isinstance(result, ExecutionResult)
        results.append([result.status.value, result.error, len(result.stdout.splitlines())])
    after = sorted(p.pid for p in psutil.Process().children())
    await engine.shutdown()
    report = {
        "child_exit": os.waitstatus_to_exitcode(status),
        "results": results,
        "workers_before": workers,
        "workers_after": after,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
