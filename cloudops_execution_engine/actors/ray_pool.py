"""The Ray pool: the supervisor's workers are actors on a Ray cluster's nodes.

The supervisor does not change: it sends the same frames and receives the same
messages. Each `RayWorkerHandle` carries them to a `NodeWorker` actor
(`ray_node.py`), which relays them to an ordinary worker process on its node.
The frames themselves do not go through Ray: each handle has a TCP connection
of its own to its actor (`ray_link.py`), authenticated with a key made for that
actor, which the actor relays to and from its worker's pipes. Ray still
places, supervises and ends the actors, and serves the logs.

A handle dies when its connection ends or breaks (the actor or its worker
ended, or the node died), when Ray fails its start (`RayActorError`), when it
times out starting, or when it sends a malformed frame. The pool also tries each node's
raylet port every half second: a raylet that answered once and now refuses
means the node is dead, which Ray's own health check takes about 15 s to say,
and every handle there dies "its node died" at once.

A dead handle's executions fail, naming the node, and are never retried: a
command is not known to be safe to run twice. The successor is placed on the
same node, and before it starts its worker it kills what the dead one's
commands left behind; if that node is gone, the successor goes to another.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..config import RayConfig
from ..errors import IoError, map_errors
from ..logfiles import LogNode
from ..protocol import Shutdown, encode_frame
from ..protocol.pipe import PipeWriter, read_available
from . import ray_link
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
from .process_tree import execution_of
from .ray_node import NodeWorker
from .telemetry import correlate

__all__ = ["RayWorkerHandle", "RayWorkerPool"]

logger = logging.getLogger("cloudops_execution_engine.ray")

_STOP_TIMEOUT = 10.0
# Each node holding workers has its raylet's port tried this often. A raylet
# that accepted before and now refuses is gone, and its node with it: Ray's own
# health check takes about 15 s to say so. A node that is merely slow still
# accepts (the kernel answers for a stalled raylet), and one that does not
# answer at all is left to the supervisor's heartbeat.
_PROBE_INTERVAL = 0.5
# How often a read of a log looks for the successor of a node's dead worker.
_READER_POLL_S = 0.05
_PROBE_TIMEOUT = 1.0
_MAX_CONCURRENCY = 1000  # calls in flight per actor: sends, the stream, log reads


# Ray is called from one lasting thread of the engine's own. Not the loop's default
# executor, which is the host's and may be full of its calls; and not a thread per
# call: a local cluster's processes are started with PR_SET_PDEATHSIG, which kills
# them when the thread that started them ends.
_ray_thread: concurrent.futures.ThreadPoolExecutor | None = None
_T = TypeVar("_T")


def _on_the_ray_thread(fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
    global _ray_thread
    if _ray_thread is None:
        _ray_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloudops-ray")
    return asyncio.wrap_future(_ray_thread.submit(fn, *args))


def _forget_the_ray_thread() -> None:
    """In a forked child: the thread is the parent's, and not in this process."""
    global _ray_thread
    _ray_thread = None


os.register_at_fork(after_in_child=_forget_the_ray_thread)


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
                _check_reachable(config.address)
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


# How long a cluster's address has to accept a connection before the engine says nothing answers.
_REACH_TIMEOUT_S = 3.0


def _check_reachable(address: str) -> None:
    """`WorkerStartError` when nothing accepts a connection at a cluster's `host:port`.

    `ray.init` retries such an address for minutes, on a thread that nothing
    can stop: the start would hang, and the host's process could not exit.
    `auto` is the address Ray would find (`RAY_ADDRESS`, or the file the last
    head started on this machine left, which a head that crashed leaves
    behind); `local` and `ray://` addresses are Ray's own to start or reach.
    """
    if address == "auto":
        address = _found_by_ray()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_REACH_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise WorkerStartError(
            f"cannot connect to the Ray cluster at {address}: nothing answers there ({reason})"
        ) from None


def _found_by_ray() -> str:
    """The `host:port` Ray connects to for `auto`: `WorkerStartError` when it finds none."""
    from ray._private.services import get_ray_address_from_environment

    try:
        found = get_ray_address_from_environment("auto", None)
    except (ConnectionError, ValueError) as exc:
        raise WorkerStartError(f"cannot connect to a Ray cluster (auto): {exc}") from None
    return str(found or "auto")


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self._prefix)


class _Raylet:
    """Where a node's raylet listens, and whether it has ever answered there."""

    __slots__ = ("address", "port", "reached")

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self.reached = False


def _alive_nodes() -> dict[str, _Raylet]:
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
    return {
        node["NodeID"]: _Raylet(str(node["NodeManagerAddress"]), int(node["NodeManagerPort"]))
        for node in nodes
        if node.get("Alive")
    }


async def _reach(raylet: _Raylet) -> bool | None:
    """True if the raylet's port accepts a connection, False if it is refused, None if unknown."""
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(raylet.address, raylet.port)
    except ConnectionRefusedError:
        return False
    except (OSError, TimeoutError):
        return None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _ray_cause(exc: BaseException) -> str:
    """The first line of Ray's explanation: its messages run to many lines of advice."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _close_connected(pending: asyncio.Future[int]) -> None:
    if not pending.cancelled() and pending.exception() is None:
        os.close(pending.result())


NodeGone = Callable[[str], Awaitable[str | None]]
"""Given a node id, why that node is dead (its raylet refuses connections), or None if it seems alive."""


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
        node_gone: NodeGone | None = None,
    ) -> None:
        super().__init__(index, loop, on_message)
        self._on_death = on_death
        self._node_gone = node_gone
        self.node_id = node_id
        self.node_address = node_id[:8]
        self.cleaned: asyncio.Future[int] = loop.create_future()
        self._outbox: list[bytes] = []  # frames sent before the connection is up
        self._fd = -1  # the connection to the actor, once made
        self._writer: PipeWriter | None = None
        self._closed: asyncio.Future[None] = loop.create_future()
        self._failures: set[asyncio.Task[None]] = set()
        self._reported: asyncio.Future[None] = loop.create_future()
        self._authkey = secrets.token_bytes(32)
        markers, sessions = abandoned
        self.actor = actor_class.options(
            num_cpus=config.num_cpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=_MAX_CONCURRENCY,
        ).remote(log_dir, sorted(markers), sorted(sessions), self._authkey)
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
            port = int(info["port"])
            try:
                fd = await self._connect(port)
            except Exception as exc:
                self.die(f"cannot connect to it at {self.node_address}:{port} ({exc or type(exc).__name__})")
                return
            self._open(fd)
            await self._closed
            # Detached, the worker is not the actor's child: its exit status is not to be had.
            self.die(await self._death_cause("its connection closed: the actor or its worker process ended"))
        except asyncio.CancelledError:
            raise
        except RayError as exc:
            self.die(await self._death_cause(_ray_cause(exc)))
        except Exception as exc:
            suffix, extra = correlate(self.held)
            logger.exception("relay of %s failed%s", self.describe(), suffix, extra=extra)
            self.die(f"relay failed: {exc}")

    async def _connect(self, port: int) -> int:
        pending = start_in_thread(ray_link.connect, self.node_address, port, self._authkey)
        try:
            return await asyncio.wait_for(asyncio.shield(pending), ray_link.HANDSHAKE_TIMEOUT + 5)
        except BaseException:
            # Given up on (or cancelled): whatever the thread still connects is closed.
            pending.add_done_callback(_close_connected)
            raise

    def _open(self, fd: int) -> None:
        self._fd = fd
        self._writer = PipeWriter(self._loop, fd, self._connection_broken)
        if self._outbox:
            self._writer.write(b"".join(self._outbox))
            self._outbox.clear()
        self._loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        data = read_available(self._fd)
        if data is None:
            return
        if not data:
            self._loop.remove_reader(self._fd)
            resolve_if_pending(self._closed)
            return
        self._feed(data)

    def send(self, wire: list[Any]) -> None:
        if self._dead:
            return
        if self._writer is not None:
            self._writer.write(encode_frame(wire))
        else:
            self._outbox.append(encode_frame(wire))

    def send_env(self, env: dict[bytes, bytes]) -> None:
        # Commands on a node get that node's environment (as Ray tasks do),
        # set by the actor; the host's PATH or HOME may mean nothing there.
        return

    def _connection_broken(self, exc: OSError) -> None:
        if self._dead:
            return
        task = self._loop.create_task(self._die_of(f"its connection broke ({exc})"))
        self._failures.add(task)
        task.add_done_callback(self._failures.discard)

    async def _die_of(self, cause: str) -> None:
        self.die(await self._death_cause(cause))

    async def _death_cause(self, cause: str) -> str:
        """The cause given, unless the node is gone: then that, which Ray takes about 15 s to say."""
        if self._node_gone is not None and not self._dead:
            return await self._node_gone(self.node_id) or cause
        return cause

    def die(self, how: str) -> None:
        if not self._mark_dead(how):
            return
        current = asyncio.current_task()
        for task in (self._relay_task, *self._failures):
            if task is not current:
                task.cancel()
        if not self.cleaned.done():
            self.cleaned.cancel()
        self._disconnect()
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)
        self._loop.call_soon(self._report_death, how)

    def _disconnect(self, loop_open: bool = True) -> None:
        if self._fd < 0:
            return
        if self._writer is not None:
            self._writer.close()
        if loop_open:
            self._loop.remove_reader(self._fd)
        # The actor sees the end of the stream and closes its worker's input:
        # the worker then ends its trees, even if Ray's kill does not arrive.
        os.close(self._fd)
        self._fd = -1

    def abandon(self) -> None:
        # The loop is closed: its selector is gone, and only the fd is left to close.
        self._disconnect(loop_open=False)
        super().abandon()

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
        self._raylets: dict[str, _Raylet] = {}  # by node id
        self._dead_nodes: set[str] = set()  # found dead here, before Ray's own health check says so
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await _on_the_ray_thread(_Connection.acquire, self._config)
        self._connected = True
        try:
            self._actor_class = ray.remote(NodeWorker)
            nodes = await self._alive_nodes()
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
            self._watcher = asyncio.get_running_loop().create_task(self._watch_nodes())
        except BaseException:
            await self._disconnect()
            raise

    async def _alive_nodes(self) -> list[str]:
        """The nodes Ray calls alive, less those found dead here; where their raylets listen is kept."""
        alive = await _on_the_ray_thread(_alive_nodes)
        new = [raylet for node_id, raylet in alive.items() if node_id not in self._raylets]
        for node_id, raylet in alive.items():
            self._raylets.setdefault(node_id, raylet)
        # Tried once now, so that a node that dies before the watcher's first
        # round is known to have had a raylet that answered.
        for raylet, reached in zip(new, await asyncio.gather(*(_reach(r) for r in new)), strict=True):
            raylet.reached = reached is True
        return [node_id for node_id in alive if node_id not in self._dead_nodes]

    async def _watch_nodes(self) -> None:
        """Fail the workers of a node whose raylet is gone, long before Ray's health check would."""
        while True:
            try:
                nodes = list({worker.node_id for worker in self.workers if worker.alive} - self._dead_nodes)
                causes = await asyncio.gather(*(self._node_gone(node_id) for node_id in nodes))
                for node_id, why in zip(nodes, causes, strict=True):
                    if why is None:
                        continue
                    for worker in list(self.workers):
                        if worker.node_id == node_id:
                            worker.die(why)
            except Exception:
                logger.exception("watching the Ray nodes failed")
            await asyncio.sleep(_PROBE_INTERVAL)

    async def _node_gone(self, node_id: str) -> str | None:
        """Why the node is dead, or None if it may be alive.

        Only a raylet that once accepted a connection and now refuses one is
        taken for dead: a port that never answered here (a firewall, a Ray
        client far from the cluster) says nothing either way.
        """
        raylet = self._raylets.get(node_id)
        if raylet is None:
            return None
        if node_id not in self._dead_nodes:
            reached = await _reach(raylet)
            if reached:
                raylet.reached = True
            if reached is not False or not raylet.reached:
                return None
            self._dead_nodes.add(node_id)
        return f"its node died: its raylet at {raylet.address}:{raylet.port} refuses connections"

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
            self._node_gone,
        )

    async def _successor(self, dead: RayWorkerHandle) -> RayWorkerHandle:
        abandoned = self._abandoned.pop(dead, (set(), set()))
        cleanup = self._cleanups.pop(dead, None)
        alive = await self._alive_nodes()
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
            suffix, extra = correlate(map(execution_of, abandoned[0]))
            logger.warning(
                "killed %d process(es) left on node %s%s",
                cleaned.result(),
                dead.node_address,
                suffix,
                extra=extra,
            )
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
            return self._await_cleanup(ref, dead, markers)
        if self._closing:
            # No successor will come: the dead worker process kills its
            # trees itself when its actor's pipe closes.
            done.set_result(None)
            return done
        self._abandoned[dead] = (markers, sessions)
        self._cleanups[dead] = done
        return done

    async def _await_cleanup(self, ref: Any, dead: RayWorkerHandle, markers: set[str]) -> None:
        try:
            await ref
        except RayError as exc:
            suffix, extra = correlate(map(execution_of, markers))
            logger.error(
                "cleaning up after %s failed: %s%s", dead.describe(), _ray_cause(exc), suffix, extra=extra
            )

    async def _reader_on(self, node_id: str) -> RayWorkerHandle | None:
        """A ready worker on the node; while the node lives and the pool runs, one to come.

        A worker's death makes its execution's result at once; its successor on
        the same node is ready a moment later, and until then nothing there
        could read the log, which is whole on a node that lives.
        """
        deadline = time.monotonic() + self.hello_timeout
        while (reader := self._live_on(node_id)) is None:
            if node_id in self._dead_nodes or self._closing or time.monotonic() > deadline:
                return None
            coming = any(handle.node_id == node_id and handle.alive for handle in self.workers)
            if not coming and node_id not in await self._alive_nodes():
                return None
            await asyncio.sleep(_READER_POLL_S)
        return reader

    def _live_on(self, node_id: str) -> RayWorkerHandle | None:
        for worker in self.workers:
            if worker.node_id == node_id and worker.ready:
                return worker
        return None

    async def read_log(
        self, worker: WorkerHandle | None, path: Path, missing_ok: bool = False, limit: int | None = None
    ) -> str:
        if not isinstance(worker, RayWorkerHandle):
            return await super().read_log(worker, path, missing_ok, limit)
        reader = worker if worker.ready else await self._reader_on(worker.node_id)
        if reader is None:
            raise IoError(f"cannot read log file {path}: no live worker on node {worker.node_address}")
        with map_errors(
            {RayError: IoError},
            f"cannot read log file {path} from node {worker.node_address}",
            describe=_ray_cause,
        ):
            ok, payload = await reader.actor.read_log.remote(str(path), missing_ok, limit)
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
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait([self._watcher])
            self._watcher = None
        if self._connected:
            self._connected = False
            await _on_the_ray_thread(_Connection.release)
