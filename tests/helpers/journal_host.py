"""A host with a journal, killed at random moments by tests/test_journal_crash.py.

    journal_host.py JOURNAL LOG_DIR DELIVERED SUBMITTED SEED [work|check]

On start it opens the journal (recovering what the previous host left) and
prints one JSON line: how many executions the journal has pending and
running, its answer for every result in DELIVERED, and the host pids named
by "Interrupted:" errors. Then, with `work` (the default), it runs a stream
of quick and long commands and plans until it is killed; with `check` it
shuts down. (journal_zygote.py runs `main` in forked children.)

DELIVERED gets a JSON line for each result as soon as this host has been
told of it (a terminal event, or `wait()` of a plan returning); SUBMITTED the
id of each execution before it is submitted. Both are written with one
unbuffered `write` each, so what is there survives the host being killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

from cloudops_execution_engine import (
    DependencyGraphStrategy,
    ExecutionConfig,
    ExecutionEngine,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionStatus,
    ParallelStrategy,
    SerialStrategy,
    ShellCommand,
)

TERMINAL = {"completed", "failed", "cancelled"}


class Appender:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def line(self, value: Any) -> None:
        os.write(self.fd, (json.dumps(value) + "\n").encode())


def command(rng: random.Random, submitted: Appender) -> ExecutionRequest:
    text = rng.choice(
        [
            "true",
            "echo quick",
            "exit 3",
            "sleep 0.05; echo done",
            "sleep 30",
            "sleep 30 & sleep 30; wait",
        ]
    )
    request = ExecutionRequest(command=ShellCommand(command=text))
    submitted.line(str(request.id))
    return request


async def report(engine: ExecutionEngine, delivered_path: Path) -> dict[str, Any]:
    pending = await engine.list_executions(status=ExecutionStatus.PENDING)
    running = await engine.list_executions(status=ExecutionStatus.RUNNING)
    answers: dict[str, Any] = {}
    texts = await asyncio.to_thread(lambda: delivered_path.read_text() if delivered_path.exists() else "")
    if texts:
        for text in texts.splitlines():
            item = json.loads(text)
            if item["kind"] == "plan":
                answer: Any = await engine.get_plan_result(item["id"])
            else:
                answer = await engine.get_result(item["id"])
            answers[item["id"]] = answer.model_dump(mode="json")
    pids: set[int] = set()
    for summary in await engine.list_executions(status=ExecutionStatus.FAILED, limit=200):
        if summary.kind != "command":
            continue
        error = (await engine.get_result(summary.id)).error or ""
        found = re.match(r"Interrupted: .*\(pid (\d+)\)", error)
        if found:
            pids.add(int(found.group(1)))
    return {
        "host": os.getpid(),
        "pending": len(pending),
        "running": len(running),
        "answers": answers,
        "interrupted_pids": sorted(pids),
    }


async def main(args: list[str]) -> None:
    journal, log_dir, delivered_path, submitted_path, seed = args[:5]
    mode = args[5] if len(args) > 5 else "work"
    rng = random.Random(int(seed))
    delivered = Appender(delivered_path)
    submitted = Appender(submitted_path)
    engine = ExecutionEngine(
        ExecutionConfig(
            journal=Path(journal),
            log_dir=Path(log_dir),
            workers=1,
            kill_grace_ms=100,
            max_concurrent_executions=4,
        )
    )

    async def on_event(event: Any) -> None:
        if event.event_type in TERMINAL:
            result = await engine.get_result(event.execution_id)
            delivered.line(
                {"id": str(event.execution_id), "kind": "command", "result": result.model_dump(mode="json")}
            )

    engine.with_event_handler(on_event)  # type: ignore[arg-type]
    await engine.start()
    print(json.dumps(await report(engine, Path(delivered_path))), flush=True)
    if mode != "work":
        await engine.shutdown()
        return
    waits: set[asyncio.Task[None]] = set()

    async def plan_done(plan_id: UUID) -> None:
        result = await engine.wait(plan_id)
        delivered.line({"id": str(plan_id), "kind": "plan", "result": result.model_dump(mode="json")})

    while True:
        if rng.random() < 0.3:
            commands = [command(rng, submitted) for _ in range(rng.randint(2, 4))]
            strategy = rng.choice(
                [
                    SerialStrategy(stop_on_error=rng.random() < 0.5),
                    ParallelStrategy(),
                    DependencyGraphStrategy(dependencies={len(commands) - 1: [0]}),
                ]
            )
            plan = ExecutionPlan(commands=commands, strategy=strategy)
            submitted.line(str(plan.id))
            plan_id = await engine.execute_plan(plan)
            task = asyncio.get_running_loop().create_task(plan_done(plan_id))
            waits.add(task)
            task.add_done_callback(waits.discard)
        else:
            await engine.execute(command(rng, submitted))
        await asyncio.sleep(rng.uniform(0, 0.01))  # a stream of submissions, not one burst


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
