"""How `cloudops-exec plan` shows a plan: a live view on a terminal, plain lines elsewhere.

Both end with the same report: a row per command, a summary, and for each
command that failed or timed out, how it ended, the last lines it wrote to
stderr and where its whole log is. On a terminal `NO_COLOR` takes the colour
away and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, TextIO

from .cli_text import exit_label, humane_error, printable, tail, what_happened
from .events import ExecutionEvent
from .requests import ExecutionPlan, ExecutionRequest
from .results import ExecutionResult, ExecutionStatus, PlanExecutionResult

ReportRow = tuple[str, ExecutionStatus, str, str, str]
Failure = tuple[str, list[str], str]

__all__ = ["PlainProgress", "PlanDisplay", "final_report", "secrets_masked", "short"]

_WIDTH = 60
_TAIL_LINES = 5


def short(text: str, width: int = _WIDTH) -> str:
    text = printable(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"


def secrets_masked(text: str, requests: list[ExecutionRequest], secrets: list[str]) -> str:
    """`text` as the engine would write it: the requests' `secret_env` values and `secrets` as `***`.

    For what the command line says of a request itself (its command, a plan's
    description), which the engine never wrote for it.
    """
    from .actors.secrets import masker_for

    values = [*secrets, *(value for request in requests for value in request.secret_env.values())]
    masker = masker_for(tuple(values))
    return masker.mask_text(text) if masker is not None else text


class PlanDisplay(Protocol):
    """What `plan` needs of a display: an event handler that is shown while the plan runs."""

    def shown(self) -> contextlib.AbstractContextManager[None]: ...

    def begin(self) -> None:
        """The plan was submitted: its clock starts."""

    def end(self) -> None:
        """The plan has its result: its clock stops, before the engine shuts down."""

    async def on_event(self, event: ExecutionEvent) -> None: ...


class Lines(Protocol):
    """Where progress lines go: a text stream, or the command line's guard around one."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


class QueuedLines(Lines, Protocol):
    """Lines written through the command line's pump (`cli_pump`): `room` waits while too many are queued."""

    async def room(self) -> None: ...


class PlainProgress:
    """One line per thing that happens; for logs and pipes."""

    def __init__(self, plan: ExecutionPlan, out: QueuedLines) -> None:
        self.index = {request.id: i for i, request in enumerate(plan.commands)}
        self.out = out

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        yield

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass

    async def on_event(self, event: ExecutionEvent) -> None:
        if event.event_type == "progress":
            self._write(f"[{event.completed}/{event.total}] finished: {short(event.current_command or '')}")
            await self.out.room()
            return
        tag = f"#{self.index.get(event.execution_id, '?')}"
        if event.event_type == "started":
            self._write(f"{tag} started: {short(event.command)}")
        elif event.event_type in ("stdout", "stderr"):
            self._write(f"{tag} {event.event_type}: {printable(event.line)}")
        elif event.event_type == "completed":
            self._write(f"{tag} completed in {event.result.duration.total_seconds():.2f}s")
        elif event.event_type == "failed":
            self._write(f"{tag} failed: {printable(humane_error(event.error))}")
        elif event.event_type == "cancelled":
            self._write(f"{tag} cancelled")
        await self.out.room()

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()


def _failure_lines(index: int, item: ExecutionResult) -> tuple[str, list[str], str]:
    """The heading, the last output lines and the log line of one command that did not complete."""
    heading = f"#{index} {item.status.value}: {printable(what_happened(item))}"
    lines: list[str] = []
    for stream, text in (("stderr", item.stderr), ("stdout", item.stdout)):
        last = tail(text, _TAIL_LINES)
        if last:
            lines.append(f"last lines of {stream}:")
            lines.extend(f"  {line}" for line in last)
            break
    return heading, lines, f"log: {item.log_path}"


def _summary(result: PlanExecutionResult) -> str:
    return (
        f"plan {result.status.value}: {result.stats.completed} completed, {result.stats.failed} failed, "
        f"{result.stats.timeout} timed out, {result.stats.cancelled} cancelled "
        f"in {result.total_duration.total_seconds():.2f}s"
    )


def final_report(
    commands: list[str], result: PlanExecutionResult, out: TextIO, console: bool, footer: str = ""
) -> None:
    """The table, the summary and what went wrong; through Rich (colour unless NO_COLOR) or as plain text.

    `commands` are the plan's commands as text, in its order.
    """
    rows = [
        (f"#{i}", item.status, f"{item.duration.total_seconds():.2f}s", exit_label(item), short(command))
        for i, (command, item) in enumerate(zip(commands, result.results, strict=True))
    ]
    failures = [
        _failure_lines(i, item)
        for i, item in enumerate(result.results)
        if item.status in (ExecutionStatus.FAILED, ExecutionStatus.TIMEOUT)
    ]
    if console:
        from .cli_live import rich_report

        rich_report(rows, _summary(result), failures, out, footer)
        return
    out.write(f"{'':<4} {'status':<10} {'duration':>9} {'exit':>11}  command\n")
    for index, status, duration, code, command in rows:
        out.write(f"{index:<4} {status.value:<10} {duration:>9} {code:>11}  {command}\n")
    out.write(_summary(result) + "\n")
    for heading, lines, log in failures:
        out.write(f"\n{heading}\n")
        for line in lines:
            out.write(f"   {line}\n")
        out.write(f"   {log}\n")
    if footer:
        out.write(f"\n{footer}\n")
    out.flush()
