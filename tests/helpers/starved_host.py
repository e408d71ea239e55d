"""A host that runs out of file descriptors, reporting what its engine does as JSON lines.

First it starts an engine with its soft limit on open files too low for a worker
to start. Then, with the limit back, it runs a long command on its one worker
and queues another behind it, lowers the limit again so that a worker cannot be
started once the first one's pipes are gone (while a scan of /proc still can),
SIGKILLs the worker, and raises the limit once the pool says it is broken.

Each line on stdout is one JSON object with an "event" key: "start", "worker",
"broken", "recovered", "log" (a warning or error the engine logged), "result",
"closed". The pool's calls are seen through a subclass that also passes them
on to whatever the supervisor gave the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import sys
from collections.abc import Iterator, Set
from pathlib import Path
from typing import Any

import psutil

from cloudops_execution_engine import (
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionRequest,
    ExecutionResult,
    ShellCommand,
    SpawnFailed,
)
from cloudops_execution_engine.actors import supervisor
from cloudops_execution_engine.actors.local_pool import LocalWorkerPool
from cloudops_execution_engine.actors.pool import OnBroken, OnRecovered

# A start takes four fds for the worker's pipes and four more for the launch;
# a scan of /proc takes one at a time. With seven free, a start always fails
# and a scan running beside it never does.
FREE_AFTER_DEATH = 7


def report(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Relay(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        report("log", level=record.levelname, logger=record.name, message=record.getMessage())


class Seen:
    broken = asyncio.Event()
    recovered = asyncio.Event()
    output = asyncio.Event()

    @classmethod
    async def on_event(cls, event: Any) -> None:
        if event.event_type == "stdout":
            cls.output.set()


class ObservedPool(LocalWorkerPool):
    def __init__(
        self,
        *args: Any,
        on_broken: OnBroken | None = None,
        on_recovered: OnRecovered | None = None,
        **kwargs: Any,
    ) -> None:
        def broken(cause: str) -> None:
            report("broken", cause=cause)
            Seen.broken.set()
            if on_broken is not None:
                on_broken(cause)

        def recovered() -> None:
            report("recovered")
            Seen.recovered.set()
            if on_recovered is not None:
                on_recovered()

        super().__init__(*args, on_broken=broken, on_recovered=recovered, **kwargs)


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, closed by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def soft_limit_leaving(free: int, freed: Set[int] = frozenset()) -> int:
    """The soft limit under which exactly `free` fd numbers are unused once `freed` are closed."""
    taken = set(open_fds()) - freed
    limit = unused = 0
    while unused < free:
        if limit not in taken:
            unused += 1
        limit += 1
    return limit


@contextlib.contextmanager
def fd_limit(soft: int) -> Iterator[None]:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def shared_with(pid: int) -> set[int]:
    """This process's fds on pipes that process `pid` also holds: those its death closes here."""
    theirs = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            theirs.add(os.readlink(f"/proc/{pid}/fd/{name}"))
    return {fd for fd, target in open_fds().items() if target.startswith("pipe:") and target in theirs}


async def start_without_fds(config: ExecutionConfig) -> None:
    engine = ExecutionEngine(config)
    before = open_fds()
    with fd_limit(soft_limit_leaving(3)):
        try:
            await engine.start()
        except SpawnFailed as exc:
            report("start", error=str(exc))
        else:
            report("start", error=None)
    report("start fds", leaked=sorted(set(open_fds()) - set(before)))
    await engine.shutdown()


async def the_sleep(worker: psutil.Process) -> psutil.Process:
    """The command's process once it is `sleep`: "up" can arrive before bash has exec'd it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        # The worker's other child is its spawner, which runs no command.
        found = [child for child in worker.children() if child.name() == "sleep"]
        if found:
            return found[0]
        assert loop.time() < deadline, f"no sleep among {worker.children()}"
        await asyncio.sleep(0.005)  # polled, with the deadline above


async def main() -> None:
    supervisor.LocalWorkerPool = ObservedPool  # type: ignore[attr-defined]
    relay = Relay(logging.WARNING)
    logging.getLogger("cloudops_execution_engine").addHandler(relay)
    config = ExecutionConfig(
        log_dir=Path(sys.argv[1]), workers=1, max_concurrent_executions=1, kill_grace_ms=500
    )
    await start_without_fds(config)
    async with ExecutionEngine(config).with_event_handler(Seen) as engine:
        long = await engine.execute(ExecutionRequest(command=ShellCommand(command="echo up; exec sleep 30")))
        await asyncio.wait_for(Seen.output.wait(), 30)
        queued = await engine.execute(ExecutionRequest(command=ExecCommand(program="echo", args=["queued"])))
        (worker,) = psutil.Process().children()
        command = await the_sleep(worker)
        report("worker", pid=worker.pid, command=command.pid)
        with fd_limit(soft_limit_leaving(FREE_AFTER_DEATH, shared_with(worker.pid))):
            os.kill(worker.pid, signal.SIGKILL)
            await asyncio.wait_for(Seen.broken.wait(), 30)
        await asyncio.wait_for(Seen.recovered.wait(), 30)
        after = await engine.execute(ExecutionRequest(command=ExecCommand(program="echo", args=["after"])))
        for name, eid in (("long", long), ("queued", queued), ("after", after)):
            result = await engine.wait(eid, timeout=30)
            assert isinstance(result, ExecutionResult)
            report("result", name=name, status=result.status.value, error=result.error, stdout=result.stdout)
    report("closed")


asyncio.run(main())
