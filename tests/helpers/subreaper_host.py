"""A host that adopts orphans (as PID 1 in a container does, or any command another engine runs).

It starts and shuts down engines four times, some with a command still
running, then SIGKILLs a worker while its command runs, and twice more while
an engine serves. It prints one
JSON line: its children left after the cycles, and after the kills once the
engine has had up to 5 s to tidy up.
"""

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import time

import psutil

from cloudops_execution_engine import (
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionRequest,
    ShellCommand,
)

PR_SET_CHILD_SUBREAPER = 36
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
log_dir = sys.argv[1]


def children() -> list[str]:
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            found.append(f"{child.name()} {child.status()}")
    return found


def true() -> ExecutionRequest:
    return ExecutionRequest(command=ExecCommand(program="true"))


async def cycle(busy: bool) -> None:
    async with ExecutionEngine(ExecutionConfig(workers=2, log_dir=log_dir, kill_grace_ms=100)) as engine:
        for _ in range(3):
            await engine.wait(await engine.execute(true()))
        if busy:
            await engine.execute(ExecutionRequest(command=ShellCommand(command="sleep 30 & sleep 30")))


async def kills() -> list[str]:
    async with ExecutionEngine(ExecutionConfig(workers=2, log_dir=log_dir)) as engine:
        for _ in range(2):
            await engine.wait(await engine.execute(true()))
            workers = [p for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE]
            workers = [p for p in workers if "python" in (p.cmdline() or [""])[0]]
            os.kill(workers[0].pid, signal.SIGKILL)
            await engine.wait(await engine.execute(true()))  # served on by the others
        deadline = time.monotonic() + 5
        # The process table, polled: no event says a zombie was reaped.
        while any("zombie" in child for child in children()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return [child for child in children() if "zombie" in child]


async def dies_mid_command() -> None:
    """The only worker SIGKILLed while its command runs: the command comes to this process, killed."""
    started = asyncio.Event()

    class Started:
        async def on_event(self, event: object) -> None:
            if getattr(event, "event_type", "") == "started":
                started.set()

    config = ExecutionConfig(workers=1, log_dir=log_dir)
    async with ExecutionEngine(config).with_event_handler(Started()) as engine:
        running = await engine.execute(ExecutionRequest(command=ShellCommand(command="sleep 30")))
        await started.wait()
        workers = [p for p in psutil.Process().children() if "python" in (p.cmdline() or [""])[0]]
        os.kill(workers[0].pid, signal.SIGKILL)
        await engine.wait(running)


async def main() -> None:
    for round_ in range(4):
        await cycle(busy=round_ % 2 == 1)
    after_cycles = children()
    await dies_mid_command()
    after_kills = await kills()
    print(json.dumps({"after_cycles": after_cycles, "after_kills": after_kills}))


asyncio.run(main())
