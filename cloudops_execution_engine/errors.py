"""The exceptions the engine raises, with the seed crate's messages.

    ExecutionError
    ├── ValidationError
    │   ├── InvalidCommand
    │   ├── ScriptNotFound
    │   ├── TimeoutTooLarge
    │   ├── InvalidWorkingDir
    │   ├── MissingField
    │   └── InvalidPlan
    ├── NotFound
    ├── NotRunning
    ├── NotCompleted
    ├── EngineClosed
    ├── Timeout
    ├── Cancelled
    ├── CommandFailed
    ├── SpawnFailed
    ├── IoError
    └── SerializationError

The public API never lets an `OSError`, `KeyError`, msgpack, psutil, pydantic
or Ray exception out. Lower-layer failures become ours in one place, at the
bottom of this module: each edge to a lower layer runs inside `map_errors`
with a table of what becomes what,

    with map_errors({OSError: IoError}, "cannot read log file"):
        ...

and code that sends an error as text rather than raising it (a worker's
report of a command that could not start) words it with `mapped`, so the
message is the same either way. `Timeout`, `Cancelled` and `CommandFailed`
are the texts of results, not exceptions the engine raises: see each.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    import pydantic

__all__ = [
    "Cancelled",
    "CommandFailed",
    "EngineClosed",
    "ErrorMapping",
    "ExecutionError",
    "InvalidCommand",
    "InvalidPlan",
    "InvalidWorkingDir",
    "IoError",
    "MissingField",
    "NotCompleted",
    "NotFound",
    "NotRunning",
    "ScriptNotFound",
    "SerializationError",
    "SpawnFailed",
    "Timeout",
    "TimeoutTooLarge",
    "ValidationError",
    "describe_failure",
    "describe_os_error",
    "map_errors",
    "mapped",
]


class ExecutionError(Exception):
    """Base of every error the engine raises."""

    # Each subclass takes the parts of its message, not the message: rebuilt by
    # calling it with `args`, as pickle and copy do, one would word it twice (or
    # fail). It is rebuilt as it is instead: its text (masked, if it was) and fields,
    # so that an error crosses processes (multiprocessing, concurrent.futures) whole.
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuilt, (type(self), self.args, dict(vars(self))))


def _rebuilt(cls: type[ExecutionError], args: tuple[Any, ...], fields: dict[str, Any]) -> ExecutionError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    vars(error).update(fields)
    return error


class ValidationError(ExecutionError):
    """A request, command or plan was rejected before anything ran."""


class InvalidCommand(ValidationError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"Invalid command format: {reason}")
        self.reason = reason


class ScriptNotFound(ValidationError):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(f"Script file not found: {os.fspath(path)}")
        self.path = Path(path)


class TimeoutTooLarge(ValidationError):
    def __init__(self, timeout_ms: int, max_timeout_ms: int) -> None:
        super().__init__(f"Timeout exceeds maximum allowed: {timeout_ms}ms > {max_timeout_ms}ms")
        self.timeout_ms = timeout_ms
        self.max_timeout_ms = max_timeout_ms


class InvalidWorkingDir(ValidationError):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(f"Invalid working directory: {os.fspath(path)}")
        self.path = Path(path)


class MissingField(ValidationError):
    def __init__(self, field: str) -> None:
        super().__init__(f"Missing required field: {field}")
        self.field = field


class InvalidPlan(ValidationError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"Invalid execution plan: {reason}")
        self.reason = reason


class NotFound(ExecutionError):
    def __init__(self, execution_id: UUID | str) -> None:
        super().__init__(f"Execution not found: {execution_id}")
        self.execution_id = execution_id


class NotRunning(ExecutionError):
    def __init__(self, execution_id: UUID) -> None:
        super().__init__(f"Execution not running: {execution_id}")
        self.execution_id = execution_id


class NotCompleted(ExecutionError):
    def __init__(self, execution_id: UUID) -> None:
        super().__init__(f"Execution not yet completed: {execution_id}")
        self.execution_id = execution_id


class EngineClosed(ExecutionError):
    def __init__(self, reason: str | None = None) -> None:
        super().__init__("Engine is shut down" if reason is None else f"Engine is shut down: {reason}")


class Timeout(ExecutionError):
    """The `error` of a result whose status is `timeout`; never raised by the engine.

    As in the seed, an execution's end is its result, so that a timed-out
    command's output and exit code reach the caller. The class gives that text
    one definition, and lets a caller who wants an exception raise one.
    """

    def __init__(self, timeout_ms: int) -> None:
        super().__init__(f"Execution timeout after {timeout_ms}ms")
        self.timeout_ms = timeout_ms


class Cancelled(ExecutionError):
    """The `error` of a result whose status is `cancelled`; never raised by the engine.

    `cancel()` ends an execution with a result, as a timeout does (see `Timeout`).
    """

    def __init__(self) -> None:
        super().__init__("Execution cancelled")


class CommandFailed(ExecutionError):
    """The `error` of a result whose command exited with a code that is not success; never raised.

    A failed command is an outcome, not a fault of the engine (see `Timeout`).
    """

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"Command failed with exit code {exit_code}")
        self.exit_code = exit_code


class SpawnFailed(ExecutionError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"Process spawn failed: {reason}")
        self.reason = reason


class IoError(ExecutionError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"IO error: {reason}")
        self.reason = reason


class SerializationError(ExecutionError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"Serialization error: {reason}")
        self.reason = reason


# -- mapping lower-layer failures to ours ---------------------------------------

# What a lower-layer exception becomes: one of our classes that takes the
# reason as its only argument (`IoError`, `SpawnFailed`, ...), or a function
# that words a message around the reason.
ErrorMapping = Mapping[type[Exception], Callable[[str], ExecutionError]]


def describe_os_error(exc: OSError) -> str:
    """`strerror: filename` when the OS said which file, like the shell does."""
    text = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{text}: {os.fsdecode(exc.filename)}"
    return text


def describe_failure(exc: BaseException) -> str:
    """What a lower-layer failure adds to our message: `describe_os_error` for an OS error, else its text."""
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    return str(exc)


def mapped(
    exc: Exception,
    to: Callable[[str], ExecutionError],
    context: str | None = None,
    *,
    describe: Callable[[Exception], str] = describe_failure,
) -> ExecutionError:
    """`exc` as our error `to`, its reason `<context>: <what describe says>`, or without `context` the latter.

    A pydantic complaint becomes the most specific error its first problem
    names: `MissingField` for a missing field, `SerializationError` for text
    that is not JSON, else `to` with `<field path>: <message>`.
    """
    # Only a process that has loaded pydantic can hold its errors: a worker,
    # which never does, does not pay for importing it.
    loaded = sys.modules.get("pydantic")
    if loaded is not None and isinstance(exc, loaded.ValidationError):
        return _from_pydantic(exc, to)
    reason = describe(exc)
    return to(f"{context}: {reason}" if context else reason)


@contextlib.contextmanager
def map_errors(
    mapping: ErrorMapping,
    context: str | None = None,
    *,
    describe: Callable[[Exception], str] = describe_failure,
) -> Iterator[None]:
    """Raise the failures of the block that `mapping` names as ours, `from` the original (see `mapped`).

    The nearest class of the exception's own ancestry that `mapping` names
    decides, so `{OSError: IoError, FileNotFoundError: NotFound}` sends a
    missing file to `NotFound` and any other OS error to `IoError`. Our own
    errors, anything `mapping` does not name, and what is not an `Exception`
    (cancellation above all) go through untouched. `describe` words the
    reason for a layer whose own text does not suit a message, as Ray's many
    lines of advice do not.
    """
    try:
        yield
    except ExecutionError:
        raise
    except Exception as exc:
        for cls in type(exc).__mro__:
            to = mapping.get(cls)
            if to is not None:
                raise mapped(exc, to, context, describe=describe) from exc
        raise


def _from_pydantic(exc: pydantic.ValidationError, to: Callable[[str], ExecutionError]) -> ExecutionError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return MissingField(where)
    if first["type"] == "json_invalid":
        return SerializationError(first["msg"])
    return to(f"{where}: {first['msg']}")
