"""The local pool: worker processes on this machine, talked to over pipes.

Each `ProcessWorkerHandle` owns one worker process and its two pipes. The host
loop watches the worker's output pipe and its process sentinel together, so a
worker that dies (even by SIGKILL) is noticed at once, whichever the kernel
reports first: end of input, a malformed or oversized frame, a failed write,
or the sentinel.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ..protocol import Shutdown, encode_frame
from ..protocol.pipe import PipeWriter, read_available
from . import process_tree
from .launcher import WorkerProcess
from .pool import OnDeath, OnMessage, WorkerHandle, WorkerPool, WorkerStartError
from .process_tree import describe_exit
from .worker import worker_main

__all__ = ["LocalWorkerPool", "ProcessWorkerHandle", "start_worker_process"]

EXIT_TIMEOUT = 5.0


def start_worker_process(name: str, detach: bool = False) -> tuple[BaseProcess, int, int]:
    """Start a worker; return it with the write end of its input and the read end of its output.

    A detached worker (see `worker_main`) is not the returned process, which exits at once.
    """
    to_worker_r, to_worker_w = multiprocessing.Pipe(duplex=False)
    from_worker_r, from_worker_w = multiprocessing.Pipe(duplex=False)
    process: BaseProcess = WorkerProcess(
        target=worker_main, args=(to_worker_r, from_worker_w, detach), name=name, daemon=True
    )
    try:
        process.start()
    except Exception as exc:
        for conn in (to_worker_r, to_worker_w, from_worker_r, from_worker_w):
            conn.close()
        raise WorkerStartError(f"cannot start worker process: {exc}") from exc
    to_worker_r.close()
    from_worker_w.close()
    wfd = _take_fd(to_worker_w)
    rfd = _take_fd(from_worker_r)
    os.set_blocking(wfd, False)
    os.set_blocking(rfd, False)
    return process, wfd, rfd


def _take_fd(conn: Connection) -> int:
    """Own a Connection's pipe as a raw fd: our frames are not its pickled messages."""
    fd = os.dup(conn.fileno())
    conn.close()
    return fd


class ProcessWorkerHandle(WorkerHandle):
    def __init__(
        self, index: int, loop: asyncio.AbstractEventLoop, on_message: OnMessage, on_death: OnDeath
    ) -> None:
        super().__init__(index, loop, on_message)
        self._on_death = on_death
        self._reported: asyncio.Future[None] = loop.create_future()
        self.process, self._wfd, self._rfd = start_worker_process(f"cloudops-execution-worker-{index}")
        self._writer = PipeWriter(loop, self._wfd, self._pipe_broken)
        self.pid = self.process.pid or 0
        self.alive = True
        loop.add_reader(self._rfd, self._on_readable)
        loop.add_reader(self.process.sentinel, self._on_sentinel)

    def send(self, wire: list[Any]) -> None:
        if not self._dead:
            self._writer.write(encode_frame(wire))

    def _pipe_broken(self, exc: OSError) -> None:
        self.die(f"stopped reading its pipe ({exc.strerror})")

    def _on_readable(self) -> None:
        data = read_available(self._rfd)
        if data is None:
            return
        if not data:
            self.die("closed its pipe")
            return
        self._feed(data)

    def _on_sentinel(self) -> None:
        self.die("exited")

    def die(self, how: str) -> None:
        if not self._mark_dead(how):
            return
        for fd in (self._rfd, self.process.sentinel):
            self._loop.remove_reader(fd)
        self._writer.close()
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._loop.create_task(self._report_death(how))

    async def _report_death(self, how: str) -> None:
        code = await self._exit_code()
        with contextlib.suppress(ValueError):
            self.process.close()
        if code is not None and code < 0:
            cause = f"killed by {describe_exit(code)}"
        elif code is not None:
            cause = f"{how} with {describe_exit(code)}"
        else:
            cause = how
        try:
            self._on_death(self, f"Worker process {self.pid} died ({cause})")
        finally:
            self._reported.set_result(None)

    async def _exit_code(self) -> int | None:
        """Wait (bounded) for the process to end, killing it if it lingers; then its exit code."""
        if await self._await_exit(EXIT_TIMEOUT / 5):
            return self.process.exitcode
        with contextlib.suppress(ProcessLookupError, AttributeError):
            self.process.kill()
        await self._await_exit(EXIT_TIMEOUT)
        return self.process.exitcode

    async def _await_exit(self, timeout: float) -> bool:
        if self.process.exitcode is not None:
            return True
        done = self._loop.create_future()
        sentinel = self.process.sentinel
        self._loop.add_reader(sentinel, _resolve, done)
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            return False
        finally:
            self._loop.remove_reader(sentinel)
        # The sentinel fires when the child closes its files on the way out, a
        # moment before it can be reaped: a short blocking join bridges that gap.
        self.process.join(1.0)
        return self.process.exitcode is not None

    async def stop(self) -> None:
        if not self._dead:
            self.send(Shutdown().to_wire())
            self._writer.flush()
            await self._await_exit(EXIT_TIMEOUT)
            self.die("was shut down")
        await self._reported


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class LocalWorkerPool(WorkerPool[ProcessWorkerHandle]):
    async def start(self) -> None:
        handles = [self._adopt(self._new_handle()) for _ in range(self.size)]
        await self._start_all(handles)

    def _new_handle(self) -> ProcessWorkerHandle:
        return ProcessWorkerHandle(
            self._next_index(), asyncio.get_running_loop(), self._on_message, self._handle_death
        )

    async def _successor(self, dead: ProcessWorkerHandle) -> ProcessWorkerHandle:
        return self._new_handle()

    async def clean_up_after(self, dead: WorkerHandle, markers: set[str], sessions: set[int]) -> None:
        if markers or sessions:
            # Walking every process on the machine takes milliseconds: not on the loop.
            await asyncio.to_thread(process_tree.kill_abandoned, markers, sessions)
