"""OpenTelemetry: spans, the command's trace context, metrics and log correlation, with the SDK in memory.

OpenTelemetry's global providers can be set once per process, so this module
sets one tracer provider and one meter provider for all its tests (and puts
the globals back as they were when it is done, so that other modules run
untraced); each test clears the span exporter first, and reads counters as
differences. What needs a process of its own (OpenTelemetry not importable,
or configured only after the engine started) runs in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import HELPERS, PYTHON, Recorder, config, result_of, run, shell
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from otel_support import global_providers

from cloudops_execution_engine import (
    ExecutionEngine,
    ExecutionPlan,
    ExecutionStatus,
    NotFound,
    ParallelStrategy,
    RayConfig,
    RetryPolicy,
)

pytestmark = pytest.mark.timeout(60)


@dataclass
class Otel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer: trace.Tracer

    def finished(self, name: str = "cloudops.execution") -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def span_of(self, execution_id: object) -> ReadableSpan:
        found = [
            s
            for s in self.finished()
            if (s.attributes or {}).get("cloudops.execution.id") == str(execution_id)
        ]
        assert len(found) == 1, f"{len(found)} spans for {execution_id}"
        return found[0]

    def points(self) -> dict[str, list[Any]]:
        """Every metric's data points by name, collected now."""
        data = self.reader.get_metrics_data()
        found: dict[str, list[Any]] = {}
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found.setdefault(metric.name, []).extend(metric.data.data_points)
        return found

    def value(self, name: str, **attributes: str) -> float:
        """A sum's value (0 before its first observation) for exactly these attributes."""
        for point in self.points().get(name, []):
            if dict(point.attributes or {}) == attributes:
                return float(point.value)
        return 0.0

    def histogram(self, name: str) -> tuple[int, float]:
        points = self.points().get(name, [])
        return sum(p.count for p in points), sum(p.sum for p in points)


@pytest.fixture(scope="module")
def tracer_provider() -> TracerProvider:
    return TracerProvider()


@pytest.fixture(scope="module")
def otel_module(tracer_provider: TracerProvider) -> Iterator[Otel]:
    spans = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    with global_providers(tracer_provider, meter_provider):
        yield Otel(spans, reader, tracer_provider.get_tracer("tests"))


@pytest.fixture
def otel(otel_module: Otel) -> Otel:
    otel_module.spans.clear()
    return otel_module


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


def _traceparent(span: ReadableSpan) -> str:
    """The span's context as OpenTelemetry's own W3C propagator writes it."""
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(NonRecordingSpan(span.context)))
    return carrier["traceparent"]


async def test_spans_for_each_final_status(tmp_path: Path, otel: Otel, recorder: Recorder) -> None:
    """One `cloudops.execution` span per execution, under the context current at `execute()`, ended
    with its status, exit code, the command's own pid and attempts; failed and timeout are errors,
    a cancel is an event on the span."""
    async with ExecutionEngine(config(tmp_path)).with_event_handler(recorder) as engine:
        with otel.tracer.start_as_current_span("host request") as host_span:
            done = await engine.execute(shell("echo $$"))
            failed = await engine.execute(shell("echo $$; exit 3"))
            timed_out = await engine.execute(shell("echo $$; exec sleep 30", timeout_ms=300))
            cancelled = await engine.execute(shell("echo $$; exec sleep 30"))
        results = {eid: await result_of(engine, eid, 20) for eid in (done, failed, timed_out)}
        await recorder.until(lambda _: "stdout" in recorder.types_of(cancelled))
        await engine.cancel(cancelled)
        results[cancelled] = await result_of(engine, cancelled, 20)

    expected = {
        done: (ExecutionStatus.COMPLETED, StatusCode.UNSET),
        failed: (ExecutionStatus.FAILED, StatusCode.ERROR),
        timed_out: (ExecutionStatus.TIMEOUT, StatusCode.ERROR),
        cancelled: (ExecutionStatus.CANCELLED, StatusCode.UNSET),
    }
    host = host_span.get_span_context()
    for eid, (status, code) in expected.items():
        result = results[eid]
        assert result.status is status
        span = otel.span_of(eid)
        attributes = dict(span.attributes or {})
        assert attributes["cloudops.status"] == status.value
        assert attributes["process.exit.code"] == result.exit_code
        assert attributes["cloudops.attempts"] == 1
        if result.stdout:  # the shell's own pid, which is the command's
            assert attributes["process.pid"] == int(result.stdout.split()[0])
        assert span.status.status_code is code
        assert span.parent is not None
        assert span.parent.span_id == host.span_id
        assert span.context.trace_id == host.trace_id
        assert span.end_time is not None
        assert span.start_time is not None
        assert span.end_time >= span.start_time
    assert otel.span_of(failed).status.description == results[failed].error
    assert [e.name for e in otel.span_of(cancelled).events] == ["cloudops.cancel"]
    assert [e.name for e in otel.span_of(done).events] == []


async def test_plan_spans_are_children_of_the_plan_span(tmp_path: Path, otel: Otel) -> None:
    """A plan has one `cloudops.plan` span, and each of its commands' spans is its child in its trace."""
    plan = ExecutionPlan(
        commands=[shell("true"), shell("exit 2"), shell("true")],
        strategy=ParallelStrategy(max_concurrency=2),
    )
    async with ExecutionEngine(config(tmp_path)) as engine:
        plan_id = await engine.execute_plan(plan)
        await engine.wait(plan_id, timeout=20)
    plans = otel.finished("cloudops.plan")
    assert len(plans) == 1
    plan_span = plans[0]
    assert dict(plan_span.attributes or {})["cloudops.plan.id"] == str(plan_id)
    assert dict(plan_span.attributes or {})["cloudops.status"] == ExecutionStatus.FAILED.value
    assert plan_span.status.status_code is StatusCode.ERROR
    commands = otel.finished()
    assert sorted(str(dict(s.attributes or {})["cloudops.execution.id"]) for s in commands) == sorted(
        str(c.id) for c in plan.commands
    )
    for span in commands:
        assert span.parent is not None
        assert span.parent.span_id == plan_span.context.span_id
        assert span.context.trace_id == plan_span.context.trace_id
        assert span.end_time is not None
        assert plan_span.end_time is not None
        assert span.end_time <= plan_span.end_time


async def test_command_joins_the_trace_through_traceparent(tmp_path: Path, otel: Otel) -> None:
    """A python3 command that reads TRACEPARENT/TRACESTATE and starts a span with the SDK lands in the
    same trace, as a child of its execution's span, and sees the host's trace state."""
    remote = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "opaque")]),
    )
    async with ExecutionEngine(config(tmp_path)) as engine:
        with trace.use_span(NonRecordingSpan(remote)):
            eid = await engine.execute(run(PYTHON, str(HELPERS / "otel_child.py")))
        result = await result_of(engine, eid, 30)
    assert result.status is ExecutionStatus.COMPLETED, result.stderr
    child = json.loads(result.stdout)
    span = otel.span_of(eid)
    assert child["name"] == "child work"
    assert child["trace_id"] == _hex(span.context.trace_id, 32) == _hex(remote.trace_id, 32)
    assert child["parent_span_id"] == _hex(span.context.span_id, 16)
    assert child["tracestate"] == "vendor=opaque"


async def test_the_requests_own_traceparent_wins(tmp_path: Path, otel: Otel) -> None:
    """A TRACEPARENT in the request's env reaches the command as given, and no TRACESTATE is added."""
    own = "00-11111111111111111111111111111111-2222222222222222-01"
    async with ExecutionEngine(config(tmp_path)) as engine:
        traced = await engine.execute(shell('printf "%s" "$TRACEPARENT"'))
        given = await engine.execute(
            shell('printf "%s|%s" "$TRACEPARENT" "${TRACESTATE-unset}"', env={"TRACEPARENT": own})
        )
        traced_result = await result_of(engine, traced, 20)
        given_result = await result_of(engine, given, 20)
    span = otel.span_of(traced)
    assert traced_result.stdout == _traceparent(span)
    assert given_result.stdout == f"{own}|unset"


async def test_metrics_count_time_and_track_statuses(tmp_path: Path, otel: Otel, recorder: Recorder) -> None:
    """`cloudops.executions` counts final statuses once; duration and queue time are recorded in
    seconds; the up-down counters show what runs and waits now; no metric carries an id."""
    before = {s: otel.value("cloudops.executions", **{"cloudops.status": s}) for s in ("completed", "failed")}
    durations_before = otel.histogram("cloudops.execution.duration")
    queue_before = otel.histogram("cloudops.execution.queue_time")
    running_before = otel.value("cloudops.executions.running")
    pending_before = otel.value("cloudops.executions.pending")
    marker = tmp_path / "go"
    engine = ExecutionEngine(config(tmp_path, max_concurrent_executions=1)).with_event_handler(recorder)
    async with engine:
        first = await engine.execute(shell(f"while [ ! -e {marker} ]; do sleep 0.01; done"))
        second = await engine.execute(shell("exit 4"))
        await recorder.until(lambda _: "started" in recorder.types_of(first))
        assert otel.value("cloudops.executions.running") == running_before + 1
        assert otel.value("cloudops.executions.pending") == pending_before + 1
        await asyncio.sleep(0.2)  # the second command's queue time grows while the first holds the slot
        marker.touch()
        assert (await result_of(engine, first, 20)).status is ExecutionStatus.COMPLETED
        assert (await result_of(engine, second, 20)).status is ExecutionStatus.FAILED
    assert otel.value("cloudops.executions", **{"cloudops.status": "completed"}) == before["completed"] + 1
    assert otel.value("cloudops.executions", **{"cloudops.status": "failed"}) == before["failed"] + 1
    assert otel.value("cloudops.executions.running") == running_before
    assert otel.value("cloudops.executions.pending") == pending_before
    count, total = otel.histogram("cloudops.execution.duration")
    assert count == durations_before[0] + 2
    assert total - durations_before[1] >= 0.2
    count, total = otel.histogram("cloudops.execution.queue_time")
    assert count == queue_before[0] + 2
    assert total - queue_before[1] >= 0.2
    for name, points in otel.points().items():
        for point in points:
            assert set(point.attributes or {}) <= {"cloudops.status"}, (name, point.attributes)


async def test_worker_death_is_counted_and_logged_with_ids(
    tmp_path: Path, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGKILLed worker adds one to `cloudops.worker.deaths`, and the warning about it carries the
    execution's id and trace id, in its fields and in its text."""
    deaths = otel.value("cloudops.worker.deaths")
    caplog.set_level(logging.WARNING, logger="cloudops_execution_engine")
    async with ExecutionEngine(config(tmp_path, workers=1)) as engine:
        eid = await engine.execute(shell("echo $PPID; exec sleep 30"))
        async with asyncio.timeout(10):
            async for event in engine.events(eid):
                if event.event_type == "stdout":
                    os.kill(int(event.line), signal.SIGKILL)
                    break
        result = await result_of(engine, eid, 30)
    assert result.status is ExecutionStatus.FAILED
    assert otel.value("cloudops.worker.deaths") == deaths + 1
    trace_id = _hex(otel.span_of(eid).context.trace_id, 32)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and str(eid) in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]
    for record in warnings:
        assert getattr(record, "execution_ids", None) == [str(eid)]
        assert getattr(record, "trace_ids", None) == [trace_id]
        assert getattr(record, "execution_id", None) == str(eid)
        assert getattr(record, "trace_id", None) == trace_id
        assert trace_id in record.getMessage()


async def test_a_handler_error_after_the_end_is_logged_with_ids(
    tmp_path: Path, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that raises on an execution's terminal event (its span already ended) is logged with
    the execution's id and trace id."""

    class FailsOnTheEnd:
        async def on_event(self, event: Any) -> None:
            if event.event_type == "completed":
                raise RuntimeError("handler bug")

    caplog.set_level(logging.ERROR, logger="cloudops_execution_engine")
    async with ExecutionEngine(config(tmp_path)).with_event_handler(FailsOnTheEnd()) as engine:
        eid = await engine.execute(shell("true"))
        await result_of(engine, eid, 20)
    trace_id = _hex(otel.span_of(eid).context.trace_id, 32)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "handler" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    assert getattr(errors[0], "execution_id", None) == str(eid)
    assert getattr(errors[0], "trace_id", None) == trace_id
    assert f"{eid} (trace {trace_id})" in errors[0].getMessage()


async def test_a_retry_is_an_event_on_the_one_span(tmp_path: Path, otel: Otel) -> None:
    """Every attempt of a retried execution is in its one span: an event per retry, the attempts counted."""
    retry = RetryPolicy(max_attempts=3, backoff_ms=10, jitter=False)
    async with ExecutionEngine(config(tmp_path)) as engine:
        eid = await engine.execute(shell("exit 1", retry=retry))
        result = await result_of(engine, eid, 20)
    assert result.attempts == 3
    span = otel.span_of(eid)
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("cloudops.retry", {"cloudops.attempt": 2}),
        ("cloudops.retry", {"cloudops.attempt": 3}),
    ]
    assert dict(span.attributes or {})["cloudops.attempts"] == 3


class FailingProcessor(SpanProcessor):
    """A host's span processor with a bug: it raises for the spans it is told of, at their start or end."""

    def __init__(self) -> None:
        self.at_start: set[str] = set()  # span names
        self.at_end: set[str] = set()  # execution ids

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if span.name in self.at_start:
            raise RuntimeError("a span processor's bug at the start")

    def on_end(self, span: ReadableSpan) -> None:
        if (span.attributes or {}).get("cloudops.execution.id") in self.at_end:
            raise RuntimeError("a span processor's bug at the end")


@pytest.fixture
def failing(otel_module: Otel, tracer_provider: TracerProvider) -> Iterator[FailingProcessor]:
    processor = FailingProcessor()
    tracer_provider.add_span_processor(processor)
    try:
        yield processor
    finally:
        processor.at_start.clear()
        processor.at_end.clear()


async def test_a_span_processor_raising_at_a_spans_end_costs_that_span_alone(
    tmp_path: Path, otel: Otel, failing: FailingProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    """Every execution ends and is answered, those after it on the same worker too, and shutdown returns."""
    running_before = otel.value("cloudops.executions.running")
    requests = [run("true") for _ in range(6)]
    failing.at_end.add(str(requests[2].id))
    async with asyncio.timeout(30), ExecutionEngine(config(tmp_path, workers=1)) as engine:
        ids = [await engine.execute(request) for request in requests]
        results = [await engine.wait(eid, timeout=20) for eid in ids]
        assert [r.status for r in results] == [ExecutionStatus.COMPLETED] * 6
    assert otel.value("cloudops.executions.running") == running_before
    said = [r for r in caplog.records if r.levelno >= logging.WARNING and "span" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert getattr(said[0], "execution_id", None) == str(requests[2].id)


async def test_a_plan_whose_span_cannot_start_runs_untraced_and_leaves_the_counters_right(
    tmp_path: Path, otel: Otel, failing: FailingProcessor
) -> None:
    """The plan's span is lost, not the plan: it runs, its commands' spans start, nothing stays pending."""
    pending_before = otel.value("cloudops.executions.pending")
    failing.at_start.add("cloudops.plan")
    plan = ExecutionPlan(commands=[run("true"), run("true")], strategy=ParallelStrategy())
    async with asyncio.timeout(30), ExecutionEngine(config(tmp_path)) as engine:
        await engine.execute_plan(plan)
        result = await engine.wait(plan.id, timeout=20)
        assert result.status is ExecutionStatus.COMPLETED
    assert otel.value("cloudops.executions.pending") == pending_before
    assert not otel.finished("cloudops.plan")
    assert [otel.span_of(command.id).status.status_code for command in plan.commands] == [
        StatusCode.UNSET
    ] * 2


async def test_a_command_gets_its_spans_trace_state_not_the_hosts_own(
    tmp_path: Path, otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host started inside a trace (TRACEPARENT/TRACESTATE in its environment) passes its commands
    their own span's context: the host's TRACESTATE does not ride along with another TRACEPARENT."""
    monkeypatch.setenv("TRACEPARENT", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    monkeypatch.setenv("TRACESTATE", "host=stale")
    async with ExecutionEngine(config(tmp_path)) as engine:
        eid = await engine.execute(shell('printf "%s|%s" "$TRACEPARENT" "$TRACESTATE"'))
        result = await result_of(engine, eid, 20)
    assert result.stdout == f"{_traceparent(otel.span_of(eid))}|"


async def test_a_span_that_cannot_start_is_said_with_its_execution(
    tmp_path: Path, otel: Otel, failing: FailingProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning carries the execution's id in its fields, as every other warning does."""
    failing.at_start.add("cloudops.execution")
    async with ExecutionEngine(config(tmp_path)) as engine:
        eid = await engine.execute(run("true"))
        assert (await result_of(engine, eid, 20)).status is ExecutionStatus.COMPLETED
    said = [r for r in caplog.records if "could not start the span" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert getattr(said[0], "execution_id", None) == str(eid)
    assert getattr(said[0], "execution_ids", None) == [str(eid)]


def test_an_engine_left_when_its_loop_closed_takes_its_counts_and_spans_with_it(
    tmp_path: Path, otel: Otel
) -> None:
    """asyncio.run ended with commands running and queued: once the engine is let go of, nothing of
    theirs is counted as running or pending, and their spans have ended, as errors."""
    running_before = otel.value("cloudops.executions.running")
    pending_before = otel.value("cloudops.executions.pending")
    engine = ExecutionEngine(config(tmp_path, max_concurrent_executions=1))

    async def leave_running() -> list[Any]:
        await engine.start()
        ids = [await engine.execute(shell("exec sleep 30")) for _ in range(3)]
        async with asyncio.timeout(20):
            async for event in engine.events(ids[0]):
                if event.event_type == "started":
                    break
        return ids

    ids = asyncio.run(leave_running())
    assert otel.value("cloudops.executions.running") == running_before + 1
    asyncio.run(engine.shutdown())  # its loop is gone: the engine is abandoned
    assert otel.value("cloudops.executions.running") == running_before
    assert otel.value("cloudops.executions.pending") == pending_before
    assert [otel.span_of(eid).status.status_code for eid in ids] == [StatusCode.ERROR] * 3


async def test_a_log_line_about_an_execution_no_longer_kept_still_names_its_trace(
    tmp_path: Path, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that fails on a terminal event after the engine let the execution go (it keeps one)."""
    first = run("true")
    release = asyncio.Event()

    class FailsLate:
        async def on_event(self, event: Any) -> None:
            if event.event_type == "completed" and event.execution_id == first.id:
                await release.wait()
                raise RuntimeError("handler bug")

    caplog.set_level(logging.ERROR, logger="cloudops_execution_engine")
    engine = ExecutionEngine(config(tmp_path, max_retained_executions=1)).with_event_handler(FailsLate())
    async with engine:
        await result_of(engine, await engine.execute(first), 20)
        for _ in range(2):
            await result_of(engine, await engine.execute(run("true")), 20)
        with pytest.raises(NotFound):
            await engine.get_status(first.id)
        release.set()
    trace_id = _hex(otel.span_of(first.id).context.trace_id, 32)
    errors = [r for r in caplog.records if str(first.id) in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    assert getattr(errors[0], "trace_id", None) == trace_id
    assert f"{first.id} (trace {trace_id})" in errors[0].getMessage()


async def test_a_child_forked_from_the_host_counts_its_own_executions_not_its_parents(
    tmp_path: Path, otel: Otel, recorder: Recorder
) -> None:
    """The up-down counters and the executions counter are this process's: a forked child starts at 0."""
    engine = ExecutionEngine(config(tmp_path, max_concurrent_executions=1)).with_event_handler(recorder)
    async with engine:
        await result_of(engine, await engine.execute(run("true")), 20)
        running = await engine.execute(shell("exec sleep 30"))
        await engine.execute(shell("true"))  # waits behind it
        await recorder.until(lambda _: "started" in recorder.types_of(running))
        assert otel.value("cloudops.executions.running") >= 1
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: reads its counters and leaves at once
            try:
                names = ("cloudops.executions.running", "cloudops.executions.pending")
                seen = [otel.value(name) for name in names]
                seen.append(otel.value("cloudops.executions", **{"cloudops.status": "completed"}))
                os.write(write, json.dumps(seen).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as answer:
            seen = json.loads(answer.read())
        await asyncio.to_thread(os.waitpid, pid, 0)
        await engine.cancel(running)
    assert seen == [0, 0, 0]


def _host(script: str, tmp_path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRACEPARENT", "TRACESTATE")}
    done = subprocess.run(
        [PYTHON, str(HELPERS / script), str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("how", ["exemplar", "provider"])
def test_a_hosts_failing_opentelemetry_setup_costs_telemetry_never_an_execution(
    tmp_path: Path, how: str
) -> None:
    """A raising exemplar filter raised out of the handling of a worker's messages, every 64th start:
    the rest of that read (other executions' output and ends) was dropped, and they never ended.
    A provider named in the environment but not installed made every `execute()` raise a bare
    RuntimeError, and left the refused execution pending for ever."""
    done = subprocess.run(
        [PYTHON, str(HELPERS / "otel_failing_parts_host.py"), how, str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"statuses": {"completed": 150}, "started_first": 150, "raised": []}


async def test_trace_context_given_in_secret_env_is_the_requests_own(tmp_path: Path, otel: Otel) -> None:
    """`secret_env` sets a command's variables as `env` does: a TRACEPARENT there got the TRACESTATE of
    the engine's span (its remote parent's) beside it."""
    own = "00-11111111111111111111111111111111-2222222222222222-01"
    remote = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        True,
        TraceFlags(1),
        TraceState([("vendor", "x")]),
    )
    async with ExecutionEngine(config(tmp_path)) as engine:
        with trace.use_span(NonRecordingSpan(remote)):
            eid = await engine.execute(
                # Its value is masked in the output: the command says whether it is the one given.
                shell(
                    f'[ "$TRACEPARENT" = {own} ] && printf "given|%s" "${{TRACESTATE-unset}}"',
                    secret_env={"TRACEPARENT": own},
                )
            )
        result = await result_of(engine, eid, 20)
    assert result.stdout == "given|unset"


async def test_a_tracestate_the_host_sets_after_the_engine_started_is_not_passed_on(
    tmp_path: Path, otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's environment is passed on as it is at each start; whether it held a TRACESTATE was
    looked at once, when the engine started, and a later one rode along with the span's TRACEPARENT."""
    async with ExecutionEngine(config(tmp_path)) as engine:
        await result_of(engine, await engine.execute(shell("true")), 20)
        monkeypatch.setenv("TRACESTATE", "host=later")
        eid = await engine.execute(shell('printf "%s|%s" "$TRACEPARENT" "${TRACESTATE-unset}"'))
        result = await result_of(engine, eid, 20)
    assert result.stdout == f"{_traceparent(otel.span_of(eid))}|"


def test_without_opentelemetry_nothing_is_imported(tmp_path: Path) -> None:
    """With OpenTelemetry not importable the engine runs as before, looks for it, and loads none of it."""
    report = _host("otel_absent_host.py", tmp_path)
    assert report["status"] == "completed"
    assert report["stdout"] == "unset"
    assert report["attempts"] >= 1, "the engine never looked for OpenTelemetry"
    assert report["loaded"] == []


def test_no_provider_no_traceparent_then_configured_later(tmp_path: Path) -> None:
    """With the API but no provider, commands get no TRACEPARENT and no span is made; a provider set
    after the engine started is used from the next execution on."""
    report = _host("otel_late_host.py", tmp_path)
    assert report["before"] == "unset"
    assert report["spans_before"] == 0
    spans = report["spans"]
    assert [s["name"] for s in spans] == ["cloudops.execution"]
    assert report["after"] == f"00-{spans[0]['trace_id']}-{spans[0]['span_id']}-{spans[0]['flags']}"


@pytest.mark.ray
@pytest.mark.timeout(120)
async def test_on_ray_the_command_gets_its_trace_context(
    tmp_path: Path, otel: Otel, ray_address: str
) -> None:
    """On Ray the command gets its execution span's TRACEPARENT too, and the span names the node."""
    engine = ExecutionEngine(config(tmp_path, ray=RayConfig(address=ray_address, workers=1)))
    async with engine:
        eid = await engine.execute(shell('printf "%s" "$TRACEPARENT"'))
        result = await result_of(engine, eid, 60)
        node = engine.get_log_node(eid)
    assert result.status is ExecutionStatus.COMPLETED, result.error
    span = otel.span_of(eid)
    assert result.stdout == _traceparent(span)
    assert node is not None
    attributes = dict(span.attributes or {})
    assert attributes["cloudops.node.id"] == node.node_id
    assert attributes["cloudops.node.address"] == str(node)
