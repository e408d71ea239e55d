"""The contract every worker pool keeps, whatever carries its frames, and what they share.

A pool holds `WorkerHandle`s: the supervisor's end of one worker. The local
pool (`local_pool.py`) runs workers as child processes over pipes; the Ray
pool (`ray_pool.py`) runs the same worker next to an actor on a cluster node
and relays the same frames. A new backend (Kubernetes pods, Dask workers) is
a `WorkerHandle` and a `WorkerPool` subclass that keep the promises below; the
supervisor relies on nothing else.

A handle (one worker):

- start: its constructor starts the worker and the transport to it, and sets
  `alive`; or it raises `WorkerStartError` naming the cause, with nothing left
  running or open. The worker is ready once its `Hello` has come, which
  `wait_ready` awaits (with a time limit) and which sets `ready`.
- receive: every byte the worker writes reaches `_feed`, in order. `_feed`
  checks and decodes the frames, takes the `Hello` and `Pong`s, hands every
  other message to the supervisor, and makes a malformed frame a death.
- send: `send(wire)` queues one message and returns at once: frames reach the
  worker in the order sent, and once the handle is dead they are dropped.
  `flush()` asks for what is queued to be written now (after a batch of sends).
- die: `die(how)` starts with `_mark_dead(how)` and does nothing more when
  that says the handle was dead already, so a death happens once however many
  paths notice it. It then shuts the transport, makes sure the worker is
  ending, and reports: exactly once, and never from within `die` (a caller
  may be in the middle of the supervisor's own bookkeeping), it calls the
  pool's `on_death(handle, message)`, the message naming the worker, where it
  ran and why it ended ("Worker process 4242 died (killed by signal
  SIGKILL(-9))"). Only then may the supervisor fail what the worker held.
- stop: `stop()` asks the worker to finish (`Shutdown`), waits a bounded
  time, then dies "was shut down", and returns once that death is reported.
- abandon: `abandon()` runs when the event loop is closed; it must not touch
  the loop, and lets the worker go so that it kills its trees and exits.

A pool (all workers of one engine):

- start: `start()` starts `size` handles (`_adopt` each, then `_start_all`) and
  returns once every one is ready; on failure, `WorkerStartError`, and none
  is left running (`_discard`).
- replace: a dead worker that had said hello is replaced by `_successor(dead)`,
  which `_handle_death` starts in the background and retries (see below).
- clean up: `clean_up_after(dead, markers, sessions)` ends the command trees a
  dead worker left running, before its executions are failed.
- logs: a worker writes its executions' logs where it runs. `read_log` reads
  one back and `log_location` names the node whose disk holds it; the
  defaults read this machine's disk and name no node.
- stop: `stop()` stops every worker and every replacement under way.

A successor that cannot be started (out of file descriptors or processes, a
worker that dies or stays silent before its hello) is retried with capped
exponential backoff for as long as the pool is open. Once a few starts in a
row have failed and no worker is ready to take work, the pool calls itself
broken (`on_broken`, naming the cause) so that work waiting for a worker can
fail instead of waiting for ever; it keeps retrying, and the first worker that
starts again ends that state (`on_recovered`).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..logfiles import LogNode, read_log
from ..protocol import FrameDecoder, Hello, Message, Ping, Pong, ProtocolError, SetEnv, decode_message
from .off_loop import in_thread
from .telemetry import correlate

__all__ = [
    "BROKEN_AFTER",
    "HELLO_TIMEOUT",
    "OnBroken",
    "OnRecovered",
    "WorkerHandle",
    "WorkerPool",
    "WorkerStartError",
    "resolve_if_pending",
]

logger = logging.getLogger("cloudops_execution_engine.pool")

HELLO_TIMEOUT = 60.0
# Failed starts in a row, with no worker ready, after which the pool is broken.
# With the backoff below that is about a second when starts fail at once.
BROKEN_AFTER = 3
_RETRY_FIRST = 0.25
_RETRY_MAX = 5.0
_CONCURRENT_READS = 8

OnMessage = Callable[["WorkerHandle", Message], None]
OnDeath = Callable[["WorkerHandle", str], None]
OnBroken = Callable[[str], None]
OnRecovered = Callable[[], None]


class WorkerStartError(Exception):
    """A worker could not be started; the supervisor raises it as `SpawnFailed`."""


class WorkerHandle(ABC):
    """The supervisor's end of one worker; a subclass keeps the promises of the module's docstring."""

    def __init__(self, index: int, loop: asyncio.AbstractEventLoop, on_message: OnMessage) -> None:
        self.index = index
        self._loop = loop
        self._on_message = on_message
        self._decoder = FrameDecoder()
        self.held: set[bytes] = set()
        self.capacity = 1  # executions it can hold at once, as its hello says
        self.last_heard = loop.time()  # when a frame last came from it
        # When the oldest ping it has not answered yet was sent (None: it has answered them all).
        # Silence counts from there: a host whose loop was blocked sent no ping meanwhile, and a
        # worker that had none to answer is not silent, however long ago it last spoke.
        self.unanswered_since: float | None = None
        self.pings = 0
        self.alive = False
        self.ready = False
        self.said_hello = False  # and so may have held work: its death calls for a successor
        # Its death was reported as the loop closed: nothing started now would run (no successor).
        self.cut_short = False
        # It asked to be replaced (`Retire`): it takes no more work, and is stopped once it holds none.
        self.retiring = False
        self.pid = 0
        # The signal that ended it, when its exit status says one did (0: none, or not known).
        self.exit_signal = 0
        self.last_env: dict[bytes, bytes] | None = None
        self._hello: asyncio.Future[None] = loop.create_future()
        self._dead = False

    @abstractmethod
    def send(self, wire: list[Any]) -> None:
        """Queue one message for the worker without blocking, in order; a dead worker drops it."""

    def flush(self) -> None:
        """Hand what `send` has queued to the transport now rather than later in the loop turn.

        Only a handle that batches its sends needs to override this.
        """
        return

    @abstractmethod
    def die(self, how: str) -> None:
        """Stop using this worker for good (`_mark_dead` first); later, report its death once."""

    @abstractmethod
    async def stop(self) -> None:
        """Ask the worker to finish, end it if it does not in time; return once its death is reported."""

    def abandon(self) -> None:
        """Let the worker go without the event loop, which is closed; it kills its trees and exits.

        A handle whose transport needs closing overrides this, without touching the loop.
        """
        self.alive = self.ready = False

    def send_env(self, env: dict[bytes, bytes]) -> None:
        # The supervisor hands over the same dict until the environment changes.
        if env is not self.last_env:
            self.last_env = env
            self.send(SetEnv(env).to_wire())

    async def wait_ready(self, timeout: float = HELLO_TIMEOUT) -> None:
        """Wait for the worker's hello; `WorkerStartError` naming the cause if it dies or stays silent."""
        try:
            await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except TimeoutError:
            self.die(f"did not say hello within {timeout:g}s of starting")
            raise WorkerStartError(f"worker {self.index} did not start within {timeout:g}s") from None
        except WorkerStartError as exc:
            raise WorkerStartError(await self._start_failure(exc)) from None
        self.ready = self.said_hello = True

    async def _start_failure(self, exc: WorkerStartError) -> str:
        """Why the worker died before its hello; a handle that can learn more (an exit status) says so."""
        return str(exc)

    def set_max_frame(self, max_frame: int) -> None:
        """Accept frames up to `max_frame` bytes (see `frame_limit_for`)."""
        self._decoder.max_frame = max_frame

    def ping(self) -> None:
        self.pings += 1
        if self.unanswered_since is None:
            self.unanswered_since = self._loop.time()
        self.send(Ping(self.pings).to_wire())

    def _feed(self, data: bytes) -> None:
        """Decode what the worker sent and hand each message to the supervisor."""
        self.last_heard = self._loop.time()
        self.unanswered_since = None  # whatever it sends, it sent after the pings before
        try:
            for frame in self._decoder.feed(data):
                message = decode_message(frame)
                if isinstance(message, Hello):
                    self.pid = message.pid
                    self.capacity = message.capacity
                    if not self._hello.done():
                        self._hello.set_result(None)
                    continue
                if isinstance(message, Pong):
                    continue
                # Each message on its own: one whose handling fails must not lose the rest of the read.
                _notify(self._on_message, self, message)
                if self._dead:
                    return
        except ProtocolError as exc:
            self.die(f"sent a malformed message ({exc})")

    def _mark_dead(self, how: str) -> bool:
        """Flip to dead once; False if it already was."""
        if self._dead:
            return False
        self._dead = True
        self.alive = False
        self.ready = False
        if not self._hello.done():
            self._hello.set_exception(WorkerStartError(f"worker {self.index} {how} while starting"))
            self._hello.exception()  # retrieved: a start failure is reported by wait_ready
        return True


H = TypeVar("H", bound=WorkerHandle)


class WorkerPool(ABC, Generic[H]):
    """All workers of one engine; a subclass keeps the promises of the module's docstring.

    The supervisor passes three callbacks: `on_message(handle, message)` for
    every message a worker sends past its hello, `on_death(handle, why)` once
    per dead worker that had said hello, and `on_ready(handle)` when a
    successor is ready for work.
    """

    def __init__(
        self,
        size: int,
        on_message: OnMessage,
        on_death: OnDeath,
        on_ready: Callable[[WorkerHandle], None],
        *,
        hello_timeout: float = HELLO_TIMEOUT,
        on_broken: OnBroken | None = None,
        on_recovered: OnRecovered | None = None,
    ) -> None:
        self.size = size
        self.workers: list[H] = []
        self.hello_timeout = hello_timeout
        # Called once when the pool becomes broken, with the cause of the last
        # failed start; then `on_recovered` once a worker has started again.
        self.on_broken = on_broken
        self.on_recovered = on_recovered
        self.broken: str | None = None  # the cause, while broken
        self._on_message = on_message
        self._on_death = on_death
        self._on_ready = on_ready
        self._counter = 0
        self._closing = False
        self._serving = False  # its start has succeeded: a death from now on may cost work
        # Each read takes a thread of its own (`off_loop`): a host reading many logs at once
        # gets them read this many at a time, not a thread apiece.
        self._reads = asyncio.Semaphore(_CONCURRENT_READS)
        self._failed_starts = 0  # in a row, across every replacement under way
        self._replacing: set[asyncio.Task[None]] = set()

    @abstractmethod
    async def start(self) -> None:
        """Start `size` workers, wait until each has said hello; `WorkerStartError` leaving none running."""

    @abstractmethod
    async def _successor(self, dead: H) -> H:
        """A new handle to take the place of `dead`, started as its constructor starts one.

        `WorkerStartError` (or `OSError`) when it cannot be had; the pool retries.
        """

    @abstractmethod
    def clean_up_after(self, dead: WorkerHandle, markers: set[str], sessions: set[int]) -> Awaitable[None]:
        """End the command trees a dead worker left running: those carrying `markers` or in `sessions`.

        `markers` are `process_tree.marker_key`s: an execution of this engine.
        Called when the death is reported, before a successor is started; awaited afterwards.
        """

    async def read_log(
        self, worker: WorkerHandle | None, path: Path, missing_ok: bool = False, limit: int | None = None
    ) -> str:
        """A log file's text (`IoError` past `limit` bytes); `worker` wrote it, None if none ran it."""
        async with self._reads:
            return await in_thread(read_log, path, missing_ok, limit, name="cloudops-read-log")

    def log_location(self, worker: WorkerHandle | None) -> LogNode | None:
        """The node whose disk has `worker`'s log files when that is not this machine; None when it is."""
        return None

    async def _start_all(self, handles: list[H]) -> None:
        waits = [asyncio.ensure_future(h.wait_ready(self.hello_timeout)) for h in handles]
        try:
            await asyncio.gather(*waits)
        except BaseException:
            await self._discard(handles, waits)
            raise
        self._serving = True

    async def _discard(self, handles: list[H], waits: Sequence[asyncio.Future[None]] = ()) -> None:
        """Undo a start that failed part way: no worker of it is left running, nor replaced."""
        self._closing = True
        for wait in waits:
            wait.cancel()
        for handle in handles:
            if not handle.ready:
                # Silent so far: asking it to shut down would only wait out its timeout.
                handle.die("was stopped: the pool failed to start")
        await asyncio.gather(*waits, *(h.stop() for h in handles), return_exceptions=True)
        for handle in handles:
            if handle in self.workers:
                self.workers.remove(handle)

    def _adopt(self, handle: H) -> H:
        self.workers.append(handle)
        return handle

    def _next_index(self) -> int:
        self._counter += 1
        return self._counter

    def pick(self) -> H | None:
        """The ready worker holding the fewest executions, among those with room for one more."""
        best: H | None = None
        for handle in self.workers:
            held = len(handle.held)
            if handle.ready and held < handle.capacity and (best is None or held < len(best.held)):
                best = handle
        return best

    def _handle_death(self, handle: WorkerHandle, why: str) -> None:
        dead: H = handle  # type: ignore[assignment]  # only this pool's handles report here
        if dead in self.workers:
            self.workers.remove(dead)
        if not dead.said_hello:
            # It never said hello, so it never held work: whoever started it
            # learns of the failure from `wait_ready` and retries or gives up.
            return
        if self._serving:
            # Before, during the pool's own start, it held no work: nobody is told.
            self._on_death(dead, why)
        if not self._closing and not dead.cut_short:
            task = asyncio.get_running_loop().create_task(self._replace(dead))
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self, dead: H) -> None:
        """Start a successor to `dead`, retrying with backoff for as long as the pool is open."""
        delay = _RETRY_FIRST
        while not self._closing:
            try:
                handle = self._adopt(await self._successor(dead))
                await handle.wait_ready(self.hello_timeout)
            except Exception as exc:
                self._start_failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            if self._closing:
                await handle.stop()
                return
            self._started()
            _notify(self._on_ready, handle)
            return

    def _start_failed(self, exc: Exception) -> None:
        cause = str(exc) if isinstance(exc, WorkerStartError) else f"cannot start a worker process: {exc}"
        self._failed_starts += 1
        if self._failed_starts == 1:
            # Once per streak: a pool that cannot start workers retries for as
            # long as it is open, and a warning per try would flood the log.
            unexpected = not isinstance(exc, (WorkerStartError, OSError))
            logger.warning("cannot start a replacement worker (%s); retrying", cause, exc_info=unexpected)
        if (
            self.broken is None
            and self._failed_starts >= BROKEN_AFTER
            and not any(worker.ready for worker in self.workers)
        ):
            self.broken = cause
            logger.error(
                "no worker can be started after %d attempts (%s); the pool is broken until one can",
                self._failed_starts,
                cause,
            )
            if self.on_broken is not None:
                _notify(self.on_broken, cause)

    def _started(self) -> None:
        failed, self._failed_starts = self._failed_starts, 0
        if self.broken is not None:
            self.broken = None
            logger.warning("a worker started again after %d failed attempts", failed)
            if self.on_recovered is not None:
                _notify(self.on_recovered)

    async def stop(self) -> None:
        self._closing = True
        for task in list(self._replacing):
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        await asyncio.gather(*(h.stop() for h in list(self.workers)), return_exceptions=True)
        self.workers.clear()


def resolve_if_pending(future: asyncio.Future[None]) -> None:
    """Complete `future`, unless something (a cancellation, an earlier call) settled it first."""
    if not future.done():
        future.set_result(None)


def _notify(callback: Callable[..., None], *args: Any) -> None:
    """Call back the supervisor; a failure there must not end the loop that keeps the pool staffed."""
    try:
        callback(*args)
    except Exception:
        # The executions it was about: a message's, or those a dead worker held.
        about = [arg.execution_id for arg in args if isinstance(getattr(arg, "execution_id", None), bytes)]
        if not about:
            for arg in args:
                if isinstance(arg, WorkerHandle):
                    about += arg.held
        suffix, extra = correlate(about)
        logger.exception("pool callback %r failed%s", callback, suffix, extra=extra)
