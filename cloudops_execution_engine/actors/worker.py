"""The worker process: runs commands for the supervisor.

    supervisor --Run, Cancel, Credit, Shutdown--> Worker --spawn--> command (own session)
               <--Started, Output, Finished-----        <--stdout/stderr pipes, SIGCHLD--

One single-threaded loop per worker (`reactor.Reactor`). It reads `Run`/`Cancel`
frames from the supervisor's pipe; for each run it opens the log file, spawns
the command in a new session (`spawning`), reads its stdout and stderr as they
arrive, and sends back batched `Output` frames and one `Finished` frame.
SIGCHLD drives reaping (`wait4`, which also yields resource usage); being the
child subreaper, it also reaps orphaned descendants of its commands.

The parts, one concept each:
- `execution.Lifecycle`: where an execution is (starting, running, exited
  with its pipes still held, terminating, draining, finished) and what it ends
  as (`outcome`). Every callback here (a read at end of file, a reap, a timer,
  a frame) only reports an `Event` through `Worker._on`, the one place that
  advances an execution and carries out what it answers.
- `output`: what a read becomes (log lines, event lines, the kept text),
  as pure functions.
- `killing.Escalation`: the one way a tree is stopped (SIGTERM, a bounded
  wait, SIGSTOP and SIGKILL, reaping): for a cancel, a timeout, a descendant
  that holds the pipes past the grace period after its command ended, the
  sweep of what a finished command left behind, and the host's death.
- `process_tree`: which processes are an execution's tree. Commands are
  subreapers of their own trees; once an execution's main process is reaped,
  adopted processes that no other tracked execution claims go with it.

An execution is finished when its main process has been reaped, both of its
pipes are closed, and, if it was killed, its tree is gone. When it ends,
whatever is left of its tree is terminated too, so a command cannot leave
processes behind in a long-lived host.

Output is sent within a credit the supervisor grants: once the worker has sent
`OUTPUT_WINDOW` bytes of output that the host has not yet taken, it stops
reading command output, and the commands block on their pipes, until the host
catches up. A slow consumer slows the commands; memory stays bounded.

End of input from the supervisor means the host died: every tree is killed at
once and the worker exits. Nothing here imports pydantic, to keep workers small.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import os
import resource
import signal
import sys
import time
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import psutil

from ..errors import IoError, SpawnFailed, describe_os_error, mapped
from ..logfiles import LogDirectories
from ..protocol import (
    OUTPUT_WINDOW,
    Cancel,
    Credit,
    FrameDecoder,
    Hello,
    Output,
    Ping,
    Pong,
    ProtocolError,
    Retire,
    Run,
    SetEnv,
    Shutdown,
    Started,
    Stream,
    decode_message,
    encode_frame,
    output_weight,
)
from ..protocol.messages import Finished, Kind
from ..protocol.pipe import READ_SIZE, PipeWriter, read_available
from ..standard_fds import fill_closed_standard_fds
from . import own_settings, process_tree
from .execution import (
    CANCEL,
    FINISH,
    HOST_GONE,
    KILL,
    LINGER,
    LINGER_EXPIRED,
    LOOK,
    MAIN_REAPED,
    NOTHING,
    OUTPUT_CLOSED,
    RUNNING,
    SPAWN_FAILED,
    SPAWNED,
    TERMINATING,
    TIMEOUT,
    TREE_GONE,
    Event,
    Lifecycle,
    outcome,
)
from .killing import Escalation
from .limits import LimitRefused, command_settings, inherited_limits, own_cpu, stopped_by
from .output import (
    block_lines,
    keep,
    kept_text,
    log_footer,
    log_header,
    log_prefix,
    mark_lines,
    mark_read,
    masked_kept,
    read_lines,
    split_lines,
    takes_masking,
    whole_lines_cut,
)
from .reactor import Reactor, Timer
from .secrets import Masker, masker_for
from .spawning import CommandEnv, describe_start_failure, spawn, spawner_pid, start_spawner, stop_spawner
from .stdin import StdinFeed

__all__ = ["worker_main"]

# Past this many unsent bytes the worker stops reading command output until
# the supervisor catches up: the commands block on their pipes instead of the
# worker growing without bound.
OUT_HIGH_WATER = 8 * 1024 * 1024
OUT_LOW_WATER = 1024 * 1024
# File descriptors an execution holds while it runs (its two pipes and its log),
# and those kept back for the worker itself: its pipes, /proc reads, a spawn's
# two pipes that are open for a moment.
FDS_PER_EXECUTION = 4  # and the pipe of its stdin, when it has one
FDS_RESERVED = 64
# How long a process whose environment reads as empty (one in the middle of an
# `exec`) is looked at again before it counts as not a command's: an `exec`
# takes milliseconds, and one that never shows the marker was started with
# an empty environment on purpose.
_UNSURE_FOR = 0.25
# A worker told to die has no loop left to wait on: it kills everything at once
# and reaps, looking this often, for at most this long.
_ABANDON_PAUSE = 0.005
_ABANDON_FOR = 2.0
# How long after a kill began new commands wait to start (see `Reactor.call_low_priority`):
# a tree that honours SIGTERM is usually gone by then.
_KILL_SETTLE = 0.005
_STREAM_NAMES = {Stream.STDOUT: "stdout", Stream.STDERR: "stderr"}


# Whether commands are child subreapers of their own trees (see `spawning`).
_COMMANDS_ADOPT = sys.platform.startswith("linux")
# `ru_maxrss` is in kilobytes, but in bytes on macOS.
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024
# A streamed command's pipe that a read empties of a full `READ_SIZE` is written
# faster than it is read: it grows to this, and its reads take up to this, so
# chatty output costs a quarter of the reads, `Output` frames and host wake-ups.
# Only such pipes grow, as their size counts against the user's allowance
# (fs.pipe-user-pages-soft); and only streamed ones, since for the log alone the
# larger buffers cost more in page faults than the fewer reads save.
_CHATTY_PIPE = 256 * 1024
# At most this many of a worker's commands' pipes are grown at once (4 MiB): a
# worker running hundreds of chatty commands would otherwise use up the user's
# allowance, and past it the kernel gives every new pipe of that user (the
# host's, other programs') a page or two.
_GROWN_PIPES_MAX = 16
_SET_PIPE_SIZE: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only


# An execution's id on the wire: its UUID's bytes.
_ID_BYTES = 16


# How much of a failed command's stderr is read for what stopped it (the loader's words).
_STDERR_HEAD = 4096


class _PipeBudget:
    """How many more of a worker's command pipes may be grown now (`_GROWN_PIPES_MAX`)."""

    __slots__ = ("left",)

    def __init__(self, pipes: int = _GROWN_PIPES_MAX) -> None:
        self.left = pipes


class _StreamState:
    """One of a command's pipes; `fd` is -1 once it is closed."""

    __slots__ = ("budget", "fd", "grew", "kept", "name", "partial", "read_size", "stream", "truncated")

    def __init__(self, fd: int, stream: Stream, budget: _PipeBudget | None) -> None:
        """`budget`: what the pipe may grow from, None when it is not to grow."""
        self.fd = fd
        self.stream = stream
        self.name = _STREAM_NAMES[stream]
        self.partial = b""
        self.kept = bytearray()
        self.truncated = False
        self.read_size = READ_SIZE
        self.budget = budget
        self.grew = budget is None  # whether its pipe has been grown, or is not to grow

    def read(self) -> bytes | None:
        """One read, as `read_available`; the first that fills `READ_SIZE` grows the pipe (`_CHATTY_PIPE`)."""
        try:
            data = os.read(self.fd, self.read_size)
        except BlockingIOError:
            return None
        except OSError:
            return b""
        budget = self.budget
        if not self.grew and len(data) == READ_SIZE and budget is not None and budget.left > 0:
            self.grew = True
            self.read_size = _grow_pipe(self.fd)
            if self.read_size > READ_SIZE:
                budget.left -= 1
        return data

    def close(self, loop: Reactor) -> None:
        """Close its pipe (once), giving back what growing it took from the budget."""
        if self.fd < 0:
            return
        loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1
        if self.read_size > READ_SIZE and self.budget is not None:
            self.budget.left += 1


def _grow_pipe(fd: int) -> int:
    """Grow the pipe of `fd` to `_CHATTY_PIPE`; its size then, or READ_SIZE if it could not grow."""
    if _SET_PIPE_SIZE is None:
        return READ_SIZE
    try:
        return max(READ_SIZE, fcntl.fcntl(fd, _SET_PIPE_SIZE, _CHATTY_PIPE))
    except OSError:  # past the user's allowance of pipe pages, or not a pipe
        return READ_SIZE


class _Execution:
    """What the worker holds for one execution: its lifecycle, and the resources it has open."""

    __slots__ = (
        "hold",
        "id",
        "kill",
        "kill_grace",
        "life",
        "limits",
        "linger_timer",
        "log_error",
        "log_fd",
        "marker",
        "masker",
        "max_output",
        "own_cpu",
        "pid",
        "rusage",
        "started_at",
        "started_mono",
        "stdin",
        "stream_output",
        "streams",
        "success",
        "timeout_timer",
    )

    def __init__(self, run: Run, marker: str) -> None:
        self.id = run.execution_id
        self.marker = marker
        self.stream_output = run.stream_output
        self.max_output = run.max_output_bytes
        self.kill_grace = run.kill_grace_ms / 1000
        self.life = Lifecycle(run.timeout_ms)
        self.pid = 0
        self.log_fd = -1
        self.log_error: str | None = None  # why the log stopped short, if it did
        self.streams: list[_StreamState] = []
        self.rusage: list[float] | None = None
        self.own_cpu: float | None = None  # its main process's, without its children's (`limits.own_cpu`)
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.timeout_timer: Timer | None = None
        self.linger_timer: Timer | None = None
        self.kill: Escalation | None = None
        self.stdin: StdinFeed | None = None
        self.success = run.success_exit_codes
        self.limits = run.limits
        self.masker: Masker | None = masker_for(tuple(run.secrets)) if run.secrets else None
        # Bytes kept past `max_output` so a secret there is masked whole (see `masked_kept`).
        self.hold = self.masker.hold if self.masker is not None else 0


def _nothing() -> None:
    pass


# A timeout is woken ahead of its deadline to look at the command's tree once,
# then waits out the rest. A process that has slept a while runs slowly at
# first (cold caches; on a virtual machine, a host that parked its CPU): a kill
# that takes 0.2 ms warm took 2 to 4 ms just after 200 ms asleep, and ended
# the command that much past its timeout. The look is what the kill does
# first, so the kill at the deadline runs warm. How far ahead follows what
# waking and looking took lately (twice that), between these bounds, since
# a loaded or parked machine takes ten times longer than a quiet one.
_TIMEOUT_LEAD_MIN = 0.003
_TIMEOUT_LEAD_MAX = 0.05


class Worker:
    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._rfd = read_fd
        self._wfd = write_fd
        self._decoder = FrameDecoder()
        self._paused = False
        self._executions: dict[bytes, _Execution] = {}
        self._by_pid: dict[int, _Execution] = {}
        self._limited = 0  # of those, how many have limits of their own (`_reap` looks closer at their end)
        self._env = CommandEnv(dict(os.environb))
        self._pid = os.getpid()
        self._credit = OUTPUT_WINDOW
        self._limits, self.capacity = _raise_fd_limit()
        own_settings.record()  # as set up, its fd limit raised: what each start puts back
        self._inherited_limits = inherited_limits()
        self._closing = False
        self._retiring = False
        # The signal that ended it, which it ends by in turn (`worker_main`), so the host's report names it.
        self.ended_by: signal.Signals | None = None
        self._serving = False
        self._unsure_since: dict[tuple[int, float], float] = {}
        self._hurrying = False
        # Runs read but not yet started, with the environment they were sent under.
        # A start blocks for a millisecond or more, so each waits for a turn of its
        # own, after the turn's reaps, output and timeouts (see `_queue_start`).
        self._to_start: dict[bytes, tuple[Run, CommandEnv]] = {}
        # Executions whose tree is being killed, and when the last kill began.
        self._killing: set[_Execution] = set()
        self._last_kill = 0.0
        self._timeout_lead = _TIMEOUT_LEAD_MIN
        self.loop = Reactor()
        self.loop.hold_low_priority = self._kill_settling
        self.loop.one_low_a_turn = self._killing_any
        self._pipe_budget = _PipeBudget()
        self._log_dirs = LogDirectories()

    def serve(self) -> None:
        """Run until the supervisor says to shut down, or is gone."""
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        # A chatty command's frame (see `_CHATTY_PIPE`) then fits in the pipe to the host whole.
        _grow_pipe(self._wfd)
        self._writer = PipeWriter(self.loop, self._wfd, self._supervisor_gone, self._apply_backpressure)
        self.loop.add_signal_handler(signal.SIGCHLD, self._reap)
        # Ended by a signal whose default would end it at once (a hangup or Ctrl-\ to the terminal's
        # process group, a `kill $PPID`), it first kills every tree it holds, then ends by the signal.
        for sig in _ENDING_SIGNALS:
            self.loop.add_signal_handler(sig, functools.partial(self._terminated, sig))
        self.loop.add_reader(self._rfd, self._on_control)
        start_spawner()
        self._send(Hello(self._pid, self.capacity).to_wire())
        self._serving = True
        try:
            self.loop.run()
        finally:
            self.loop.close()
            self._log_dirs.close()

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
                    if st.fd >= 0:
                        self.loop.remove_reader(st.fd)
        elif self._paused and backlog < OUT_LOW_WATER and self._credit > 0:
            self._paused = False
            for ex in self._executions.values():
                for st in ex.streams:
                    if st.fd >= 0:
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
                try:
                    message = decode_message(frame)
                except ProtocolError as exc:
                    if not self._refuse_run(frame, exc):
                        raise
                    continue
                self._handle(message)
        except ProtocolError:
            # A supervisor that sends garbage cannot be trusted to send a
            # shutdown either: behave as if it died.
            self._abandon()

    def _refuse_run(self, frame: object, exc: ProtocolError) -> bool:
        """A command's request with a field that does not decode fails alone, when it names its execution.

        A value of the wrong type that slipped past the host's checks is that
        request's fault, not a sign that the host cannot be trusted.
        """
        if not (isinstance(frame, list) and len(frame) > 1 and frame[0] == Kind.RUN):
            return False
        key = frame[1]
        if not isinstance(key, bytes) or len(key) != _ID_BYTES or key in self._executions:
            return False
        now = time.time()
        error = f"Process spawn failed: the worker could not read this command's request ({exc})"
        self._send(Started(key, 0, now).to_wire())
        self._send(Finished(key, "failed", -1, "", "", False, False, now, now, error, None, None).to_wire())
        return True

    def _handle(self, message: object) -> None:
        if isinstance(message, Run):
            self._queue_start(message)
        elif isinstance(message, Cancel):
            queued = self._to_start.pop(message.execution_id, None)
            if queued is not None:
                # Started and cancelled, as if the two had come apart.
                self._start(*queued)
            ex = self._executions.get(message.execution_id)
            if ex is not None:
                self._on(ex, CANCEL)
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
            while self._to_start:
                self._start_next()
            for ex in list(self._executions.values()):
                self._on(ex, CANCEL)
            self._apply_backpressure()

    def _terminated(self, sig: signal.Signals) -> None:
        """An ending signal (`_ENDING_SIGNALS`): end as `_abandon` does, then by that signal."""
        if self.ended_by is None:
            self.ended_by = sig
        self._abandon()

    def _abandon(self) -> None:
        """The host is gone (or told us to die): kill every tree now and exit."""
        if not self._serving:
            return
        self._serving = False
        self.loop.remove_reader(self._rfd)
        self._to_start.clear()  # nobody is left to run them for
        for ex in list(self._executions.values()):
            self._on(ex, HOST_GONE)
        # Every tree is among the worker's descendants, the spawner too: all go, at once.
        everything = Escalation(self._descendants, self._reap, 0.0)
        everything.run_blocking(_ABANDON_FOR, _ABANDON_PAUSE, settled=self._no_children)
        self._reap()
        self.loop.stop()

    def _finish_serving(self) -> None:
        if self._serving:
            self._serving = False
            # What is still being finished off would outlive the worker otherwise.
            Escalation(self._descendants, self._reap, 0.0).begin()
            self._reap()
            self.loop.stop()

    # -- running a command ----------------------------------------------

    def _queue_start(self, run: Run) -> None:
        """Start `run` in a turn of its own, once what ends executions has gone first.

        A frame of runs (the host refilling the slots a batch of timeouts just
        freed) would otherwise start every one of them in a row, while the rest
        of that batch waits to be killed and reaped: each timeout would end the
        whole burst's starts late. Its `started_at` is taken when it starts.
        """
        if self._closing:
            self._start(run, self._env)  # a shutdown waits only for what has started
            return
        self._to_start[run.execution_id] = (run, self._env)
        self.loop.call_low_priority(self._start_next)

    def _start_next(self) -> None:
        # A cancel may have started one out of turn: then the next, if any, goes now.
        for key in self._to_start:
            self._start(*self._to_start.pop(key))
            return

    def _start(self, run: Run, command_env: CommandEnv) -> None:
        # What an earlier command changed in this worker (its limits, nice value, CPU set)
        # is put back before this one's log opens and it starts (`own_settings`).
        self._restore_own()
        marker = _uuid_text(run.execution_id)
        ex = _Execution(run, marker)
        self._executions[ex.id] = ex
        try:
            ex.log_fd = self._log_dirs.open(run.log_path, run.attempt <= 1)
        except OSError as exc:
            self._send(Started(ex.id, 0, ex.started_at).to_wire())
            self._on(ex, SPAWN_FAILED, error=str(mapped(exc, IoError, "cannot open log file")))
            return
        if run.attempt > 1:
            # Every attempt goes into the one log, each under a line of its own.
            self._log(ex, f"# --- attempt {run.attempt} ---\n")
        self._log(ex, self._masked(ex, log_header(marker, run.display, os.fsdecode(run.cwd), ex.started_at)))
        env = command_env.for_command(run.env, marker)
        stdin_r = stdin_w = -1
        try:
            limits, nice, cpus = command_settings(run.limits, run.cpu_affinity, self._limits)
            if run.stdin:
                stdin_r, stdin_w = os.pipe()
            search = command_env.search_path(run.env)
            pid, out_fd, err_fd = spawn(run.argv, env, run.cwd, search, limits, stdin_r, nice, cpus)
        except Exception as exc:
            # Whatever stops one command from starting (a refused limit, a value the
            # spawner cannot carry) is that execution's failure, never this worker's end.
            if stdin_w >= 0:
                os.close(stdin_w)
            reason = str(SpawnFailed(str(exc))) if isinstance(exc, LimitRefused) else None
            self._send(Started(ex.id, 0, ex.started_at).to_wire())
            error = reason or str(mapped(exc, SpawnFailed, describe=describe_start_failure))
            self._on(ex, SPAWN_FAILED, error=error)
            return
        finally:
            if stdin_r >= 0:
                os.close(stdin_r)
        if stdin_w >= 0:
            # The command holds its end now: ours is written as the pipe takes it.
            ex.stdin = StdinFeed(self.loop, stdin_w, run.stdin)
        ex.pid = pid
        self._by_pid[pid] = ex
        if ex.limits:
            self._limited += 1
        budget = self._pipe_budget if ex.stream_output else None
        ex.streams = [
            _StreamState(out_fd, Stream.STDOUT, budget),
            _StreamState(err_fd, Stream.STDERR, budget),
        ]
        for st in ex.streams:
            if not self._paused:
                self.loop.add_reader(st.fd, self._on_output, ex, st)
        self._on(ex, SPAWNED)
        # Due `timeout_ms` after the start the result reports, not after the spawn returned.
        due = run.timeout_ms / 1000 - (time.monotonic() - ex.started_mono)
        lead = self._timeout_lead
        if due > 2 * lead:
            ex.timeout_timer = self.loop.call_later(due - lead, self._near_timeout, ex)
        else:
            ex.timeout_timer = self.loop.call_later(max(0.0, due), self._on, ex, TIMEOUT)
        self._send(Started(ex.id, pid, ex.started_at).to_wire())

    def _near_timeout(self, ex: _Execution) -> None:
        """Shortly before the timeout: warm up for the kill, then wait for the deadline."""
        planned = ex.timeout_timer.when if ex.timeout_timer is not None else time.monotonic()
        self._look(ex)
        now = time.monotonic()
        lead = max(2 * (now - planned), 0.9 * self._timeout_lead, _TIMEOUT_LEAD_MIN)
        self._timeout_lead = min(lead, _TIMEOUT_LEAD_MAX)
        due = ex.life.timeout_ms / 1000 - (now - ex.started_mono)
        ex.timeout_timer = self.loop.call_later(max(0.0, due), self._on, ex, TIMEOUT)

    def _on(self, ex: _Execution, event: Event, exit_code: int = -1, error: str | None = None) -> None:
        """Tell an execution what happened, and do what its lifecycle answers: the one way it moves."""
        action = ex.life.advance(event, exit_code, error)
        if action is NOTHING:
            return
        if action is FINISH:
            self._complete(ex)
        elif action is KILL:
            self._kill(ex)
        elif action is LINGER:
            # The main process is gone but something it started still holds
            # the pipes: give it the grace period to finish, then end it.
            ex.linger_timer = self.loop.call_later(ex.kill_grace, self._on, ex, LINGER_EXPIRED)
        elif action is LOOK:
            # Finish now rather than at the kill policy's next look.
            procs, unsure = self._look(ex)
            if not procs and not unsure:
                self._on(ex, TREE_GONE)

    def _on_output(self, ex: _Execution, st: _StreamState) -> bool:
        """Take one read of a stream; False when there was nothing to read after all."""
        data = st.read()
        if data is None:
            return False
        if not data:
            self._close_stream(ex, st)
            return True
        ts = time.time()
        if keep(st.kept, data, ex.max_output + ex.hold):
            st.truncated = True
        head = st.partial
        cut = whole_lines_cut(head, data)
        if takes_masking(head, data, cut, ex.masker):
            block, pieces, st.partial = split_lines(head, data, ex.masker)
            if block or pieces:
                self._emit(ex, st, ts, block, pieces)
            return True
        if cut:
            # The usual read: marked up in one copy, with no joined buffer.
            st.partial = data[cut:]
            prefix = log_prefix(ts, st.name)
            self._write_log_parts(ex, mark_read(prefix, head, data, cut))
            if ex.stream_output:
                self._send_output(ex, st.stream, ts, read_lines(head, data, cut))
            return True
        block, pieces, st.partial = split_lines(head, data)
        if block or pieces:
            self._emit(ex, st, ts, block, pieces)
        return True

    def _emit(self, ex: _Execution, st: _StreamState, ts: float, block: bytes, pieces: list[bytes]) -> None:
        """Log and (if streaming) send whole lines: `block` ends in a newline; `pieces` have none."""
        self._write_log(ex, mark_lines(log_prefix(ts, st.name), block, pieces))
        if ex.stream_output:
            self._send_output(ex, st.stream, ts, block_lines(block, pieces))

    def _close_stream(self, ex: _Execution, st: _StreamState) -> None:
        if st.fd < 0:
            return
        st.close(self.loop)
        if st.partial:
            rest = ex.masker.mask(st.partial) if ex.masker is not None else st.partial
            self._emit(ex, st, time.time(), b"", [rest])
            st.partial = b""
        self._on(ex, OUTPUT_CLOSED)

    def _reap(self) -> None:
        adopted = False
        while True:
            try:
                if self._limited:
                    # A look before reaping: only a zombie's /proc entry tells its own CPU time from
                    # its children's. Only while a command has limits: a system call more per reap.
                    exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                    if exited is None:
                        break
                    limited = self._by_pid.get(exited.si_pid)
                    if limited is not None and limited.limits:
                        limited.own_cpu = own_cpu(exited.si_pid)
                    pid, status, usage = os.wait4(exited.si_pid, os.WNOHANG)
                else:
                    pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ex = self._by_pid.pop(pid, None)
            if ex is None:
                adopted = True  # an adopted orphan; reaping it is all it needed
                continue
            if ex.limits:
                self._limited -= 1
            ex.rusage = [usage.ru_utime, usage.ru_stime, usage.ru_maxrss * _RSS_UNIT]
            life = ex.life
            if (life.phase is RUNNING or life.phase is TERMINATING) and life.open_pipes:
                # Its pipes were closed when it exited, before its parent heard of
                # it: end of output is usually there already, though this turn's
                # wait did not report it. Take it now rather than on another turn
                # (a killed one too, which can then end at once); while paused
                # too, as one read is bounded by the pipe's size.
                for st in ex.streams:
                    if st.fd >= 0:
                        self._on_output(ex, st)
            self._on(ex, MAIN_REAPED, os.waitstatus_to_exitcode(status))
        if adopted and not self._hurrying:
            # Perhaps the last of a tree being killed: look once this turn is done.
            self._hurrying = True
            self.loop.call_soon(self._hurry_kills)

    def _hurry_kills(self) -> None:
        self._hurrying = False
        for ex in list(self._executions.values()):
            if ex.kill is not None:
                ex.kill.hurry()

    # -- stopping a tree ------------------------------------------------

    def _kill_settling(self) -> bool:
        """Whether a tree signalled moments ago may still be dying: a start now would hold up its end.

        Only for `_KILL_SETTLE` after the last kill began: a tree that takes
        longer is in its grace period, and starts go on meanwhile.
        """
        return bool(self._killing) and time.monotonic() - self._last_kill < _KILL_SETTLE

    def _killing_any(self) -> bool:
        """Whether a tree is being killed: starts then go one a turn, so that its end is seen between them."""
        return bool(self._killing)

    def _kill(self, ex: _Execution) -> None:
        self._killing.add(ex)
        self._last_kill = time.monotonic()
        if ex.linger_timer is not None:
            ex.linger_timer.cancel()
            ex.linger_timer = None
        life = ex.life
        # The group reaches children forked since a look, but only while its
        # leader is unreaped: after that, its number may be someone else's.
        ex.kill = Escalation(
            partial(self._look, ex), self._reap, ex.kill_grace, lambda: 0 if life.reaped else ex.pid
        )
        ex.kill.watch(self.loop, partial(self._tree_gone, ex))

    def _tree_gone(self, ex: _Execution) -> None:
        self._killing.discard(ex)
        self._on(ex, TREE_GONE)
        self._reap()
        self._drain(ex)

    def _drain(self, ex: _Execution) -> None:
        """Take what a dead tree left in its pipes, even while output is paused.

        Nothing can write to them any more, so this is bounded by the pipes'
        capacity, and the execution can end although the host reads slowly.
        """
        if not self._paused:
            return
        for st in ex.streams:
            while st.fd >= 0 and self._on_output(ex, st):
                pass

    def _complete(self, ex: _Execution) -> None:
        """Report a finished execution, let go of it, and sweep up what it left running."""
        self._release(ex)
        completed_at = time.time()
        status, error, exit_code = outcome(ex.life, ex.success)
        if status == "failed" and ex.life.error is None:
            error = self._limit_error(ex, exit_code) or error
        if error is not None and ex.masker is not None:
            error = ex.masker.mask_text(error)
        self._log(ex, log_footer(ex.started_at, completed_at, status, exit_code, error))
        if ex.log_fd >= 0:
            os.close(ex.log_fd)
            ex.log_fd = -1
        if ex.streams:
            out, err = ex.streams
            if ex.masker is not None:
                out.kept[:], out.truncated = masked_kept(out.kept, out.truncated, ex.max_output, ex.masker)
                err.kept[:], err.truncated = masked_kept(err.kept, err.truncated, ex.max_output, ex.masker)
            stdout, stdout_truncated = kept_text(out.kept, out.truncated, ex.max_output)
            stderr, stderr_truncated = kept_text(err.kept, err.truncated, ex.max_output)
        else:
            stdout, stdout_truncated, stderr, stderr_truncated = "", False, "", False
        # Before the end that frees its slot: a worker that must retire says so before the
        # host would send it the next command.
        self._restore_own()
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
                ex.log_error,
            ).to_wire()
        )
        del self._executions[ex.id]
        if ex.pid:
            self._sweep(ex)
        if self._closing:
            self._apply_backpressure()

    def _limit_error(self, ex: _Execution, exit_code: int) -> str | None:
        """The error naming a limit that stopped the command, from its own CPU time and what it wrote."""
        wrote = any(st.kept or st.truncated for st in ex.streams)
        # The loader's words come first: its head is enough, however much the command wrote.
        err = bytes(ex.streams[1].kept[:_STDERR_HEAD]) if ex.streams else b""
        return stopped_by(exit_code, ex.limits, ex.own_cpu, self._inherited_limits, stderr=err, wrote=wrote)

    def _restore_own(self) -> None:
        """Put back what a command changed in this worker; retire if some of it cannot be."""
        if own_settings.restore() and not self._retiring:
            # This worker's commands would start with what a command chose (and its own
            # log files may not open): it asks to be replaced, and runs on what it holds.
            self._retiring = True
            reason = "a command lowered its hard resource limits, which it may not raise again"
            self._send(Retire(reason).to_wire())

    def _release(self, ex: _Execution) -> None:
        self._killing.discard(ex)
        for timer in (ex.timeout_timer, ex.linger_timer):
            if timer is not None:
                timer.cancel()
        if ex.stdin is not None:
            ex.stdin.close()
        if ex.kill is not None:
            ex.kill.cancel()
        for st in ex.streams:
            st.close(self.loop)

    def _sweep(self, ex: _Execution) -> None:
        """End whatever the finished command left running, without holding up its result."""
        children = set(process_tree.children_of(self._pid))
        children.discard(spawner_pid())
        if ex.life.reaped and self._by_pid.keys() >= children:
            # The usual case, in one read: the worker's only children are the
            # commands still running, so this one left nothing behind.
            return
        procs, unsure = self._look(ex)
        if not procs and not unsure:
            return
        # An unsure process is usually one the command started that is still in
        # its `exec`: look again shortly rather than let it escape.
        Escalation(partial(self._look, ex), self._reap, ex.kill_grace).watch(self.loop, _nothing, procs)

    # -- helpers --------------------------------------------------------

    @staticmethod
    def _masked(ex: _Execution, text: str) -> str:
        return ex.masker.mask_text(text) if ex.masker is not None else text

    def _log(self, ex: _Execution, text: str) -> None:
        self._write_log(ex, text.encode("utf-8", "replace"))

    def _write_log_parts(self, ex: _Execution, parts: list[bytes | memoryview]) -> None:
        if ex.log_fd < 0:
            return
        try:
            written = os.writev(ex.log_fd, parts)
        except OSError as exc:
            self._log_failed(ex, exc)
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
        except OSError as exc:
            self._log_failed(ex, exc)

    def _log_failed(self, ex: _Execution, exc: OSError) -> None:
        # A full disk must not stop the command or its result: the log stays
        # short, and the host is told why, for a warning naming the execution.
        os.close(ex.log_fd)
        ex.log_fd = -1
        ex.log_error = describe_os_error(exc)

    def _tree(self, ex: _Execution, unsure: list[process_tree.Proc] | None = None) -> list[process_tree.Proc]:
        others = [o.pid for o in self._executions.values() if o.pid and o is not ex and not o.life.reaped]
        others.append(spawner_pid())  # the worker's own helper, no command's
        reaped = ex.life.reaped
        claimed: tuple[set[str], set[int]] | None = None
        if reaped and _COMMANDS_ADOPT:
            # Commands adopt their own orphans while they run, so an orphan that
            # reached the worker and that no other command claims came from one
            # that has ended: this one, if nothing else, and it goes with it.
            rest = [o for o in self._executions.values() if o is not ex]
            claimed = ({o.marker for o in rest}, {o.pid for o in rest if o.pid})
        found = process_tree.tree_of(
            0 if reaped else ex.pid, ex.pid, ex.marker, self._pid, others, unsure, claimed
        )
        if unsure:
            unsure[:] = [proc for proc in unsure if self._still_unsure(proc)]
        return found

    def _look(self, ex: _Execution) -> tuple[list[process_tree.Proc], bool]:
        """What is alive of an execution's tree, and whether a process might yet turn out to be in it."""
        unsure: list[process_tree.Proc] = []
        procs = process_tree.live(self._tree(ex, unsure))
        return procs, bool(unsure)

    def _still_unsure(self, proc: process_tree.Proc) -> bool:
        now = time.monotonic()
        try:
            key = (proc.pid, proc.create_time())
        except psutil.Error:
            return False
        if len(self._unsure_since) > 256:
            self._unsure_since = {k: t for k, t in self._unsure_since.items() if psutil.pid_exists(k[0])}
        return now - self._unsure_since.setdefault(key, now) < _UNSURE_FOR

    def _descendants(self) -> tuple[list[psutil.Process], bool]:
        return process_tree.live(process_tree.descendants(self._pid)), False

    def _no_children(self) -> bool:
        return not process_tree.children_of(self._pid)


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


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def worker_main(read_conn: Connection, write_conn: Connection, detach: bool = False) -> None:
    """Entry point of a worker process (the target of its `multiprocessing.Process`).

    With `detach`, the worker leaves its parent: it forks, the first process
    exits, and the second goes on in a session of its own. A Ray actor starts
    its worker this way because Ray SIGKILLs an actor's direct children when
    the actor exits, which would leave the commands running with no one to
    kill them. Detached, the worker outlives the actor long enough to see its
    pipe close and kill every tree, as it does when a local host dies.
    """
    # First, or a duplicate below could be 2 (a host started with 2 closed), and anything
    # written to standard error would go into the pipe to the host.
    fill_closed_standard_fds()
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
    # decides what a host's interrupt means for running commands. Set before the
    # signals are unblocked: one that came while the worker was born blocking it
    # is pending, and ignoring it discards it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _clean_signals()
    _quiet_stdio()
    _close_on_exec_all()
    process_tree.become_subreaper()
    # What is alive now (modules, mostly) lives as long as the worker: leave it
    # out of every collection to come.
    gc.freeze()
    worker = Worker(read_fd, write_fd)
    worker.serve()
    _reap_before_exit()
    if worker.ended_by is not None:
        # Its trees are killed; now it ends as the signal would have ended it (without a core file).
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        signal.signal(worker.ended_by, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {worker.ended_by})
        os.kill(os.getpid(), worker.ended_by)
        os._exit(128 + worker.ended_by)
    os._exit(0)


# The longest a worker waits, as it exits, for the children it killed to be reaped.
_REAP_AT_EXIT_S = 1.0


def _reap_before_exit() -> None:
    """End the spawner and reap every child left: none may outlive the worker unreaped.

    A worker's children that it leaves go to the nearest subreaper, the host
    itself when the host is one (PID 1 in a container, or a command that
    another engine runs), which never reaps them: each shutdown left the
    spawner there as a zombie. What the worker has killed on its way out
    dies in milliseconds; the wait is bounded all the same.
    """
    stop_spawner()
    for child in process_tree.children_of(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + _REAP_AT_EXIT_S
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # none left
        if pid == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)  # a killed child not yet dead: milliseconds


# Signals whose default action ends a process, which reach a worker from outside: SIGHUP and
# SIGQUIT come with the terminal's process group (a hangup, Ctrl-\). SIGINT is ignored instead
# (`worker_main`): the supervisor decides what a host's interrupt means.
_ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

# What Python itself ignores; commands get the default back (`spawning`).
_PYTHONS_OWN = {getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name)}


def _clean_signals() -> None:
    """Unblock every signal and let go of what the host ignored: both survive exec, into every command.

    A host that blocked SIGTERM on the thread that started the worker (or ran
    under `nohup`) would otherwise hand that to each command, and a command
    with SIGTERM blocked hears no cancel or timeout until the SIGKILL.
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGINT) or sig in _PYTHONS_OWN:
            continue  # SIGINT the worker ignores itself (`worker_main`)
        with contextlib.suppress(OSError, ValueError):
            if signal.getsignal(sig) is signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)


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
    if devnull != 0:  # 0 itself when it was closed: then it is /dev/null already
        os.dup2(devnull, 0)
        os.close(devnull)
