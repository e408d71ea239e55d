"""Worker entry points that misbehave on purpose, for the pool's fault tests.

Each has `worker_main`'s signature and is what a `LocalWorkerPool` given it as
`worker_target` runs in its worker processes; a spawned worker imports this
module by name. The faults at start-up strike every worker. The faults while
running strike only on a `Run` whose command line holds `TRIGGER`, so the
pool's other executions, and the workers that replace a dead one, behave.
"""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from cloudops_execution_engine.actors import worker
from cloudops_execution_engine.protocol import DEFAULT_MAX_FRAME, Kind, Run, Shutdown

TRIGGER = "fault-injection-trigger"
EXIT_CODE = 70
# Past the largest frame the supervisor accepts with a small `max_output_bytes`.
OVERSIZE = DEFAULT_MAX_FRAME + 1024 * 1024


def exit_before_hello(read_conn: Connection, write_conn: Connection, detach: bool = False) -> None:
    os._exit(EXIT_CODE)


def hang_before_hello(read_conn: Connection, write_conn: Connection, detach: bool = False) -> None:
    # Holds its pipes open and says nothing: only the hello timeout ends it.
    while True:
        time.sleep(3600)


def _triggered(message: object) -> bool:
    return isinstance(message, Run) and TRIGGER in message.display


class _ExitOnRun(worker.Worker):
    def _handle(self, message: object) -> None:
        if _triggered(message):
            os._exit(EXIT_CODE)
        super()._handle(message)


class _KillSelfOnRun(worker.Worker):
    def _handle(self, message: object) -> None:
        if _triggered(message):
            os.kill(os.getpid(), signal.SIGKILL)
        super()._handle(message)


class _OversizedFinished(worker.Worker):
    """Sends the triggering execution's `Finished` padded past the frame limit."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._targets: set[bytes] = set()

    def _handle(self, message: object) -> None:
        if _triggered(message):
            assert isinstance(message, Run)
            self._targets.add(message.execution_id)
        super()._handle(message)

    def _send(self, wire: list[Any]) -> None:
        if wire[0] == Kind.FINISHED and wire[1] in self._targets:
            wire = [*wire, b"\0" * OVERSIZE]
        super()._send(wire)


def _serve_as(kind: type[worker.Worker], read_conn: Connection, write_conn: Connection, detach: bool) -> None:
    # `worker_main` builds its worker by this name: this process only ever runs one.
    worker.Worker = kind  # type: ignore[misc]
    worker.worker_main(read_conn, write_conn, detach)


def exit_on_run(read_conn: Connection, write_conn: Connection, detach: bool = False) -> None:
    _serve_as(_ExitOnRun, read_conn, write_conn, detach)


def kill_self_on_run(read_conn: Connection, write_conn: Connection, detach: bool = False) -> None:
    _serve_as(_KillSelfOnRun, read_conn, write_conn, detach)


def oversized_finished(read_conn: Connection, write_conn: Connection, detach: bool = False) -> None:
    _serve_as(_OversizedFinished, read_conn, write_conn, detach)


# How long a worker told to shut down lingers after closing its output pipe.
LINGER = 0.5


class _PipeClosedBeforeExit(worker.Worker):
    """On Shutdown, closes its output pipe, then lingers a moment before it exits.

    The host reads the end of the pipe before the process's sentinel fires:
    the order a slow exit (a large worker freeing its memory) can give.
    """

    def _handle(self, message: object) -> None:
        if isinstance(message, Shutdown):
            os.close(self._wfd)
            time.sleep(LINGER)
            os._exit(0)
        super()._handle(message)


def pipe_closed_before_exit(read_conn: Connection, write_conn: Connection, detach: bool = False) -> None:
    _serve_as(_PipeClosedBeforeExit, read_conn, write_conn, detach)


# Where `exit_seen_only_by_asking` writes the pid of the process that keeps its sentinel open.
HOLDER_PIDFILE = "CLOUDOPS_TEST_HOLDER_PIDFILE"


class _ExitSeenOnlyByAsking(worker.Worker):
    """On Shutdown, leaves a process holding its files for a while, then exits at once.

    That process keeps the write end of the worker's sentinel open, so the
    host learns of the exit from the end of the pipe and by asking for the
    exit status, never from the sentinel.
    """

    def _handle(self, message: object) -> None:
        if isinstance(message, Shutdown):
            holder = os.fork()
            if holder == 0:
                time.sleep(LINGER * 4)
                os._exit(0)
            with open(os.environ[HOLDER_PIDFILE], "w") as pidfile:
                pidfile.write(str(holder))
            os._exit(0)
        super()._handle(message)


def exit_seen_only_by_asking(read_conn: Connection, write_conn: Connection, detach: bool = False) -> None:
    _serve_as(_ExitSeenOnlyByAsking, read_conn, write_conn, detach)
