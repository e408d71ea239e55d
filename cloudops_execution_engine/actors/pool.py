"""What every worker pool shares, whatever carries its frames.

A pool holds `WorkerHandle`s: the supervisor's end of one worker. The local
pool (`local_pool.py`) runs workers as child processes over pipes; the Ray
pool (`ray_pool.py`) runs the same worker next to an actor on a cluster node
and relays the same frames. Either way a handle decodes frames with the same
checks, answers `wait_ready` once the worker's `Hello` arrives, and dies
exactly once: the pool then tells the supervisor, which fails what the worker
held, and starts a successor.

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

from ..logfiles import read_log
from ..protocol import FrameDecoder, Hello, Message, Ping, Pong, ProtocolError, SetEnv, decode_message

__all__ = [
    "BROKEN_AFTER",
    "HELLO_TIMEOUT",
    "OnBroken",
    "OnRecovered",
    "WorkerHandle",
    "WorkerPool",
    "WorkerStartError",
]

logger = logging.getLogger("cloudops_execution_engine.pool")

HELLO_TIMEOUT = 60.0
# Failed starts in a row, with no worker ready, after which the pool is broken.
# With the backoff below that is about a second when starts fail at once.
BROKEN_AFTER = 3
_RETRY_FIRST = 0.25
_RETRY_MAX = 5.0

OnMessage = Callable[["WorkerHandle", Message], None]
OnDeath = Callable[["WorkerHandle", str], None]
OnBroken = Callable[[str], None]
OnRecovered = Callable[[], None]


class WorkerStartError(Exception):
    pass


class WorkerHandle(ABC):
    """The supervisor's end of one worker."""

    def __init__(self, index: int, loop: asyncio.AbstractEventLoop, on_message: OnMessage) -> None:
        self.index = index
        self._loop = loop
        self._on_message = on_message
        self._decoder = FrameDecoder()
        self.held: set[bytes] = set()
        self.capacity = 1  # executions it can hold at once, as its hello says
        self.last_heard = loop.time()  # when a frame last came from it
        self.pings = 0
        self.alive = False
        self.ready = False
        self.served = False  # said hello: its death calls for a successor
        self.pid = 0
        self.last_env: dict[bytes, bytes] | None = None
        self._hello: asyncio.Future[None] = loop.create_future()
        self._dead = False

    @abstractmethod
    def send(self, wire: list[Any]) -> None:
        """Queue one message for the worker; a dead worker drops it."""

    @abstractmethod
    def die(self, how: str) -> None:
        """Stop using this worker for good; the pool learns why once it is gone."""

    @abstractmethod
    async def stop(self) -> None:
        """Ask the worker to finish and exit; end it if it does not."""

    def abandon(self) -> None:
        """Let the worker go without the event loop, which is closed; it kills its trees and exits."""
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
        self.ready = self.served = True

    async def _start_failure(self, exc: WorkerStartError) -> str:
        """Why the worker died before its hello; a handle that can learn more (an exit status) says so."""
        return str(exc)

    def set_max_frame(self, max_frame: int) -> None:
        """Accept frames up to `max_frame` bytes (see `frame_limit_for`)."""
        self._decoder.max_frame = max_frame

    def ping(self) -> None:
        self.pings += 1
        self.send(Ping(self.pings).to_wire())

    def _feed(self, data: bytes) -> None:
        """Decode what the worker sent and hand each message to the supervisor."""
        self.last_heard = self._loop.time()
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
                self._on_message(self, message)
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
        self._failed_starts = 0  # in a row, across every replacement under way
        self._replacing: set[asyncio.Task[None]] = set()

    @abstractmethod
    async def start(self) -> None:
        """Start `size` workers and wait until each has said hello."""

    @abstractmethod
    async def _successor(self, dead: H) -> H:
        """A new handle to take the place of `dead`."""

    @abstractmethod
    def clean_up_after(self, dead: WorkerHandle, markers: set[str], sessions: set[int]) -> Awaitable[None]:
        """End the command trees a dead worker left running: those carrying `markers` or in `sessions`.

        Called when the death is reported, before a successor is started; awaited afterwards.
        """

    async def read_log(self, worker: WorkerHandle | None, path: Path, missing_ok: bool = False) -> str:
        """A log file's text; `worker` is the one that wrote it, None if none ever ran it."""
        return await asyncio.to_thread(read_log, path, missing_ok)

    def log_location(self, worker: WorkerHandle | None) -> str | None:
        """Where `worker` keeps its log files when that is not this machine; None when it is."""
        return None

    async def _start_all(self, handles: list[H]) -> None:
        waits = [asyncio.ensure_future(h.wait_ready(self.hello_timeout)) for h in handles]
        try:
            await asyncio.gather(*waits)
        except BaseException:
            await self._discard(handles, waits)
            raise

    async def _discard(self, handles: list[H], waits: Sequence[asyncio.Future[None]] = ()) -> None:
        """Undo a start that failed part way: no worker of it is left running."""
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
        if not dead.served:
            # It never said hello, so it never held work: whoever started it
            # learns of the failure from `wait_ready` and retries or gives up.
            return
        self._on_death(dead, why)
        if not self._closing:
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


def _notify(callback: Callable[..., None], *args: Any) -> None:
    """Call back the supervisor; a failure there must not end the loop that keeps the pool staffed."""
    try:
        callback(*args)
    except Exception:
        logger.exception("pool callback %r failed", callback)
