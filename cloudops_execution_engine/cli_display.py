"""How `cloudops-exec plan` shows a plan: a live view on a terminal, plain lines elsewhere."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TextIO
from uuid import UUID

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .events import ExecutionEvent
from .requests import ExecutionPlan
from .results import ExecutionStatus, PlanExecutionResult

__all__ = ["PlainProgress", "RichProgress", "final_table"]

_WIDTH = 60


def _short(text: str, width: int = _WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


class PlainProgress:
    """One line per thing that happens; for logs, pipes and NO_COLOR."""

    def __init__(self, plan: ExecutionPlan, out: TextIO) -> None:
        self.index = {request.id: i for i, request in enumerate(plan.commands)}
        self.out = out

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        yield

    async def on_event(self, event: ExecutionEvent) -> None:
        if event.event_type == "progress":
            self._write(f"[{event.completed}/{event.total}] finished: {_short(event.current_command or '')}")
            return
        tag = f"#{self.index.get(event.execution_id, '?')}"
        if event.event_type == "started":
            self._write(f"{tag} started: {_short(event.command)}")
        elif event.event_type in ("stdout", "stderr"):
            self._write(f"{tag} {event.event_type}: {event.line}")
        elif event.event_type == "completed":
            self._write(f"{tag} completed in {event.result.duration.total_seconds():.2f}s")
        elif event.event_type == "failed":
            self._write(f"{tag} failed: {event.error}")
        elif event.event_type == "cancelled":
            self._write(f"{tag} cancelled")

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()


class RichProgress:
    """A progress bar and the commands running now, redrawn in place."""

    def __init__(self, plan: ExecutionPlan) -> None:
        self.plan = plan
        self.index = {request.id: i for i, request in enumerate(plan.commands)}
        self.running: dict[UUID, tuple[str, float]] = {}
        self.console = Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task(_short(plan.description or "plan", 40), total=len(plan.commands))
        self.live = Live(self._render(), console=self.console, refresh_per_second=10, transient=False)

    def _render(self) -> Group:
        table = Table.grid(padding=(0, 2))
        now = time.monotonic()
        for eid, (command, since) in list(self.running.items())[:10]:
            table.add_row(f"#{self.index[eid]}", f"{now - since:5.1f}s", _short(command))
        return Group(self.progress, table)

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        with self.live:
            yield
            self.live.update(self._render())

    async def on_event(self, event: ExecutionEvent) -> None:
        if event.event_type == "started":
            self.running[event.execution_id] = (event.command, time.monotonic())
        elif event.event_type in ("completed", "failed", "cancelled"):
            self.running.pop(event.execution_id, None)
        elif event.event_type == "progress":
            self.progress.update(self.task, completed=event.completed)
        self.live.update(self._render())


_STYLE = {
    ExecutionStatus.COMPLETED: "green",
    ExecutionStatus.FAILED: "red",
    ExecutionStatus.TIMEOUT: "red",
    ExecutionStatus.CANCELLED: "yellow",
}


def final_table(plan: ExecutionPlan, result: PlanExecutionResult, fancy: bool, out: TextIO) -> None:
    rows = []
    for i, (request, item) in enumerate(zip(plan.commands, result.results, strict=True)):
        rows.append(
            (
                f"#{i}",
                item.status,
                f"{item.duration.total_seconds():.2f}s",
                str(item.exit_code),
                _short(request.command.display()),
            )
        )
    summary = (
        f"plan {result.status.value}: {result.stats.completed} completed, {result.stats.failed} failed, "
        f"{result.stats.timeout} timed out, {result.stats.cancelled} cancelled "
        f"in {result.total_duration.total_seconds():.2f}s"
    )
    if fancy:
        table = Table("", "status", "duration", "exit", "command")
        for index, status, duration, code, command in rows:
            table.add_row(index, f"[{_STYLE.get(status, 'white')}]{status.value}", duration, code, command)
        console = Console(file=out)
        console.print(table)
        console.print(summary)
        return
    out.write(f"{'':<4} {'status':<10} {'duration':>9} {'exit':>5}  command\n")
    for index, status, duration, code, command in rows:
        out.write(f"{index:<4} {status.value:<10} {duration:>9} {code:>5}  {command}\n")
    out.write(summary + "\n")
    out.flush()
