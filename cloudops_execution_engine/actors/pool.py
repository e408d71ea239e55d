"""What every worker pool shares, whatever carries its frames.

A pool holds `WorkerHandle`s: the supervisor's end of one worker. The local
pool (`local_pool.py`) runs workers as child processes over pipes; the Ray
pool (`ray_pool.py`) runs the same worker next to an actor on a cluster node
and relays the same frames. Either way a handle decodes frames with the same
checks, answers `wait_ready` once the worker's `Hello` arrives, and dies
exactly once: the pool then tells the supervisor, which fails what the worker
held, and starts a successor.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..logfiles import read_log
from ..protocol import FrameDecoder, Hello, Message, ProtocolError, SetEnv, decode_message

__all__ = ["HELLO_TIMEOUT", "WorkerHandle", "WorkerPool", "WorkerStartError"]

logger = logging.getLogger("cloudops_execution_engine.pool")

HELLO_TIMEOUT = 60.0

OnMessage = Callable[["WorkerHandle", Message], None]
OnDeath = Callable[["WorkerHandle", str], None]


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
        self.alive = False
        self.ready = False
        self.served = False  # said hello: its death calls for a successor
        self.pid = 0
        self.last_env: dict[str, str] | None = None
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

    def send_env(self, env: dict[str, str]) -> None:
        # The supervisor hands over the same dict until the environment changes.
        if env is not self.last_env:
            self.last_env = env
            self.send(SetEnv(env).to_wire())

    async def wait_ready(self, timeout: float = HELLO_TIMEOUT) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except TimeoutError:
            self.die(f"did not answer within {timeout:.0f}s of starting")
            raise WorkerStartError(f"worker {self.index} did not start within {timeout:.0f}s") from None
        self.ready = self.served = True

    def _feed(self, data: bytes) -> None:
        """Decode what the worker sent and hand each message to the supervisor."""
        try:
            for frame in self._decoder.feed(data):
                message = decode_message(frame)
                if isinstance(message, Hello):
                    self.pid = message.pid
                    if not self._hello.done():
                        self._hello.set_result(None)
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
    ) -> None:
        self.size = size
        self.workers: list[H] = []
        self._on_message = on_message
        self._on_death = on_death
        self._on_ready = on_ready
        self._counter = 0
        self._closing = False
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
        try:
            await asyncio.gather(*(h.wait_ready() for h in handles))
        except BaseException:
            await asyncio.gather(*(h.stop() for h in handles), return_exceptions=True)
            raise

    def _adopt(self, handle: H) -> H:
        self.workers.append(handle)
        return handle

    def _next_index(self) -> int:
        self._counter += 1
        return self._counter

    def pick(self) -> H | None:
        """The ready worker holding the fewest executions."""
        best: H | None = None
        for handle in self.workers:
            if handle.ready and (best is None or len(handle.held) < len(best.held)):
                best = handle
        return best

    def _handle_death(self, handle: WorkerHandle, why: str) -> None:
        dead: H = handle  # type: ignore[assignment]  # only this pool's handles report here
        if dead in self.workers:
            self.workers.remove(dead)
        self._on_death(dead, why)
        # One that never served is retried by the `_replace` loop that started it.
        if dead.served and not self._closing:
            task = asyncio.get_running_loop().create_task(self._replace(dead))
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self, dead: H) -> None:
        delay = 0.05
        while not self._closing:
            try:
                handle = self._adopt(await self._successor(dead))
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
