"""A host that configures OpenTelemetry only through its environment, not in code.

The test runs it with `OTEL_PYTHON_TRACER_PROVIDER=sdk_tracer_provider`, which
the API reads to load the SDK's tracer provider the first time anyone asks for
the global one. The host runs two commands that print their TRACEPARENT, then
prints one JSON line: what each saw, and the global tracer provider's type.
"""

import asyncio
import json
import sys
from pathlib import Path

from opentelemetry import trace

from cloudops_execution_engine import (
    ExecutionConfig,
    ExecutionEngine,
    ExecutionRequest,
    ExecutionResult,
    ShellCommand,
)


async def main() -> None:
    seen = []
    async with ExecutionEngine(ExecutionConfig(log_dir=Path(sys.argv[1]), workers=1)) as engine:
        for _ in range(2):
            request = ExecutionRequest(command=ShellCommand(command='printf "%s" "${TRACEPARENT-unset}"'))
            result = await engine.wait(await engine.execute(request), timeout=30)
            assert isinstance(result, ExecutionResult)
            seen.append(result.stdout)
    print(json.dumps({"traceparents": seen, "provider": type(trace.get_tracer_provider()).__module__}))


asyncio.run(main())
