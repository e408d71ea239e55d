"""The live view of a plan on a terminal, and the report after it, drawn with Rich.

Imported only when stdout is a terminal: piped runs never load Rich.

Rich draws into text, never onto the terminal: what it draws goes out as the
run's other output does, through its pump (`cli_pump`), so that a terminal
that stops reading (a frozen emulator, a stalled ssh link) holds up neither
the event loop nor the signals that end the run. The view is redrawn by the
loop ten times a second, not by Rich's thread, and a redraw is skipped while
the terminal has not taken the last: the plan's pace is never the terminal's.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO, cast
from uuid import UUID

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Table
from rich.text import Text

from .cli_display import Failure, ReportRow, short
from .events import ExecutionEvent
from .requests import ExecutionPlan
from .results import ExecutionStatus

__all__ = ["LiveProgress", "rich_report", "terminal_console"]

_RUNNING_ROWS = 10
_REDRAW_S = 0.1
# A redraw is a few kilobytes: while more than this waits for the terminal, the next is skipped.
_MOST_UNTAKEN = 16 * 1024


class _ElapsedColumn(ProgressColumn):
    """The plan's own time in tenths of a second (Rich's own column counts whole seconds)."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.elapsed or 0.0:.1f}s", style="progress.elapsed")


@dataclass
class _Running:
    command: str
    since: float
    last_line: str = ""


class _Drawn:
    """The file Rich's console writes: each piece it flushes goes to `out` (the run's pump)."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self._out = out
        self._parts: list[str] = []
        # The terminal's, which Rich asks to choose its box and bar characters.
        self.encoding = getattr(sys.stdout, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        if self._parts:
            text = "".join(self._parts)
            self._parts.clear()
            self._out(text)

    def isatty(self) -> bool:
        return True


def terminal_console(file: TextIO | _Drawn) -> Console:
    """A console drawing for our terminal into `file`: its colours and size are the terminal's.

    emoji=False: `:x:` in what a command wrote is what it wrote, not an emoji.
    """
    return Console(file=cast(TextIO, file), force_terminal=True, emoji=False)


class LiveProgress:
    """A progress bar and the commands running now with their clocks, redrawn ten times a second."""

    def __init__(
        self, plan: ExecutionPlan, description: str, out: Callable[[str], None], backlog: Callable[[], int]
    ) -> None:
        """`description`: the plan's, as it may be shown (its secrets masked); `out` writes to the
        terminal, `backlog` says how much of what it was given the terminal has not taken yet."""
        self.plan = plan
        self.index = {request.id: i for i, request in enumerate(plan.commands)}
        self.running: dict[UUID, _Running] = {}
        self._backlog = backlog
        self.console = terminal_console(_Drawn(out))
        self.progress = Progress(
            # Not markup: Rich reads emoji codes in markup whatever the console says.
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            _ElapsedColumn(),
            console=self.console,
        )
        # The clock starts when the plan does, not when the engine begins to start.
        self.task = self.progress.add_task(
            short(description or "plan", 40), total=len(plan.commands), start=False
        )
        # Rendered afresh on every refresh, so that a command's clock moves
        # while it runs without a word of output.
        self.live = Live(
            get_renderable=self._render,
            console=self.console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def _render(self) -> RenderableType:
        table = Table.grid(padding=(0, 2))
        now = time.monotonic()
        for eid, running in list(self.running.items())[:_RUNNING_ROWS]:
            table.add_row(
                f"#{self.index[eid]}",
                f"{now - running.since:5.1f}s",
                escape(short(running.command, 40)),
                f"[dim]{escape(short(running.last_line, 50))}",
            )
        return Group(self.progress, table)

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        with self.live:
            redraws = asyncio.get_running_loop().create_task(self._redraw())
            try:
                yield
            finally:
                redraws.cancel()

    async def _redraw(self) -> None:
        while True:
            await asyncio.sleep(_REDRAW_S)
            if self._backlog() <= _MOST_UNTAKEN:
                self.live.refresh()

    def begin(self) -> None:
        self.progress.start_task(self.task)

    def end(self) -> None:
        self.progress.stop_task(self.task)
        self.live.refresh()

    async def on_event(self, event: ExecutionEvent) -> None:
        if event.event_type == "started":
            self.running[event.execution_id] = _Running(event.command, time.monotonic())
        elif event.event_type in ("stdout", "stderr"):
            running = self.running.get(event.execution_id)
            if running is not None:
                running.last_line = event.line
            return
        elif event.event_type in ("completed", "failed", "cancelled"):
            self.running.pop(event.execution_id, None)
        elif event.event_type == "progress":
            self.progress.update(self.task, completed=event.completed)


_STYLE = {
    ExecutionStatus.COMPLETED: "green",
    ExecutionStatus.FAILED: "red",
    ExecutionStatus.TIMEOUT: "red",
    ExecutionStatus.CANCELLED: "yellow",
}


def rich_report(
    rows: list[ReportRow],
    summary: str,
    failures: list[Failure],
    out: TextIO,
    footer: str = "",
) -> None:
    """The final report (see `cli_display.final_report`), coloured unless NO_COLOR is set."""
    console = terminal_console(out)
    table = Table("", "status", "duration", "exit", "command")
    for index, status, duration, code, command in rows:
        style = _STYLE.get(status, "white")
        table.add_row(index, f"[{style}]{status.value}", duration, code, escape(command))
    console.print(table)
    console.print(summary, highlight=False)
    for heading, lines, log in failures:
        console.print(f"\n[bold red]{escape(heading)}", highlight=False)
        for line in lines:
            console.print(f"   {escape(line)}", highlight=False, soft_wrap=True)
        console.print(f"   [dim]{escape(log)}", highlight=False, soft_wrap=True)
    if footer:
        console.print(f"\n{escape(footer)}", highlight=False, soft_wrap=True)
