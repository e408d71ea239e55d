"""Holds a journal: an engine on it, running a process tree and a plan, until it is killed.

    journal_holder.py JOURNAL LOG_DIR [resumed | "resumed twice"]

Prints "holding <pid>" once the engine has started, then, once the tree's
main process has started and all of it is in the journal, a JSON line with
the execution id, that process's pid and the plan's id. With `resumed`, the
plan is the resumption of one that failed (its id is `resumed_from` in the
line), whose second command runs on; with `resumed twice`, that plan is
resumed a second time too (`again`).
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
    async for event in events:
        if event.event_type == "started":
            break
    started = {"id": str(request.id), "pid": engine._supervisor.entry(request.id).pid}  # type: ignore[union-attr]
    if sys.argv[3:] in (["resumed"], ["resumed twice"]):
        # A plan that failed, resumed: its second command fails the first time and runs on the second.
        mark = Path(sys.argv[2]) / "resumed.mark"
        again = f"if [ -e '{mark}' ]; then exec sleep 60; else touch '{mark}'; exit 1; fi"
        first = ExecutionPlan(
            commands=[
                ExecutionRequest(command=ShellCommand(command="true")),
                ExecutionRequest(command=ShellCommand(command=again)),
            ],
            strategy=SerialStrategy(),
        )
        await engine.wait(await engine.execute_plan(first), timeout=30)
        started["plan"] = str(await engine.resume_plan(first.id))
        started["resumed_from"] = str(first.id)
        if sys.argv[3] == "resumed twice":
            # Resumed again while the first resumption runs: both reuse the command that completed.
            started["again"] = str(await engine.resume_plan(first.id))
    else:
        plan = ExecutionPlan(
            commands=[ExecutionRequest(command=ShellCommand(command="sleep 60"))], strategy=SerialStrategy()
        )
        started["plan"] = str(await engine.execute_plan(plan))
    # Records are durable in the order they were made: once this one's end is, the plans' are too.
    await engine.wait(
        await engine.execute(ExecutionRequest(command=ShellCommand(command="true"))), timeout=30
    )
    print(json.dumps(started), flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
