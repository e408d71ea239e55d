"""Use the models for the first time from many threads at once, in a fresh interpreter.

Prints one JSON line: what each thread got, so the test can compare it with
what a single thread gets. A model built on first use must be built once,
whoever asks first, and every thread must get the model's own validator.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from cloudops_execution_engine import ExecutionPlan, ExecutionRequest, ExecutionResult

THREADS = 16

REQUEST = {"command": {"type": "shell", "command": "echo hi"}, "timeout_ms": 5000, "env": {"A": "1"}}
PLAN = {"commands": [REQUEST, REQUEST], "strategy": {"type": "parallel", "max_concurrency": 2}}
RESULT = {
    "id": "0b6d2a1e-3c39-4b8e-9d61-0a4a5e0f2c11",
    "status": "completed",
    "exit_code": 0,
    "stdout": "hi\n",
    "stderr": "",
    "duration": {"secs": 1, "nanos": 5},
    "started_at": "2026-11-30T00:00:00.000000001Z",
    "completed_at": "2026-11-30T00:00:01.000000006Z",
    "log_path": "/tmp/x.log",
    "error": None,
}


def use() -> list[Any]:
    request = ExecutionRequest.model_validate(REQUEST)
    plan = ExecutionPlan.model_validate(PLAN)
    result = ExecutionResult.model_validate(RESULT)
    return [
        request.model_dump(mode="json", exclude={"id"}),
        plan.model_dump_json(exclude={"id"}).count("echo hi"),
        result.model_dump_json(),
    ]


def main() -> None:
    start = threading.Barrier(THREADS)
    got: list[Any] = [None] * THREADS

    def run(index: int) -> None:
        start.wait()
        try:
            got[index] = use()
        except Exception as exc:
            got[index] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"threads": got, "alone": use()}))


if __name__ == "__main__":
    main()
