"""How the command line words a result for people, and its exit code for shells.

The JSON keeps the contract's numbers (`exit_code: -9`); people read
`killed by SIGKILL`, and `did not start` for a command whose process never
began. The tests of these words read them from the real command's output.
"""

from __future__ import annotations

import json
import signal
from typing import Any

from .errors import CommandFailed, SpawnFailed
from .results import ExecutionResult, ExecutionStatus

__all__ = [
    "EXIT_CANNOT_RUN",
    "EXIT_FAILED",
    "EXIT_INVALID",
    "EXIT_SIGNALLED",
    "EXIT_TIMEOUT",
    "did_not_start",
    "exit_code_for",
    "exit_label",
    "humane_error",
    "ndjson_line",
    "signal_name",
    "tail",
    "what_happened",
]

EXIT_TIMEOUT = 124  # as GNU timeout
EXIT_CANNOT_RUN = 127  # as a shell for a command it cannot find
EXIT_SIGNALLED = 128  # plus the signal number, as a shell
EXIT_FAILED = 1
EXIT_INVALID = 2

# Taken from the errors themselves so that the wording is defined in one place.
_SPAWN_FAILED_PREFIX = str(SpawnFailed(""))
# How much of one line an excerpt of output shows.
_LINE_CHARS = 400
_FLOAT_DIGITS = 6  # microseconds: the kernel's CPU accounting is no finer


def signal_name(number: int) -> str:
    """`SIGKILL` for 9; a number no signal has stays a number."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def did_not_start(result: ExecutionResult) -> bool:
    # Not `exit_code == -1`: a command killed by SIGHUP has that code too.
    return result.error is not None and result.error.startswith(_SPAWN_FAILED_PREFIX)


def _killed_by_signal(result: ExecutionResult) -> bool:
    """The command's own end was a signal (not a -1 made up for a worker that died)."""
    if result.exit_code >= 0:
        return False
    if result.status is ExecutionStatus.FAILED:
        return result.error == str(CommandFailed(result.exit_code))
    # The engine ends a timed-out or cancelled command with SIGTERM or SIGKILL;
    # -1 there means it never ran.
    return result.exit_code != -1


def exit_code_for(result: ExecutionResult) -> int:
    """The code `run` exits with, as a shell would for the same end."""
    if result.status is ExecutionStatus.COMPLETED:
        return 0
    if result.status is ExecutionStatus.TIMEOUT:
        return EXIT_TIMEOUT
    if did_not_start(result):
        return EXIT_CANNOT_RUN
    if result.exit_code > 0:
        return result.exit_code
    # A negative code is a signal only when the command's own end produced it;
    # a result made up for a worker that died or a log that could not be
    # opened carries -1 as well, and naming SIGHUP for those would mislead.
    if result.status is ExecutionStatus.FAILED and _killed_by_signal(result):
        return EXIT_SIGNALLED - result.exit_code
    return EXIT_FAILED


def exit_label(result: ExecutionResult) -> str:
    """The exit column of a table: the code, a signal's name, or that there was none."""
    if did_not_start(result):
        return "not started"
    if _killed_by_signal(result):
        return signal_name(-result.exit_code)
    if result.exit_code < 0:
        return "-"
    return str(result.exit_code)


def what_happened(result: ExecutionResult) -> str:
    """One line on how a command ended, for people."""
    if result.status is ExecutionStatus.COMPLETED:
        return "completed"
    if did_not_start(result):
        assert result.error is not None
        return "did not start: " + result.error[len(_SPAWN_FAILED_PREFIX) :]
    if result.status is ExecutionStatus.FAILED and _killed_by_signal(result):
        return f"killed by {signal_name(-result.exit_code)}"
    if result.error:
        return result.error
    return result.status.value


_COMMAND_FAILED_PREFIX = str(CommandFailed(0)).removesuffix("0")


def humane_error(error: str) -> str:
    """A failed event's error as `what_happened` words it: signals by name, `did not start`."""
    if error.startswith(_SPAWN_FAILED_PREFIX):
        return "did not start: " + error[len(_SPAWN_FAILED_PREFIX) :]
    if error.startswith(_COMMAND_FAILED_PREFIX):
        code = error[len(_COMMAND_FAILED_PREFIX) :]
        if code.startswith("-") and code[1:].isdigit():
            return f"killed by {signal_name(int(code[1:]))}"
    return error


# Control characters (C0, DEL, C1) shown as U+FFFD: a command's output or name is the command's to
# choose, and a terminal would act on an escape sequence in it (move the cursor, clear lines, rewrite
# the report this program draws), so what this program shows of it holds none.
_CONTROLS = {code: "\ufffd" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROLS[ord("\t")] = " "


def printable(text: str) -> str:
    """`text` with no control character a terminal would act on."""
    return text.translate(_CONTROLS)


def printable_lines(text: str) -> str:
    """`printable`, keeping the line breaks of a message this program made of several lines."""
    return "\n".join(printable(line) for line in text.split("\n"))


def tail(text: str, lines: int) -> list[str]:
    """The last `lines` non-blank lines of `text`, each cut to `_LINE_CHARS`: an excerpt for people.

    A command's output may be one line of megabytes, which would bury the
    report it is an excerpt in.
    """
    kept = [line for line in text.splitlines() if line.strip()]
    return [printable(_cut(line)) for line in kept[-lines:]]


def _cut(line: str) -> str:
    if len(line) <= _LINE_CHARS:
        return line
    return f"{line[:_LINE_CHARS]}… ({len(line) - _LINE_CHARS} more characters)"


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, _FLOAT_DIGITS)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def ndjson_line(document: dict[str, Any]) -> str:
    """One event's JSON (a model's `model_dump(mode="json")`) on one line, floats to the microsecond.

    `0.0012649999999999998` is binary noise around what the kernel measured;
    six decimals keep every digit it has.
    """
    return json.dumps(_rounded(document), separators=(",", ":"), ensure_ascii=False)
