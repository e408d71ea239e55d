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

`map_os_error` is the one place where lower-layer failures become ours; the
public API never lets an `OSError`, `KeyError`, msgpack or psutil exception out.
"""

from __future__ import annotations

import os
from pathlib import Path
from uuid import UUID

__all__ = [
    "Cancelled",
    "CommandFailed",
    "EngineClosed",
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
    "map_os_error",
]


class ExecutionError(Exception):
    """Base of every error the engine raises."""


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
    def __init__(self, timeout_ms: int) -> None:
        super().__init__(f"Execution timeout after {timeout_ms}ms")
        self.timeout_ms = timeout_ms


class Cancelled(ExecutionError):
    def __init__(self) -> None:
        super().__init__("Execution cancelled")


class CommandFailed(ExecutionError):
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


def describe_os_error(exc: OSError) -> str:
    """`strerror: filename` when the OS said which file, like the shell does."""
    text = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{text}: {os.fsdecode(exc.filename)}"
    return text


def map_os_error(exc: OSError) -> IoError:
    return IoError(describe_os_error(exc))
