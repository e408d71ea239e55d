"""Errors carry the seed's messages and form the documented hierarchy."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest

import cloudops_execution_engine as cee

pytestmark = pytest.mark.timeout(30)

ID = UUID("6f1c0f7e-9d5e-4b8a-8f0e-2b2b1b7d9a10")

CASES = [
    (cee.InvalidCommand("bad"), "Invalid command format: bad", cee.ValidationError),
    (cee.ScriptNotFound(Path("/x.sh")), "Script file not found: /x.sh", cee.ValidationError),
    (
        cee.TimeoutTooLarge(700_000, 600_000),
        "Timeout exceeds maximum allowed: 700000ms > 600000ms",
        cee.ValidationError,
    ),
    (cee.InvalidWorkingDir(Path("/nope")), "Invalid working directory: /nope", cee.ValidationError),
    (cee.MissingField("command"), "Missing required field: command", cee.ValidationError),
    (cee.InvalidPlan("cycle"), "Invalid execution plan: cycle", cee.ValidationError),
    (cee.NotFound(ID), f"Execution not found: {ID}", cee.ExecutionError),
    (cee.NotRunning(ID), f"Execution not running: {ID}", cee.ExecutionError),
    (cee.NotCompleted(ID), f"Execution not yet completed: {ID}", cee.ExecutionError),
    (cee.EngineClosed(), "Engine is shut down", cee.ExecutionError),
    (cee.Timeout(5000), "Execution timeout after 5000ms", cee.ExecutionError),
    (cee.Cancelled(), "Execution cancelled", cee.ExecutionError),
    (cee.CommandFailed(3), "Command failed with exit code 3", cee.ExecutionError),
    (cee.SpawnFailed("no such file"), "Process spawn failed: no such file", cee.ExecutionError),
    (cee.IoError("disk full"), "IO error: disk full", cee.ExecutionError),
    (cee.SerializationError("bad json"), "Serialization error: bad json", cee.ExecutionError),
]


@pytest.mark.parametrize(("error", "message", "base"), CASES)
def test_message_and_base(error: cee.ExecutionError, message: str, base: type) -> None:
    """Each error's text is the seed's, and it sits under the documented base."""
    assert str(error) == message
    assert isinstance(error, base)
    assert isinstance(error, cee.ExecutionError)


def test_every_error_type_is_covered() -> None:
    """The table above names every public error class."""
    public = {
        obj
        for name in cee.__all__
        if isinstance(obj := getattr(cee, name), type) and issubclass(obj, cee.ExecutionError)
    }
    covered = {type(case[0]) for case in CASES} | {cee.ExecutionError, cee.ValidationError}
    assert public == covered
