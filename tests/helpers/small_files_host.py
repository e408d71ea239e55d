"""A host whose processes may not write files past a few kilobytes, as on a disk that fills up.

    small_files_host.py LOG_DIR

It lowers RLIMIT_FSIZE (and ignores SIGXFSZ, so that a write past it fails
with EFBIG rather than killing) before starting its engine; its workers
inherit both, so a command's log cannot grow past the limit. It runs one
command whose output is far larger, and prints one JSON line: the result's
status, error and stdout length, the log's size, and the engine's warnings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
import sys
from pathlib import Path

from cloudops_execution_engine import (
    ExecCommand,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionRequest,
    ExecutionResult,
)

LIMIT = 8192


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def main(log_dir: Path) -> None:
    kept = Kept()
    logging.getLogger("cloudops_execution_engine").addHandler(kept)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    async with ExecutionEngine(ExecutionConfig(log_dir=log_dir, workers=1)) as engine:
        big = ExecutionRequest(command=ExecCommand(program="seq", args=["20000"]))
        result = await engine.wait(await engine.execute(big), timeout=30)
        small = await engine.wait(await engine.execute(ExecutionRequest(command=ExecCommand(program="true"))))
    assert isinstance(result, ExecutionResult)
    print(
        json.dumps(
            {
                "id": str(result.id),
                "status": result.status.value,
                "error": result.error,
                "stdout_lines": len(result.stdout.splitlines()),
                "log_size": result.log_path.stat().st_size,
                "small_status": small.status.value,
                "warnings": [
                    {"message": r.getMessage(), "execution_id": getattr(r, "execution_id", None)}
                    for r in kept.records
                ],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
