"""A host in which OpenTelemetry cannot be imported, as if the `[otel]` extra were not installed.

A finder first on `sys.meta_path` answers every `opentelemetry` import as not
found (and counts the attempts). The host runs one command that prints its
TRACEPARENT, then prints one JSON line: the result, the attempts, and which
`opentelemetry` modules ended up in `sys.modules`.
"""

import asyncio
import importlib.abc
import json
import sys
from pathlib import Path


class NotInstalled(importlib.abc.MetaPathFinder):
    attempts = 0

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname == "opentelemetry" or fullname.startswith("opentelemetry."):
            NotInstalled.attempts += 1
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


sys.meta_path.insert(0, NotInstalled())

from cloudops_execution_engine import (  # noqa: E402  (after the finder, on purpose)
    ExecutionConfig,
    ExecutionEngine,
    ExecutionRequest,
    ExecutionResult,
    ShellCommand,
)


async def main() -> None:
    async with ExecutionEngine(ExecutionConfig(log_dir=Path(sys.argv[1]), workers=1)) as engine:
        request = ExecutionRequest(command=ShellCommand(command='printf "%s" "${TRACEPARENT-unset}"'))
        result = await engine.wait(await engine.execute(request), timeout=30)
    assert isinstance(result, ExecutionResult)
    loaded = sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry")
    print(
        json.dumps(
            {
                "status": str(result.status),
                "stdout": result.stdout,
                "attempts": NotInstalled.attempts,
                "loaded": loaded,
            }
        )
    )


asyncio.run(main())
