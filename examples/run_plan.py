"""Run a plan from a JSON file, printing its progress and output as it happens.

python examples/run_plan.py examples/deploy.json
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from cloudops_execution_engine import ExecutionEngine, ExecutionEvent, ExecutionPlan, PlanExecutionResult


class Printer:
    def __init__(self, plan: ExecutionPlan) -> None:
        self.index = {request.id: i for i, request in enumerate(plan.commands)}

    async def on_event(self, event: ExecutionEvent) -> None:
        if event.event_type == "progress":
            done = "#" * event.completed + "." * (event.total - event.completed)
            print(f"[{done}] {event.completed}/{event.total}  finished: {event.current_command}")
            return
        tag = f"#{self.index.get(event.execution_id, '?')}"
        if event.event_type == "started":
            print(f"{tag} started   {event.command}")
        elif event.event_type in ("stdout", "stderr"):
            print(f"{tag} {event.event_type}    {event.line}")
        elif event.event_type == "completed":
            print(f"{tag} completed in {event.result.duration.total_seconds():.2f}s")
        elif event.event_type == "failed":
            print(f"{tag} failed    {event.error}")
        elif event.event_type == "cancelled":
            print(f"{tag} cancelled")


async def main(plan: ExecutionPlan) -> int:
    print(f"plan {plan.id}: {plan.description} ({len(plan.commands)} commands)")
    async with ExecutionEngine().with_event_handler(Printer(plan)) as engine:
        result = await engine.wait(await engine.execute_plan(plan))
    assert isinstance(result, PlanExecutionResult)
    print(f"\nplan {result.status.value} in {result.total_duration.total_seconds():.2f}s")
    for i, item in enumerate(result.results):
        print(f"  #{i} {item.status.value:<9} exit={item.exit_code:<3} {item.duration.total_seconds():.2f}s")
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(ExecutionPlan.model_validate_json(Path(sys.argv[1]).read_text()))))
