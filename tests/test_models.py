"""The public models speak the seed's serde JSON, both ways."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pydantic
import pytest

import cloudops_execution_engine as cee
from cloudops_execution_engine import (
    AwsCliCommand,
    DependencyGraphStrategy,
    ExecCommand,
    ExecutionConfig,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    ParallelStrategy,
    ProgressEvent,
    ScriptCommand,
    SerialStrategy,
    ShellCommand,
    StdoutEvent,
)

pytestmark = pytest.mark.timeout(30)

SEED_COMMANDS = [
    '{"type": "script", "path": "/tmp/deploy.sh", "interpreter": null}',
    '{"type": "exec", "program": "python3", "args": ["script.py", "--input", "data.json"]}',
    '{"type": "shell", "command": "aws ec2 describe-instances | jq \'.Reservations[]\'", "shell": "bash"}',
    '{"type": "aws_cli", "service": "ec2", "operation": "describe-instances",'
    ' "args": ["--region", "us-west-2"], "profile": "production", "region": "us-west-2"}',
]

RUST_REQUEST = """{
  "id": "6f1c0f7e-9d5e-4b8a-8f0e-2b2b1b7d9a10",
  "command": {"type": "aws_cli", "service": "ec2", "operation": "describe-instances",
              "args": [], "profile": "prod", "region": "us-west-2"},
  "env": {"A": "1"},
  "working_dir": null,
  "timeout_ms": null,
  "metadata": {"source": "server", "conversation_id": null, "tags": {"team": "ops"}}
}"""

RUST_RESULT = """{
  "id": "6f1c0f7e-9d5e-4b8a-8f0e-2b2b1b7d9a10",
  "status": "completed",
  "exit_code": 0,
  "stdout": "ok\\n",
  "stderr": "",
  "duration": {"secs": 1, "nanos": 500000000},
  "started_at": "2024-05-01T12:00:00.123456789Z",
  "completed_at": "2024-05-01T12:00:01.623456789Z",
  "log_path": "/tmp/x.log",
  "error": null
}"""


class _Command(pydantic.RootModel[cee.Command]):
    pass


@pytest.mark.parametrize("text", SEED_COMMANDS)
def test_seed_command_examples_parse_and_round_trip(text: str) -> None:
    """Every command JSON example of the seed parses and serialises back to the same JSON."""
    command = _Command.model_validate_json(text).root
    assert json.loads(command.model_dump_json()) == json.loads(text)


def test_rust_request_parses_and_round_trips() -> None:
    """A request written by serde parses, and our JSON of it is serde's JSON again."""
    request = ExecutionRequest.model_validate_json(RUST_REQUEST)
    assert isinstance(request.command, AwsCliCommand)
    assert request.command.profile == "prod"
    assert request.metadata.tags == {"team": "ops"}
    assert json.loads(request.model_dump_json()) == json.loads(RUST_REQUEST)


def test_rust_result_with_nanoseconds_parses() -> None:
    """chrono's nine fractional digits are kept exactly; Duration is {secs, nanos}."""
    result = ExecutionResult.model_validate_json(RUST_RESULT)
    assert result.duration == timedelta(seconds=1, microseconds=500000)
    assert isinstance(result.started_at, datetime)
    assert result.started_at.replace(microsecond=123456) == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert result.started_at.nanosecond == 123456789  # type: ignore[attr-defined]
    assert result.started_at.tzinfo is not None
    dumped = json.loads(result.model_dump_json())
    assert dumped["duration"] == {"secs": 1, "nanos": 500000000}
    assert dumped["started_at"] == "2024-05-01T12:00:00.123456789Z"
    assert dumped["resource_usage"] is None
    assert ExecutionResult.model_validate_json(result.model_dump_json()) == result


def test_duration_keeps_sub_second_parts_exactly() -> None:
    """A Python result's duration survives a JSON round trip to the microsecond."""
    duration = timedelta(seconds=3, microseconds=7)
    result = ExecutionResult(
        id=UUID(int=1),
        status=ExecutionStatus.FAILED,
        exit_code=2,
        duration=duration,
        started_at=datetime(2024, 1, 1, tzinfo=UTC),
        log_path=Path("/tmp/a.log"),
    )
    data = json.loads(result.model_dump_json())
    assert data["duration"] == {"secs": 3, "nanos": 7000}
    assert ExecutionResult.model_validate_json(result.model_dump_json()).duration == duration


def test_naive_datetimes_are_taken_as_utc() -> None:
    """Every datetime the models hold is timezone-aware."""
    event = StdoutEvent(execution_id=UUID(int=1), line="x", timestamp="2024-01-01T00:00:00")
    assert event.timestamp.tzinfo is not None
    assert event.timestamp.utcoffset() == timedelta(0)


def test_dependency_keys_are_decimal_strings_in_json() -> None:
    """serde writes HashMap<usize, _> keys as strings; we write and read the same."""
    strategy = DependencyGraphStrategy(dependencies={2: [0, 1]})
    data = json.loads(strategy.model_dump_json())
    assert data == {"type": "dependency_graph", "dependencies": {"2": [0, 1]}}
    assert DependencyGraphStrategy.model_validate_json('{"dependencies": {"2": [0, 1]}}') == strategy


def test_plan_json_round_trip_with_every_strategy() -> None:
    """Plans with each strategy survive JSON both ways."""
    commands = [ExecutionRequest(command=ExecCommand(program="true"))]
    for strategy in (SerialStrategy(), ParallelStrategy(max_concurrency=3), DependencyGraphStrategy()):
        plan = ExecutionPlan(commands=commands, strategy=strategy, description="d")
        again = ExecutionPlan.model_validate_json(plan.model_dump_json())
        assert again == plan
    data = json.loads(ExecutionPlan(commands=commands, strategy=SerialStrategy()).model_dump_json())
    assert data["strategy"] == {"type": "serial", "stop_on_error": True}


def test_event_union_discriminates_on_event_type() -> None:
    """`ExecutionEvent` parses each variant by its `event_type` tag."""
    adapter: pydantic.TypeAdapter[cee.ExecutionEvent] = pydantic.TypeAdapter(cee.ExecutionEvent)
    progress = adapter.validate_json(
        '{"event_type": "progress", "plan_id": "6f1c0f7e-9d5e-4b8a-8f0e-2b2b1b7d9a10",'
        ' "completed": 1, "total": 3, "current_command": null,'
        ' "timestamp": "2024-05-01T12:00:00.123456789Z"}'
    )
    assert isinstance(progress, ProgressEvent)
    assert progress.total == 3


def test_status_values_are_the_seeds() -> None:
    assert [s.value for s in ExecutionStatus] == [
        "pending",
        "running",
        "completed",
        "failed",
        "cancelled",
        "timeout",
    ]
    assert ExecutionStatus.COMPLETED == "completed"  # type: ignore[comparison-overlap]  # a str enum


def test_positional_construction_matches_the_contract_signatures() -> None:
    """`ExecCommand("ls", ["-l"])` and friends read like the SPEC's signatures.

    Type checkers see pydantic's keyword-only signatures, hence the ignores (mypy with the pydantic
    plugin reports some lines as `misc` only when its cache is warm).
    """
    assert ExecCommand("ls", ["-l"]) == ExecCommand(program="ls", args=["-l"])  # type: ignore[call-arg, misc, unused-ignore]
    assert ShellCommand("echo hi").shell == "bash"  # type: ignore[call-arg, misc, unused-ignore]
    assert ScriptCommand("/x.sh", "sh").interpreter == "sh"  # type: ignore[call-arg, misc, unused-ignore]
    request = ExecutionRequest(ExecCommand("ls"))  # type: ignore[call-arg, misc, unused-ignore]
    assert isinstance(request.id, UUID)
    plan = ExecutionPlan([request], SerialStrategy(False))  # type: ignore[call-arg, misc, unused-ignore]
    assert plan.strategy.stop_on_error is False  # type: ignore[union-attr]
    with pytest.raises(TypeError):
        ExecCommand("ls", [], "extra")  # type: ignore[call-arg, misc, unused-ignore]


def test_config_defaults_are_the_seeds() -> None:
    config = ExecutionConfig()
    assert config.default_timeout_ms == 120_000
    assert config.max_timeout_ms == 600_000
    assert config.stream_output is True
    assert config.log_dir is None
    assert config.max_concurrent_executions == 10
    assert config.kill_grace_ms == 2000
    assert config.max_output_bytes == 16 * 1024 * 1024
    assert config.workers is None


def test_config_rejects_nonsense() -> None:
    with pytest.raises(pydantic.ValidationError):
        ExecutionConfig(max_concurrent_executions=0)
    with pytest.raises(pydantic.ValidationError):
        ExecutionConfig(default_timeout_ms=700_000)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"journal": ""}, "journal must not be empty"),
        ({"log_dir": ""}, "log_dir must not be empty"),
        ({"journal": "."}, "journal must name a file"),
        ({"journal": "/"}, "journal must name a file"),
        ({"journal": "state/.."}, "journal must name a file"),
        # No system call takes the name: each use would be a bare ValueError.
        ({"log_dir": "/tmp/a\x00b"}, "log_dir must not contain a NUL character"),
        ({"journal": "/tmp/a\x00b.sqlite3"}, "journal must not contain a NUL character"),
    ],
)
def test_a_path_setting_that_names_no_file_is_refused_where_it_is_made(
    settings: dict[str, str], message: str
) -> None:
    """An empty setting (an unset environment variable, say) would be the working directory."""
    with pytest.raises(cee.ValidationError, match=message):
        ExecutionConfig(**settings)
    with pytest.raises(pydantic.ValidationError, match=message):
        ExecutionConfig.model_validate_json(json.dumps(settings))


def test_public_names_are_exactly_all_and_sorted() -> None:
    """The package exports what `__all__` lists, sorted, and nothing is missing from it."""
    assert cee.__all__ == sorted(cee.__all__)
    public = {n for n in dir(cee) if not n.startswith("_")}
    modules = {
        "actors",
        "cli",
        "cli_display",
        "commands",
        "config",
        "engine",
        "errors",
        "events",
        "logfiles",
        "plans",
        "protocol",
        "requests",
        "results",
        "sync",
    }
    assert public - modules == set(cee.__all__)
    for name in cee.__all__:
        assert getattr(cee, name) is not None


def test_events_built_on_the_fast_path_equal_validated_ones() -> None:
    """Line events the engine builds without validation are the same models, with the same JSON."""
    from cloudops_execution_engine._model import construct_unchecked, utcnow

    values = {"event_type": "stdout", "execution_id": UUID(int=5), "line": "é", "timestamp": utcnow()}
    fast = construct_unchecked(StdoutEvent, dict(values), set(values))
    slow = StdoutEvent(**values)
    assert fast == slow
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_fields_set == slow.model_fields_set


@pytest.mark.timeout(60)
def test_models_first_used_from_many_threads_at_once_give_every_thread_the_same_answer() -> None:
    """Where models are built on first use, sixteen threads asking at once all get the model's own."""
    helper = Path(__file__).parent / "helpers" / "first_use_threads.py"
    for _ in range(3):  # a fresh interpreter each time: nothing built yet
        done = subprocess.run(
            [sys.executable, str(helper)], capture_output=True, text=True, timeout=50, check=True
        )
        report = json.loads(done.stdout)
        assert report["threads"] == [report["alone"]] * len(report["threads"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: cee.RetryPolicy(max_attempts=0),
        lambda: cee.RetryPolicy.model_validate_json('{"max_attempts": 0}'),
        lambda: cee.RetryPolicy(backoff_multiplier=float("inf")),
        lambda: cee.RetryPolicy(backoff_multiplier=float("nan")),
        lambda: cee.RetryPolicy.model_validate_json('{"backoff_multiplier": Infinity}'),
        lambda: cee.RetryPolicy.model_validate_json('{"backoff_multiplier": 1e400}'),
        lambda: cee.ResourceUsage(user_cpu_s=float("nan"), system_cpu_s=0.0, max_rss_bytes=0),
    ],
    ids=["zero-attempts", "zero-attempts-json", "inf", "nan", "json-infinity", "json-overflow", "nan-usage"],
)
def test_what_serde_could_not_write_back_is_refused(make: Any) -> None:
    """No attempts at all, or a float JSON has no number for (serde writes null for it, and reads
    null back as no float): refused (pydantic's error from JSON, the contract's from a constructor),
    not a value that cannot come back from a journal."""
    with pytest.raises(pydantic.ValidationError):
        make()


def test_attempts_are_at_least_one_in_the_schema_too() -> None:
    assert cee.RetryPolicy.model_json_schema()["properties"]["max_attempts"]["minimum"] == 1
    assert cee.ExecutionResult.model_json_schema()["properties"]["attempts"]["minimum"] == 1
