"""Errors carry the seed's messages and form the documented hierarchy."""

from __future__ import annotations

import asyncio
import copy
import pickle
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import pydantic
import pytest

import cloudops_execution_engine as cee
from cloudops_execution_engine import errors
from cloudops_execution_engine.actors.secrets import mask_error
from cloudops_execution_engine.errors import ErrorMapping, map_errors, mapped
from cloudops_execution_engine.logfiles import read_log

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


# -- the one mapping of lower-layer failures to ours ---------------------------


def raised_by(
    block: Callable[[], object], mapping: ErrorMapping, context: str | None = None
) -> BaseException:
    try:
        with map_errors(mapping, context):
            block()
    except BaseException as exc:
        return exc
    pytest.fail("the block did not fail")


def fail(exc: BaseException) -> Callable[[], object]:
    def block() -> object:
        raise exc

    return block


def invalid_request(data: object) -> Callable[[], object]:
    def block() -> object:
        if isinstance(data, str):
            return cee.ExecutionRequest.model_validate_json(data)
        return cee.ExecutionRequest.model_validate(data)

    return block


TO_IO: ErrorMapping = {OSError: cee.IoError}
TO_SPAWN: ErrorMapping = {OSError: cee.SpawnFailed, ValueError: cee.SpawnFailed}
TO_INVALID: ErrorMapping = {pydantic.ValidationError: cee.InvalidCommand}
LOG = "cannot open log file"
NOT_AN_INT = "timeout_ms: Input should be a valid integer"
EXEC = {"type": "exec", "program": "ls"}

# (lower-layer failure, mapping, context, the error it becomes, its message)
MAPPINGS: list[tuple[Callable[[], object], ErrorMapping, str | None, type, str]] = [
    (
        fail(IsADirectoryError(21, "Is a directory", "x.log")),
        TO_IO,
        LOG,
        cee.IoError,
        f"IO error: {LOG}: Is a directory: x.log",
    ),
    (
        fail(PermissionError(13, "Permission denied")),
        TO_IO,
        LOG,
        cee.IoError,
        f"IO error: {LOG}: Permission denied",
    ),
    (fail(OSError("no errno at all")), TO_IO, None, cee.IoError, "IO error: no errno at all"),
    (
        fail(FileNotFoundError(2, "No such file", "/x")),
        TO_SPAWN,
        None,
        cee.SpawnFailed,
        "Process spawn failed: No such file: /x",
    ),
    (
        fail(ValueError("embedded null byte")),
        TO_SPAWN,
        None,
        cee.SpawnFailed,
        "Process spawn failed: embedded null byte",
    ),
    (invalid_request({"env": {}}), TO_INVALID, None, cee.MissingField, "Missing required field: command"),
    (
        invalid_request("{"),
        TO_INVALID,
        None,
        cee.SerializationError,
        "Serialization error: Invalid JSON: EOF while parsing an object at line 1 column 1",
    ),
    (
        invalid_request({"command": EXEC, "timeout_ms": "soon"}),
        TO_INVALID,
        None,
        cee.InvalidCommand,
        f"Invalid command format: {NOT_AN_INT}",
    ),
]


@pytest.mark.parametrize(("block", "mapping", "context", "kind", "message"), MAPPINGS)
def test_lower_layer_failures_become_the_contract_errors(
    block: Callable[[], object], mapping: ErrorMapping, context: str | None, kind: type, message: str
) -> None:
    """Each edge's failure becomes the most specific public error, worded as before, `from` the original."""
    error = raised_by(block, mapping, context)
    assert type(error) is kind
    assert str(error) == message
    assert error.__cause__ is not None
    assert not isinstance(error.__cause__, cee.ExecutionError)


def test_what_is_sent_as_text_reads_as_what_is_raised() -> None:
    """A worker reports an error as text; `mapped` words it exactly as `map_errors` raises it."""
    for block, mapping, context, _kind, message in MAPPINGS:
        original = raised_by(block, {})
        assert isinstance(original, Exception)
        target = next(to for source, to in mapping.items() if isinstance(original, source))
        assert str(mapped(original, target, context)) == message


def test_the_nearest_mapped_class_decides() -> None:
    """A subclass named in the mapping wins over its base, whatever the mapping's order."""
    mapping: ErrorMapping = {OSError: cee.IoError, FileNotFoundError: cee.NotFound}
    assert type(raised_by(fail(FileNotFoundError(2, "gone")), mapping)) is cee.NotFound
    assert type(raised_by(fail(PermissionError(13, "no")), mapping)) is cee.IoError


def test_unmapped_failures_our_own_errors_and_cancellation_pass_untouched() -> None:
    """Only what the mapping names is mapped; an error of ours is never wrapped again."""
    key_error = KeyError("k")
    assert raised_by(fail(key_error), {OSError: cee.IoError}) is key_error
    ours = cee.IoError("log directory /x is not a directory")
    assert raised_by(fail(ours), {Exception: cee.SpawnFailed}) is ours
    cancelled = asyncio.CancelledError()
    assert raised_by(fail(cancelled), {BaseException: cee.IoError}) is cancelled  # type: ignore[dict-item]


def test_a_layer_may_word_its_own_reason() -> None:
    """Ray's many lines of advice are cut to what a message needs by the describer it passes."""

    def first_line(exc: Exception) -> str:
        return str(exc).splitlines()[0]

    with (
        pytest.raises(cee.IoError) as caught,
        map_errors({RuntimeError: cee.IoError}, "on node n", describe=first_line),
    ):
        raise RuntimeError("the node died\nhere is how to debug it\n...")
    assert str(caught.value) == "IO error: on node n: the node died"


def test_a_target_may_word_the_message_around_the_reason() -> None:
    """A function of the reason serves where the reason sits inside the message, not at its end."""
    with (
        pytest.raises(
            cee.SpawnFailed, match=r"^Process spawn failed: needs Ray \(no module\): pip install x$"
        ),
        map_errors({ImportError: lambda reason: cee.SpawnFailed(f"needs Ray ({reason}): pip install x")}),
    ):
        raise ImportError("no module")


def test_outcome_errors_name_the_result_texts_they_define() -> None:
    """`Timeout`, `Cancelled` and `CommandFailed` document that they are the texts of results."""
    for kind in (cee.Timeout, cee.Cancelled, cee.CommandFailed):
        assert kind.__doc__ is not None
        assert "never raised" in kind.__doc__


def test_reading_a_missing_log_maps_to_io_error_unless_allowed(tmp_path: Path) -> None:
    """`read_log`'s missing file reads as empty when allowed, else the contract's IoError naming it."""
    missing = tmp_path / "gone.log"
    assert read_log(missing, missing_ok=True) == ""
    with pytest.raises(cee.IoError) as caught:
        read_log(missing)
    assert str(caught.value) == f"IO error: cannot read log file: No such file or directory: {missing}"
    assert isinstance(caught.value.__cause__, FileNotFoundError)


@pytest.mark.parametrize(
    "error",
    [
        errors.InvalidCommand("bad"),
        errors.ScriptNotFound("/no/such/script"),
        errors.TimeoutTooLarge(10, 5),
        errors.InvalidWorkingDir("/no/such/dir"),
        errors.MissingField("command"),
        errors.InvalidPlan("a cycle"),
        errors.NotFound(UUID(int=1)),
        errors.NotRunning(UUID(int=2)),
        errors.NotCompleted(UUID(int=3)),
        errors.EngineClosed(),
        errors.EngineClosed("forked"),
        errors.Timeout(100),
        errors.Cancelled(),
        errors.CommandFailed(3),
        errors.SpawnFailed("no such file"),
        errors.IoError("disk full"),
        errors.SerializationError("EOF"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_an_error_crosses_processes_and_copies_as_it_was(error: errors.ExecutionError) -> None:
    """A host that runs the engine under multiprocessing or concurrent.futures gets the error raised
    in its worker: pickled, and copied, each is the same class with the same text and fields."""
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert type(again) is type(error)
        assert str(again) == str(error)
        assert vars(again) == vars(error)


def test_a_masked_error_stays_masked_across_processes() -> None:
    error = errors.InvalidWorkingDir("/tmp/s3cr3t-value")
    mask_error(error, ["s3cr3t-value"])
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) == "Invalid working directory: /tmp/***"
    assert again.path == error.path
