"""This library's JSON against real serde: the seed's types compiled in Rust (tests/interop).

The Rust program declares the seed's types with the seed's serde attributes and
is built offline against Debian's packaged serde, serde_json, chrono and uuid.
Documents go both ways, and are compared field by field and, where serde's
output has a fixed order, byte for byte:

- what this library writes (every command kind, strategy, status and event,
  requests with env, cwd and timeouts, results and events of a real engine run)
  is read by serde and written again;
- what serde writes (Rust's own values, with nanosecond and edge values) is read
  here, written again, and read by serde once more;
- values serde refuses are refused here too, field by field.

Where cargo or the packaged crates are missing the tests fail, naming what to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pydantic
import pydantic_core
import pytest
from conftest import Recorder, config, result_of, shell

from cloudops_execution_engine import (
    AwsCliCommand,
    Command,
    DependencyGraphStrategy,
    ExecCommand,
    ExecutionEngine,
    ExecutionEvent,
    ExecutionMetadata,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStats,
    ExecutionStatus,
    ExecutionStrategy,
    ExecutionSummary,
    ParallelStrategy,
    PlanExecutionResult,
    ProgressEvent,
    ResourceLimits,
    RetryPolicy,
    ScriptCommand,
    SerialStrategy,
    ShellCommand,
    StderrEvent,
    StdoutEvent,
)
from cloudops_execution_engine._model import Duration, NanoDateTime, NanoDuration, UsizeKeyMap, UtcDateTime

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("no_leaks")]

INTEROP = Path(__file__).parent / "interop"
TARGET = INTEROP / "target"
U64_MAX = 2**64 - 1


# -- the Rust side ---------------------------------------------------------------


def _cargo() -> str:
    found = shutil.which("cargo")
    if found:
        return found
    home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin" / "cargo"
    if home.exists():
        return str(home)
    pytest.fail(
        "cargo is needed to build tests/interop (the seed's types under real serde): "
        "install Rust (rustup) so that cargo is on PATH or in ~/.cargo/bin; "
        "`make test` installs it when run as root"
    )


@pytest.fixture(scope="session")
def serde_bin() -> Path:
    """The interop program, built once per session (incrementally, in tests/interop/target)."""
    registry = Path("/usr/share/cargo/registry")
    missing = [
        c for c in ("serde-1", "serde_json-1", "chrono-0.4", "uuid-1") if not list(registry.glob(c + "*"))
    ]
    if missing:
        pytest.fail(
            f"Debian's packaged Rust crates are missing ({', '.join(missing)}): apt-get install "
            "librust-serde-dev librust-serde-derive-dev librust-serde-json-dev librust-chrono-dev "
            "librust-uuid-dev (`make test` installs it when run as root)"
        )
    # cargo reads .cargo/config.toml (the offline, packaged-crates source) from the directory it runs in.
    built = subprocess.run(
        [_cargo(), "build", "--offline", "--quiet", "--target-dir", str(TARGET)],
        cwd=INTEROP,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    if built.returncode != 0:
        pytest.fail(f"building tests/interop failed:\n{built.stderr[-4000:]}")
    return TARGET / "debug" / "serde-interop"


@dataclass
class Serde:
    """Runs documents through serde: each is parsed as its Rust type and written again."""

    binary: Path

    def run(self, docs: list[tuple[str, str]]) -> list[tuple[bool, str]]:
        text = "".join(f"{type_name}\t{doc}\n" for type_name, doc in docs)
        done = subprocess.run(
            [str(self.binary)], input=text.encode(), capture_output=True, timeout=60, check=True
        )
        # split on "\n" only: serde writes U+2028 and friends raw, and they are not line ends in JSON lines.
        lines = done.stdout.decode().split("\n")[:-1]
        assert len(lines) == len(docs), done.stderr.decode()
        out = []
        for line in lines:
            status, _, body = line.partition("\t")
            out.append((status == "ok", body))
        return out

    def samples(self) -> list[tuple[str, str, str]]:
        done = subprocess.run([str(self.binary), "samples"], capture_output=True, timeout=60, check=True)
        return [tuple(line.split("\t", 2)) for line in done.stdout.decode().split("\n")[:-1]]  # type: ignore[misc]


@pytest.fixture
def serde(serde_bin: Path) -> Serde:
    return Serde(serde_bin)


# -- the Python side ---------------------------------------------------------------


class DependencyMap(pydantic.BaseModel):
    """The strategy's field alone, as the Rust program's `DependencyMap`."""

    dependencies: UsizeKeyMap


ADAPTERS: dict[str, pydantic.TypeAdapter[Any]] = {
    "Command": pydantic.TypeAdapter(Command),
    "ExecutionStrategy": pydantic.TypeAdapter(ExecutionStrategy),
    "ExecutionRequest": pydantic.TypeAdapter(ExecutionRequest),
    "ExecutionPlan": pydantic.TypeAdapter(ExecutionPlan),
    "ExecutionResult": pydantic.TypeAdapter(ExecutionResult),
    "PlanExecutionResult": pydantic.TypeAdapter(PlanExecutionResult),
    "ExecutionStatus": pydantic.TypeAdapter(ExecutionStatus),
    "ExecutionEvent": pydantic.TypeAdapter(ExecutionEvent),
    "ExecutionMetadata": pydantic.TypeAdapter(ExecutionMetadata),
    "ExecutionSummary": pydantic.TypeAdapter(ExecutionSummary),
    "ExecutionStats": pydantic.TypeAdapter(ExecutionStats),
    "DependencyMap": pydantic.TypeAdapter(DependencyMap),
    "Duration": pydantic.TypeAdapter(Duration),
    "DateTime": pydantic.TypeAdapter(UtcDateTime),
}

# Fields this library adds to the seed's types; serde ignores them. Each is
# written only when set, except the three of 0.1 (SPEC 2), written always.
EXTRAS = {
    "resource_usage",
    "stdout_truncated",
    "stderr_truncated",
    "attempts",
    "resumed_from",
    "kind",
    "retry",
    "success_exit_codes",
    "stdin",
    "limits",
    "secret_env",
}
# plan_id is the seed's in PlanExecutionResult and ProgressEvent; only a summary's is ours.
SUMMARY_EXTRAS = EXTRAS | {"plan_id"}
# serde writes a HashMap in no fixed order; a document with a larger map is compared by value only.
MAPS = {"env", "tags", "dependencies"}


def python_json(type_name: str, value: Any) -> str:
    return ADAPTERS[type_name].dump_json(value).decode()


@dataclass
class Tally:
    documents: int = 0
    fields: int = 0
    byte_identical: int = 0


TALLY = Tally()


def strip_extras(value: Any, extras: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: strip_extras(v, extras) for k, v in value.items() if k not in extras}
    if isinstance(value, list):
        return [strip_extras(v, extras) for v in value]
    return value


def has_large_map(value: Any) -> bool:
    if isinstance(value, dict):
        return any(
            (k in MAPS and isinstance(v, dict) and len(v) > 1) or has_large_map(v) for k, v in value.items()
        )
    if isinstance(value, list):
        return any(has_large_map(v) for v in value)
    return False


def compare(ours: Any, theirs: Any, extras: set[str], where: str = "$") -> int:
    """Assert that every field serde wrote equals ours; return how many leaf fields were compared."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{where}: ours is {ours!r}, serde's {theirs!r}"
        unexpected = set(ours) - set(theirs) - extras
        assert not unexpected, f"{where}: fields serde does not know: {unexpected}"
        missing = set(theirs) - set(ours)
        assert not missing, f"{where}: fields we did not write: {missing}"
        return sum(compare(ours[k], v, extras, f"{where}.{k}") for k, v in theirs.items()) or 1
    if isinstance(theirs, list):
        assert isinstance(ours, list), f"{where}: ours is {ours!r}, serde's {theirs!r}"
        assert len(ours) == len(theirs), f"{where}: {ours!r} != {theirs!r}"
        pairs = enumerate(zip(ours, theirs, strict=True))
        return sum(compare(a, b, extras, f"{where}[{i}]") for i, (a, b) in pairs) or 1
    assert type(ours) is type(theirs), f"{where}: ours {ours!r}, serde's {theirs!r}"
    assert ours == theirs, f"{where}: ours {ours!r}, serde's {theirs!r}"
    return 1


def check_same_document(type_name: str, ours_text: str, theirs_text: str, label: str) -> None:
    """Ours and serde's JSON of one value: equal field by field, and byte for byte where order is fixed."""
    extras = SUMMARY_EXTRAS if type_name == "ExecutionSummary" else EXTRAS
    ours = json.loads(ours_text)
    theirs = json.loads(theirs_text)
    try:
        TALLY.fields += compare(ours, theirs, extras)
    except AssertionError as exc:
        raise AssertionError(f"{label}: {exc}\n ours:   {ours_text}\n serde's: {theirs_text}") from None
    TALLY.documents += 1
    if not has_large_map(theirs):
        stripped = pydantic_core.to_json(strip_extras(ours, extras)).decode()
        assert stripped == theirs_text, (
            f"{label}: same fields, other bytes\n ours:   {stripped}\n serde's: {theirs_text}"
        )
        TALLY.byte_identical += 1


# -- what this library writes, read by serde ---------------------------------------------


def _at(nanos: int, second: int = 0) -> datetime:
    base = datetime(2024, 5, 1, 12, 0, second, tzinfo=UTC)
    return (
        NanoDateTime.from_parts(base, nanos) if nanos % 1000 else base + timedelta(microseconds=nanos // 1000)
    )


def built_corpus(tmp: Path) -> list[tuple[str, str, Any]]:
    """(label, Rust type, value) for values built in Python."""
    commands: list[Any] = [
        ScriptCommand(path=Path("/tmp/deploy.sh")),
        ScriptCommand(path=Path("run.py"), interpreter="python3 -u"),
        ExecCommand(program="python3", args=["script.py", "--input", "data.json"]),
        ExecCommand(program="true"),
        ExecCommand(program="printf", args=["é✓🚀", '\x01\x1f\t\n\r"\\/', "\x7f\u2028", ""]),
        ShellCommand(command="aws ec2 describe-instances | jq '.Reservations[]'"),
        ShellCommand(command="echo $0", shell="sh"),
        AwsCliCommand(service="ec2", operation="describe-instances", profile="prod", region="us-west-2"),
        AwsCliCommand(service="s3", operation="ls", args=["s3://bucket"]),
    ]
    strategies: list[Any] = [
        SerialStrategy(),
        SerialStrategy(stop_on_error=False),
        ParallelStrategy(),
        ParallelStrategy(max_concurrency=4),
        ParallelStrategy(max_concurrency=U64_MAX),
        DependencyGraphStrategy(),
    ]
    metadata = ExecutionMetadata(source="server", conversation_id=UUID(int=7), tags={"team": "ops"})
    requests = [ExecutionRequest(command=c, id=UUID(int=i + 1)) for i, c in enumerate(commands)]
    requests += [
        ExecutionRequest(
            command=commands[2],
            env={"A": "1", "B": "two words", "C": ""},
            working_dir=tmp,
            timeout_ms=5000,
            metadata=metadata,
        ),
        ExecutionRequest(command=commands[3], timeout_ms=0),
        ExecutionRequest(command=commands[3], timeout_ms=U64_MAX),
        ExecutionRequest(
            command=commands[3],
            retry=RetryPolicy(max_attempts=2),
            success_exit_codes=[0, 3],
            stdin="input\n",
            limits=ResourceLimits(open_files=64),
            secret_env={"TOKEN": "s3cret"},
        ),
    ]
    corpus: list[tuple[str, str, Any]] = []
    corpus += [(f"command {c!r}", "Command", c) for c in commands]
    corpus += [(f"strategy {s!r}", "ExecutionStrategy", s) for s in strategies]
    corpus += [(f"status {s}", "ExecutionStatus", s) for s in ExecutionStatus]
    corpus += [
        ("metadata", "ExecutionMetadata", metadata),
        ("metadata default", "ExecutionMetadata", ExecutionMetadata()),
    ]
    corpus += [(f"request {r.id}", "ExecutionRequest", r) for r in requests]
    corpus += [
        (f"plan {s!r}", "ExecutionPlan", ExecutionPlan(commands=requests[:3], strategy=s, description="d"))
        for s in strategies
    ]
    durations = [
        timedelta(0),
        timedelta(seconds=2, milliseconds=250),
        timedelta(seconds=1, microseconds=7),
        NanoDuration.from_parts(1, 123_456_789),
        NanoDuration.from_parts(0, 1),
        NanoDuration.from_parts(0, 999_999_999),
        timedelta.max,
    ]
    stamps = [_at(0), _at(250_000_000), _at(123_456_000), _at(123_456_789), _at(1), _at(999_999_999, 59)]
    for n, (duration, stamp) in enumerate(zip(durations, [*stamps, stamps[0]], strict=True)):
        result = ExecutionResult(
            id=UUID(int=100 + n),
            status=ExecutionStatus.COMPLETED,
            exit_code=0,
            stdout="ok\n",
            duration=duration,
            started_at=stamp,
            completed_at=stamp,
            log_path=Path("/tmp/x.log"),
        )
        corpus.append((f"result {duration!r} {stamp!r}", "ExecutionResult", result))
        corpus.append(
            (
                f"stdout event {stamp!r}",
                "ExecutionEvent",
                StdoutEvent(execution_id=UUID(int=n), line="l", timestamp=stamp),
            )
        )
    for code in (-(2**31), 2**31 - 1, -9):
        failed = ExecutionResult(
            id=UUID(int=200),
            status=ExecutionStatus.FAILED,
            exit_code=code,
            stderr="é\x00",
            duration=NanoDuration.from_parts(3, 5),
            started_at=stamps[3],
            log_path=Path("/tmp/y.log"),
            error=f"exit {code}",
            attempts=3,
        )
        corpus.append((f"result exit {code}", "ExecutionResult", failed))
    stats = ExecutionStats(total=U64_MAX, completed=U64_MAX, failed=0, cancelled=1, timeout=2)
    corpus.append(("stats", "ExecutionStats", stats))
    corpus.append(
        (
            "plan result",
            "PlanExecutionResult",
            PlanExecutionResult(
                plan_id=UUID(int=300),
                status=ExecutionStatus.FAILED,
                results=[corpus[-2][2]],
                total_duration=NanoDuration.from_parts(9, 999_999_999),
                stats=stats,
                resumed_from=UUID(int=301),
            ),
        )
    )
    corpus.append(
        (
            "progress usize::MAX",
            "ExecutionEvent",
            ProgressEvent(plan_id=UUID(int=1), completed=U64_MAX, total=U64_MAX, timestamp=stamps[1]),
        )
    )
    corpus.append(
        (
            "stderr event",
            "ExecutionEvent",
            StderrEvent(execution_id=UUID(int=1), line="é", timestamp=stamps[2]),
        )
    )
    return corpus


async def engine_corpus(tmp_path: Path) -> list[tuple[str, str, Any]]:
    """(label, Rust type, value) for results, events and summaries of a real engine run."""
    recorder = Recorder()
    corpus: list[tuple[str, str, Any]] = []
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        ok = await engine.execute(shell("echo out; echo err >&2", env={"X": "1"}, working_dir=tmp_path))
        bad = await engine.execute(shell("echo failing; exit 3"))
        slow = await engine.execute(shell("sleep 30", timeout_ms=200))
        cancelled = await engine.execute(shell("sleep 30"))
        await recorder.until(lambda _: "started" in recorder.types_of(cancelled))
        await engine.cancel(cancelled)
        plan = ExecutionPlan(
            commands=[ExecutionRequest(command=ExecCommand(program="true")) for _ in range(3)],
            strategy=SerialStrategy(),
        )
        plan_id = await engine.execute_plan(plan)
        for execution_id in (ok, bad, slow, cancelled):
            corpus.append(
                (
                    f"engine result {execution_id}",
                    "ExecutionResult",
                    await result_of(engine, execution_id, 30),
                )
            )
        plan_result = await engine.wait(plan_id, timeout=30)
        corpus.append(("engine plan result", "PlanExecutionResult", plan_result))
        corpus += [
            (f"engine summary {s.kind}", "ExecutionSummary", s) for s in await engine.list_executions()
        ]
        corpus.append(("engine plan", "ExecutionPlan", plan))
    corpus += [(f"engine event {e.event_type}", "ExecutionEvent", e) for e in recorder.events]
    kinds = {e.event_type for e in recorder.events}
    assert kinds == {"started", "stdout", "stderr", "completed", "failed", "cancelled", "progress"}
    statuses = {r.status for _, t, r in corpus if t == "ExecutionResult"}
    assert statuses == {
        ExecutionStatus.COMPLETED,
        ExecutionStatus.FAILED,
        ExecutionStatus.TIMEOUT,
        ExecutionStatus.CANCELLED,
    }
    return corpus


async def test_what_we_write_serde_reads_and_writes_back_the_same(serde: Serde, tmp_path: Path) -> None:
    """Every document this library writes, built or from a real run, serde reads and writes as we did."""
    corpus = built_corpus(tmp_path) + await engine_corpus(tmp_path)
    texts = [(type_name, python_json(type_name, value)) for _, type_name, value in corpus]
    for (label, type_name, _), (ok, theirs), (_, ours) in zip(corpus, serde.run(texts), texts, strict=True):
        assert ok, f"serde refused {label}: {theirs}\n ours: {ours}"
        check_same_document(type_name, ours, theirs, label)
    summaries = [json.loads(text) for type_name, text in texts if type_name == "ExecutionSummary"]
    assert {s["kind"] for s in summaries} == {"command", "plan"}
    print(f"\n{len(corpus)} documents of ours; {TALLY}")


def test_a_non_empty_dependency_graph_is_unreadable_to_serde_itself(serde: Serde) -> None:
    """serde-rs/serde#1183: the crate cannot read integer map keys inside its internally tagged strategy."""
    ours = python_json("ExecutionStrategy", DependencyGraphStrategy(dependencies={2: [0, 1]}))
    theirs = dict((label, text) for label, _, text in serde.samples())["strategy-graph"]
    assert ours == theirs == '{"type":"dependency_graph","dependencies":{"2":[0,1]}}'
    [(ok, error)] = serde.run([("ExecutionStrategy", theirs)])
    assert not ok
    assert 'invalid type: string "2", expected usize' in error
    # The same map outside the tagged enum reads fine, and as we read it.
    [(ok, again)] = serde.run([("DependencyMap", '{"dependencies":{"2":[0,1]}}')])
    assert ok, again
    assert again == '{"dependencies":{"2":[0,1]}}'
    assert ADAPTERS["ExecutionStrategy"].validate_json(theirs) == DependencyGraphStrategy(
        dependencies={2: [0, 1]}
    )


# -- what serde writes, read here ------------------------------------------------------

# Rust samples this library refuses, each as a validation error saying why.
REFUSED = {
    "duration-u64-max-secs": "longer than Python's timedelta can hold",
    "result-duration-u64-max-secs": "longer than Python's timedelta can hold",
    "datetime-leap-second": "leap second",
    "event-stdout-leap-second": "leap second",
    "datetime-year-10000": "year 10000 is outside 1..=9999",
    "event-stdout-year-10000": "year 10000 is outside 1..=9999",
    "datetime-year-0": "year 0 is outside 1..=9999",
    "event-stdout-year-0": "year 0 is outside 1..=9999",
}
# Rust samples whose log path pathlib writes normalised: the same file, other text.
NORMALISED_PATHS = {
    "result-log-path-empty": ("", "."),
    "result-log-path-unnormalised": ("/tmp//a/./b/", "/tmp/a/b"),
}
UNREADABLE_TO_SERDE = {"strategy-graph", "plan-graph"}  # serde-rs/serde#1183


def test_what_serde_writes_we_read_and_write_back_exactly(serde: Serde) -> None:
    """Rust's own values, nanoseconds and edges included, come back from us as the bytes serde wrote."""
    samples = serde.samples()
    assert len(samples) > 100
    kept: list[tuple[str, str, str, str]] = []
    for label, type_name, theirs in samples:
        adapter = ADAPTERS[type_name]
        if label in REFUSED:
            with pytest.raises(pydantic.ValidationError, match=REFUSED[label]):
                adapter.validate_json(theirs)
            continue
        ours = adapter.dump_json(adapter.validate_json(theirs)).decode()
        if label in NORMALISED_PATHS:
            written, normalised = NORMALISED_PATHS[label]
            assert json.loads(theirs)["log_path"] == written
            assert json.loads(ours)["log_path"] == normalised
            continue
        check_same_document(type_name, ours, theirs, label)
        kept.append((label, type_name, theirs, ours))
    back = serde.run([(type_name, ours) for _, type_name, _, ours in kept])
    for (label, _, theirs, ours), (ok, again) in zip(kept, back, strict=True):
        if label in UNREADABLE_TO_SERDE:
            assert not ok, label
            assert "expected usize" in again, label
            continue
        assert ok, f"{label}: serde refused our JSON of its own value: {again}\n ours: {ours}"
        assert again == theirs, f"{label}: changed on the way round\n was: {theirs}\n now: {again}"
    print(f"\n{len(samples)} Rust samples; {TALLY}")


# -- values serde refuses, field by field ---------------------------------------------------

INT_PROBES: list[Any] = [
    -1,
    0,
    2**31 - 1,
    2**31,
    -(2**31) - 1,
    2**32,
    U64_MAX,
    2**64,
    True,
    "5",
    5.0,
    None,
    [1],
]
BOOL_PROBES: list[Any] = [1, 0, "true", None]
STR_PROBES: list[Any] = [5, True, None, [], {}]
TIMESTAMP_PROBES: list[Any] = [
    "2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00.5+01:00",
    "2024-01-01T00:00:00+0100",
    "2024-01-01 00:00:00Z",
    "2024-01-01T00:00:00utc",
    "2024-01-01T00:00:00.1234567891Z",
    "2024-01-01T00:00:00",
    "2024-01-01",
    "1700000000",
    "2024-13-01T00:00:00Z",
    1700000000,
]
UUID_PROBES: list[Any] = [
    "6f1c0f7e9d5e4b8a8f0e2b2b1b7d9a10",
    "{6f1c0f7e-9d5e-4b8a-8f0e-2b2b1b7d9a10}",
    "urn:uuid:6f1c0f7e-9d5e-4b8a-8f0e-2b2b1b7d9a10",
    "6F1C0F7E-9D5E-4B8A-8F0E-2B2B1B7D9A10",
    "6f1c0f7e-9d5e-4b8a-8f0e",
    7,
]
DURATION_PROBES: list[Any] = [
    [1, 2],
    [1],
    {"secs": 1},
    {"nanos": 1},
    {"secs": 1, "nanos": 1, "millis": 0},
    {"secs": 1, "nanos": 2**32 - 1},
    {"secs": 1, "nanos": 2**32},
    {"secs": 86_399_999_999_999, "nanos": 999_999_999},
    {"secs": U64_MAX, "nanos": 0},
    {"secs": U64_MAX, "nanos": 1_000_000_000},
    {"secs": -1, "nanos": 0},
    1.5,
    None,
]
KEY_PROBES = ["2", "+2", "007", " 2", "-1", "2.0", "", "18446744073709551615", "18446744073709551616", "x"]
STATUS_PROBES: list[Any] = ["completed", "Completed", "COMPLETED", 1, None]

BASES = [
    "command-aws-cli",
    "command-script",
    "strategy-serial",
    "strategy-parallel-4",
    "metadata-full",
    "request-env-cwd-timeout",
    "plan-parallel-4",
    "result-exit-minus-1",
    "plan-result",
    "event-progress",
    "event-completed",
    "event-started",
    "summary-done",
    "stats",
    "duration-nanos",
    "command-exec",
    "command-shell",
    "command-script-interpreter",
    "strategy-parallel-unlimited",
    "plan-serial",
    "result-running-no-completion",
    "event-stdout",
    "event-stderr",
    "event-failed",
    "event-cancelled",
    "event-progress-none",
    "summary-running",
    "stats-usize-max",
]
UUID_FIELDS = {"id", "conversation_id", "execution_id", "plan_id"}
TIME_FIELDS = {"timestamp", "started_at", "completed_at"}
DURATION_FIELDS = {"duration", "total_duration"}


def _probes(key: str, value: Any) -> list[Any]:
    if key in DURATION_FIELDS:
        return DURATION_PROBES
    if key in TIME_FIELDS:
        return TIMESTAMP_PROBES
    if key in UUID_FIELDS:
        return UUID_PROBES
    if key == "status":
        return STATUS_PROBES
    if isinstance(value, bool):
        return BOOL_PROBES
    if isinstance(value, int):
        return INT_PROBES
    if isinstance(value, str) and key not in ("type", "event_type"):
        return STR_PROBES
    return []


def mutations(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every (path, document) with one field replaced by a probe, or left out."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for key, value in items:
        here = (*path, key)
        if isinstance(key, str) and key not in ("type", "event_type"):
            yield (*here, "<missing>"), _replace(doc, key, _MISSING)
        probes = _probes(key if isinstance(key, str) else "", value)
        for probe in probes:
            yield (*here, probe), _replace(doc, key, probe)
        if probes and key in DURATION_FIELDS:
            continue
        for sub, mutated in mutations(value, here):
            yield sub, _replace(doc, key, mutated)


_MISSING = object()


def _replace(doc: Any, key: Any, value: Any) -> Any:
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    if value is _MISSING:
        del copy[key]
    else:
        copy[key] = value
    return copy


def _python_accepts(adapter: pydantic.TypeAdapter[Any], text: str) -> bool:
    try:
        adapter.validate_json(text)
    except pydantic.ValidationError:
        return False
    return True


# Where this library and serde answer differently, and why. Each entry is a
# predicate on (type, path, probe) and what each side does.
Difference = tuple[str, Callable[[str, tuple[Any, ...]], bool], bool]


def _missing_with_default(type_name: str, path: tuple[Any, ...]) -> bool:
    # The SPEC's constructors give these fields defaults (`ExecCommand(program, args=[])`), and JSON
    # without them reads as the constructor would; serde's derive (no #[serde(default)]) requires them.
    # The seed's Option fields are optional to serde too, so they do not differ.
    return path[-1] == "<missing>" and path[-2] in {
        "args",
        "shell",
        "env",
        "metadata",
        "description",
        "id",
        "stop_on_error",
        "stdout",
        "stderr",
        "tags",
        "total",
        "completed",
        "failed",
        "cancelled",
        "timeout",
        "timestamp",
    }


def _naive_timestamp(type_name: str, path: tuple[Any, ...]) -> bool:
    # A timestamp without an offset is taken as UTC, as the models take a naive datetime; chrono refuses it.
    return bool(path[-1] == "2024-01-01T00:00:00")


def _beyond_timedelta(type_name: str, path: tuple[Any, ...]) -> bool:
    return bool(path[-1] == {"secs": U64_MAX, "nanos": 0} or (path[-2] == "secs" and path[-1] == U64_MAX))


EXPECTED_DIFFERENCES: list[Difference] = [
    ("a field the Python constructor defaults may be left out of JSON", _missing_with_default, True),
    ("a timestamp without offset is read as UTC", _naive_timestamp, True),
    ("a Duration longer than timedelta.max (about 2.7 million years) is refused", _beyond_timedelta, False),
]


def test_values_serde_refuses_are_refused_here_field_by_field(serde: Serde) -> None:
    """Each field of each seed type, given a wrong JSON type or a value beyond its Rust type, as serde."""
    bases = {label: (type_name, json.loads(text)) for label, type_name, text in serde.samples()}
    cases: list[tuple[str, tuple[Any, ...], str]] = []
    for label in BASES:
        type_name, doc = bases[label]
        for path, mutated in mutations(doc):
            cases.append((type_name, (label, *path), json.dumps(mutated, ensure_ascii=False)))
    cases += [("ExecutionStatus", ("status", p), json.dumps(p)) for p in STATUS_PROBES]
    cases += [
        ("DependencyMap", ("dependencies", k), json.dumps({"dependencies": {k: [0]}})) for k in KEY_PROBES
    ]
    answers = serde.run([(type_name, text) for type_name, _, text in cases])
    unexpected = []
    seen: dict[str, int] = {}
    for (type_name, path, text), (serde_ok, why) in zip(cases, answers, strict=True):
        ours_ok = _python_accepts(ADAPTERS[type_name], text)
        if ours_ok == serde_ok:
            continue
        known = [
            name
            for name, applies, python_ok in EXPECTED_DIFFERENCES
            if python_ok == ours_ok and applies(type_name, path)
        ]
        if known:
            seen[known[0]] = seen.get(known[0], 0) + 1
        else:
            ours = "accepts" if ours_ok else "refuses"
            unexpected.append(
                f"{type_name} {path}: python {ours}, serde {why if not serde_ok else 'accepts'}"
            )
    assert not unexpected, f"{len(unexpected)} of {len(cases)} answers differ from serde's:\n" + "\n".join(
        unexpected[:40]
    )
    assert len(cases) > 1400
    assert set(seen) == {name for name, _, _ in EXPECTED_DIFFERENCES}, seen
    print(f"\n{len(cases)} probes; answers that differ from serde's, as expected: {seen}")
