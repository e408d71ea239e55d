"""A host whose OpenTelemetry setup fails in one of two ways, named by the first argument.

- `exemplar`: its meter provider's exemplar filter raises, so every histogram
  measurement raises when it is recorded;
- `provider`: `OTEL_PYTHON_TRACER_PROVIDER` and `OTEL_PYTHON_METER_PROVIDER`
  name providers that are not installed (a typo), so the API raises when the
  engine asks for the global providers.

It runs 150 commands at once on 2 workers and prints one JSON line: the final
statuses, how many executions had a `started` event first, and whether any
call raised.
"""

import asyncio
import json
import os
import sys
from collections import Counter
from typing import Any

how, log_dir = sys.argv[1], sys.argv[2]
if how == "provider":
    os.environ["OTEL_PYTHON_TRACER_PROVIDER"] = "no_such_tracer_provider"
    os.environ["OTEL_PYTHON_METER_PROVIDER"] = "no_such_meter_provider"
else:
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics._internal.exemplar import ExemplarFilter
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    class Raising(ExemplarFilter):
        def should_sample(self, value: Any, time_unix_nano: Any, attributes: Any, context: Any) -> bool:
            raise RuntimeError("exemplar filter broke")

    metrics.set_meter_provider(
        MeterProvider(metric_readers=[InMemoryMetricReader()], exemplar_filter=Raising())
    )

from cloudops_execution_engine import ExecCommand, ExecutionConfig, ExecutionEngine, ExecutionRequest  # noqa: E402


async def main() -> None:
    first: dict[Any, str] = {}

    class FirstEvents:
        async def on_event(self, event: Any) -> None:
            first.setdefault(event.execution_id, event.event_type)

    raised = []
    statuses: Counter[str] = Counter()
    engine = ExecutionEngine(ExecutionConfig(log_dir=log_dir, workers=2)).with_event_handler(FirstEvents())
    async with engine:
        ids = []
        for _ in range(150):
            try:
                ids.append(await engine.execute(ExecutionRequest(command=ExecCommand(program="true"))))
            except Exception as exc:
                raised.append(f"{type(exc).__name__}: {exc}")
        for execution_id in ids:
            try:
                statuses[(await engine.wait(execution_id, timeout=20)).status.value] += 1
            except Exception as exc:
                statuses[type(exc).__name__] += 1
    started_first = sum(1 for kind in first.values() if kind == "started")
    print(json.dumps({"statuses": dict(statuses), "started_first": started_first, "raised": raised[:3]}))


asyncio.run(main())
