"""Where one execution is in its life, and what it ends as: a state machine with no I/O.

    STARTING --spawned--> RUNNING --main reaped, output closed-----------------------> FINISHED
       |                   |   `--main reaped, output open--> EXITED --output closed--> FINISHED
       | spawn failed      | cancel, timeout                    | cancel, timeout, linger expired
       v                   v                                    |
    FINISHED           TERMINATING <----------------------------'
                           | tree gone
                           v
                       DRAINING --main reaped and output closed--> FINISHED

An execution is finished when its main process has been reaped and both of its
pipes are closed (asyncio's `_try_finish`), and, once a kill began, when its
tree is gone too. `Lifecycle.advance` is the only code that changes the state:
the worker tells it what happened (an `Event`) and does what it answers (an
`Action`): start the kill policy, start the linger timer, look at the tree
once, or finish. `outcome` says what a finished execution reports.

Why a kill was asked for (`reason`: cancel or timeout) is kept apart from the
phase: a cancel that arrives while a lingering descendant is being killed does
not start another kill, but the execution still ends as cancelled. The host's
death (`HOST_GONE`) counts as a cancel and takes a running or exited execution
straight to DRAINING: the worker kills every tree at once, so there is no kill
of its own to wait for.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Action", "Event", "Lifecycle", "Phase", "outcome"]


class Phase(Enum):
    STARTING = "starting"  # the log is being opened and the command spawned
    RUNNING = "running"  # the main process runs, and no kill was asked for
    EXITED = "exited"  # the main process was reaped; something it started still holds its pipes
    TERMINATING = "terminating"  # the kill policy is stopping the tree
    DRAINING = "draining"  # the tree is gone: waiting for the main process's reap and the end of output
    FINISHED = "finished"


class Event(Enum):
    SPAWNED = "spawned"
    SPAWN_FAILED = "spawn failed"  # also a log file that could not be opened
    OUTPUT_CLOSED = "output closed"  # one of the two pipes reached its end
    MAIN_REAPED = "main reaped"
    TREE_GONE = "tree gone"
    CANCEL = "cancel"
    TIMEOUT = "timeout"
    LINGER_EXPIRED = "linger expired"
    HOST_GONE = "host gone"


class Action(Enum):
    NOTHING = "nothing"
    KILL = "kill"  # start the kill policy on the tree
    LINGER = "linger"  # give the tree the grace period to close the pipes, then send LINGER_EXPIRED
    LOOK = "look"  # look at the tree once: if it is gone already, send TREE_GONE
    FINISH = "finish"  # report the outcome and let go of the execution


# Module-level names: the worker advances every execution several times, and a
# global is found faster than an attribute of an enum class.
STARTING, RUNNING, EXITED = Phase.STARTING, Phase.RUNNING, Phase.EXITED
TERMINATING, DRAINING, FINISHED = Phase.TERMINATING, Phase.DRAINING, Phase.FINISHED
SPAWNED, SPAWN_FAILED, OUTPUT_CLOSED = Event.SPAWNED, Event.SPAWN_FAILED, Event.OUTPUT_CLOSED
MAIN_REAPED, TREE_GONE, CANCEL, TIMEOUT = Event.MAIN_REAPED, Event.TREE_GONE, Event.CANCEL, Event.TIMEOUT
LINGER_EXPIRED, HOST_GONE = Event.LINGER_EXPIRED, Event.HOST_GONE
NOTHING, KILL, LINGER, LOOK, FINISH = Action.NOTHING, Action.KILL, Action.LINGER, Action.LOOK, Action.FINISH

# Each of a command's two pipes, stdout and stderr, closes once.
_PIPES = 2


class Lifecycle:
    """One execution's state; `advance` moves it."""

    __slots__ = ("error", "exit_code", "open_pipes", "phase", "reaped", "reason", "timeout_ms")

    def __init__(self, timeout_ms: int) -> None:
        self.phase = STARTING
        self.timeout_ms = timeout_ms  # for the timeout's message
        self.reason: Event | None = None  # CANCEL or TIMEOUT once a kill was asked for
        self.error: str | None = None  # why it could not start
        self.exit_code = -1
        self.reaped = False
        self.open_pipes = 0

    def __repr__(self) -> str:
        reason = self.reason.value if self.reason is not None else None
        return (
            f"<Lifecycle {self.phase.value} reason={reason} reaped={self.reaped} "
            f"open_pipes={self.open_pipes} exit_code={self.exit_code}>"
        )

    def advance(self, event: Event, exit_code: int = -1, error: str | None = None) -> Action:
        """Take in what happened; say what to do next.

        `exit_code` goes with MAIN_REAPED, `error` with SPAWN_FAILED. Events that
        no longer matter (a timeout after the end, a second cancel) change nothing.
        """
        phase = self.phase
        if phase is FINISHED:
            return NOTHING
        # The events of every execution first, in the order of their frequency.
        if event is OUTPUT_CLOSED:
            self.open_pipes -= 1
            return self._settle() if phase is EXITED or phase is DRAINING else NOTHING
        if event is MAIN_REAPED:
            self.reaped = True
            self.exit_code = exit_code
            if phase is RUNNING:
                if self.open_pipes:
                    self.phase = EXITED
                    return LINGER
                self.phase = FINISHED
                return FINISH
            if phase is TERMINATING:
                # Usually the whole tree died with the main process.
                return LOOK
            return self._settle() if phase is DRAINING else NOTHING
        if event is SPAWNED:
            if phase is STARTING:
                self.phase = RUNNING
                self.open_pipes = _PIPES
            return NOTHING
        if event is TREE_GONE:
            if phase is TERMINATING or phase is DRAINING:
                self.phase = DRAINING
                return self._settle()
            return NOTHING
        if event is CANCEL or event is TIMEOUT or event is HOST_GONE:
            if self.reason is None:
                self.reason = TIMEOUT if event is TIMEOUT else CANCEL
            if phase is RUNNING or phase is EXITED:
                if event is HOST_GONE:
                    self.phase = DRAINING
                    return self._settle()
                self.phase = TERMINATING
                return KILL
            return NOTHING
        if event is LINGER_EXPIRED:
            if phase is EXITED:
                self.phase = TERMINATING
                return KILL
            return NOTHING
        if event is SPAWN_FAILED:
            if phase is STARTING:
                self.error = error or "spawn failed"
                self.phase = FINISHED
                return FINISH
            return NOTHING
        raise ValueError(f"unknown event {event!r}")

    def _settle(self) -> Action:
        if self.reaped and not self.open_pipes:
            self.phase = FINISHED
            return FINISH
        return NOTHING


def outcome(life: Lifecycle, success: list[int] | tuple[int, ...] = (0,)) -> tuple[str, str | None, int]:
    """What a finished execution reports: its status, its error message and its exit code.

    `success` holds exactly the exit codes that count as completed.
    """
    if life.error is not None:
        return "failed", life.error, -1
    if life.reason is TIMEOUT:
        return "timeout", f"Execution timeout after {life.timeout_ms}ms", life.exit_code
    if life.reason is CANCEL:
        return "cancelled", "Execution cancelled", life.exit_code
    if life.exit_code in success:
        return "completed", None, life.exit_code
    return "failed", f"Command failed with exit code {life.exit_code}", life.exit_code
