"""The Ray pool: the supervisor's workers are actors on a Ray cluster's nodes.

The supervisor does not change: it sends the same frames and receives the same
messages. Each `RayWorkerHandle` carries them to a `NodeWorker` actor
(`ray_node.py`), which relays them to an ordinary worker process on its node.
Frames written in one turn of the host loop go in one `send` call; what the
worker writes comes back through the actor's streaming generator, in order.

A handle dies when its stream ends or fails (`RayActorError` when the actor or
its node dies), when it times out starting, or when it sends a malformed
frame. Its executions fail, naming the node, and are never retried: a command
is not known to be safe to run twice. The successor is placed on the same
node, and before it starts its worker it kills what the dead one's commands
left behind; if that node is gone, the successor goes to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future as ConcurrentFuture
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..config import RayConfig
from ..errors import IoError, map_errors
from ..logfiles import LogNode
from ..protocol import Shutdown, encode_frame
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
from .ray_node import NodeWorker

__all__ = ["RayWorkerHandle", "RayWorkerPool"]

logger = logging.getLogger("cloudops_execution_engine.ray")

_STOP_TIMEOUT = 10.0
_MAX_CONCURRENCY = 1000  # calls in flight per actor: sends, the stream, log reads


class _Connection:
    """One Ray connection per process, shared by every engine in it.

    If the host initialised Ray itself, that connection is used and left open;
    if an engine did, the last engine to stop closes it.
    """

    _lock = threading.Lock()
    _users = 0
    _owned = False

    @classmethod
    def acquire(cls, config: RayConfig) -> None:
        with cls._lock:
            if not ray.is_initialized():
                options: dict[str, Any] = {
                    "namespace": config.namespace,
                    "runtime_env": config.runtime_env,
                    "logging_level": logging.WARNING,
                    "log_to_driver": False,
                }
                options["address"] = config.address
                if config.address == "local":
                    # A new cluster in this process, even when one runs on this machine.
                    options["include_dashboard"] = False
                # `acquire` runs in a worker thread, so Ray leaves the host's
                # SIGTERM handler alone (on the main thread it would install
                # one that exits); its warning about that is only noise here.
                quiet = _DropMessage("SIGTERM handler is not set")
                ray_logger = logging.getLogger("ray._private.worker")
                ray_logger.addFilter(quiet)
                try:
                    ray.init(**options)
                except Exception as exc:
                    raise WorkerStartError(
                        f"cannot connect to the Ray cluster at {config.address}: {exc}"
                    ) from exc
                finally:
                    ray_logger.removeFilter(quiet)
                cls._owned = True
            cls._users += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0 and cls._owned:
                cls._owned = False
                ray.shutdown()


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self._prefix)


def _alive_nodes() -> list[str]:
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
    return [node["NodeID"] for node in nodes if node.get("Alive")]


def _ray_cause(exc: BaseException) -> str:
    """The first line of Ray's explanation: its messages run to many lines of advice."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _retrieved(future: ConcurrentFuture[Any]) -> None:
    # A failed send is seen as the end of the actor's stream; reading the
    # outcome here keeps Ray from reporting it as an unhandled error.
    if not future.cancelled():
        future.exception()


class RayWorkerHandle(WorkerHandle):
    def __init__(
        self,
        index: int,
        loop: asyncio.AbstractEventLoop,
        on_message: OnMessage,
        on_death: OnDeath,
        actor_class: Any,
        node_id: str,
        config: RayConfig,
        log_dir: str,
        abandoned: tuple[set[str], set[int]] = (set(), set()),
    ) -> None:
        super().__init__(index, loop, on_message)
        self._on_death = on_death
        self.node_id = node_id
        self.node_address = node_id[:8]
        self.cleaned: asyncio.Future[int] = loop.create_future()
        self._outbox: list[bytes] = []
        self._seq = 0
        self._flush_scheduled = False
        self._reported: asyncio.Future[None] = loop.create_future()
        markers, sessions = abandoned
        self.actor = actor_class.options(
            num_cpus=config.num_cpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=_MAX_CONCURRENCY,
        ).remote(log_dir, sorted(markers), sorted(sessions))
        self.alive = True
        self._relay_task = loop.create_task(self._relay())

    def describe(self) -> str:
        return f"Worker actor {self.index} (pid {self.pid}) on node {self.node_address} ({self.node_id[:8]})"

    async def _relay(self) -> None:
        try:
            info = await self.actor.start.remote()
            self.node_address = str(info["address"])
            if not self.cleaned.done():
                self.cleaned.set_result(int(info["cleaned"]))
            async for ref in self.actor.stream.options(num_returns="streaming").remote():
                self._feed(await ref)
                if self._dead:
                    return
            # Detached, the worker is not the actor's child: its exit status is not to be had.
            self.die("its worker process exited")
        except asyncio.CancelledError:
            raise
        except RayError as exc:
            self.die(_ray_cause(exc))
        except Exception as exc:
            logger.exception("relay of %s failed", self.describe())
            self.die(f"relay failed: {exc}")

    def send(self, wire: list[Any]) -> None:
        if self._dead:
            return
        self._outbox.append(encode_frame(wire))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_env(self, env: dict[bytes, bytes]) -> None:
        # Commands on a node get that node's environment (as Ray tasks do),
        # set by the actor; the host's PATH or HOME may mean nothing there.
        return

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._dead or not self._outbox:
            return
        data = b"".join(self._outbox)
        self._outbox.clear()
        self._seq += 1
        self.actor.send.remote(self._seq, data).future().add_done_callback(_retrieved)

    def die(self, how: str) -> None:
        if not self._mark_dead(how):
            return
        if self._relay_task is not asyncio.current_task():
            self._relay_task.cancel()
        if not self.cleaned.done():
            self.cleaned.cancel()
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)
        self._loop.call_soon(self._report_death, how)

    def _report_death(self, how: str) -> None:
        try:
            self._on_death(self, f"{self.describe()} died ({how})")
        finally:
            self._reported.set_result(None)

    async def stop(self) -> None:
        if not self._dead:
            self.send(Shutdown().to_wire())
            # `wait`, not `wait_for`: the relay ending in any way (even
            # cancelled by a death) is what is waited for, and only the
            # caller's own cancellation is raised here.
            await asyncio.wait([self._relay_task], timeout=_STOP_TIMEOUT)
            self.die("was shut down")
        await self._reported


class RayWorkerPool(WorkerPool[RayWorkerHandle]):
    def __init__(
        self,
        config: RayConfig,
        log_dir: str,
        on_message: OnMessage,
        on_death: OnDeath,
        on_ready: Callable[[WorkerHandle], None],
        *,
        hello_timeout: float = HELLO_TIMEOUT,
        on_broken: OnBroken | None = None,
        on_recovered: OnRecovered | None = None,
    ) -> None:
        super().__init__(
            config.workers or 0,
            on_message,
            on_death,
            on_ready,
            hello_timeout=hello_timeout,
            on_broken=on_broken,
            on_recovered=on_recovered,
        )
        self._config = config
        self._log_dir = log_dir
        self._actor_class: Any = None
        self._connected = False
        self._abandoned: dict[RayWorkerHandle, tuple[set[str], set[int]]] = {}
        self._cleanups: dict[RayWorkerHandle, asyncio.Future[None]] = {}

    async def start(self) -> None:
        await asyncio.to_thread(_Connection.acquire, self._config)
        self._connected = True
        try:
            self._actor_class = ray.remote(NodeWorker)
            nodes = await asyncio.to_thread(_alive_nodes)
            if not nodes:
                raise WorkerStartError("the Ray cluster has no alive node")
            self.size = self._config.workers or len(nodes)
            handles: list[RayWorkerHandle] = []
            try:
                for i in range(self.size):
                    handles.append(self._adopt(self._new_handle(nodes[i % len(nodes)])))
            except BaseException:
                await self._discard(handles)
                raise
            await self._start_all(handles)
        except BaseException:
            await self._disconnect()
            raise

    def _new_handle(
        self, node_id: str, abandoned: tuple[set[str], set[int]] = (set(), set())
    ) -> RayWorkerHandle:
        return RayWorkerHandle(
            self._next_index(),
            asyncio.get_running_loop(),
            self._on_message,
            self._handle_death,
            self._actor_class,
            node_id,
            self._config,
            self._log_dir,
            abandoned,
        )

    async def _successor(self, dead: RayWorkerHandle) -> RayWorkerHandle:
        abandoned = self._abandoned.pop(dead, (set(), set()))
        cleanup = self._cleanups.pop(dead, None)
        alive = await asyncio.to_thread(_alive_nodes)
        if dead.node_id in alive:
            handle = self._new_handle(dead.node_id, abandoned)
            handle.cleaned.add_done_callback(lambda cleaned: self._cleaned(cleaned, dead, abandoned, cleanup))
            return handle
        # Its processes went with the node: nothing there to clean or reach.
        if cleanup is not None:
            resolve_if_pending(cleanup)
        if not alive:
            raise WorkerStartError("the Ray cluster has no alive node")
        counts = {node: 0 for node in alive}
        for worker in self.workers:
            if worker.node_id in counts:
                counts[worker.node_id] += 1
        return self._new_handle(min(alive, key=counts.__getitem__))

    def _cleaned(
        self,
        cleaned: asyncio.Future[int],
        dead: RayWorkerHandle,
        abandoned: tuple[set[str], set[int]],
        cleanup: asyncio.Future[None] | None,
    ) -> None:
        if cleaned.cancelled() or cleaned.exception() is not None:
            # The successor died before it cleaned up: the next one will.
            if cleanup is not None and not self._closing:
                self._abandoned[dead] = abandoned
                self._cleanups[dead] = cleanup
            elif cleanup is not None:
                resolve_if_pending(cleanup)
            return
        if cleaned.result():
            logger.warning("killed %d process(es) left on node %s", cleaned.result(), dead.node_address)
        if cleanup is not None:
            resolve_if_pending(cleanup)

    def clean_up_after(self, dead: WorkerHandle, markers: set[str], sessions: set[int]) -> Awaitable[None]:
        assert isinstance(dead, RayWorkerHandle)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not markers and not sessions:
            done.set_result(None)
            return done
        peer = self._live_on(dead.node_id)
        if peer is not None:
            ref = peer.actor.clean_up.remote(sorted(markers), sorted(sessions))
            return self._await_cleanup(ref, dead)
        if self._closing:
            # No successor will come: the dead worker process kills its
            # trees itself when its actor's pipe closes.
            done.set_result(None)
            return done
        self._abandoned[dead] = (markers, sessions)
        self._cleanups[dead] = done
        return done

    async def _await_cleanup(self, ref: Any, dead: RayWorkerHandle) -> None:
        try:
            await ref
        except RayError as exc:
            logger.error("cleaning up after %s failed: %s", dead.describe(), _ray_cause(exc))

    def _live_on(self, node_id: str) -> RayWorkerHandle | None:
        for worker in self.workers:
            if worker.node_id == node_id and worker.ready:
                return worker
        return None

    async def read_log(self, worker: WorkerHandle | None, path: Path, missing_ok: bool = False) -> str:
        if not isinstance(worker, RayWorkerHandle):
            return await super().read_log(worker, path, missing_ok)
        reader = worker if worker.ready else self._live_on(worker.node_id)
        if reader is None:
            raise IoError(f"cannot read log file {path}: no live worker on node {worker.node_address}")
        with map_errors(
            {RayError: IoError},
            f"cannot read log file {path} from node {worker.node_address}",
            describe=_ray_cause,
        ):
            ok, payload = await reader.actor.read_log.remote(str(path), missing_ok)
        if not ok:
            raise IoError(f"{payload} (on node {worker.node_address})")
        return str(payload)

    def log_location(self, worker: WorkerHandle | None) -> LogNode | None:
        if not isinstance(worker, RayWorkerHandle):
            return None
        return LogNode(worker.node_address, worker.node_id)

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            for future in self._cleanups.values():
                resolve_if_pending(future)
            self._cleanups.clear()
            await self._disconnect()

    async def _disconnect(self) -> None:
        if self._connected:
            self._connected = False
            await asyncio.to_thread(_Connection.release)
