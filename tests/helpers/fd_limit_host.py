"""A host under a low fd limit: runs many concurrent commands and prints how they ended.

Usage: fd_limit_host.py LOG_DIR SOFT HARD COUNT SECONDS. A separate process,
because lowering the limit (the hard one in particular) cannot be undone.
"""

from __future__ import annotations

import asyncio
import resource
import sys
from collections import Counter

from cloudops_execution_engine import ExecCommand, ExecutionConfig, ExecutionEngine, ExecutionRequest


async def main(log_dir: str, count: int, seconds: str) -> None:
    config = ExecutionConfig(log_dir=log_dir, max_concurrent_executions=count, workers=2, kill_grace_ms=500)
    async with ExecutionEngine(config) as engine:
        ids = [
            await engine.execute(ExecutionRequest(command=ExecCommand(program="sleep", args=[seconds])))
            for _ in range(count)
        ]
        results = [await engine.wait(eid, timeout=90) for eid in ids]
    outcomes = Counter(str(result.status) for result in results)
    errors = Counter(
        getattr(result, "error", None) for result in results if str(result.status) != "completed"
    )
    print(f"completed={outcomes['completed']}", f"failed={count - outcomes['completed']}")
    for error, times in errors.items():
        print(f"{times} x {error}", file=sys.stderr)


if __name__ == "__main__":
    log_dir, soft, hard, count, seconds = sys.argv[1:]
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(soft), int(hard)))
    asyncio.run(main(log_dir, int(count), seconds))
