"""OpenTelemetry work done in batches still tells what happened when it happened.

The engine starts spans when their executions are dispatched, ends them in one
callback per turn of its event loop, and records histogram measurements in
batches (telemetry.py says why). These tests hold it to what a host sees: a
queued execution's span starts at `execute()` under the context current then;
a span has ended by the time anyone learns its execution ended; an execution
cancelled before it ever ran has its span too; and no measurement is lost or
counted twice while a metric reader collects on its own thread.

OpenTelemetry's global providers can be set once per process, so this module
sets its own for all its tests and puts the globals back as they were when it
is done, as tests/test_otel.py does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from conftest import HELPERS, PYTHON, Recorder, config, result_of, run, shell
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otel_support import global_providers

from cloudops_execution_engine import ExecutionEngine, ExecutionPlan, ExecutionStatus, ParallelStrategy
from cloudops_execution_engine.actors.telemetry import correlate

pytestmark = pytest.mark.timeout(60)


class _Counted(MetricExporter):
    """An exporter for a reader that collects every few milliseconds; it only counts its exports."""

    def __init__(self) -> None:
        super().__init__()
        self.exports = 0

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports += 1
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


class _Failing(SpanProcessor):
    """A host's span processor that fails on the spans of the executions named in `ids`."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if (span.attributes or {}).get("cloudops.execution.id") in self.ids:
            raise RuntimeError("processor bug")


@dataclass
class Otel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    busy_reader: _Counted
    tracer: trace.Tracer
    failing: _Failing

    def span_of(self, execution_id: UUID) -> ReadableSpan:
        found = [
            s
            for s in self.spans.get_finished_spans()
            if s.name == "cloudops.execution"
            and (s.attributes or {}).get("cloudops.execution.id") == str(execution_id)
        ]
        assert len(found) == 1, f"{len(found)} ended spans for {execution_id}"
        return found[0]

    def histogram_count(self, name: str) -> int:
        data = self.reader.get_metrics_data()
        if data is None:
            return 0
        return sum(
            point.count
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
            if isinstance(point, HistogramDataPoint)
        )


@pytest.fixture(scope="module")
def otel_module() -> Iterator[Otel]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    failing = _Failing()
    tracer_provider.add_span_processor(failing)
    reader = InMemoryMetricReader()
    busy = _Counted()
    # A second reader collecting every 5 ms on its own thread, while the engine takes measurements.
    busy_reader = PeriodicExportingMetricReader(busy, export_interval_millis=5)
    meter_provider = MeterProvider(metric_readers=[reader, busy_reader])
    with global_providers(tracer_provider, meter_provider):
        yield Otel(spans, reader, busy, tracer_provider.get_tracer("tests"), failing)


@pytest.fixture
def otel(otel_module: Otel) -> Otel:
    otel_module.spans.clear()
    return otel_module


def _blocker(marker: Path) -> Any:
    """A command that holds its concurrency slot until `marker` exists."""
    return shell(f"while [ ! -e {marker} ]; do sleep 0.01; done")


async def test_queued_spans_start_at_execute_under_their_context(
    tmp_path: Path, otel: Otel, recorder: Recorder
) -> None:
    """Executions that wait for a slot, more of them than the engine starts spans for at once, each
    have a span that starts when its `execute()` was called, under the span current then, and lasts
    through the wait: not one that starts when it is dispatched."""
    marker = tmp_path / "go"
    engine = ExecutionEngine(config(tmp_path, max_concurrent_executions=1)).with_event_handler(recorder)
    called: dict[UUID, tuple[int, int]] = {}
    async with engine:
        first = await engine.execute(_blocker(marker))
        await recorder.until(lambda _: "started" in recorder.types_of(first))
        with otel.tracer.start_as_current_span("host request") as host_span:
            for _ in range(70):
                before = time.time_ns()
                queued = await engine.execute(run("/bin/true"))
                called[queued] = (before, time.time_ns())
        await asyncio.sleep(0.2)  # not to wait for anything: the queued executions' wait, to be measured
        marker.touch()
        results = [await result_of(engine, eid, 20) for eid in called]
        await result_of(engine, first, 20)
    assert all(r.status is ExecutionStatus.COMPLETED for r in results)
    host = host_span.get_span_context()
    for eid, (before, after) in called.items():
        span = otel.span_of(eid)
        assert span.start_time is not None
        assert span.end_time is not None
        assert before <= span.start_time <= after
        assert span.end_time - span.start_time >= 200_000_000
        assert span.parent is not None
        assert span.parent.span_id == host.span_id
        assert span.context.trace_id == host.trace_id


async def test_every_span_has_ended_when_its_result_is_seen(tmp_path: Path, otel: Otel) -> None:
    """However many executions end together, each one's span has ended and been exported by the time
    `wait()` returns its result; a plan's span and its commands' spans by the time the plan's does."""
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=8)) as engine:
        ids = [await engine.execute(run("/bin/true")) for _ in range(24)]
        for eid in ids:
            result = await result_of(engine, eid, 20)
            assert result.status is ExecutionStatus.COMPLETED
            span = otel.span_of(eid)  # exported already, with its final attributes
            assert (span.attributes or {})["cloudops.status"] == "completed"
            assert span.end_time is not None
        plan = ExecutionPlan(commands=[run("/bin/true") for _ in range(6)], strategy=ParallelStrategy())
        plan_id = await engine.execute_plan(plan)
        await engine.wait(plan_id, timeout=20)
        plans = [s for s in otel.spans.get_finished_spans() if s.name == "cloudops.plan"]
        assert len(plans) == 1
        for command in plan.commands:
            span = otel.span_of(command.id)
            assert span.parent is not None
            assert span.parent.span_id == plans[0].context.span_id


async def test_executions_cancelled_or_named_before_they_ran_have_their_spans(
    tmp_path: Path, otel: Otel, recorder: Recorder
) -> None:
    """A queued execution, cancelled before any worker ran it, ends with a span under the context of
    its `execute()`, marked cancelled with the cancel event; a log line about a queued execution
    names the trace its span has in the end."""
    marker = tmp_path / "go"
    engine = ExecutionEngine(config(tmp_path, max_concurrent_executions=1)).with_event_handler(recorder)
    async with engine:
        first = await engine.execute(_blocker(marker))
        await recorder.until(lambda _: "started" in recorder.types_of(first))
        with otel.tracer.start_as_current_span("host request") as host_span:
            named = await engine.execute(shell("true"))
            _suffix, extra = correlate([named])
            cancelled = await engine.execute(shell("true"))
        await engine.cancel(cancelled)
        result = await result_of(engine, cancelled, 20)
        marker.touch()
        await result_of(engine, first, 20)
        await result_of(engine, named, 20)
    assert result.status is ExecutionStatus.CANCELLED
    span = otel.span_of(cancelled)
    attributes = dict(span.attributes or {})
    assert attributes["cloudops.status"] == "cancelled"
    assert "process.pid" not in attributes  # no command ever ran
    assert [e.name for e in span.events] == ["cloudops.cancel"]
    host = host_span.get_span_context()
    for eid in (cancelled, named):
        parent = otel.span_of(eid).parent
        assert parent is not None
        assert parent.span_id == host.span_id
    assert extra["trace_id"] == f"{otel.span_of(named).context.trace_id:032x}" == f"{host.trace_id:032x}"


async def test_no_measurement_is_lost_while_a_reader_collects(tmp_path: Path, otel: Otel) -> None:
    """With one reader collecting every 5 ms on its own thread, the other still counts exactly one
    duration and one queue time per execution, right after the last one ended."""
    durations = otel.histogram_count("cloudops.execution.duration")
    queue_times = otel.histogram_count("cloudops.execution.queue_time")
    exports = otel.busy_reader.exports
    n = 150  # more than one batch of measurements, and not a multiple of one
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=10)) as engine:
        ids = [await engine.execute(run("/bin/true")) for _ in range(n)]
        results = [await result_of(engine, eid, 30) for eid in ids]
        assert all(r.status is ExecutionStatus.COMPLETED for r in results)
        assert otel.histogram_count("cloudops.execution.duration") == durations + n
        assert otel.histogram_count("cloudops.execution.queue_time") == queue_times + n
    assert otel.busy_reader.exports > exports, "the busy reader never collected during the run"


async def test_a_span_that_cannot_start_costs_only_itself(
    tmp_path: Path, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """A host's span processor that fails on one execution's span: that execution and the others
    submitted with it still run, the others are traced, and a warning names the one that is not."""
    caplog.set_level(logging.WARNING, logger="cloudops_execution_engine")
    requests = [run("/bin/true") for _ in range(5)]
    otel.failing.ids.add(str(requests[2].id))
    async with ExecutionEngine(config(tmp_path, max_concurrent_executions=2)) as engine:
        ids = [await engine.execute(request) for request in requests]
        results = [await result_of(engine, eid, 20) for eid in ids]
    assert all(r.status is ExecutionStatus.COMPLETED for r in results)
    traced = {
        str((s.attributes or {}).get("cloudops.execution.id"))
        for s in otel.spans.get_finished_spans()
        if s.name == "cloudops.execution"
    }
    assert traced == {str(eid) for i, eid in enumerate(ids) if i != 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(ids[2]) in message for message in warnings), warnings


def test_a_provider_named_in_the_environment_is_used(tmp_path: Path) -> None:
    """A host that names its tracer provider only in `OTEL_PYTHON_TRACER_PROVIDER` gets spans: each
    command receives a sampled TRACEPARENT of its own, in W3C form."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRACEPARENT", "TRACESTATE")}
    env["OTEL_PYTHON_TRACER_PROVIDER"] = "sdk_tracer_provider"
    done = subprocess.run(
        [PYTHON, str(HELPERS / "otel_env_host.py"), str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["provider"] == "opentelemetry.sdk.trace"
    first, second = report["traceparents"]
    for traceparent in (first, second):
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", traceparent), traceparent
        assert int(traceparent[-2:], 16) & 1, "not sampled"
    assert first != second


async def test_measurements_are_not_exemplars_of_a_span_current_nearby(tmp_path: Path, otel: Otel) -> None:
    """Histogram measurements, recorded in batches wherever the engine's loop happens to be, never
    carry as exemplar a span that was current there: not even one current while the engine started
    and its executions were submitted."""
    with otel.tracer.start_as_current_span("host request"):
        async with ExecutionEngine(config(tmp_path, max_concurrent_executions=10)) as engine:
            ids = [await engine.execute(run("/bin/true")) for _ in range(3 * 64)]
            for eid in ids:
                await result_of(engine, eid, 30)
            data = otel.reader.get_metrics_data()
    assert data is not None
    exemplars = [
        exemplar
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name.startswith("cloudops.execution.")
        for point in metric.data.data_points
        for exemplar in point.exemplars
    ]
    assert exemplars == []
