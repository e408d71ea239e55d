"""JSON as serde and chrono write and read it: nanoseconds kept, chrono's timestamps, strict values.

tests/test_interop.py checks the same against the Rust crate's types under real
serde; these say each rule on its own, without Rust.
"""

from __future__ import annotations

import copy
import json
import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pydantic
import pytest

import cloudops_execution_engine as cee
from cloudops_execution_engine import (
    DependencyGraphStrategy,
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    ExecutionSummary,
    InvalidCommand,
    ParallelStrategy,
    ProgressEvent,
    SerialStrategy,
    StdoutEvent,
    ValidationError,
)
from cloudops_execution_engine._model import Model, NanoDateTime, NanoDuration, construct_unchecked

pytestmark = pytest.mark.timeout(30)

U64_MAX = 2**64 - 1
ID = "6f1c0f7e-9d5e-4b8a-8f0e-2b2b1b7d9a10"


def result_json(
    duration: str = '{"secs": 1, "nanos": 0}', started_at: str = "2024-05-01T12:00:00Z", **more: Any
) -> str:
    fields = {
        "id": ID,
        "status": "completed",
        "exit_code": 0,
        "stdout": "",
        "stderr": "",
        "duration": json.loads(duration),
        "started_at": started_at,
        "completed_at": None,
        "log_path": "/tmp/x.log",
        "error": None,
    }
    fields.update(more)
    return json.dumps(fields)


def dumped(model: pydantic.BaseModel) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(model.model_dump_json())
    return data


# -- timestamps as chrono writes them --------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("2024-05-01T12:00:00Z", "2024-05-01T12:00:00Z"),
        ("2024-05-01T12:00:00.250Z", "2024-05-01T12:00:00.250Z"),
        ("2024-05-01T12:00:00.25Z", "2024-05-01T12:00:00.250Z"),
        ("2024-05-01T12:00:00.123456Z", "2024-05-01T12:00:00.123456Z"),
        ("2024-05-01T12:00:00.123450Z", "2024-05-01T12:00:00.123450Z"),
        ("2024-05-01T12:00:00.123456789Z", "2024-05-01T12:00:00.123456789Z"),
        ("2024-05-01T12:00:00.000000001Z", "2024-05-01T12:00:00.000000001Z"),
        ("2024-05-01T12:00:00.000000000Z", "2024-05-01T12:00:00Z"),
        ("2024-05-01T12:00:00.1234567891Z", "2024-05-01T12:00:00.123456789Z"),  # chrono reads nine digits
        ("2024-05-01T14:00:00.5+02:00", "2024-05-01T12:00:00.500Z"),
        ("2024-05-01 12:00:00Z", "2024-05-01T12:00:00Z"),
    ],
)
def test_timestamps_are_written_with_0_3_6_or_9_digits_as_chrono_does(written: str, expected: str) -> None:
    """chrono writes `...:00Z`, `...:00.250Z`, 6 or 9 digits: the fewest of those that hold the value."""
    event = StdoutEvent.model_validate_json(
        json.dumps({"event_type": "stdout", "execution_id": ID, "line": "x", "timestamp": written})
    )
    assert dumped(event)["timestamp"] == expected


@pytest.mark.parametrize(
    ("micros", "expected"),
    [(0, "12:00:00Z"), (250_000, "12:00:00.250Z"), (1000, "12:00:00.001Z"), (7, "12:00:00.000007Z")],
)
def test_timestamps_the_engine_makes_are_written_as_chrono_does(micros: int, expected: str) -> None:
    """Events built on the per-line path (no validation, plain datetimes) are written the same way."""
    stamp = datetime(2024, 5, 1, 12, 0, 0, micros, tzinfo=UTC)
    values = {"event_type": "stdout", "execution_id": UUID(int=1), "line": "x", "timestamp": stamp}
    event = construct_unchecked(StdoutEvent, values, set(values))
    assert dumped(event)["timestamp"] == f"2024-05-01T{expected}"


# -- nanoseconds, kept --------------------------------------------------------------


@pytest.mark.parametrize(
    ("secs", "nanos"),
    [(1, 123_456_789), (0, 1), (0, 999_999_999), (5, 0), (0, 500), (86_399_999_999_999, 999_999_999)],
)
def test_durations_keep_their_nanoseconds(secs: int, nanos: int) -> None:
    """`{"secs": 1, "nanos": 123456789}` comes back as written, not rounded to microseconds."""
    text = result_json(duration=json.dumps({"secs": secs, "nanos": nanos}))
    result = ExecutionResult.model_validate_json(text)
    assert dumped(result)["duration"] == {"secs": secs, "nanos": nanos}
    assert isinstance(result.duration, timedelta)
    assert result.duration == timedelta(seconds=secs, microseconds=nanos // 1000) or nanos % 1000
    assert ExecutionResult.model_validate_json(result.model_dump_json()) == result


def test_a_nanosecond_duration_is_a_timedelta_that_counts_its_nanoseconds() -> None:
    """NanoDuration works wherever a timedelta does, and its nanoseconds count in comparisons."""
    d = NanoDuration.from_parts(1, 123_456_789)
    assert (d.secs, d.nanos, d.total_nanoseconds()) == (1, 123_456_789, 1_123_456_789)
    assert d.total_seconds() == pytest.approx(1.123457)
    assert d + timedelta(seconds=1) == timedelta(seconds=2, microseconds=123_456)
    assert d != timedelta(seconds=1, microseconds=123_456)
    assert timedelta(seconds=1, microseconds=123_456) < d < timedelta(seconds=1, microseconds=123_457)
    assert d == NanoDuration.from_parts(0, 1_123_456_789)
    assert NanoDuration.from_parts(2, 0) == timedelta(seconds=2)
    assert hash(NanoDuration.from_parts(2, 0)) == hash(timedelta(seconds=2))
    assert len({d, NanoDuration.from_parts(1, 123_456_788)}) == 2
    for again in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d), copy.copy(d)):
        assert isinstance(again, NanoDuration)
        assert again.nanos == 123_456_789


def test_timestamps_keep_their_nanoseconds() -> None:
    """A chrono timestamp with nine digits is a datetime that keeps all nine."""
    result = ExecutionResult.model_validate_json(result_json(started_at="2024-05-01T12:00:00.123456789Z"))
    stamp = result.started_at
    assert isinstance(stamp, NanoDateTime)
    assert stamp.nanosecond == 123_456_789
    assert stamp.microsecond == 123_456
    assert stamp.tzinfo is UTC
    assert stamp != datetime(2024, 5, 1, 12, 0, 0, 123_456, tzinfo=UTC)
    assert datetime(2024, 5, 1, 12, 0, 0, 123_456, tzinfo=UTC) < stamp
    assert stamp - NanoDateTime(2024, 5, 1, tzinfo=UTC) == timedelta(hours=12, microseconds=123_456)
    assert stamp.astimezone(UTC).nanosecond == 123_456_789
    assert stamp.replace(tzinfo=UTC).nanosecond == 123_456_789
    for again in (pickle.loads(pickle.dumps(stamp)), copy.deepcopy(stamp)):
        assert isinstance(again, NanoDateTime)
        assert again.nanosecond == 123_456_789
    assert ExecutionResult.model_validate_json(result.model_dump_json()) == result
    assert dumped(result)["started_at"] == "2024-05-01T12:00:00.123456789Z"


def test_a_nanosecond_timestamp_can_be_given_in_python() -> None:
    """`NanoDateTime.from_parts` makes a timestamp the models keep and write to the nanosecond."""
    stamp = NanoDateTime.from_parts(datetime(2024, 5, 1, 12, tzinfo=UTC), 1)
    event = StdoutEvent(execution_id=UUID(int=1), line="x", timestamp=stamp)
    assert event.timestamp is stamp
    assert dumped(event)["timestamp"] == "2024-05-01T12:00:00.000000001Z"


# -- values Python cannot hold are validation errors that say why ------------------------------


@pytest.mark.parametrize(
    ("duration", "why"),
    [
        ({"secs": U64_MAX, "nanos": 0}, "longer than Python's timedelta can hold"),
        ({"secs": U64_MAX, "nanos": 1_000_000_000}, "overflow deserializing Duration"),
        ({"secs": 2**64, "nanos": 0}, "range of u64"),
        ({"secs": 1, "nanos": 2**32}, "range of u32"),
        ({"secs": -1, "nanos": 0}, "range of u64"),
        ({"secs": True, "nanos": 0}, "range of u64"),
        ({"secs": 1}, "missing field 'nanos'"),
        ({"secs": 1, "nanos": 0, "millis": 5}, "unknown field 'millis'"),
        (1.5, "secs"),
    ],
)
def test_durations_serde_refuses_or_python_cannot_hold_are_validation_errors(duration: Any, why: str) -> None:
    """Never a raw OverflowError: a pydantic ValidationError whose message says what is wrong."""
    with pytest.raises(pydantic.ValidationError, match=why):
        ExecutionResult.model_validate_json(result_json(duration=json.dumps(duration)))


def test_nanos_beyond_a_second_carry_into_seconds_as_serde_does() -> None:
    """serde's Duration takes any u32 of nanos and carries whole seconds; so do we."""
    result = ExecutionResult.model_validate_json(result_json(duration='{"secs": 1, "nanos": 4294967295}'))
    assert dumped(result)["duration"] == {"secs": 5, "nanos": 294_967_295}
    result = ExecutionResult.model_validate_json(result_json(duration="[2, 5]"))  # serde's sequence form
    assert dumped(result)["duration"] == {"secs": 2, "nanos": 5}


@pytest.mark.parametrize(
    ("timestamp", "why"),
    [
        ("2016-12-31T23:59:60.500Z", "leap second"),
        ("+10000-01-01T00:00:00Z", "year 10000 is outside 1..=9999"),
        ("0000-06-01T00:00:00Z", "year 0 is outside"),
        ("9999-12-31T23:00:00-02:00", "outside years 1..=9999 in UTC"),
        ("0001-01-01T00:00:00+01:00", "outside years 1..=9999 in UTC"),
        ("2024-05-01", "not an RFC 3339 timestamp"),
        ("1714564800", "not an RFC 3339 timestamp"),
        ("\u0662\u0660\u0662\u0664-01-01T00:00:00Z", "not an RFC 3339 timestamp"),  # Arabic-Indic digits
        ("\uff12\uff10\uff12\uff14-01-01T00:00:00Z", "not an RFC 3339 timestamp"),  # full-width digits
        ("2024-01-01T00:00:00.\u0661\u0662\u0663Z", "not an RFC 3339 timestamp"),
    ],
)
def test_timestamps_python_cannot_hold_are_validation_errors_that_say_why(timestamp: str, why: str) -> None:
    """A leap second or a year past 9999 from chrono is refused, as a ValidationError naming the reason."""
    with pytest.raises(pydantic.ValidationError, match=why):
        ExecutionResult.model_validate_json(result_json(started_at=timestamp))


def test_a_timestamp_is_a_string_in_json() -> None:
    """chrono reads only strings; a number of seconds is refused."""
    with pytest.raises(pydantic.ValidationError, match="RFC 3339 string"):
        ExecutionResult.model_validate_json(result_json(started_at=1714564800))  # type: ignore[arg-type]


# -- strict values: serde's JSON types and each field's Rust integer range ----------------------------


def request_json(**fields: Any) -> str:
    return json.dumps({"command": {"type": "exec", "program": "true", "args": []}, **fields})


@pytest.mark.parametrize("timeout_ms", [-1, 2**64, True, "5000", 5000.0, 5.5])
def test_a_timeout_serde_refuses_is_refused(timeout_ms: Any) -> None:
    """timeout_ms is a u64: `true` (once a 1 ms timeout), `"5000"`, 5000.0, -1 and 2^64 are not one."""
    with pytest.raises(pydantic.ValidationError, match="timeout_ms"):
        ExecutionRequest.model_validate_json(request_json(timeout_ms=timeout_ms))
    with pytest.raises(pydantic.ValidationError, match="timeout_ms"):
        ExecutionRequest(command=ExecCommand(program="true"), timeout_ms=timeout_ms)


def test_a_u64_timeout_at_its_largest_is_read() -> None:
    """u64::MAX itself is a valid u64 (the engine's own validate() then refuses it as too large)."""
    request = ExecutionRequest.model_validate_json(request_json(timeout_ms=U64_MAX))
    assert request.timeout_ms == U64_MAX


async def test_the_engine_refuses_json_with_a_boolean_timeout(tmp_path: Path) -> None:
    """A request given as JSON text with `"timeout_ms": true` is InvalidCommand; nothing runs."""
    async with ExecutionEngine(ExecutionConfig(log_dir=tmp_path)) as engine:
        with pytest.raises(InvalidCommand):
            await engine.execute(request_json(timeout_ms=True))  # type: ignore[arg-type]
        assert await engine.list_executions() == []


SEED_FIELDS: list[tuple[str, Any, list[Any]]] = [
    (
        "max_concurrency",
        lambda v: ParallelStrategy.model_validate({"max_concurrency": v}),
        [-1, 2**64, True, "5", 5.0],
    ),
    (
        "completed",
        lambda v: ProgressEvent.model_validate(
            {"plan_id": ID, "completed": v, "total": 3, "timestamp": "2024-05-01T12:00:00Z"}
        ),
        [-1, 2**64, True, "5", 5.0, None],
    ),
    (
        "exit_code",
        lambda v: ExecutionResult.model_validate_json(result_json(exit_code=v)),
        [2**31, True, "0", 0.0, None],
    ),
    ("stop_on_error", lambda v: SerialStrategy.model_validate({"stop_on_error": v}), [1, 0, "true", None]),
]


@pytest.mark.parametrize(
    ("field", "build", "value"),
    [(field, build, value) for field, build, values in SEED_FIELDS for value in values],
    ids=lambda v: repr(v) if not callable(v) else "",
)
def test_seed_fields_take_only_what_serde_reads(field: str, build: Any, value: Any) -> None:
    """usize max_concurrency and progress counts, i32 exit_code, bool stop_on_error: own JSON type only."""
    with pytest.raises(pydantic.ValidationError, match=field):
        build(value)


def test_integer_fields_take_their_rust_range_ends() -> None:
    """The largest and smallest values of each Rust type are accepted, one beyond is not."""
    assert ExecutionResult.model_validate_json(result_json(exit_code=-(2**31))).exit_code == -(2**31)
    assert ExecutionResult.model_validate_json(result_json(exit_code=2**31 - 1)).exit_code == 2**31 - 1
    assert ParallelStrategy(max_concurrency=U64_MAX).max_concurrency == U64_MAX
    with pytest.raises(pydantic.ValidationError):
        ExecutionResult.model_validate_json(result_json(exit_code=-(2**31) - 1))
    with pytest.raises(pydantic.ValidationError):
        ParallelStrategy(max_concurrency=2**64)


@pytest.mark.parametrize(
    "settings",
    [
        {"max_concurrent_executions": True},
        {"max_concurrent_executions": "10"},
        {"default_timeout_ms": 1000.0},
        {"kill_grace_ms": -1},
        {"max_output_bytes": 2**64},
        {"stream_output": "yes"},
        {"stream_output": 1},
        {"workers": 2.0},
    ],
)
def test_config_settings_are_strict_too(settings: dict[str, Any]) -> None:
    """ExecutionConfig's integers and booleans are checked as strictly as the JSON models'."""
    with pytest.raises(pydantic.ValidationError, match=next(iter(settings))):
        ExecutionConfig(**settings)


def test_a_constructor_refusal_is_pydantic_s_and_the_engine_s_validation_error() -> None:
    """`ExecutionRequest(cmd, timeout_ms=-1)` raises what the engine would for the same request."""
    with pytest.raises(ValidationError) as caught:
        ExecutionRequest(ExecCommand("true"), timeout_ms=-1)  # type: ignore[call-arg, misc, unused-ignore]
    assert isinstance(caught.value, pydantic.ValidationError)
    assert caught.value.errors()[0]["loc"] == ("timeout_ms",)
    with pytest.raises(ValidationError, match="path"):
        cee.ScriptCommand(path=5)  # type: ignore[arg-type, unused-ignore]


@pytest.mark.parametrize(
    ("key", "index"), [("2", 2), ("+2", 2), ("007", 7), ("18446744073709551615", U64_MAX)]
)
def test_dependency_keys_are_read_as_rust_reads_a_usize_key(key: str, index: int) -> None:
    """serde_json parses an integer map key with Rust's u64::from_str; so do we."""
    strategy = DependencyGraphStrategy.model_validate_json(json.dumps({"dependencies": {key: [0]}}))
    assert strategy.dependencies == {index: [0]}
    assert DependencyGraphStrategy.model_validate({"dependencies": {key: [0]}}) == strategy


@pytest.mark.parametrize("key", [" 2", "-1", "2.0", "", "x", "18446744073709551616"])
def test_dependency_keys_rust_refuses_are_refused(key: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        DependencyGraphStrategy.model_validate_json(json.dumps({"dependencies": {key: [0]}}))


def _models() -> list[type[Model]]:
    found: list[type[Model]] = []
    todo = list(Model.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return sorted(set(found), key=lambda c: c.__qualname__)


def _loose_numbers(schema: Any, where: str = "") -> list[str]:
    """Every int, bool or float in a core schema that is not strict, or an int without both bounds."""
    out: list[str] = []
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind in ("int", "bool", "float") and not schema.get("strict"):
            out.append(f"{where}: {kind} is not strict")
        if kind == "int" and not (("ge" in schema or "gt" in schema) and ("le" in schema or "lt" in schema)):
            out.append(f"{where}: int has no Rust range")
        for key, value in schema.items():
            if key not in ("serialization", "metadata"):
                out += _loose_numbers(value, f"{where}.{schema.get('name', key) if key == 'schema' else key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            out += _loose_numbers(value, f"{where}[{i}]")
    return out


def test_every_number_in_every_model_is_strict_and_in_a_rust_range() -> None:
    """Each int, bool and float of each model (config, options, strategies too) is read as serde would."""
    models = _models()
    assert {m.__name__ for m in models} >= {
        "ExecutionRequest",
        "ExecutionConfig",
        "ExecutionResult",
        "ProgressEvent",
    }
    loose = [
        f"{m.__name__}{problem}" for m in models for problem in _loose_numbers(m.__pydantic_core_schema__)
    ]
    assert loose == []


# -- unknown keywords ---------------------------------------------------------------------


def test_an_unknown_keyword_is_a_type_error_naming_the_likely_one() -> None:
    """`ExecutionRequest(cmd, timeout=5)` no longer runs silently with the default timeout."""
    with pytest.raises(
        TypeError, match=r"unexpected keyword argument 'timeout'; did you mean 'timeout_ms'\?"
    ):
        ExecutionRequest(ExecCommand("true"), timeout=5)  # type: ignore[call-arg, misc, unused-ignore]
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_concurency'"):
        ExecutionConfig(max_concurency=5)  # type: ignore[call-arg, unused-ignore]


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_model_refuses_unknown_keywords(model: type[Model]) -> None:
    """Each model's constructor (the config's too) raises TypeError for a keyword that names no field."""
    with pytest.raises(TypeError, match="no_such_field"):
        model(no_such_field=1)


def test_json_and_dicts_still_ignore_unknown_fields_as_serde_does() -> None:
    """Fields a newer peer adds are ignored when reading, at every level."""
    text = json.dumps(
        {
            "command": {"type": "exec", "program": "true", "args": [], "future": 1},
            "metadata": {"source": None, "conversation_id": None, "tags": {}, "future": 2},
            "future": 3,
        }
    )
    request = ExecutionRequest.model_validate_json(text)
    assert request.command == ExecCommand(program="true")
    assert ExecutionRequest.model_validate(json.loads(text)).command == request.command
    plan = ExecutionPlan.model_validate(
        {"strategy": {"type": "serial", "stop_on_error": True, "future": 1}, "commands": [json.loads(text)]}
    )
    assert plan.strategy == SerialStrategy()


# -- summaries -----------------------------------------------------------------------------


def test_a_summary_read_without_kind_claims_nothing() -> None:
    """The crate's summary has no kind: here its kind is None (not "command"), written back as read."""
    text = f'{{"id":"{ID}","status":"running","started_at":"2024-05-01T12:00:00Z","duration":null}}'
    summary = ExecutionSummary.model_validate_json(text)
    assert summary.kind is None
    assert summary.plan_id is None
    assert summary.model_dump_json() == text


async def test_the_engine_s_summaries_say_their_kind_and_plan(tmp_path: Path) -> None:
    """Summaries the engine makes name their kind, and a plan's commands their plan, in JSON too."""
    async with ExecutionEngine(ExecutionConfig(log_dir=tmp_path)) as engine:
        plan = ExecutionPlan(
            commands=[ExecutionRequest(command=ExecCommand(program="true"))], strategy=SerialStrategy()
        )
        plan_id = await engine.execute_plan(plan)
        await engine.wait(plan_id, timeout=20)
        summaries = {s.id: dumped(s) for s in await engine.list_executions()}
    assert summaries[plan_id]["kind"] == "plan"
    assert "plan_id" not in summaries[plan_id]
    command = summaries[plan.commands[0].id]
    assert command["kind"] == "command"
    assert command["plan_id"] == str(plan_id)
    assert summaries[plan_id]["status"] == ExecutionStatus.COMPLETED
