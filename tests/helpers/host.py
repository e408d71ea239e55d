"""A host process that runs a process tree through the engine and echoes its pids.

With HOST_RAY_ADDRESS set, the tree runs on a worker actor of that Ray cluster.
"""

import asyncio
import os
import sys
from pathlib import Path

from cloudops_execution_engine import (
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionRequest,
    RayConfig,
)

TREE = Path(__file__).with_name("tree.py")


async def main() -> None:
    address = os.environ.get("HOST_RAY_ADDRESS")
    ray = RayConfig(address=address, workers=1) if address else None
    engine = ExecutionEngine(ExecutionConfig(log_dir=Path(sys.argv[1]), workers=1, ray=ray))
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
