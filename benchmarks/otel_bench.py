"""What OpenTelemetry costs: throughput with a configured SDK against throughput without the extra.

Each sample runs in a fresh interpreter, since OpenTelemetry's providers can be
set once per process and "without the extra" means it cannot be imported at all:

- `without otel`: a finder first on `sys.meta_path` makes `opentelemetry`
  unimportable, as if the `[otel]` extra were not installed;
- `otel, no provider`: the API is installed but nothing is configured;
- `otel SDK, no-op exporters`: an SDK tracer provider with a batch span
  processor and an SDK meter provider with a periodic reader, both exporting
  to exporters that drop everything, so what is measured is the engine's
  instrumentation and the SDK, not an exporter.

Subjects alternate within each round, as in the throughput workload. On a
busy machine the rate varies from run to run far more than the difference
measured; the CPU per execution is the steadier figure.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.abc
import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from .harness import Row, median

SUBJECTS = ("without otel", "otel, no provider", "otel SDK, no-op exporters")


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


def _configure_sdk() -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        MetricsData,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class DropSpans(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class DropMetrics(MetricExporter):
        def export(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> MetricExportResult:
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            return None

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(DropMetrics(), export_interval_millis=1000)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _one(subject: str, n: int, concurrency: int) -> None:
    """In a fresh interpreter: set the subject up, run, and print the rate and CPU per execution as JSON.

    The CPU is the host's own and, once the engine has shut down and its
    workers are reaped, that of the workers and every command they waited for:
    on a busy machine it shows the cost more steadily than the rate does.
    """
    if subject == SUBJECTS[0]:
        sys.meta_path.insert(0, _NotInstalled())
    elif subject == SUBJECTS[2]:
        _configure_sdk()
    from .workloads import _engine_throughput

    # A first engine pays the one-time costs (importing OpenTelemetry, making instruments).
    asyncio.run(_engine_throughput(200, concurrency))
    # So does a full collection, in every subject alike: importing the SDK leaves tens
    # of thousands of new objects, whose first full collection (some 15 ms) would
    # otherwise fall inside the measured run and add about 10 us to each execution.
    gc.collect()
    host, children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    rate = asyncio.run(_engine_throughput(n, concurrency))
    host = _cpu(resource.RUSAGE_SELF) - host
    children = _cpu(resource.RUSAGE_CHILDREN) - children
    loaded = any(name.split(".")[0] == "opentelemetry" for name in sys.modules)
    if subject == SUBJECTS[0] and loaded:
        raise SystemExit("OpenTelemetry was loaded although it could not be imported")
    print(json.dumps({"rate": rate, "host_us": host / n * 1e6, "total_us": (host + children) / n * 1e6}))


def _sample(subject: str, n: int, concurrency: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.otel_bench", subject, str(n), str(concurrency)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def otel_overhead(n: int = 2000, concurrency: int = 10, rounds: int = 9) -> list[Row]:
    """/bin/true under each subject: executions per second, and CPU per execution (host; all processes).

    Ratios are against `without otel`; for CPU the ratio is inverted
    (without / with), so that each reads as relative throughput.
    """
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in SUBJECTS}
    for round_ in range(rounds):
        shift = round_ % len(SUBJECTS)
        for name in SUBJECTS[shift:] + SUBJECTS[:shift]:
            samples[name].append(_sample(name, n, concurrency))
    rows = []
    for key, unit, label, higher_is_better in (
        ("rate", "exec/s", "throughput", True),
        ("host_us", "us/exec", "host CPU", False),
        ("total_us", "us/exec", "all CPU", False),
    ):
        base = median([s[key] for s in samples[SUBJECTS[0]]])
        for name, runs in samples.items():
            values = [s[key] for s in runs]
            value = median(values)
            ratio = value / base if higher_is_better else base / value
            rows.append(
                Row(
                    f"otel: {label}, /bin/true x{n} @{concurrency}",
                    name,
                    value,
                    unit,
                    {"vs_without": round(ratio, 3), "rounds": [round(v) for v in values]},
                )
            )
    return rows


if __name__ == "__main__":
    _one(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
