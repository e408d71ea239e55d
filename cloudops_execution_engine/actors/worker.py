"""The worker process: runs commands for the supervisor.

One single-threaded loop per worker (`reactor.Reactor`). It reads `Run`/`Cancel` frames
from the supervisor's pipe; for each run it opens the log file, spawns the
command in a new session (`spawning`), reads its stdout and stderr as
they arrive, and sends back batched `Output` frames and one `Finished` frame.
SIGCHLD drives reaping (`wait4`, which also yields resource usage); being the
child subreaper, it also reaps orphaned descendants of its commands.

An execution is finished when its main process has been reaped, both of its
pipes are closed, and, if it was cancelled or timed out, its tree is gone.
When it ends, whatever is left of its tree is terminated too, so a command
cannot leave processes behind in a long-lived host.

Output is sent within a credit the supervisor grants: once the worker has sent
`OUTPUT_WINDOW` bytes of output that the host has not yet taken, it stops
reading command output, and the commands block on their pipes, until the host
catches up. A slow consumer slows the commands; memory stays bounded.

End of input from the supervisor means the host died: every tree is killed at
once and the worker exits. Nothing here imports pydantic, to keep workers small.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import psutil

from ..errors import IoError, SpawnFailed
from ..logfiles import open_log
from ..protocol import (
    Cancel,
    Credit,
    FrameDecoder,
    Hello,
    Output,
    Ping,
    Pong,
    ProtocolError,
    Run,
    SetEnv,
    Shutdown,
    Started,
    Stream,
    decode_message,
    encode_frame,
    output_weight,
)
from ..protocol.messages import Finished
from ..protocol.pipe import PipeWriter, read_available
from . import process_tree
from .reactor import Reactor, Timer
from .spawning import CommandEnv, spawn, spawner_pid, start_spawner

__all__ = ["OUTPUT_WINDOW", "worker_main"]

# A line without a newline is cut into pieces of this size, so one endless line
# cannot grow a buffer without bound here or in the host.
LINE_PIECE = 1024 * 1024
# Past this many unsent bytes the worker stops reading command output until
# the supervisor catches up: the commands block on their pipes instead of the
# worker growing without bound.
OUT_HIGH_WATER = 8 * 1024 * 1024
OUT_LOW_WATER = 1024 * 1024
# Output (as `output_weight` counts it) the worker may have sent that the host
# has not yet given back as `Credit`.
OUTPUT_WINDOW = 4 * 1024 * 1024
# File descriptors an execution holds while it runs (its two pipes and its log),
# and those kept back for the worker itself: its pipes, /proc reads, a spawn's
# two pipes that are open for a moment.
FDS_PER_EXECUTION = 3
FDS_RESERVED = 64
_POLL_FIRST = 0.002
# How long a process whose environment reads as empty (one in the middle of an
# `exec`) is looked at again before it counts as not a command's: an `exec`
# takes milliseconds, and one that never shows the marker was started with
# an empty environment on purpose.
_UNSURE_FOR = 0.25
_POLL_MAX = 0.05
_STREAM_NAMES = {Stream.STDOUT: "stdout", Stream.STDERR: "stderr"}


# Whether commands are child subreapers of their own trees (see `spawning`).
_COMMANDS_ADOPT = sys.platform.startswith("linux")

_second_text: tuple[int, str] = (-1, "")


def _stamp(ts: float) -> str:
    global _second_text
    whole = int(ts)
    second, text = _second_text
    if second != whole:
        # strftime is the costly part, and most stamps share their second.
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second_text = (whole, text)
    return f"{text}.{int((ts - whole) * 1e6):06d}Z"


class _StreamState:
    __slots__ = ("fd", "kept", "name", "open", "partial", "stream", "truncated")

    def __init__(self, fd: int, stream: Stream) -> None:
        self.fd = fd
        self.stream = stream
        self.name = _STREAM_NAMES[stream]
        self.partial = b""
        self.kept = bytearray()
        self.truncated = False
        self.open = True


class _Execution:
    __slots__ = (
        "display",
        "exit_code",
        "finished",
        "id",
        "kill_grace",
        "linger_timer",
        "log_fd",
        "marker",
        "max_output",
        "pid",
        "reaped",
        "reason",
        "rusage",
        "spawn_error",
        "started_at",
        "stream_output",
        "streams",
        "timeout_ms",
        "timeout_timer",
        "tree_gone",
    )

    def __init__(self, run: Run, marker: str) -> None:
        self.id = run.execution_id
        self.marker = marker
        self.display = run.display
        self.stream_output = run.stream_output
        self.max_output = run.max_output_bytes
        self.kill_grace = run.kill_grace_ms / 1000
        self.timeout_ms = run.timeout_ms
        self.pid = 0
        self.log_fd = -1
        self.streams: list[_StreamState] = []
        self.reaped = False
        self.exit_code = -1
        self.rusage: list[float] | None = None
        self.reason: str | None = None  # "cancelled" or "timeout" once a kill began
        self.tree_gone = True
        self.spawn_error: str | None = None
        self.started_at = time.time()
        self.finished = False
        self.timeout_timer: Timer | None = None
        self.linger_timer: Timer | None = None


class Worker:
    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._rfd = read_fd
        self._wfd = write_fd
        self._decoder = FrameDecoder()
        self._paused = False
        self._executions: dict[bytes, _Execution] = {}
        self._by_pid: dict[int, _Execution] = {}
        self._env = CommandEnv(dict(os.environb))
        self._pid = os.getpid()
        self._credit = OUTPUT_WINDOW
        self._limits, self.capacity = _raise_fd_limit()
        self._closing = False
        self._serving = False
        self._unsure_since: dict[tuple[int, float], float] = {}
        self.loop = Reactor()

    def serve(self) -> None:
        """Run until the supervisor says to shut down, or is gone."""
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._writer = PipeWriter(self.loop, self._wfd, self._supervisor_gone, self._apply_backpressure)
        self.loop.add_signal_handler(signal.SIGCHLD, self._reap)
        self.loop.add_signal_handler(signal.SIGTERM, self._abandon)
        self.loop.add_reader(self._rfd, self._on_control)
        start_spawner()
        self._send(Hello(self._pid, self.capacity).to_wire())
        self._serving = True
        try:
            self.loop.run()
        finally:
            self.loop.close()

    # -- supervisor side -------------------------------------------------

    def _send(self, wire: list[Any]) -> None:
        self._writer.write(encode_frame(wire))

    def _supervisor_gone(self, _exc: OSError) -> None:
        # Nobody is left to report to.
        self._abandon()

    def _send_output(self, ex: _Execution, stream: Stream, ts: float, lines: list[str]) -> None:
        self._send(Output(ex.id, stream, ts, lines).to_wire())
        self._credit -= output_weight(lines)
        if self._credit <= 0 and not self._paused:
            self._apply_backpressure()

    def _apply_backpressure(self) -> None:
        backlog = self._writer.backlog
        if not self._paused and (backlog > OUT_HIGH_WATER or self._credit <= 0):
            self._paused = True
            for ex in self._executions.values():
                for st in ex.streams:
                    if st.open:
                        self.loop.remove_reader(st.fd)
        elif self._paused and backlog < OUT_LOW_WATER and self._credit > 0:
            self._paused = False
            for ex in self._executions.values():
                for st in ex.streams:
                    if st.open:
                        self.loop.add_reader(st.fd, self._on_output, ex, st)
        if self._closing and not backlog and not self._executions:
            self._finish_serving()

    def _on_control(self) -> None:
        data = read_available(self._rfd)
        if data is None:
            return
        if not data:
            self._abandon()
            return
        try:
            for frame in self._decoder.feed(data):
                self._handle(decode_message(frame))
        except ProtocolError:
            # A supervisor that sends garbage cannot be trusted to send a
            # shutdown either: behave as if it died.
            self._abandon()

    def _handle(self, message: object) -> None:
        if isinstance(message, Run):
            self._start(message)
        elif isinstance(message, Cancel):
            ex = self._executions.get(message.execution_id)
            if ex is not None and not ex.finished:
                self._terminate(ex, "cancelled")
        elif isinstance(message, Ping):
            self._send(Pong(message.seq).to_wire())
        elif isinstance(message, Credit):
            self._credit += message.nbytes
            if self._paused:
                self._apply_backpressure()
        elif isinstance(message, SetEnv):
            self._env = CommandEnv(message.env)
        elif isinstance(message, Shutdown):
            self._closing = True
            for ex in list(self._executions.values()):
                self._terminate(ex, "cancelled")
            self._apply_backpressure()

    def _abandon(self) -> None:
        """The host is gone (or told us to die): kill every tree now and exit."""
        if not self._serving:
            return
        self._serving = False
        self.loop.remove_reader(self._rfd)
        for ex in list(self._executions.values()):
            ex.reason = ex.reason or "cancelled"
            process_tree.signal_processes(self._tree(ex), signal.SIGKILL)
        self._kill_orphans(signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and self._remaining_children():
            self._reap()
            time.sleep(0.005)
        self._reap()
        self.loop.stop()

    def _finish_serving(self) -> None:
        if self._serving:
            self._serving = False
            # What is still being finished off would outlive the worker otherwise.
            self._kill_orphans(signal.SIGKILL)
            self._reap()
            self.loop.stop()

    # -- running a command ----------------------------------------------

    def _start(self, run: Run) -> None:
        marker = _uuid_text(run.execution_id)
        ex = _Execution(run, marker)
        self._executions[ex.id] = ex
        try:
            ex.log_fd = open_log(run.log_path)
        except OSError as exc:
            ex.spawn_error = str(IoError(f"cannot open log file: {_describe(exc)}"))
            self._send(Started(ex.id, 0, ex.started_at).to_wire())
            self._complete(ex)
            return
        display, cwd = run.display, os.fsdecode(run.cwd)
        if "\n" in display or "\n" in cwd:
            display, cwd = _header(display), _header(cwd)
        self._log(
            ex,
            f"# execution {marker}\n# command: {display}\n# cwd: {cwd}\n# started: {_stamp(ex.started_at)}\n",
        )
        env = self._env.for_command(run.env, marker)
        try:
            pid, out_fd, err_fd = spawn(run.argv, env, run.cwd, self._env.search_path(run.env), self._limits)
        except (OSError, ValueError) as exc:
            reason = _describe(exc) if isinstance(exc, OSError) else str(exc)
            ex.spawn_error = str(SpawnFailed(reason))
            self._send(Started(ex.id, 0, ex.started_at).to_wire())
            self._complete(ex)
            return
        ex.pid = pid
        self._by_pid[pid] = ex
        ex.streams = [_StreamState(out_fd, Stream.STDOUT), _StreamState(err_fd, Stream.STDERR)]
        for st in ex.streams:
            if not self._paused:
                self.loop.add_reader(st.fd, self._on_output, ex, st)
        ex.timeout_timer = self.loop.call_later(run.timeout_ms / 1000, self._on_timeout, ex)
        self._send(Started(ex.id, pid, ex.started_at).to_wire())

    def _on_output(self, ex: _Execution, st: _StreamState) -> bool:
        """Take one read of a stream; False when there was nothing to read after all."""
        data = read_available(st.fd)
        if data is None:
            return False
        if not data:
            self._close_stream(ex, st)
            return True
        ts = time.time()
        if len(st.kept) < ex.max_output:
            room = ex.max_output - len(st.kept)
            st.kept += data[:room]
            if len(data) > room:
                st.truncated = True
        else:
            st.truncated = True
        head = st.partial
        cut = data.rfind(b"\n") + 1
        if cut and len(data) - cut < LINE_PIECE and b"\r" not in data and not head.endswith(b"\r"):
            # The usual read: whole lines after the last one's start, no carriage
            # returns. Marked up in one copy, with no joined buffer.
            st.partial = data[cut:]
            self._emit_read(ex, st, ts, head, data, cut)
            return True
        buffer = head + data if head else data
        cut = buffer.rfind(b"\n") + 1
        rest = buffer[cut:]
        pieces: list[bytes] = []
        while len(rest) >= LINE_PIECE:
            piece = _utf8_boundary(rest, LINE_PIECE)
            pieces.append(rest[:piece])
            rest = rest[piece:]
        st.partial = rest
        if cut or pieces:
            self._emit(ex, st, ts, buffer[:cut], pieces)
        return True

    def _emit_read(
        self, ex: _Execution, st: _StreamState, ts: float, head: bytes, data: bytes, cut: int
    ) -> None:
        """Log and (if streaming) send the lines `head + data[:cut]`, which end in a newline.

        Every newline in `data` gets the next line's prefix after it, in one C-level
        replace. What follows the last newline (the prefix and the next partial
        line) is left out of the write by a view, not a copy.
        """
        prefix = f"{_stamp(ts)} {st.name} ".encode()
        marked = data.replace(b"\n", b"\n" + prefix)
        end = len(marked) - (len(data) - cut) - len(prefix)
        self._write_log_parts(ex, [prefix, head, memoryview(marked)[:end]])
        if ex.stream_output:
            lines = (head + memoryview(data)[:cut]).decode("utf-8", "replace").split("\n")
            lines.pop()  # the empty string after the last newline
            self._send_output(ex, st.stream, ts, lines)

    def _emit(self, ex: _Execution, st: _StreamState, ts: float, block: bytes, pieces: list[bytes]) -> None:
        """Log and (if streaming) send whole lines: `block` ends in a newline; `pieces` have none.

        The log is written from bytes with C-level replaces; text is decoded only for events.
        """
        prefix = f"{_stamp(ts)} {st.name} ".encode()
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")
        log = prefix + block[:-1].replace(b"\n", b"\n" + prefix) + b"\n" if block else b""
        for piece in pieces:
            log += prefix + piece + b"\n"
        self._write_log(ex, log)
        if ex.stream_output:
            lines = block.decode("utf-8", "replace").split("\n")
            lines.pop()  # the empty string after the last newline
            lines += [piece.decode("utf-8", "replace") for piece in pieces]
            self._send_output(ex, st.stream, ts, lines)

    def _close_stream(self, ex: _Execution, st: _StreamState) -> None:
        if not st.open:
            return
        st.open = False
        self.loop.remove_reader(st.fd)
        os.close(st.fd)
        if st.partial:
            self._emit(ex, st, time.time(), b"", [st.partial])
            st.partial = b""
        self._maybe_complete(ex)

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ex = self._by_pid.pop(pid, None)
            if ex is None:
                continue  # an adopted orphan; reaping it is all it needed
            ex.reaped = True
            ex.exit_code = os.waitstatus_to_exitcode(status)
            rss_unit = 1 if sys.platform == "darwin" else 1024
            ex.rusage = [usage.ru_utime, usage.ru_stime, usage.ru_maxrss * rss_unit]
            if ex.reason is None and _any_open(ex):
                # Its pipes were closed when it exited, before its parent heard of
                # it: end of output is usually there already, though this turn's
                # wait did not report it. Take it now rather than on another turn;
                # while paused too, as one read is bounded by the pipe's size.
                for st in ex.streams:
                    if st.open:
                        self._on_output(ex, st)
            if _any_open(ex) and ex.linger_timer is None and ex.reason is None:
                # The main process is gone but something it started still holds
                # the pipes: give it the grace period to finish, then end it.
                ex.linger_timer = self.loop.call_later(ex.kill_grace, self._terminate, ex, None)
            if ex.reason is not None and not ex.tree_gone:
                # Usually the whole tree died with the main process: finish now
                # rather than at the next look of the kill watcher.
                unsure: list[psutil.Process] = []
                ex.tree_gone = not process_tree.live(self._tree(ex, unsure)) and not unsure
            self._maybe_complete(ex)

    def _on_timeout(self, ex: _Execution) -> None:
        ex.timeout_timer = None
        if not ex.finished and ex.reason is None:
            self._terminate(ex, "timeout")

    def _terminate(self, ex: _Execution, reason: str | None) -> None:
        """SIGTERM the tree, SIGKILL what is left after the grace period, then report."""
        if ex.finished:
            return
        if reason is not None:
            if ex.reason is not None:
                return
            ex.reason = reason
        if not ex.pid:
            return
        ex.tree_gone = False
        process_tree.signal_processes(self._tree(ex), signal.SIGTERM)
        if not ex.reaped:
            process_tree.signal_group(ex.pid, signal.SIGTERM)
        deadline = time.monotonic() + ex.kill_grace
        self.loop.call_later(_POLL_FIRST, self._watch_kill, ex, deadline, _POLL_FIRST)

    def _watch_kill(self, ex: _Execution, deadline: float, delay: float) -> None:
        if ex.finished:
            return
        self._reap()
        unsure: list[psutil.Process] = []
        procs = process_tree.live(self._tree(ex, unsure))
        if not procs and (not unsure or time.monotonic() >= deadline):
            # What is still unsure at the deadline never showed the marker: not ours.
            ex.tree_gone = True
            self._reap()
            self._drain(ex)
            self._maybe_complete(ex)
            return
        if time.monotonic() >= deadline:
            # Stop them first so that none can fork while its siblings die.
            process_tree.signal_processes(procs, signal.SIGSTOP)
            process_tree.signal_processes(procs, signal.SIGKILL)
            if not ex.reaped:
                process_tree.signal_group(ex.pid, signal.SIGKILL)
        delay = min(delay * 2, _POLL_MAX)
        self.loop.call_later(delay, self._watch_kill, ex, deadline, delay)

    def _drain(self, ex: _Execution) -> None:
        """Take what a dead tree left in its pipes, even while output is paused.

        Nothing can write to them any more, so this is bounded by the pipes'
        capacity, and the execution can end although the host reads slowly.
        """
        if not self._paused:
            return
        for st in ex.streams:
            while st.open and self._on_output(ex, st):
                pass

    def _maybe_complete(self, ex: _Execution) -> None:
        if ex.finished or not ex.reaped or not ex.tree_gone or _any_open(ex):
            return
        self._complete(ex)

    def _complete(self, ex: _Execution) -> None:
        ex.finished = True
        for timer in (ex.timeout_timer, ex.linger_timer):
            if timer is not None:
                timer.cancel()
        for st in ex.streams:
            if st.open:
                st.open = False
                self.loop.remove_reader(st.fd)
                os.close(st.fd)
        completed_at = time.time()
        if ex.spawn_error is not None:
            status, error, exit_code = "failed", ex.spawn_error, -1
        elif ex.reason == "timeout":
            status, error, exit_code = "timeout", f"Execution timeout after {ex.timeout_ms}ms", ex.exit_code
        elif ex.reason == "cancelled":
            status, error, exit_code = "cancelled", "Execution cancelled", ex.exit_code
        elif ex.exit_code == 0:
            status, error, exit_code = "completed", None, 0
        else:
            status, error, exit_code = "failed", f"Command failed with exit code {ex.exit_code}", ex.exit_code
        self._log(
            ex,
            f"# finished: {_stamp(completed_at)} status={status} exit_code={exit_code} "
            f"duration_ms={(completed_at - ex.started_at) * 1000:.1f}\n"
            + (f"# error: {error}\n" if error else ""),
        )
        if ex.log_fd >= 0:
            os.close(ex.log_fd)
            ex.log_fd = -1
        out, err = ex.streams if ex.streams else (None, None)
        stdout, stdout_truncated = _kept_text(out, ex.max_output)
        stderr, stderr_truncated = _kept_text(err, ex.max_output)
        self._send(
            Finished(
                ex.id,
                status,
                exit_code,
                stdout,
                stderr,
                stdout_truncated,
                stderr_truncated,
                ex.started_at,
                completed_at,
                error,
                ex.rusage,
            ).to_wire()
        )
        del self._executions[ex.id]
        if ex.pid:
            self._sweep(ex)
        if self._closing:
            self._apply_backpressure()

    def _sweep(self, ex: _Execution) -> None:
        """End whatever the finished command left running, without holding up its result."""
        children = set(process_tree.children_of(self._pid))
        children.discard(spawner_pid())
        if ex.reaped and self._by_pid.keys() >= children:
            # The usual case, in one read: the worker's only children are the
            # commands still running, so this one left nothing behind.
            return
        unsure: list[psutil.Process] = []
        procs = process_tree.live(self._tree(ex, unsure))
        if not procs and not unsure:
            return
        # An unsure process is usually one the command started that is still in
        # its `exec`: look again shortly rather than let it escape.
        process_tree.signal_processes(procs, signal.SIGTERM)
        self.loop.call_later(_POLL_FIRST, self._finish_off, ex, time.monotonic() + ex.kill_grace, _POLL_FIRST)

    def _finish_off(self, ex: _Execution, deadline: float, delay: float) -> None:
        self._reap()
        unsure: list[psutil.Process] = []
        left = process_tree.live(self._tree(ex, unsure))
        past = time.monotonic() >= deadline
        if not left and (not unsure or past):
            return
        # Ones found since the last look have had no SIGTERM yet; a repeat is harmless.
        process_tree.signal_processes(left, signal.SIGKILL if past else signal.SIGTERM)
        delay = min(delay * 2, _POLL_MAX)
        self.loop.call_later(delay, self._finish_off, ex, deadline, delay)

    # -- helpers --------------------------------------------------------

    def _log(self, ex: _Execution, text: str) -> None:
        self._write_log(ex, text.encode("utf-8", "replace"))

    def _write_log_parts(self, ex: _Execution, parts: list[bytes | memoryview]) -> None:
        if ex.log_fd < 0:
            return
        try:
            written = os.writev(ex.log_fd, parts)
        except OSError:
            os.close(ex.log_fd)
            ex.log_fd = -1
            return
        if written < sum(len(part) for part in parts):
            # A short write (a signal, a nearly full disk): finish it the plain way.
            self._write_log(ex, b"".join(parts)[written:])

    def _write_log(self, ex: _Execution, data: bytes) -> None:
        if ex.log_fd < 0:
            return
        try:
            while data:
                written = os.write(ex.log_fd, data)
                data = data[written:]
        except OSError:
            # A full disk must not stop the command or its result; the log stays short.
            os.close(ex.log_fd)
            ex.log_fd = -1

    def _tree(self, ex: _Execution, unsure: list[psutil.Process] | None = None) -> list[psutil.Process]:
        others = [o.pid for o in self._executions.values() if o.pid and o is not ex and not o.reaped]
        others.append(spawner_pid())  # the worker's own helper, no command's
        claimed: tuple[set[str], set[int]] | None = None
        if ex.reaped and _COMMANDS_ADOPT:
            # Commands adopt their own orphans while they run, so an orphan that
            # reached the worker and that no other command claims came from one
            # that has ended: this one, if nothing else, and it goes with it.
            rest = [o for o in self._executions.values() if o is not ex]
            claimed = ({o.marker for o in rest}, {o.pid for o in rest if o.pid})
        found = process_tree.tree_of(
            0 if ex.reaped else ex.pid, ex.pid, ex.marker, self._pid, others, unsure, claimed
        )
        if unsure:
            unsure[:] = [proc for proc in unsure if self._still_unsure(proc)]
        return found

    def _still_unsure(self, proc: psutil.Process) -> bool:
        now = time.monotonic()
        try:
            key = (proc.pid, proc.create_time())
        except psutil.Error:
            return False
        if len(self._unsure_since) > 256:
            self._unsure_since = {k: t for k, t in self._unsure_since.items() if psutil.pid_exists(k[0])}
        return now - self._unsure_since.setdefault(key, now) < _UNSURE_FOR

    def _kill_orphans(self, sig: int) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            process_tree.signal_processes(psutil.Process(self._pid).children(recursive=True), sig)

    def _remaining_children(self) -> bool:
        return bool(process_tree.children_of(self._pid))


def _any_open(ex: _Execution) -> bool:
    # No generator: this is asked several times for every command.
    for st in ex.streams:  # noqa: SIM110
        if st.open:
            return True
    return False


def _kept_text(st: _StreamState | None, limit: int) -> tuple[str, bool]:
    """A stream's kept output as text of at most `limit` UTF-8 bytes, and whether it was cut.

    Decoding replaces each invalid byte with U+FFFD, three bytes in UTF-8, so
    the text can be up to three times the bytes kept: it is cut again to the
    limit, which is what bounds a `Finished` frame (see `frame_limit_for`).
    """
    if st is None:
        return "", False
    text = st.kept.decode("utf-8", "replace")
    if "\ufffd" not in text:
        return text, st.truncated
    encoded = text.encode()
    if len(encoded) <= limit:
        return text, st.truncated
    return encoded[: _utf8_boundary(encoded, limit)].decode(), True


def _raise_fd_limit() -> tuple[tuple[tuple[int, int, int], ...], int]:
    """Raise the soft fd limit to the hard one, as servers do; say how many executions fit.

    Returns the limit to give commands back (the soft limit the worker was
    started with, so a command sees what it would have seen from the host) and
    the number of executions the worker can hold at once.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            target = soft
    restore = ((resource.RLIMIT_NOFILE, soft, hard),) if target != soft else ()
    usable = target if target != resource.RLIM_INFINITY else 1 << 20
    return restore, max(1, (usable - FDS_RESERVED) // FDS_PER_EXECUTION)


def _header(value: str) -> str:
    """A header value on `#` lines only: a multi-line script must not read as command output."""
    return value.replace("\n", "\n#   ")


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _describe(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{text}: {os.fsdecode(exc.filename)}"
    return text


def _utf8_boundary(data: bytes, limit: int) -> int:
    """The largest cut at or below `limit` that does not split a UTF-8 sequence.

    A cut lands before a continuation byte only inside a sequence; sequences are
    at most four bytes, so at most three steps back. Invalid input gets `limit`.
    """
    if len(data) <= limit:
        return len(data)
    cut = limit
    while cut > limit - 4 and cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > limit - 4 else limit


def worker_main(read_conn: Connection, write_conn: Connection, detach: bool = False) -> None:
    """Entry point of a worker process (the target of its `multiprocessing.Process`).

    With `detach`, the worker leaves its parent: it forks, the first process
    exits, and the second goes on in a session of its own. A Ray actor starts
    its worker this way because Ray SIGKILLs an actor's direct children when
    the actor exits, which would leave the commands running with no one to
    kill them. Detached, the worker outlives the actor long enough to see its
    pipe close and kill every tree, as it does when a local host dies.
    """
    # Duplicates are close-on-exec: a command holding these pipes would keep
    # them open after the host died and hide that death from us.
    read_fd = os.dup(read_conn.fileno())
    write_fd = os.dup(write_conn.fileno())
    read_conn.close()
    write_conn.close()
    if detach:
        if os.fork() != 0:
            os._exit(0)
        os.setsid()
        # Let go of what the launch handed down (the end of the launcher's
        # sentinel pipe among it), so the launcher reads as exited at once.
        low, high = sorted((read_fd, write_fd))
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, os.sysconf("SC_OPEN_MAX"))
    # Ctrl-C in a terminal goes to the whole foreground group; the supervisor
    # decides what a host's interrupt means for running commands.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet_stdio()
    _close_on_exec_all()
    process_tree.become_subreaper()
    # What is alive now (modules, mostly) lives as long as the worker: leave it
    # out of every collection to come.
    gc.freeze()
    Worker(read_fd, write_fd).serve()
    os._exit(0)


def _close_on_exec_all() -> None:
    """Keep what the launch handed down (the end of multiprocessing's sentinel pipe) out of commands."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = [str(fd) for fd in range(3, 1024)]
    for name in names:
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def _quiet_stdio() -> None:
    """Give the worker /dev/null as standard input, which every command inherits.

    A command must never read the host's terminal or pipes. Standard output and
    error stay the host's, so that a worker's own crash report still reaches it.
    """
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
