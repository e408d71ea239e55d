"""The worker pool: starting worker processes and talking to them over pipes.

Each `WorkerHandle` owns one worker process and its two pipes. The host loop
watches the worker's output pipe and its process sentinel together, so a
worker that dies (even by SIGKILL) is noticed at once, whichever the kernel
reports first. A handle dies exactly once: on end of input, a malformed or
oversized frame, a failed write, or the sentinel. The pool then tells the
supervisor, which fails what the worker held, and starts a replacement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ..protocol import (
    FrameDecoder,
    Hello,
    Message,
    ProtocolError,
    SetEnv,
    Shutdown,
    decode_message,
    encode_frame,
)
from ..protocol.pipe import PipeWriter
from .launcher import WorkerProcess
from .process_tree import describe_exit
from .worker import READ_SIZE, worker_main

__all__ = ["WorkerHandle", "WorkerPool", "WorkerStartError"]

logger = logging.getLogger("cloudops_execution_engine.pool")

HELLO_TIMEOUT = 60.0
EXIT_TIMEOUT = 5.0


class WorkerStartError(Exception):
    pass


class WorkerHandle:
    """The supervisor's end of one worker."""

    def __init__(
        self,
        index: int,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerHandle, Message], None],
        on_death: Callable[[WorkerHandle, str], None],
    ) -> None:
        self.index = index
        self._loop = loop
        self._on_message = on_message
        self._on_death = on_death
        self._decoder = FrameDecoder()
        self.held: set[bytes] = set()
        self.alive = False
        self.ready = False
        self.last_env: dict[str, str] | None = None
        self._hello: asyncio.Future[None] = loop.create_future()
        self._reported: asyncio.Future[None] = loop.create_future()
        self._dead = False

        to_worker_r, to_worker_w = multiprocessing.Pipe(duplex=False)
        from_worker_r, from_worker_w = multiprocessing.Pipe(duplex=False)
        self.process: BaseProcess = WorkerProcess(
            target=worker_main,
            args=(to_worker_r, from_worker_w),
            name=f"cloudops-execution-worker-{index}",
            daemon=True,
        )
        try:
            self.process.start()
        except Exception as exc:
            for conn in (to_worker_r, to_worker_w, from_worker_r, from_worker_w):
                conn.close()
            raise WorkerStartError(f"cannot start worker process: {exc}") from exc
        to_worker_r.close()
        from_worker_w.close()
        self._wfd = _take_fd(to_worker_w)
        self._rfd = _take_fd(from_worker_r)
        os.set_blocking(self._wfd, False)
        os.set_blocking(self._rfd, False)
        self._writer = PipeWriter(loop, self._wfd, self._pipe_broken)
        self.pid: int = self.process.pid or 0
        self.alive = True
        loop.add_reader(self._rfd, self._on_readable)
        loop.add_reader(self.process.sentinel, self._on_sentinel)

    async def wait_ready(self, timeout: float = HELLO_TIMEOUT) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except TimeoutError:
            self.die(f"did not answer within {timeout:.0f}s of starting")
            raise WorkerStartError(f"worker {self.pid} did not start within {timeout:.0f}s") from None
        self.ready = True

    def send(self, wire: list[Any]) -> None:
        if not self._dead:
            self._writer.write(encode_frame(wire))

    def send_env(self, env: dict[str, str]) -> None:
        if env != self.last_env:
            self.last_env = env
            self.send(SetEnv(env).to_wire())

    def _pipe_broken(self, exc: OSError) -> None:
        self.die(f"stopped reading its pipe ({exc.strerror})")

    def _on_readable(self) -> None:
        try:
            data = os.read(self._rfd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.die("closed its pipe")
            return
        try:
            frames = self._decoder.feed(data)
            for frame in frames:
                message = decode_message(frame)
                if isinstance(message, Hello):
                    if not self._hello.done():
                        self._hello.set_result(None)
                    continue
                self._on_message(self, message)
                if self._dead:
                    return
        except ProtocolError as exc:
            self.die(f"sent a malformed message ({exc})")

    def _on_sentinel(self) -> None:
        self.die("exited")

    def die(self, how: str) -> None:
        """Stop using this worker for good; the supervisor learns why once it has exited."""
        if self._dead:
            return
        self._dead = True
        self.alive = False
        self.ready = False
        for fd in (self._rfd, self.process.sentinel):
            self._loop.remove_reader(fd)
        self._writer.close()
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if not self._hello.done():
            self._hello.set_exception(WorkerStartError(f"worker {self.pid} {how} while starting"))
            self._hello.exception()  # retrieved: a start failure is reported by wait_ready
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
        """Ask the worker to exit; kill it if it does not."""
        if not self._dead:
            self.send(Shutdown().to_wire())
            self._writer.flush()
            await self._await_exit(EXIT_TIMEOUT)
            self.die("was shut down")
        await self._reported


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _take_fd(conn: Connection) -> int:
    """Own a Connection's pipe as a raw fd: our frames are not its pickled messages."""
    fd = os.dup(conn.fileno())
    conn.close()
    return fd


class WorkerPool:
    def __init__(
        self,
        size: int,
        on_message: Callable[[WorkerHandle, Message], None],
        on_death: Callable[[WorkerHandle, str], None],
        on_ready: Callable[[WorkerHandle], None],
    ) -> None:
        self.size = size
        self.workers: list[WorkerHandle] = []
        self._on_message = on_message
        self._on_death = on_death
        self._on_ready = on_ready
        self._counter = 0
        self._closing = False
        self._replacing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        handles = [self._new_handle(loop) for _ in range(self.size)]
        try:
            await asyncio.gather(*(h.wait_ready() for h in handles))
        except BaseException:
            await asyncio.gather(*(h.stop() for h in handles), return_exceptions=True)
            raise

    def _new_handle(self, loop: asyncio.AbstractEventLoop) -> WorkerHandle:
        self._counter += 1
        handle = WorkerHandle(self._counter, loop, self._on_message, self._handle_death)
        self.workers.append(handle)
        return handle

    def pick(self) -> WorkerHandle | None:
        """The ready worker holding the fewest executions."""
        best: WorkerHandle | None = None
        for handle in self.workers:
            if handle.ready and (best is None or len(handle.held) < len(best.held)):
                best = handle
        return best

    def _handle_death(self, handle: WorkerHandle, why: str) -> None:
        if handle in self.workers:
            self.workers.remove(handle)
        self._on_death(handle, why)
        if not self._closing:
            task = asyncio.get_running_loop().create_task(self._replace())
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        delay = 0.05
        while not self._closing:
            loop = asyncio.get_running_loop()
            try:
                handle = self._new_handle(loop)
                await handle.wait_ready()
            except WorkerStartError as exc:
                logger.warning("replacement worker failed to start: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closing:
                await handle.stop()
                return
            self._on_ready(handle)
            return

    async def stop(self) -> None:
        self._closing = True
        for task in list(self._replacing):
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        await asyncio.gather(*(h.stop() for h in list(self.workers)), return_exceptions=True)
        self.workers.clear()
