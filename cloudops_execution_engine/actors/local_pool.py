"""The local pool: worker processes on this machine, talked to over pipes.

Each `ProcessWorkerHandle` owns one worker process and its two pipes. The host
loop watches the worker's output pipe and its exit (a pidfd, else the process
sentinel) together, so a worker that dies (even by SIGKILL) is noticed at
once, whichever the kernel reports first: end of input, a malformed or
oversized frame, a failed write, or the exit.

Starting a worker can fail for want of file descriptors or processes; every
such failure is a `WorkerStartError` naming the cause, and leaves nothing
open or running behind it.

Nothing here blocks the host loop while a worker ends: its exit is awaited on
that fd, and the moment between the fd and the exit status is bridged by
polling, as `subprocess.Popen.wait(timeout)` polls. Whichever learns of the
exit first (the fd, or a poll for the status) tells every waiter. Only
`abandon`, which runs when the loop is closed, waits in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Coroutine
from multiprocessing.process import BaseProcess
from typing import Any

from ..protocol import FrameDecoder, Shutdown, encode_frame
from ..protocol.pipe import PipeWriter, read_available
from . import after_fork, process_tree, spare_worker, spawner
from .launcher import WorkerProcess, WorkerTarget, launch_worker
from .off_loop import start_in_thread
from .pool import (
    HELLO_TIMEOUT,
    OnBroken,
    OnDeath,
    OnMessage,
    OnRecovered,
    WorkerHandle,
    WorkerPool,
    WorkerStartError,
    resolve_if_pending,
)
from .process_tree import describe_exit
from .worker_entry import worker_main

__all__ = ["LocalWorkerPool", "ProcessWorkerHandle", "WorkerTarget", "start_worker_process"]

EXIT_TIMEOUT = 5.0
# How long an exit status may trail the exit fd (see `_await_exit`).
_REAP_GAP = 1.0
# When a dead worker's spawner is looked for among this process's zombies (`clean_up_after`).
_SPAWNER_REAPED_AFTER = (0.05, 0.5, 2.0)
# Its command name, as /proc says it.
SPAWNER_NAME = os.fsencode(spawner.PROGRAM.name)
_POLL_FIRST = 0.0005
_POLL_MAX = 0.05


# Tasks that report a worker's death or reap a worker that failed to start:
# the loop keeps only weak references.
_background: set[asyncio.Task[None]] = set()


def start_worker_process(
    name: str, detach: bool = False, target: WorkerTarget = worker_main
) -> tuple[BaseProcess, int, int]:
    """Start a worker; return it with the write end of its input and the read end of its output.

    A detached worker (see `worker_main`) is not the returned process, which exits at once.
    A plain worker may be the process's spare (`spare_worker`), started before the engine was.
    `WorkerStartError` if it cannot be started; nothing is left open then.
    """
    if not detach and target is worker_main:
        spare = spare_worker.take()
        if spare is not None:
            return spare
    try:
        return launch_worker(name, target, detach)
    except Exception as exc:
        raise WorkerStartError(f"cannot start a worker process: {exc}") from exc


def _kill_abandoned(markers: set[str], sessions: set[int]) -> None:
    # A dead worker's commands: in a host that adopts orphans they are its children now, and zombies
    # once killed. Reaped only there: elsewhere a pid among them may be no child of ours.
    process_tree.kill_abandoned(markers, sessions, reap=process_tree.adopts_orphans())


def _exit_watch(process: BaseProcess, pid: int) -> tuple[int, bool]:
    """An fd that becomes readable when the process ends, and whether it is ours to close.

    A pidfd says so whatever else holds the worker's files. multiprocessing's
    sentinel, a pipe, stays open while any process the worker forked and that
    did not exec holds its write end: it serves where pidfds do not exist.
    """
    try:
        return os.pidfd_open(pid), True
    except (AttributeError, OSError):
        return process.sentinel, False


class ProcessWorkerHandle(WorkerHandle):
    def __init__(
        self,
        index: int,
        loop: asyncio.AbstractEventLoop,
        on_message: OnMessage,
        on_death: OnDeath,
        target: WorkerTarget = worker_main,
    ) -> None:
        super().__init__(index, loop, on_message)
        self._on_death = on_death
        self._reported: asyncio.Future[None] = loop.create_future()
        self._how = ""
        self._cause = ""
        self._forked_away = False
        self._killed = False
        # The exit is watched from start to reaping, by this handle alone:
        # whoever waits for it (stop, the death report) waits on these.
        self._exit_waiters: list[asyncio.Future[None]] = []
        self._exit_seen = False
        # Kept when the process object is let go of (`_release_process`).
        self._released_code: int | None = None
        self.process, self._wfd, self._rfd = start_worker_process(
            f"cloudops-execution-worker-{index}", target=target
        )
        self.pid = self.process.pid or 0
        self._exit_fd, self._own_exit_fd = _exit_watch(self.process, self.pid)
        try:
            self._writer = PipeWriter(loop, self._wfd, self._pipe_broken)
            loop.add_reader(self._rfd, self._on_readable)
            loop.add_reader(self._exit_fd, self._on_exit)
        except BaseException as exc:
            self._abort_start()
            if isinstance(exc, Exception):
                raise WorkerStartError(f"cannot watch worker process {self.pid}: {exc}") from exc
            raise
        self.alive = True
        after_fork.track(self)

    def forked(self) -> None:
        """In a process forked from the host: close the child's copies of the worker's pipes (`after_fork`).

        Only the descriptors: the event loop's epoll instance is the parent's
        too, and unregistering would unregister them there. Only those still
        open: the number of one closed before the fork may name another file now.
        """
        fds = [] if self._dead else [self._rfd, self._wfd]
        # The child's copy of the loop still holds this handle's callbacks, and runs
        # if the child ends through `asyncio.run`; the epoll instance being the
        # parent's, it is told of the parent's pipes. A copy that read, wrote or
        # reported a death there would have the parent's commands killed as a
        # dead worker's: it is made inert, and dead to everything else.
        self._forked_away = True
        self._dead = True
        self.alive = self.ready = False
        self._writer.forget()
        if self._own_exit_fd:
            self._own_exit_fd = False
            fds.append(self._exit_fd)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _abort_start(self) -> None:
        """Undo a start that the loop could not take on: kill the process, close every fd."""
        for fd in (self._rfd, self._exit_fd):
            self._loop.remove_reader(fd)
        for fd in (self._rfd, self._wfd):
            os.close(fd)
        self._close_exit_fd()
        self.process.kill()
        # Reaped in the background: the loop that could not watch the
        # process must not wait for it either, so no sentinel, only polling.
        self._in_background(self._reap_killed())

    async def _reap_killed(self) -> None:
        await self._reaped(EXIT_TIMEOUT)
        with contextlib.suppress(ValueError):
            self.process.close()

    def _in_background(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self._loop.create_task(job)
        _background.add(task)
        task.add_done_callback(_background.discard)
        return task

    def send(self, wire: list[Any]) -> None:
        if not self._dead:
            self._writer.write(encode_frame(wire))

    def flush(self) -> None:
        # The writer would write on the next loop turn; a batch of Runs is
        # complete, so one write now saves the worker that turn's wait.
        self._writer.flush()

    def _pipe_broken(self, exc: OSError) -> None:
        self.die(f"stopped reading its pipe ({exc.strerror})")

    def _on_readable(self) -> None:
        if self._forked_away:
            return
        data = read_available(self._rfd)
        if data is None:
            return
        if not data:
            self.die("closed its pipe")
            return
        self._feed(data)

    def _on_exit(self) -> None:
        if self._forked_away:
            return
        self._loop.remove_reader(self._exit_fd)
        self._exited()
        self.die("exited")

    def _close_exit_fd(self) -> None:
        if self._own_exit_fd:
            self._own_exit_fd = False
            os.close(self._exit_fd)

    def _exited(self) -> None:
        """The process is known to have ended: nobody waits for its exit fd any more."""
        self._exit_seen = True
        for waiter in self._exit_waiters:
            resolve_if_pending(waiter)
        self._exit_waiters.clear()

    def _exit_status(self) -> int | None:
        """The exit code once the process has been reaped (asked without blocking); None before."""
        if self._released_code is not None:
            return self._released_code
        return self.process.exitcode

    def abandon(self) -> None:
        if not self._mark_dead("was abandoned"):
            if not self._reported.done():
                # Dead, its report never made: the loop closed first. Let go of it without a report,
                # which nothing could act on any more.
                self._exit_code_in_place()
                self._release_process()
                self._close_exit_fd()
                resolve_if_pending(self._reported)
            return
        if not self._loop.is_closed():
            # An idle loop (the engine was let go of between two runs of it) is still the
            # host's: it lets go of the pipes before they close, or a descriptor number the
            # kernel hands out again would be taken there for one it watches already.
            self._loop.remove_reader(self._rfd)
            self._loop.remove_reader(self._exit_fd)
        self._writer.close()
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        # End of input: the worker kills every tree it holds and exits. The
        # loop does not run, so waiting in place holds up nothing that could.
        self.process.join(EXIT_TIMEOUT)
        if self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError, AttributeError):
                self.process.kill()
            self.process.join(EXIT_TIMEOUT)
        self._close_exit_fd()
        with contextlib.suppress(ValueError):
            self.process.close()

    def die(self, how: str) -> None:
        if not self._mark_dead(how):
            return
        # The exit stays watched: the end of the pipe can come first, and the
        # exit is what `stop` and the death report wait for.
        self._loop.remove_reader(self._rfd)
        self._writer.close()
        self._decoder = FrameDecoder()  # nor a frame half read: records of its executions outlive it
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._how = how
        report = self._in_background(self._report_death(how))
        report.add_done_callback(self._report_cut_short)

    async def _report_death(self, how: str) -> None:
        try:
            code = await self._exit_code()
        except asyncio.CancelledError:
            self._report_in_place()
            raise
        self._report(how, code)

    def _report_cut_short(self, report: asyncio.Task[None]) -> None:
        """The report was cancelled, perhaps before it began: the loop is closing (`_report_in_place`)."""
        if report.cancelled():
            self._report_in_place()

    def _report_in_place(self) -> None:
        """Report the death now, waiting for the exit in place: the loop is closing.

        Only the closing of the loop cancels a report (`asyncio.run` cancels
        every task as it ends), and it may do so before the report's first
        step, when no `finally` of it runs. Unreported, the worker would stay
        unreaped with its descriptors open, its commands' trees left running
        if it was killed, and a shutdown under way would wait for the report
        for ever. The wait here is bounded, as `abandon`'s is; a successor is
        not started (`cut_short`).
        """
        if self._reported.done():
            return
        self.cut_short = True
        self._report(self._how, self._exit_code_in_place())

    def _exit_code_in_place(self) -> int | None:
        with contextlib.suppress(ValueError):  # let go of already
            self.process.join(EXIT_TIMEOUT / 5)
            if self.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError, AttributeError):
                    self.process.kill()
                    self._killed = True
                self.process.join(EXIT_TIMEOUT)
        return self._exit_status()

    def _report(self, how: str, code: int | None) -> None:
        if self._forked_away:
            # A report under way as the process forked, run on in the child: the worker is the parent's.
            resolve_if_pending(self._reported)
            return
        try:
            lost = isinstance(self.process, WorkerProcess) and self.process.status_lost
            self._release_process()
            if lost:
                self._cause = f"{how}; its exit status unknown, the host's SIGCHLD handling reaped it"
            elif self._killed:
                # The host ended it, for the reason it gave (it stopped responding).
                self._cause = how
            elif code is not None and code < 0:
                self.exit_signal = -code
                self._cause = f"killed by {describe_exit(code)}"
            elif code is not None and how in ("exited", "closed its pipe"):
                # Which of the two the loop saw first is chance; the exit status is what counts.
                self._cause = f"exited with {describe_exit(code)}"
            elif code is not None:
                self._cause = f"{how} with {describe_exit(code)}"
            else:
                self._cause = how
            self._on_death(self, f"Worker process {self.pid} died ({self._cause})")
        finally:
            resolve_if_pending(self._reported)

    async def _start_failure(self, exc: WorkerStartError) -> str:
        # Waiting for the report is bounded by `_exit_code`, and gives the exit status.
        await asyncio.shield(self._reported)
        return f"worker process {self.pid} died before it was ready ({self._cause or exc})"

    async def _exit_code(self) -> int | None:
        """Wait (bounded) for the process to end, killing it if it lingers; then its exit code."""
        if await self._await_exit(EXIT_TIMEOUT / 5):
            return self._exit_status()
        with contextlib.suppress(ProcessLookupError, AttributeError):
            self.process.kill()
            self._killed = True
        await self._await_exit(EXIT_TIMEOUT)
        return self._exit_status()

    def _release_process(self) -> None:
        """Stop watching a reaped process and let go of it; one still alive stays watched.

        Its exit may have been learnt by asking, before its exit fd was read:
        whoever waits on that fd (`stop`) is told here.
        """
        code = self._exit_status()
        if code is None or self._released_code is not None:
            return
        self._released_code = code
        self._exited()
        self._loop.remove_reader(self._exit_fd)
        self._close_exit_fd()
        with contextlib.suppress(ValueError):
            self.process.close()

    async def _await_exit(self, timeout: float) -> bool:
        if self._exit_status() is not None:
            return True
        if not self._exit_seen:
            done: asyncio.Future[None] = self._loop.create_future()
            self._exit_waiters.append(done)
            try:
                await asyncio.wait_for(done, timeout)
            except TimeoutError:
                return False
            finally:
                with contextlib.suppress(ValueError):
                    self._exit_waiters.remove(done)
        # The exit fd may be read a moment before the process can be reaped
        # (the sentinel fires as the child closes its files on the way out).
        return await self._reaped(_REAP_GAP)

    async def _reaped(self, timeout: float) -> bool:
        """Whether the process was reaped within `timeout`; asks without blocking, at growing intervals."""
        deadline = self._loop.time() + timeout
        delay = _POLL_FIRST
        while self._exit_status() is None:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX)
        return True

    async def stop(self) -> None:
        if not self._dead:
            self.send(Shutdown().to_wire())
            self._writer.flush()
            await self._await_exit(EXIT_TIMEOUT)
            self.die("was shut down")
        await self._reported


class LocalWorkerPool(WorkerPool[ProcessWorkerHandle]):
    """Worker processes on this machine.

    `worker_target` is what each worker process runs (`worker_main`); it must
    be importable by name, since workers are spawned, not forked.
    """

    def __init__(
        self,
        size: int,
        on_message: OnMessage,
        on_death: OnDeath,
        on_ready: Callable[[WorkerHandle], None],
        *,
        worker_target: WorkerTarget = worker_main,
        hello_timeout: float = HELLO_TIMEOUT,
        on_broken: OnBroken | None = None,
        on_recovered: OnRecovered | None = None,
    ) -> None:
        super().__init__(
            size,
            on_message,
            on_death,
            on_ready,
            hello_timeout=hello_timeout,
            on_broken=on_broken,
            on_recovered=on_recovered,
        )
        self.worker_target = worker_target

    async def start(self) -> None:
        handles: list[ProcessWorkerHandle] = []
        try:
            for _ in range(self.size):
                handles.append(self._adopt(self._new_handle()))
        except BaseException:
            await self._discard(handles)
            raise
        await self._start_all(handles)

    def _new_handle(self) -> ProcessWorkerHandle:
        return ProcessWorkerHandle(
            self._next_index(),
            asyncio.get_running_loop(),
            self._on_message,
            self._handle_death,
            self.worker_target,
        )

    async def _successor(self, dead: ProcessWorkerHandle) -> ProcessWorkerHandle:
        return self._new_handle()

    def clean_up_after(self, dead: WorkerHandle, markers: set[str], sessions: set[int]) -> Awaitable[None]:
        if process_tree.adopts_orphans():
            # Its spawner comes to this process when it exits, as a zombie: reaped here, as no
            # one else will. It exits once it sees the worker gone, within milliseconds.
            loop = asyncio.get_running_loop()
            for delay in _SPAWNER_REAPED_AFTER:
                loop.call_later(delay, process_tree.reap_orphaned, SPAWNER_NAME)
        if not markers and not sessions:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        # Walking every process on the machine takes milliseconds: not on the loop. Started here,
        # not on a task's first step: a loop that closes now cancels tasks before they begin.
        return start_in_thread(_kill_abandoned, markers, sessions, name="cloudops-clean-up")
