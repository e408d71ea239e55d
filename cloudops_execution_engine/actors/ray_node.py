"""The worker actor that runs on a Ray node.

Ray runs `NodeWorker` as an async actor. It does not run commands itself: it
starts the same worker process the local pool uses (`worker.py`, in a process
of its own, so that it keeps its signal handling, its subreaper role and its
single-threaded loop), detached so that Ray's end of the actor does not take
the worker down before it has killed its trees, and carries frames both ways.
`start` returns the port it listens on; the host connects there (`ray_link.py`)
with the key it gave the actor, and from then on the actor pumps bytes: what
comes from the host into the worker's input pipe, what the worker writes back
to the host. The worker's end of output closes the connection; the host's end
of the connection closes the worker's input, so it ends its trees and exits.

A command runs in a session of its own, which Ray does not kill when an actor
dies. So a new actor first ends what the commands of a dead predecessor on
this node left running, found by their execution marker or session.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import IoError
from ..logfiles import prepare_log_dir, read_log
from ..protocol import SetEnv, encode_frame
from ..protocol.pipe import PipeWriter, read_available
from . import process_tree, ray_link
from .local_pool import start_worker_process

__all__ = ["NodeWorker"]

# Past this many bytes not yet taken by the supervisor, stop reading the
# worker: it then holds back command output itself, as it does locally.
_HIGH_WATER = 8 * 1024 * 1024
_EXIT_WAIT = 5.0
# The host connects as soon as `start` returns; one that has not by then is gone.
_ACCEPT_TIMEOUT = 60.0
# The cluster's credential must not reach the commands' environment.
_SECRET_PREFIXES = ("RAY_AUTH_TOKEN",)


class NodeWorker:
    def __init__(self, log_dir: str, markers: list[str], sessions: list[int], authkey: bytes) -> None:
        self._log_dir = log_dir
        self._abandoned = (set(markers), set(sessions))
        self._authkey = authkey
        self._writer: PipeWriter | None = None  # to the worker's input
        self._wfd = -1
        self._rfd = -1
        self._host: PipeWriter | None = None  # to the host, once it has connected
        self._sock = -1
        self._host_paused = False
        self._chunks: list[bytes] = []  # the worker's output before the host connected
        self._reading = False
        self._eof = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting: asyncio.Task[None] | None = None

    async def start(self) -> dict[str, Any]:
        """Clean up after a predecessor, start the worker process, listen for the host; say where."""
        import ray

        loop = self._loop = asyncio.get_running_loop()
        markers, sessions = self._abandoned
        cleaned = 0
        if markers or sessions:
            cleaned = await asyncio.to_thread(process_tree.kill_abandoned, markers, sessions)
        prepare_log_dir(Path(self._log_dir))
        address = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
        listener = ray_link.listen(address)
        launcher, self._wfd, self._rfd = start_worker_process("cloudops-execution-worker", detach=True)
        # The launcher exits as soon as the worker has left it.
        await asyncio.to_thread(launcher.join, _EXIT_WAIT)
        self._writer = PipeWriter(loop, self._wfd, self._input_broken, self._input_flushed)
        secret = tuple(os.fsencode(prefix) for prefix in _SECRET_PREFIXES)
        env = {k: v for k, v in os.environb.items() if not k.startswith(secret)}
        self._writer.write(encode_frame(SetEnv(env).to_wire()))
        self._resume_reading()
        self._accepting = loop.create_task(self._accept(listener))
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "address": address,
            "port": listener.getsockname()[1],
            "hostname": socket.gethostname(),
            "cleaned": cleaned,
        }

    async def _accept(self, listener: socket.socket) -> None:
        try:
            self._sock = await asyncio.wait_for(ray_link.accept(listener, self._authkey), _ACCEPT_TIMEOUT)
        except Exception:  # the host never came (or the listener failed): nothing will drive the worker
            self._host_gone()
            return
        finally:
            listener.close()
        assert self._loop is not None
        self._host = PipeWriter(self._loop, self._sock, self._host_broken, self._host_flushed)
        if self._chunks:
            self._host.write(b"".join(self._chunks))
            self._chunks.clear()
        if self._eof:
            self._host_flushed()
        self._loop.add_reader(self._sock, self._from_host)

    def _from_host(self) -> None:
        data = read_available(self._sock)
        if data is None:
            return
        if not data:
            self._host_gone()
            return
        assert self._writer is not None
        self._writer.write(data)
        if self._writer.backlog > _HIGH_WATER and self._loop is not None:
            # The worker does not keep up (a large stdin, say): hold the host back.
            self._loop.remove_reader(self._sock)
            self._host_paused = True

    def _input_flushed(self) -> None:
        if self._host_paused and self._writer is not None and self._writer.backlog == 0:
            assert self._loop is not None
            self._host_paused = False
            self._loop.add_reader(self._sock, self._from_host)

    def _input_broken(self, _exc: OSError) -> None:
        # The worker is gone; its end of output tells the host.
        pass

    def _host_gone(self) -> None:
        """The host closed the connection or never came: the worker's input closes, so it ends its trees."""
        if self._loop is not None and self._sock >= 0:
            self._loop.remove_reader(self._sock)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            os.close(self._wfd)
        self._close_host()

    def _host_broken(self, _exc: OSError) -> None:
        self._host_gone()

    def _close_host(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None
        if self._sock >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._sock)
            os.close(self._sock)
            self._sock = -1

    def _host_flushed(self) -> None:
        if self._host is None:
            return
        if self._host.backlog == 0 and self._eof:
            # All the worker wrote has gone: the host sees the end of the stream.
            self._close_host()
        elif self._host.backlog < _HIGH_WATER:
            self._resume_reading()

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
            if self._host is not None:
                self._host.write(data)
                if self._host.backlog > _HIGH_WATER:
                    self._pause_reading()
            else:
                self._chunks.append(data)
                if sum(map(len, self._chunks)) > _HIGH_WATER:
                    self._pause_reading()
            return
        self._pause_reading()
        self._eof = True
        os.close(self._rfd)
        self._host_flushed()

    async def read_log(self, path: str, missing_ok: bool, limit: int | None) -> tuple[bool, str]:
        """(True, text) or (False, why): a plain value, so no exception class must cross the cluster."""
        try:
            return True, await asyncio.to_thread(read_log, Path(path), missing_ok, limit)
        except IoError as exc:
            return False, str(exc)

    async def clean_up(self, markers: list[str], sessions: list[int]) -> int:
        """End the command trees a dead sibling on this node left behind."""
        return await asyncio.to_thread(process_tree.kill_abandoned, set(markers), set(sessions))
