"""A host process that runs a process tree through the engine and echoes its pids."""

import asyncio
import os
import sys
from pathlib import Path

from cloudops_execution_engine import ExecCommand, ExecutionConfig, ExecutionEngine, ExecutionRequest

TREE = Path(__file__).with_name("tree.py")


async def main() -> None:
    engine = ExecutionEngine(ExecutionConfig(log_dir=Path(sys.argv[1]), workers=1))
    async with engine:
        request = ExecutionRequest(
            command=ExecCommand(program=sys.executable, args=[str(TREE), *sys.argv[2:]])
        )
        eid = await engine.execute(request)
        print(f"host {os.getpid()}", flush=True)
        async for event in engine.events(eid):
            if event.event_type == "stdout":
                print(event.line, flush=True)


asyncio.run(main())
