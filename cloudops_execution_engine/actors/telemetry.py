"""OpenTelemetry: spans for executions and plans, metrics, the command's trace context, log correlation.

Nothing here imports OpenTelemetry when this module is imported. `load()` does,
and returns None when the `[otel]` extra is not installed; the supervisor then
holds None and each of its hooks costs one None check.

With the extra installed, the global tracer and meter providers are looked up
each time an execution is submitted (two dictionary reads: `_global`), so a host may
configure OpenTelemetry after importing or even after starting the engine.
While a provider is still the API's proxy (nothing configured), no span is
made and commands get no `TRACEPARENT`.

Cost matters: every execution passes through here, and the SDK's work for one
span or one measurement costs several times as much when done once between the
engine's other work (its code and data gone from the CPU's caches) as when done
many times in a row. So that work is done in batches, each item with the time
it belongs to:

- a span is started when its execution is dispatched (or ends, or is asked
  about), together with every other span submitted since (at most `_BATCH`
  wait), each under the context and with the start time its `execute()` had;
- a span ends when its execution does, not in a batch: whoever learns of
  that end may run before any callback scheduled then would;
- histogram measurements wait in a queue that is recorded when it holds
  `_BATCH` of them and whenever a metric reader collects, so a reader never
  misses one taken before it collected;
- counters and up-down counters are observable instruments reading plain
  integers that the hooks bump. The integers are process-wide, not per
  engine, so that a counter never goes down when an engine is garbage collected.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from time import time_ns
from typing import TYPE_CHECKING, Any
from uuid import UUID

from ..results import ExecutionResult, ExecutionStatus

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

    from opentelemetry.context import Context
    from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation
    from opentelemetry.trace import Span, StatusCode, Tracer, TracerProvider

    from .pool import WorkerPool
    from .records import PlanRun, Record
    from .store import Store

__all__ = ["Telemetry", "correlate", "load"]

logger = logging.getLogger("cloudops_execution_engine.telemetry")

_SCOPE = "cloudops_execution_engine"
_PENDING = ExecutionStatus.PENDING
_RUNNING = ExecutionStatus.RUNNING
_ERRORS = (ExecutionStatus.FAILED, ExecutionStatus.TIMEOUT)
_EXECUTION_SPAN = "cloudops.execution"
_EXECUTION_ID = "cloudops.execution.id"
# The most spans started, or histogram measurements recorded, at once: enough for
# the SDK's code to stay in the caches, few enough that the work (about 12 us a
# span, 4 us a measurement) holds the event loop for a millisecond at most.
_BATCH = 64
# Commands inherit these from the execution's span (the OpenTelemetry environment carrier).
TRACEPARENT = "TRACEPARENT"
TRACESTATE = "TRACESTATE"


@dataclass
class _Counts:
    """What the observable instruments report: process-wide, bumped by every engine's hooks.

    Engines run on their own loops' threads (two `SyncExecutionEngine`s), so
    each change is made under `lock`: a read and a write of another thread's
    between them would lose a count.
    """

    pending: int = 0
    running: int = 0
    worker_deaths: int = 0
    executions: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_COUNTS = _Counts()


def _forked() -> None:
    # A child forked from a host counts its own executions, not its parent's (nor a lock held there).
    global _COUNTS
    _COUNTS = _Counts()
    _recent_traces.clear()


os.register_at_fork(after_in_child=_forked)

# The traces of executions that ended lately, for log lines about them once their
# engine no longer keeps them (`max_retained_executions`, retention): a handler's
# error about a terminal event may come after that.
_recent_traces: dict[bytes, int] = {}
_RECENT_TRACES = 4096


class _Meters:
    """The instruments made on one meter provider, and the histogram measurements not yet recorded."""

    def __init__(self, provider: MeterProvider, metrics: ModuleType, no_span: Context) -> None:
        self.provider = provider
        # Deques: appended to on the event loop, drained there or on a metric reader's thread.
        self.durations: deque[float] = deque()
        self.queue_times: deque[float] = deque()
        self.failed = False  # a recording failed: said once
        # Measurements are recorded later and elsewhere than they were taken: an explicit
        # context without a span keeps the SDK from making exemplars of some unrelated span.
        self._no_span = no_span
        observation: type[Observation] = metrics.Observation
        meter = provider.get_meter(_SCOPE, _version())
        self._duration: Histogram = meter.create_histogram(
            "cloudops.execution.duration", unit="s", description="How long commands ran, start to end."
        )
        self._queue_time: Histogram = meter.create_histogram(
            "cloudops.execution.queue_time",
            unit="s",
            description="Time from execute() to the command's start.",
        )

        def executions(_options: CallbackOptions) -> Iterator[Observation]:
            # A collection runs the callbacks before it reads the histograms.
            self.record()
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

    def record(self) -> None:
        """Hand the waiting measurements to the histograms (from the event loop or a reader's thread)."""
        no_span = self._no_span
        for histogram, waiting in ((self._duration, self.durations), (self._queue_time, self.queue_times)):
            record = histogram.record
            take = waiting.popleft
            try:
                while waiting:
                    record(take(), None, no_span)
            except IndexError:  # another thread took the last one
                pass
            except Exception:
                # A host's failing part (an exemplar filter, a view) costs these measurements, and
                # never the caller: the loop's handling of a worker's messages, or a reader's collection.
                waiting.clear()
                if not self.failed:
                    self.failed = True
                    logger.warning("could not record the engine's histograms", exc_info=True)


# A span to start: its record, the tracer and parent context current at submission, and when that was.
_Unstarted = tuple["Record", "Tracer", "Context", int]


class Telemetry:
    """One engine's hooks. Made by `load()` only when OpenTelemetry can be imported.

    All hooks run on the engine's event loop, so the batches need no lock.
    """

    def __init__(self, trace: ModuleType, metrics: ModuleType, context: ModuleType, store: Store) -> None:
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
        # Where the API keeps the providers a host set (see `_global`).
        self._trace_globals: dict[str, Any] = vars(trace)
        self._metrics_globals: dict[str, Any] = vars(internal) if internal is not None else {}
        # Not an empty Context: the SDK would take the current one instead.
        self._no_span: Context = trace.set_span_in_context(trace.INVALID_SPAN)
        self._current_context: Callable[[], Context] = context.get_current
        self._error: StatusCode = trace.StatusCode.ERROR
        self._unstarted: list[_Unstarted] = []
        self._providers_failed = False  # said once
        # The event loop's thread (an engine starts on its loop), which alone starts spans.
        self._thread = threading.get_ident()
        _LIVE.add(self)

    # -- providers ----------------------------------------------------------

    def _current(self) -> tuple[Tracer | None, _Meters | None]:
        """The tracer and instruments of the global providers as they are now (None: not configured).

        None too when the providers cannot be had: OpenTelemetry's API raises
        for an `OTEL_PYTHON_TRACER_PROVIDER` naming a provider not installed
        (a typo), and executions then run untraced rather than not at all.
        """
        try:
            return self._providers()
        except Exception:
            if not self._providers_failed:
                self._providers_failed = True
                logger.warning(
                    "OpenTelemetry's tracer or meter provider cannot be had: executions run untraced",
                    exc_info=True,
                )
            return None, None

    def _providers(self) -> tuple[Tracer | None, _Meters | None]:
        provider = _global(
            self._trace_globals,
            "_TRACER_PROVIDER",
            self._trace_globals.get("_PROXY_TRACER_PROVIDER"),
            self._tracer_provider,
            self._trace.get_tracer_provider,
        )
        if provider is not self._tracer_provider:
            self._tracer_provider = provider
            self._tracer = None
            if not isinstance(provider, self._proxy_tracer_provider):
                self._tracer = provider.get_tracer(_SCOPE, _version())
        meter_provider = _global(
            self._metrics_globals,
            "_METER_PROVIDER",
            self._proxy_meter_provider,
            self._meter_provider,
            self._metrics.get_meter_provider,
        )
        if meter_provider is not self._meter_provider:
            self._meter_provider = meter_provider
            self._meters = (
                None
                if meter_provider is self._proxy_meter_provider
                else _meters_for(meter_provider, self._metrics, self._no_span)
            )
        return self._tracer, self._meters

    # -- batches ----------------------------------------------------------------

    def _wait_to_start(self, record: Record, tracer: Tracer, parent: Context) -> None:
        unstarted = self._unstarted
        unstarted.append((record, tracer, parent, time_ns()))
        if len(unstarted) >= _BATCH:  # a burst of submissions does not hold the loop long at its dispatch
            self._start_spans()

    def _start_spans(self) -> None:
        """Start every span waiting to: each as of its submission, so only the moment of the work differs."""
        unstarted, self._unstarted = self._unstarted, []
        for record, tracer, parent, start in unstarted:
            try:
                record.span = tracer.start_span(
                    _EXECUTION_SPAN, parent, attributes={_EXECUTION_ID: str(record.id)}, start_time=start
                )
            except Exception:  # a host's failing sampler or processor costs a span, not the dispatch
                # Not `correlate`, which would start the spans waiting: this is that.
                execution = str(record.id)
                logger.warning(
                    "could not start the span of execution %s",
                    execution,
                    exc_info=True,
                    extra={
                        "execution_id": execution,
                        "execution_ids": [execution],
                        "trace_id": None,
                        "trace_ids": [None],
                    },
                )

    # -- hooks ----------------------------------------------------------------

    def plan_submitted(self, run: PlanRun) -> None:
        """A plan's span, and its commands' spans under it (a command of a resumed plan may be done)."""
        pending = [record for record in run.records if record.status is _PENDING]
        counts = _COUNTS
        with counts.lock:
            counts.pending += len(pending)
        tracer, _meters = self._current()
        if tracer is None:
            return
        try:
            run.span = span = tracer.start_span("cloudops.plan", attributes={"cloudops.plan.id": str(run.id)})
            parent = self._trace.set_span_in_context(span)
        except Exception:  # a host's failing sampler or processor costs the plan's span, not the plan
            suffix, extra = correlate([run.id])
            logger.warning("could not start the span of plan%s", suffix, exc_info=True, extra=extra)
            parent = self._current_context()
        for record in pending:
            self._wait_to_start(record, tracer, parent)

    def submitted(self, record: Record) -> None:
        """At `execute()`: the span, to be started under the context current now and as of now."""
        counts = _COUNTS
        with counts.lock:
            counts.pending += 1
        tracer, _meters = self._current()
        if tracer is not None:
            self._wait_to_start(record, tracer, self._current_context())

    def dispatched(self, record: Record) -> None:
        """A Run is about to go to a worker; a retry's Run (already running) changes no count."""
        if record.status is _PENDING:
            counts = _COUNTS
            with counts.lock:
                counts.pending -= 1
                counts.running += 1

    def env_for(self, record: Record, env: dict[str, str]) -> dict[str, str]:
        """`env` with the execution span's trace context, unless `env` sets one itself."""
        if self._unstarted:
            self._start_spans()
        span = record.span
        if span is None or TRACEPARENT in env or TRACESTATE in env:
            return env
        context = span.get_span_context()
        if not context.is_valid:
            return env
        overlay = dict(env)
        # The W3C traceparent, version 00, as OpenTelemetry's environment carrier spells it.
        flags = int(context.trace_flags)  # a plain int formats quicker than the subclass
        overlay[TRACEPARENT] = f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
        if context.trace_state:
            overlay[TRACESTATE] = context.trace_state.to_header()
        elif TRACESTATE in os.environ:
            # The host's own (it runs inside a trace, or set one since the engine started)
            # belongs to another TRACEPARENT: empty is none.
            overlay[TRACESTATE] = ""
        return overlay

    def started(self, record: Record, attempt: int) -> None:
        if attempt > 1:
            if record.span is not None:
                with self._guarded(record.id, "add the retry to"):
                    record.span.add_event("cloudops.retry", {"cloudops.attempt": attempt})
            return
        meters = self._meters
        if meters is not None:
            waiting = meters.queue_times
            waiting.append(max(0.0, record.started_ts - record.submitted_at.timestamp()))
            if len(waiting) >= _BATCH:
                meters.record()

    def cancelling(self, record: Record) -> None:
        if record.status.is_final:
            return
        if record.span is None and self._unstarted:
            self._start_spans()
        if record.span is not None:
            with self._guarded(record.id, "add the cancel to"):
                record.span.add_event("cloudops.cancel")

    def ended(self, record: Record, result: ExecutionResult, pool: WorkerPool[Any] | None) -> None:
        """Before the record takes its final status: `record.status` is still pending or running.

        The span ends here, not in a batch: whoever learns of this end may be
        running before any callback scheduled now would.
        """
        status: str = result.status._value_  # `.value` is a descriptor call
        counts = _COUNTS
        with counts.lock:
            if record.status is _RUNNING:
                counts.running -= 1
            elif record.status is _PENDING:
                counts.pending -= 1
            executions = counts.executions
            executions[status] = executions.get(status, 0) + 1
        meters = self._meters
        if meters is not None and record.started_at is not None:
            meters.durations.append(result.duration.total_seconds())
        span = record.span
        if span is None:
            if not self._unstarted:
                return
            self._start_spans()  # it ends before it was dispatched
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
        record.span = None
        with self._guarded(record.id, "end"):
            record.trace_id = trace_id = span.get_span_context().trace_id
            _remember_trace(record.key, trace_id)
            span.set_attributes(attributes)
            if result.status in _ERRORS:
                span.set_status(self._error, result.error)
            span.end()

    def plan_ended(self, run: PlanRun) -> None:
        span = run.span
        if span is None or run.result is None:
            return
        run.span = None
        with self._guarded(run.id, "end"):
            run.trace_id = span.get_span_context().trace_id
            span.set_attribute("cloudops.status", run.result.status.value)
            if run.result.status in _ERRORS:
                span.set_status(self._error, f"plan {run.result.status.value}")
            span.end()

    def abandoned(self, records: Iterable[Record], plans: Iterable[PlanRun]) -> None:
        """The engine's loop closed with these not ended: they never will be, here; their counts go."""
        counts = _COUNTS
        for record in records:
            with counts.lock:
                if record.status is _RUNNING:
                    counts.running -= 1
                elif record.status is _PENDING:
                    counts.pending -= 1
                else:
                    continue
            span, record.span = record.span, None
            if span is not None:
                with self._guarded(record.id, "end"):
                    span.set_status(self._error, "the engine was abandoned: its event loop closed")
                    span.end()
        for run in plans:
            span, run.span = run.span, None
            if span is not None and run.result is None:
                with self._guarded(run.id, "end"):
                    span.set_status(self._error, "the engine was abandoned: its event loop closed")
                    span.end()

    def worker_died(self) -> None:
        counts = _COUNTS
        with counts.lock:
            counts.worker_deaths += 1

    @contextlib.contextmanager
    def _guarded(self, entry_id: UUID, what: str) -> Iterator[None]:
        """A host's span processor or exporter that raises costs the span, never the execution."""
        try:
            yield
        except Exception:
            suffix, extra = correlate([entry_id])
            logger.warning("could not %s the span%s", what, suffix, exc_info=True, extra=extra)

    # -- log correlation ----------------------------------------------------------

    def trace_id_of(self, execution_id: UUID) -> str | None:
        try:
            entry = self._store.entry(execution_id)
        except Exception:  # not (or no longer) this engine's: it may have ended lately
            trace_id = _recent_traces.get(execution_id.bytes, 0)
            return f"{trace_id:032x}" if trace_id else None
        # Spans waiting to start are started on the loop's own thread only; a log line
        # written elsewhere meanwhile goes without the trace of one not yet dispatched.
        if self._unstarted and threading.get_ident() == self._thread:
            self._start_spans()
        # What a durable store brings back from an earlier engine has no span.
        span: Span | None = getattr(entry, "span", None)
        if span is None and not getattr(entry, "trace_id", 0):
            trace_id = _recent_traces.get(execution_id.bytes, 0)
            return f"{trace_id:032x}" if trace_id else None
        trace_id = span.get_span_context().trace_id if span is not None else getattr(entry, "trace_id", 0)
        return f"{trace_id:032x}" if trace_id else None  # 0: not traced (or an invalid context)


def _remember_trace(key: bytes, trace_id: int) -> None:
    if not trace_id:
        return
    recent = _recent_traces
    recent[key] = trace_id
    if len(recent) > _RECENT_TRACES:
        # Dicts keep insertion order: the oldest go, a quarter at a time.
        for old in list(itertools.islice(recent, _RECENT_TRACES // 4)):
            recent.pop(old, None)


_UNREADABLE = object()


def _global(
    api_globals: dict[str, Any], name: str, proxy: object, last: object, get: Callable[[], Any]
) -> Any:
    """A global provider as the API's getter `get` returns it, for less while nothing is configured.

    While no provider is set, the getter looks an environment variable up
    (`OTEL_PYTHON_*_PROVIDER`, naming one to load) at each call, a few
    microseconds each time. So once it has returned its `proxy`, the provider
    is read from the API's global (`name`) until something is set there. Where
    that global is not found, an API other than the one this was written
    against, the getter is asked each time.
    """
    found = api_globals.get(name, _UNREADABLE)
    if found is None and last is proxy and proxy is not None:
        return proxy  # nothing set since the getter gave its proxy
    if found is None or found is _UNREADABLE:
        return get()
    return found


_meters_by_provider: weakref.WeakKeyDictionary[Any, _Meters] = weakref.WeakKeyDictionary()
_LIVE: weakref.WeakSet[Telemetry] = weakref.WeakSet()


def _meters_for(provider: MeterProvider, metrics: ModuleType, no_span: Context) -> _Meters:
    """One set of instruments per provider, however many engines use it (observables register once)."""
    meters = _meters_by_provider.get(provider)
    if meters is None:
        meters = _meters_by_provider[provider] = _Meters(provider, metrics, no_span)
    return meters


def _version() -> str:
    from .. import __version__  # the package is loaded by the time an engine runs

    return __version__


def load(store: Store) -> Telemetry | None:
    """Hooks for one engine, or None when OpenTelemetry (the `[otel]` extra) is not installed."""
    try:
        from opentelemetry import context, metrics, trace  # only here: nothing else loads OpenTelemetry
    except ImportError:
        return None
    return Telemetry(trace, metrics, context, store)


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
