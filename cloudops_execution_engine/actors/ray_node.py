"""The worker actor that runs on a Ray node.

Ray runs `NodeWorker` as an async actor. It does not run commands itself: it
starts the same worker process the local pool uses (`worker.py`, in a process
of its own, so that it keeps its signal handling, its subreaper role and its
single-threaded loop), detached so that Ray's end of the actor does not take
the worker down before it has killed its trees, and carries frames both ways. `send` writes the
supervisor's frames to the worker's input pipe in the order they were sent;
`stream` yields what the worker writes, in batches, until the worker exits.

A command runs in a session of its own, which Ray does not kill when an actor
dies. So a new actor first ends what the commands of a dead predecessor on
this node left running, found by their execution marker or session.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..errors import IoError
from ..logfiles import prepare_log_dir, read_log
from ..protocol import SetEnv, encode_frame
from ..protocol.pipe import PipeWriter, read_available
from . import process_tree
from .local_pool import start_worker_process

__all__ = ["NodeWorker"]

# Past this many bytes not yet taken by the supervisor, stop reading the
# worker: it then holds back command output itself, as it does locally.
_HIGH_WATER = 8 * 1024 * 1024
_EXIT_WAIT = 5.0
# The cluster's credential must not reach the commands' environment.
_SECRET_PREFIXES = ("RAY_AUTH_TOKEN",)


class NodeWorker:
    def __init__(self, log_dir: str, markers: list[str], sessions: list[int]) -> None:
        self._log_dir = log_dir
        self._abandoned = (set(markers), set(sessions))
        self._writer: PipeWriter | None = None
        self._rfd = -1
        self._inbox: dict[int, bytes] = {}
        self._next_seq = 1
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._reading = False
        self._eof = False
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> dict[str, Any]:
        """Clean up after a predecessor, start the worker process; say where it runs."""
        import ray

        loop = self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        markers, sessions = self._abandoned
        cleaned = 0
        if markers or sessions:
            cleaned = await asyncio.to_thread(process_tree.kill_abandoned, markers, sessions)
        prepare_log_dir(Path(self._log_dir))
        launcher, wfd, self._rfd = start_worker_process("cloudops-execution-worker", detach=True)
        # The launcher exits as soon as the worker has left it.
        await asyncio.to_thread(launcher.join, _EXIT_WAIT)
        self._writer = PipeWriter(loop, wfd, self._input_broken)
        secret = tuple(os.fsencode(prefix) for prefix in _SECRET_PREFIXES)
        env = {k: v for k, v in os.environb.items() if not k.startswith(secret)}
        self._writer.write(encode_frame(SetEnv(env).to_wire()))
        self._drain_inbox()
        self._resume_reading()
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "address": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
            "hostname": socket.gethostname(),
            "cleaned": cleaned,
        }

    async def send(self, seq: int, data: bytes) -> None:
        # Ray may start calls of an async actor out of order; the sequence
        # number puts the frames back in the order the supervisor wrote them.
        self._inbox[seq] = data
        self._drain_inbox()

    def _drain_inbox(self) -> None:
        if self._writer is None:
            return
        while self._next_seq in self._inbox:
            self._writer.write(self._inbox.pop(self._next_seq))
            self._next_seq += 1

    def _input_broken(self, _exc: OSError) -> None:
        # The worker is gone; its end of output tells the supervisor.
        pass

    def _resume_reading(self) -> None:
        if not self._reading and not self._eof and self._loop is not None:
            self._loop.add_reader(self._rfd, self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._rfd)
            self._reading = False

    def _on_readable(self) -> None:
        data = read_available(self._rfd)
        if data is None:
            return
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > _HIGH_WATER:
                self._pause_reading()
        else:
            self._pause_reading()
            self._eof = True
            os.close(self._rfd)
        assert self._wake is not None
        self._wake.set()

    async def stream(self) -> AsyncIterator[bytes]:
        """The worker's output as it comes, batched, until the worker closes its end."""
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                self._resume_reading()
                yield data
            if self._eof and not self._chunks:
                break
        if self._writer is not None:
            self._writer.close()

    async def read_log(self, path: str, missing_ok: bool) -> tuple[bool, str]:
        """(True, text) or (False, why): a plain value, so no exception class must cross the cluster."""
        try:
            return True, await asyncio.to_thread(read_log, Path(path), missing_ok)
        except IoError as exc:
            return False, str(exc)

    async def clean_up(self, markers: list[str], sessions: list[int]) -> int:
        """End the command trees a dead sibling on this node left behind."""
        return await asyncio.to_thread(process_tree.kill_abandoned, set(markers), set(sessions))
