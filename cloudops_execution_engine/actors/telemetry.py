"""OpenTelemetry: spans for executions and plans, metrics, the command's trace context, log correlation.

Nothing here imports OpenTelemetry when this module is imported. `load()` does,
and returns None when the `[otel]` extra is not installed; the supervisor then
holds None and each of its hooks costs one None check.

With the extra installed, the global tracer and meter providers are looked up
each time an execution is submitted (two attribute reads), so a host may
configure OpenTelemetry after importing or even after starting the engine.
While a provider is still the API's proxy (nothing configured), no span is
made and commands get no `TRACEPARENT`.

Cost matters: every execution passes through here. Counters and up-down
counters are observable instruments reading plain integers that the hooks
bump, so they cost nothing per execution beyond an integer add; only the two
histograms and the span go through the SDK for each execution. The integers
are process-wide, not per engine, so that a counter never goes down when an
engine is garbage collected.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

from ..results import ExecutionResult, ExecutionStatus

if TYPE_CHECKING:
    from types import ModuleType

    from opentelemetry.context import Context
    from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from .pool import WorkerPool
    from .records import PlanRun, Record
    from .store import Store

__all__ = ["Telemetry", "correlate", "load"]

_SCOPE = "cloudops_execution_engine"
_PENDING = ExecutionStatus.PENDING
_RUNNING = ExecutionStatus.RUNNING
_ERRORS = (ExecutionStatus.FAILED, ExecutionStatus.TIMEOUT)
# Commands inherit these from the execution's span (the OpenTelemetry environment carrier).
TRACEPARENT = "TRACEPARENT"
TRACESTATE = "TRACESTATE"


@dataclass
class _Counts:
    """What the observable instruments report: process-wide, bumped by every engine's hooks."""

    pending: int = 0
    running: int = 0
    worker_deaths: int = 0
    executions: dict[str, int] = field(default_factory=dict)


_COUNTS = _Counts()


class _Meters:
    """The instruments made on one meter provider."""

    def __init__(self, provider: MeterProvider, metrics: ModuleType) -> None:
        self.provider = provider
        observation: type[Observation] = metrics.Observation
        meter = provider.get_meter(_SCOPE, _version())
        self.duration: Histogram = meter.create_histogram(
            "cloudops.execution.duration", unit="s", description="How long commands ran, start to end."
        )
        self.queue_time: Histogram = meter.create_histogram(
            "cloudops.execution.queue_time",
            unit="s",
            description="Time from execute() to the command's start.",
        )

        def executions(_options: CallbackOptions) -> Iterator[Observation]:
            for status, count in list(_COUNTS.executions.items()):
                yield observation(count, {"cloudops.status": status})

        def running(_options: CallbackOptions) -> Iterator[Observation]:
            yield observation(_COUNTS.running)

        def pending(_options: CallbackOptions) -> Iterator[Observation]:
            yield observation(_COUNTS.pending)

        def deaths(_options: CallbackOptions) -> Iterator[Observation]:
            yield observation(_COUNTS.worker_deaths)

        meter.create_observable_counter(
            "cloudops.executions",
            [executions],
            unit="{execution}",
            description="Executions that reached a final status, by that status.",
        )
        meter.create_observable_up_down_counter(
            "cloudops.executions.running", [running], unit="{execution}", description="Executions running."
        )
        meter.create_observable_up_down_counter(
            "cloudops.executions.pending",
            [pending],
            unit="{execution}",
            description="Executions waiting to start.",
        )
        meter.create_observable_counter(
            "cloudops.worker.deaths", [deaths], unit="{worker}", description="Worker processes that died."
        )


class Telemetry:
    """One engine's hooks. Made by `load()` only when OpenTelemetry can be imported."""

    def __init__(self, trace: ModuleType, metrics: ModuleType, store: Store) -> None:
        self._trace = trace
        self._metrics = metrics
        self._store = store
        self._tracer_provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        self._meter_provider: MeterProvider | None = None
        self._meters: _Meters | None = None
        # The API's stand-ins while a host has configured nothing.
        self._proxy_tracer_provider: type[Any] = trace.ProxyTracerProvider
        internal = getattr(metrics, "_internal", None)
        self._proxy_meter_provider: object = getattr(internal, "_PROXY_METER_PROVIDER", None)
        # Measurements are taken in whatever context the loop's callback has (for a
        # pipe reader, the one current when the engine started): an explicit context
        # without a span keeps the SDK from making exemplars of some unrelated span.
        self._no_span: Context = trace.set_span_in_context(trace.INVALID_SPAN)
        _LIVE.add(self)

    # -- providers ----------------------------------------------------------

    def _current(self) -> tuple[Tracer | None, _Meters | None]:
        """The tracer and instruments of the global providers as they are now (None: not configured)."""
        provider = self._trace.get_tracer_provider()
        if provider is not self._tracer_provider:
            self._tracer_provider = provider
            self._tracer = None
            if not isinstance(provider, self._proxy_tracer_provider):
                self._tracer = provider.get_tracer(_SCOPE, _version())
        meter_provider = self._metrics.get_meter_provider()
        if meter_provider is not self._meter_provider:
            self._meter_provider = meter_provider
            self._meters = (
                None
                if meter_provider is self._proxy_meter_provider
                else _meters_for(meter_provider, self._metrics)
            )
        return self._tracer, self._meters

    # -- hooks ----------------------------------------------------------------

    def plan_submitted(self, run: PlanRun) -> None:
        """A plan's span, and its commands' spans under it (a command of a resumed plan may be done)."""
        tracer, _meters = self._current()
        if tracer is not None:
            run.span = tracer.start_span("cloudops.plan", attributes={"cloudops.plan.id": str(run.id)})
        for record in run.records:
            if record.status is _PENDING:
                self.submitted(record)

    def submitted(self, record: Record) -> None:
        """At `execute()` (or a plan's submission): the span starts here, under the current context."""
        _COUNTS.pending += 1
        tracer, _meters = self._current()
        if tracer is None:
            return
        plan = record.plan
        context = None
        if plan is not None and plan.span is not None:
            context = self._trace.set_span_in_context(plan.span)
        record.span = tracer.start_span(
            "cloudops.execution", context, attributes={"cloudops.execution.id": str(record.id)}
        )

    def dispatched(self, record: Record) -> None:
        """A Run is about to go to a worker; a retry's Run (already running) changes no count."""
        if record.status is _PENDING:
            _COUNTS.pending -= 1
            _COUNTS.running += 1

    def env_for(self, record: Record, env: dict[str, str]) -> dict[str, str]:
        """`env` with the execution span's trace context, unless `env` sets one itself."""
        span = record.span
        if span is None:
            return env
        context = span.get_span_context()
        if not context.is_valid or TRACEPARENT in env or TRACESTATE in env:
            return env
        overlay = dict(env)
        overlay[TRACEPARENT] = (
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
        )
        if context.trace_state:
            overlay[TRACESTATE] = context.trace_state.to_header()
        return overlay

    def started(self, record: Record, attempt: int) -> None:
        if attempt > 1:
            if record.span is not None:
                record.span.add_event("cloudops.retry", {"cloudops.attempt": attempt})
            return
        meters = self._meters
        if meters is not None:
            queued = max(0.0, record.started_ts - record.submitted_at.timestamp())
            meters.queue_time.record(queued, None, self._no_span)

    def cancelling(self, record: Record) -> None:
        if record.span is not None and not record.status.is_final:
            record.span.add_event("cloudops.cancel")

    def ended(self, record: Record, result: ExecutionResult, pool: WorkerPool[Any] | None) -> None:
        """Before the record takes its final status: `record.status` is still pending or running."""
        if record.status is _RUNNING:
            _COUNTS.running -= 1
        elif record.status is _PENDING:
            _COUNTS.pending -= 1
        status = result.status.value
        executions = _COUNTS.executions
        executions[status] = executions.get(status, 0) + 1
        meters = self._meters
        if meters is not None and record.started_at is not None:
            meters.duration.record(result.duration.total_seconds(), None, self._no_span)
        span = record.span
        if span is None:
            return
        attributes: dict[str, Any] = {
            "cloudops.status": status,
            "process.exit.code": result.exit_code,
            "cloudops.attempts": result.attempts,
        }
        if record.pid:
            attributes["process.pid"] = record.pid
        node = pool.log_location(record.worker) if pool is not None and record.worker is not None else None
        if node is not None:  # a remote node (Ray)
            attributes["cloudops.node.address"] = str(node)
            attributes["cloudops.node.id"] = node.node_id
        span.set_attributes(attributes)
        if result.status in _ERRORS:
            span.set_status(self._trace.StatusCode.ERROR, result.error)
        span.end()
        record.span = None
        record.trace_id = span.get_span_context().trace_id

    def plan_ended(self, run: PlanRun) -> None:
        span = run.span
        if span is None or run.result is None:
            return
        span.set_attribute("cloudops.status", run.result.status.value)
        if run.result.status in _ERRORS:
            span.set_status(self._trace.StatusCode.ERROR, f"plan {run.result.status.value}")
        span.end()
        run.span = None
        run.trace_id = span.get_span_context().trace_id

    def worker_died(self) -> None:
        _COUNTS.worker_deaths += 1

    # -- log correlation ----------------------------------------------------------

    def trace_id_of(self, execution_id: UUID) -> str | None:
        try:
            entry = self._store.entry(execution_id)
        except Exception:  # not (or no longer) this engine's: another engine may know it
            return None
        # What a durable store brings back from an earlier engine has no span.
        span: Span | None = getattr(entry, "span", None)
        trace_id = span.get_span_context().trace_id if span is not None else getattr(entry, "trace_id", 0)
        return f"{trace_id:032x}" if trace_id else None  # 0: not traced (or an invalid context)


_meters_by_provider: weakref.WeakKeyDictionary[Any, _Meters] = weakref.WeakKeyDictionary()
_LIVE: weakref.WeakSet[Telemetry] = weakref.WeakSet()


def _meters_for(provider: MeterProvider, metrics: ModuleType) -> _Meters:
    """One set of instruments per provider, however many engines use it (observables register once)."""
    meters = _meters_by_provider.get(provider)
    if meters is None:
        meters = _meters_by_provider[provider] = _Meters(provider, metrics)
    return meters


def _version() -> str:
    from .. import __version__  # the package is loaded by the time an engine runs

    return __version__


def load(store: Store) -> Telemetry | None:
    """Hooks for one engine, or None when OpenTelemetry (the `[otel]` extra) is not installed."""
    try:
        from opentelemetry import metrics, trace  # only here: nothing else loads OpenTelemetry
    except ImportError:
        return None
    return Telemetry(trace, metrics, store)


# -- log correlation: usable with or without OpenTelemetry --------------------------

_IDS_IN_TEXT = 5


def correlate(ids: Iterable[UUID | bytes | str]) -> tuple[str, dict[str, Any]]:
    """A suffix for a log message naming these executions (and their traces), and `extra=` fields.

    The fields are `execution_ids` and `trace_ids` (lists, the trace of each
    execution in the same place, None where it is not traced), and, when there
    is exactly one execution, `execution_id` and `trace_id`, so that a log line
    can be joined to its span.
    """
    uuids = [_as_uuid(value) for value in ids]
    traces: list[str | None] = [_trace_id(u) for u in uuids]
    named = [
        f"{u} (trace {t})" if t is not None else str(u)
        for u, t in zip(uuids[:_IDS_IN_TEXT], traces, strict=False)
    ]
    if len(uuids) > _IDS_IN_TEXT:
        named.append(f"and {len(uuids) - _IDS_IN_TEXT} more")
    if not uuids:
        suffix = ""
    elif len(uuids) == 1:
        suffix = f" [execution {named[0]}]"
    else:
        suffix = f" [executions {', '.join(named)}]"
    extra: dict[str, Any] = {
        "execution_ids": [str(u) for u in uuids],
        "trace_ids": traces,
        "execution_id": str(uuids[0]) if len(uuids) == 1 else None,
        "trace_id": traces[0] if len(uuids) == 1 else None,
    }
    return suffix, extra


def _as_uuid(value: UUID | bytes | str) -> UUID:
    if isinstance(value, UUID):
        return value
    if isinstance(value, bytes):
        return UUID(bytes=value)
    return UUID(value)


def _trace_id(execution_id: UUID) -> str | None:
    try:
        engines = list(_LIVE)
    except RuntimeError:  # an engine started on another thread meanwhile: a log line does without
        return None
    for telemetry in engines:
        found = telemetry.trace_id_of(execution_id)
        if found is not None:
            return found
    return None
