"""An execution's lifecycle and outcome, driven by events alone: no process, no loop."""

from __future__ import annotations

import pytest

from cloudops_execution_engine.actors.execution import Action, Event, Lifecycle, Phase, outcome

pytestmark = pytest.mark.timeout(10)

E = Event
A = Action


def drive(steps: list[tuple[Event, Action, Phase]], exit_code: int = 0) -> Lifecycle:
    """Feed events in order, checking the action and phase after each; the main process exits `exit_code`."""
    life = Lifecycle(5000)
    for event, action, phase in steps:
        got = life.advance(event, exit_code=exit_code)
        assert (got, life.phase) == (action, phase), f"after {event.name}: {life!r}"
    return life


def started() -> list[tuple[Event, Action, Phase]]:
    return [(E.SPAWNED, A.NOTHING, Phase.RUNNING)]


def test_a_command_that_exits_with_its_pipes_closed_finishes_at_its_reap() -> None:
    """The usual end: both pipes reach their end, then the exit is reaped (asyncio's `_try_finish`)."""
    life = drive(
        [
            *started(),
            (E.OUTPUT_CLOSED, A.NOTHING, Phase.RUNNING),
            (E.OUTPUT_CLOSED, A.NOTHING, Phase.RUNNING),
            (E.MAIN_REAPED, A.FINISH, Phase.FINISHED),
        ]
    )
    assert outcome(life) == ("completed", None, 0)


def test_a_reap_before_the_end_of_output_waits_for_it_under_the_linger_timer() -> None:
    """A descendant still holding the pipes gets the grace period; its output is awaited."""
    life = drive(
        [
            *started(),
            (E.MAIN_REAPED, A.LINGER, Phase.EXITED),
            (E.OUTPUT_CLOSED, A.NOTHING, Phase.EXITED),
            (E.OUTPUT_CLOSED, A.FINISH, Phase.FINISHED),
        ]
    )
    assert outcome(life) == ("completed", None, 0)


def test_linger_expiry_kills_the_tree_and_reports_the_main_exit_status() -> None:
    """Killing a lingering descendant is housekeeping: the command's own exit status stands."""
    life = drive(
        [
            *started(),
            (E.MAIN_REAPED, A.LINGER, Phase.EXITED),
            (E.LINGER_EXPIRED, A.KILL, Phase.TERMINATING),
            (E.TREE_GONE, A.NOTHING, Phase.DRAINING),  # the pipes may still hold output
            (E.OUTPUT_CLOSED, A.NOTHING, Phase.DRAINING),
            (E.OUTPUT_CLOSED, A.FINISH, Phase.FINISHED),
        ],
        exit_code=3,
    )
    assert outcome(life) == ("failed", "Command failed with exit code 3", 3)


@pytest.mark.parametrize(
    ("event", "status", "error"),
    [
        (E.CANCEL, "cancelled", "Execution cancelled"),
        (E.TIMEOUT, "timeout", "Execution timeout after 1500ms"),
    ],
)
def test_cancel_and_timeout_kill_and_finish_once_the_tree_is_gone(
    event: Event, status: str, error: str
) -> None:
    """A kill ends only when the tree is gone, the main process reaped and both pipes closed."""
    life = Lifecycle(1500)
    life.advance(E.SPAWNED)
    assert life.advance(event) is A.KILL
    assert life.advance(E.OUTPUT_CLOSED) is A.NOTHING
    assert life.advance(E.OUTPUT_CLOSED) is A.NOTHING
    assert life.advance(E.MAIN_REAPED, exit_code=-15) is A.LOOK  # the tree may have died with it
    assert life.phase is Phase.TERMINATING
    assert life.advance(E.TREE_GONE) is A.FINISH
    assert outcome(life) == (status, error, -15)


def test_a_tree_gone_before_the_main_process_is_reaped_waits_for_the_reap() -> None:
    """A zombie main process is not live, so the tree can read as gone before SIGCHLD is handled."""
    life = drive(
        [
            *started(),
            (E.CANCEL, A.KILL, Phase.TERMINATING),
            (E.TREE_GONE, A.NOTHING, Phase.DRAINING),
            (E.OUTPUT_CLOSED, A.NOTHING, Phase.DRAINING),
            (E.OUTPUT_CLOSED, A.NOTHING, Phase.DRAINING),
            (E.TREE_GONE, A.NOTHING, Phase.DRAINING),  # a second look changes nothing
            (E.MAIN_REAPED, A.FINISH, Phase.FINISHED),
        ]
    )
    assert outcome(life)[0] == "cancelled"


def test_the_first_reason_wins_and_a_second_kill_is_never_started() -> None:
    """A cancel after a timeout (or a second cancel) starts nothing; the timeout stands."""
    life = drive(
        [
            *started(),
            (E.TIMEOUT, A.KILL, Phase.TERMINATING),
            (E.CANCEL, A.NOTHING, Phase.TERMINATING),
            (E.TIMEOUT, A.NOTHING, Phase.TERMINATING),
        ]
    )
    assert life.reason is E.TIMEOUT


def test_a_cancel_while_a_lingering_descendant_is_killed_makes_it_cancelled() -> None:
    """No second kill, but the execution ends as cancelled: the caller asked for it."""
    life = drive(
        [
            *started(),
            (E.MAIN_REAPED, A.LINGER, Phase.EXITED),
            (E.LINGER_EXPIRED, A.KILL, Phase.TERMINATING),
            (E.CANCEL, A.NOTHING, Phase.TERMINATING),
            (E.LINGER_EXPIRED, A.NOTHING, Phase.TERMINATING),
            (E.TREE_GONE, A.NOTHING, Phase.DRAINING),
            (E.OUTPUT_CLOSED, A.NOTHING, Phase.DRAINING),
            (E.OUTPUT_CLOSED, A.FINISH, Phase.FINISHED),
        ]
    )
    assert outcome(life) == ("cancelled", "Execution cancelled", 0)


def test_a_cancel_during_the_linger_kills_at_once() -> None:
    """The grace period for a lingering descendant gives way to a cancel."""
    drive(
        [
            *started(),
            (E.MAIN_REAPED, A.LINGER, Phase.EXITED),
            (E.CANCEL, A.KILL, Phase.TERMINATING),
            (E.LINGER_EXPIRED, A.NOTHING, Phase.TERMINATING),
        ]
    )


def test_a_spawn_failure_finishes_at_once_as_failed() -> None:
    """A command that cannot start (or whose log cannot be opened) fails with the reason, exit code -1."""
    life = Lifecycle(5000)
    assert life.advance(E.SPAWN_FAILED, error="Failed to spawn process: No such file") is A.FINISH
    assert life.phase is Phase.FINISHED
    assert outcome(life) == ("failed", "Failed to spawn process: No such file", -1)


def test_the_host_gone_needs_no_kill_of_its_own_and_counts_as_a_cancel() -> None:
    """The worker kills every tree at once; an execution then ends at its reap and end of output."""
    life = drive(
        [
            *started(),
            (E.OUTPUT_CLOSED, A.NOTHING, Phase.RUNNING),
            (E.HOST_GONE, A.NOTHING, Phase.DRAINING),
            (E.OUTPUT_CLOSED, A.NOTHING, Phase.DRAINING),
            (E.MAIN_REAPED, A.FINISH, Phase.FINISHED),
        ]
    )
    assert outcome(life)[0] == "cancelled"


def test_the_host_gone_keeps_a_timeout_already_under_way() -> None:
    """A kill already started for a timeout still reports the timeout."""
    life = drive(
        [*started(), (E.TIMEOUT, A.KILL, Phase.TERMINATING), (E.HOST_GONE, A.NOTHING, Phase.TERMINATING)]
    )
    assert life.reason is E.TIMEOUT


@pytest.mark.parametrize("event", list(Event))
def test_nothing_moves_a_finished_execution(event: Event) -> None:
    """Late timers, cancels and looks after the end are ignored."""
    life = drive(
        [*started(), (E.OUTPUT_CLOSED, A.NOTHING, Phase.RUNNING), (E.OUTPUT_CLOSED, A.NOTHING, Phase.RUNNING)]
    )
    assert life.advance(E.MAIN_REAPED, exit_code=0) is A.FINISH
    assert life.advance(event) is A.NOTHING
    assert life.phase is Phase.FINISHED
    assert outcome(life) == ("completed", None, 0)


@pytest.mark.parametrize(
    ("exit_code", "expected"),
    [
        (0, ("completed", None, 0)),
        (1, ("failed", "Command failed with exit code 1", 1)),
        (-9, ("failed", "Command failed with exit code -9", -9)),
    ],
)
def test_outcome_of_a_plain_exit(exit_code: int, expected: tuple[str, str | None, int]) -> None:
    """Without a kill, the exit status alone decides: a signal is a failure with a negative code."""
    life = Lifecycle(5000)
    life.advance(E.SPAWNED)
    life.advance(E.OUTPUT_CLOSED)
    life.advance(E.OUTPUT_CLOSED)
    life.advance(E.MAIN_REAPED, exit_code=exit_code)
    assert outcome(life) == expected
