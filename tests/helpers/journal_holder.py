"""Holds a journal: an engine on it, running a process tree and a plan, until it is killed.

    journal_holder.py JOURNAL LOG_DIR

Prints "holding <pid>" once the engine has started, then, once the tree's
main process has started, a JSON line with the execution id, that process's
pid and the plan's id.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from cloudops_execution_engine import (
    ExecutionConfig,
    ExecutionEngine,
    ExecutionPlan,
    ExecutionRequest,
    SerialStrategy,
    ShellCommand,
)


async def main() -> None:
    engine = ExecutionEngine(ExecutionConfig(journal=Path(sys.argv[1]), log_dir=Path(sys.argv[2]), workers=1))
    await engine.start()
    print(f"holding {os.getpid()}", flush=True)
    request = ExecutionRequest(command=ShellCommand(command="sleep 60 & sleep 60; wait"))
    events = engine.events(request.id)
    await engine.execute(request)
    plan = ExecutionPlan(
        commands=[ExecutionRequest(command=ShellCommand(command="sleep 60"))], strategy=SerialStrategy()
    )
    await engine.execute_plan(plan)
    async for event in events:
        if event.event_type == "started":
            break
    pid = engine._supervisor.entry(request.id).pid  # type: ignore[union-attr]
    print(json.dumps({"id": str(request.id), "pid": pid, "plan": str(plan.id)}), flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
