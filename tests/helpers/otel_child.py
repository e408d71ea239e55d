"""A command that joins its engine's trace: it reads TRACEPARENT/TRACESTATE and starts a span of its own.

It exports that span with the OpenTelemetry SDK to stdout, as one JSON line
naming the span's trace id, its parent's span id and the trace state it saw.
"""

import json
import os
import sys
from collections.abc import Sequence

from opentelemetry import propagate
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult


class JsonLines(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            parent = span.parent
            line = {
                "name": span.name,
                "trace_id": f"{span.context.trace_id:032x}",
                "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
                "tracestate": span.context.trace_state.to_header(),
            }
            print(json.dumps(line), flush=True)
        return SpanExportResult.SUCCESS


def main() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLines()))
    # The environment carrier: TRACEPARENT and TRACESTATE, read as the W3C headers they hold.
    carrier = {key.lower(): os.environ[key] for key in ("TRACEPARENT", "TRACESTATE") if key in os.environ}
    if not carrier:
        sys.exit("no TRACEPARENT in the environment")
    with provider.get_tracer("child").start_as_current_span("child work", context=propagate.extract(carrier)):
        pass
    provider.shutdown()


main()
