"""A host that starts its engine before configuring OpenTelemetry, and configures it midway.

The first command runs with the API installed but no provider set; then the
host sets an SDK tracer provider (in memory) and runs a second. It prints one
JSON line: what TRACEPARENT each command saw and the spans exported.
"""

import asyncio
import json
import sys
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cloudops_execution_engine import (
    ExecutionConfig,
    ExecutionEngine,
    ExecutionRequest,
    ExecutionResult,
    ShellCommand,
)


def print_traceparent() -> ExecutionRequest:
    return ExecutionRequest(command=ShellCommand(command='printf "%s" "${TRACEPARENT-unset}"'))


async def main() -> None:
    exporter = InMemorySpanExporter()
    async with ExecutionEngine(ExecutionConfig(log_dir=Path(sys.argv[1]), workers=1)) as engine:
        before = await engine.wait(await engine.execute(print_traceparent()), timeout=30)
        spans_before = len(exporter.get_finished_spans())
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        after = await engine.wait(await engine.execute(print_traceparent()), timeout=30)
    assert isinstance(before, ExecutionResult)
    assert isinstance(after, ExecutionResult)
    spans = [
        {
            "name": s.name,
            "trace_id": f"{s.context.trace_id:032x}",
            "span_id": f"{s.context.span_id:016x}",
            "flags": f"{int(s.context.trace_flags):02x}",
        }
        for s in exporter.get_finished_spans()
    ]
    print(
        json.dumps(
            {
                "before": before.stdout,
                "after": after.stdout,
                "spans_before": spans_before,
                "spans": spans,
            }
        )
    )


asyncio.run(main())
