"""`cloudops-exec history`, `show` and `logs`: what earlier runs recorded in the journal.

`run` and `plan` record into the default journal
(`$XDG_STATE_HOME/cloudops-execution-engine/journal.sqlite3`) unless given
`--journal PATH` or `--no-journal`. One engine at a time may hold a journal:
a `run` that finds it held (another `run` or `plan` is going on) runs all the
same, unrecorded, and says so. `history`, `show` and `logs` read a held
journal beside its owner (`JournalView`: what it has committed), and
`logs --follow` of a command still running reads its log file as it grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeAlias, TypeVar
from uuid import UUID

import click

from .cli_display import short
from .cli_text import EXIT_FAILED, EXIT_INVALID, printable_lines

if TYPE_CHECKING:
    from .config import ExecutionConfig
    from .engine import ExecutionEngine
    from .events import EventHandler
    from .results import ExecutionResult, ExecutionStatus, ExecutionSummary, PlanExecutionResult

    Result: TypeAlias = ExecutionResult | PlanExecutionResult


class Queries(Protocol):
    """What these commands ask of a journal: an engine that owns it, or a `JournalView` beside its owner."""

    async def list_executions(
        self, *, status: ExecutionStatus | str | None = None, limit: int | None = None
    ) -> list[ExecutionSummary]: ...

    async def get_status(self, execution_id: UUID) -> ExecutionStatus: ...

    async def get_result(self, execution_id: UUID) -> ExecutionResult: ...

    async def get_plan_result(self, plan_id: UUID) -> PlanExecutionResult: ...

    def get_log_path(self, execution_id: UUID) -> Path: ...

    async def read_logs(self, execution_id: UUID) -> str: ...


__all__ = ["history", "journal_for", "journal_options", "logs", "show", "started_engine"]

_T = TypeVar("_T")
_STATUSES = ["pending", "running", "completed", "failed", "cancelled", "timeout"]
_HEADER_BYTES = 4096  # a log's header lines are at its start
_DEFAULT_JOURNAL = "$XDG_STATE_HOME/cloudops-execution-engine/journal.sqlite3"


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    # What the message quotes (a file's fields, an error's text) may hold escape sequences.
    click.echo(f"cloudops-exec: {printable_lines(message)}", err=True)
    sys.exit(code)


def journal_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--journal PATH` and `--no-journal`, for the commands that run something."""
    command = click.option("--no-journal", is_flag=True, help="Do not record this run in the journal.")(
        command
    )
    return _journal_path("Record into this journal file.")(command)


def _journal_path(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--journal",
        type=click.Path(path_type=Path, dir_okay=False),
        metavar="PATH",
        help=f"{what}  [default: {_DEFAULT_JOURNAL}]",
    )


def journal_for(journal: Path | None, no_journal: bool) -> Path | None:
    """The journal `run` and `plan` record into: `--journal`, else the default; None with `--no-journal`."""
    if no_journal:
        return None
    if journal is None:
        from .config import default_journal_path

        journal = default_journal_path()
    # The engine creates the file; the state directory may not exist yet on
    # a new machine. If it cannot be made, the engine says why and the run
    # goes on unrecorded.
    from .logfiles import make_parents

    with contextlib.suppress(OSError):
        make_parents(journal.parent)
    return journal


@contextlib.contextmanager
def _workers_born_ignoring_sigint() -> Iterator[None]:
    """SIGINT blocked while the engine starts its workers.

    Ctrl-C reaches the terminal's whole process group: a worker still
    importing would die of it with a traceback before it gets to ignore it
    itself. A blocked signal stays blocked across fork and exec, so workers
    are born blocking it, and ignore it before they unblock it (`worker_main`),
    which discards one that came meanwhile. Blocked, not ignored, here: a
    Ctrl-C during the start waits, and cancels the run once the start is
    done, where an ignored one was lost and the command ran to its end.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


async def started_engine(config: ExecutionConfig, handlers: list[EventHandler]) -> ExecutionEngine:
    """A started engine; one that cannot have its journal runs without it, and says so."""
    from .engine import ExecutionEngine
    from .errors import IoError

    engine = ExecutionEngine(config)
    for handler in handlers:
        engine.with_event_handler(handler)
    try:
        with _workers_born_ignoring_sigint():
            await engine.start()
    except IoError as exc:
        if config.journal is None:
            raise
        await engine.shutdown()
        # The run matters more than its record: a second `run` beside a long
        # `plan` (each holding the journal in turn) must not fail for it.
        click.echo(f"cloudops-exec: not recorded: {exc.reason}", err=True)
        return await started_engine(config.model_copy(update={"journal": None}), handlers)
    return engine


_journal_option = _journal_path("The journal to read.")


def _command_of(log_path: Path) -> str:
    """The command line a log file's header names; a command that never ran has no log.

    Nor has one whose log retention or a cleaner removed: the journal does not tell
    the two apart (a command cancelled before it started has a start time too).
    """
    from .errors import IoError
    from .logfiles import open_to_read

    try:
        fd = open_to_read(log_path)
    except FileNotFoundError:
        return "(no log: it did not run, or its log was removed)"
    except (OSError, IoError):
        return "(its log cannot be read)"
    try:
        head = os.read(fd, _HEADER_BYTES).decode("utf-8", "replace")
    except OSError:
        return "(its log cannot be read)"
    finally:
        os.close(fd)
    for line in head.splitlines():
        if line.startswith("# command: "):
            return line.removeprefix("# command: ")
    return ""


def _shown(engine: Queries, item: ExecutionSummary) -> str:
    """What `history` shows of an entry's command: a plan's commands are listed on their own."""
    from .errors import NotFound

    if item.kind == "plan":
        return ""
    try:
        path = engine.get_log_path(item.id)
    except NotFound:
        # Listed, then deleted by the retention of the engine that holds the journal.
        return "(removed since it was listed)"
    return _command_of(path)


def _local(moment: datetime) -> str:
    return moment.astimezone().strftime("%m-%d %H:%M:%S")


def _seconds(summary: ExecutionSummary) -> str:
    return "" if summary.duration is None else f"{summary.duration.total_seconds():.2f}s"


@click.command(short_help="List the commands and plans recorded in the journal.")
@click.option("--status", type=click.Choice(_STATUSES), help="Only those in this status.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    metavar="N",
    help="The newest N; 0 for all.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON summary per line.")
@_journal_option
def history(status: str | None, limit: int, as_json: bool, journal: Path | None) -> None:
    """The commands and plans recorded in the journal, oldest first."""

    async def summaries(engine: Queries) -> list[tuple[ExecutionSummary, str]]:
        found = await engine.list_executions(status=status, limit=limit or None)
        return [(item, _shown(engine, item)) for item in found]

    rows = _reading(journal, summaries)
    if as_json:
        for summary, _ in rows:
            click.echo(summary.model_dump_json())
        return
    if not rows:
        click.echo("nothing recorded" + (f" with status {status}" if status else ""), err=True)
        return
    table: list[tuple[str, ...]] = [
        (
            str(s.id),
            s.status.value,
            _local(s.started_at),
            _seconds(s),
            str(s.plan_id)[:8] if s.plan_id else "",
            "(plan)" if s.kind == "plan" else short(command, 60),
        )
        for s, command in rows
    ]
    heads: tuple[str, ...] = ("id", "status", "started", "duration", "plan", "command")
    widths = [max([len(head), *(len(row[i]) for row in table)]) for i, head in enumerate(heads)]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        grid = Table(box=None, padding=(0, 2, 0, 0), header_style="bold")
        for head, width in zip(heads, widths, strict=True):
            # Whole ids, to paste into `show`: on a narrow terminal the command gives way.
            grid.add_column(head, no_wrap=True, min_width=None if head == "command" else width)
        colours = {"completed": "green", "failed": "red", "timeout": "red", "cancelled": "yellow"}
        for row in table:
            cells = [escape(cell) for cell in row]
            cells[1] = f"[{colours.get(row[1], 'default')}]{cells[1]}"
            grid.add_row(*cells)
        Console(emoji=False).print(grid)
        return
    for row in [heads, *table]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _uuid(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        _fail(f"{value!r} is not an id (ids are UUIDs, as `cloudops-exec history` lists them)", EXIT_INVALID)


@click.command(short_help="Say how a recorded command or plan ended.")
@click.argument("execution_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="The result as JSON (the Rust crate's serde JSON).")
@_journal_option
def show(execution_id: str, as_json: bool, journal: Path | None) -> None:
    """How a recorded command or plan ended: status, exit, error, log file; a plan's table."""
    from .cli_display import final_report
    from .cli_text import exit_label, printable, what_happened
    from .errors import NotFound
    from .results import ExecutionStatus, PlanExecutionResult

    key = _uuid(execution_id)

    async def look(engine: Queries) -> tuple[ExecutionStatus, Result | None]:
        status = await engine.get_status(key)
        if not status.is_final:
            return status, None
        try:
            return status, await engine.get_plan_result(key)
        except NotFound:  # not a plan: a command
            return status, await engine.get_result(key)

    status, result = _reading(journal, look)
    if result is None:
        click.echo(f"{key}: {status.value}")
        return
    if as_json:
        click.echo(result.model_dump_json())
        return
    if isinstance(result, PlanExecutionResult):
        commands = [_command_of(item.log_path) for item in result.results]
        final_report(commands, result, sys.stdout, console=sys.stdout.isatty())
        return
    lines = [
        ("id", str(result.id)),
        ("command", _command_of(result.log_path)),
        ("status", result.status.value),
        ("exit", exit_label(result)),
        ("started", _local(result.started_at)),
        ("duration", f"{result.duration.total_seconds():.2f}s"),
        ("log", str(result.log_path)),
    ]
    if result.status is not ExecutionStatus.COMPLETED:
        lines.insert(4, ("ended", what_happened(result)))
    for name, value in lines:
        click.echo(f"{name + ':':<10}{printable(value)}")


@click.command(short_help="Print a recorded command's log (--follow while it runs).")
@click.argument("execution_id", metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Keep printing what the command writes until it ends.")
@click.option(
    "--log-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where its run put log files, when it gave --log-dir; used while the journal is in use.",
)
@_journal_option
def logs(execution_id: str, follow: bool, log_dir: Path | None, journal: Path | None) -> None:
    """A recorded command's log file (a plan's: each command's, one after another)."""
    from .config import default_log_dir
    from .errors import ExecutionError, NotCompleted, NotFound
    from .logfiles import copy_log

    key = _uuid(execution_id)
    if follow:
        recorded_in = journal_for(journal, False)
        # Where the journal says its run put it, unless told: `plan --log-dir X` put it in X.
        directory = log_dir or _recorded_log(recorded_in, key) or default_log_dir()
        log_file = directory / f"{key}.log"
        # Followed as a file: the running command's engine holds the journal.
        from .cli_follow import follow as follow_log

        try:
            code = follow_log(log_file, key, recorded_in)
        except KeyboardInterrupt:
            code = 130
        if code is not None:
            sys.exit(code)

    async def where(engine: Queries) -> list[tuple[Path, bool]] | str:
        """The log files to print, each with whether it may be missing; a running plan's text."""
        try:
            plan = await engine.get_plan_result(key)
        except NotFound:
            return [(engine.get_log_path(key), False)]
        except NotCompleted:
            return await engine.read_logs(key)  # what its commands have written so far
        # Those that never ran have none.
        return [(item.log_path, True) for item in plan.results]

    found = _reading(journal, where)
    if isinstance(found, str):
        click.echo(found, nl=False)
        return
    # Copied a piece at a time, as `cat` would: a log of any length, in little memory.
    out = sys.stdout.buffer
    sys.stdout.flush()
    try:
        for path, missing_ok in found:
            copy_log(path, out, missing_ok=missing_ok)
        out.flush()  # here, so that a reader that left ends it as SIGPIPE would (141)
    except ExecutionError as exc:
        out.flush()
        _fail(str(exc))


def _recorded_log(journal: Path | None, key: UUID) -> Path | None:
    """The directory of the log the journal recorded for `key`: a run given `--log-dir` put it there."""
    from .actors.journal_view import JournalView
    from .errors import ExecutionError

    if journal is None:
        return None
    try:
        view = JournalView(journal)
    except ExecutionError:
        return None  # no journal yet: the run that will record it has not started
    try:
        recorded = view.get_log_path(key)
    except ExecutionError:
        return None  # not recorded (yet): where it goes by default
    finally:
        view.close()
    return recorded.parent if recorded.name else None


def _reading(journal: Path | None, use: Callable[[Queries], Awaitable[_T]]) -> _T:
    """Open the journal with an engine, run `use` and close it; errors said plainly.

    A journal held by a running `run`, `plan` or service is read beside it, as
    last committed, through a `JournalView`.
    """
    from .actors.journal_view import JournalView
    from .config import U64_MAX, ExecutionConfig
    from .engine import ExecutionEngine
    from .errors import ExecutionError, IoError

    path = journal_for(journal, False)
    assert path is not None
    if not path.exists():
        _fail(f"no journal at {path}: nothing has been recorded there yet")

    async def main() -> _T:
        # `logs` prints a log of any length, as `cat` would: this process does nothing else.
        config = ExecutionConfig(journal=path, workers=1, max_log_read_bytes=U64_MAX)
        async with ExecutionEngine(config) as engine:
            return await use(engine)

    async def beside_its_owner() -> _T:
        async with JournalView(path) as view:
            return await use(view)

    try:
        if not _left_unfinished(path):
            # Read without taking the journal: an engine opened here would hold it while it
            # read, and a `run` started meanwhile would go unrecorded ("in use").
            return asyncio.run(beside_its_owner())
        try:
            return asyncio.run(main())  # which recovers what a dead owner left
        except IoError as exc:
            if "in use" not in exc.reason:
                raise
        return asyncio.run(beside_its_owner())
    except ExecutionError as exc:
        _fail(str(exc))


def _left_unfinished(path: Path) -> bool:
    """Whether the journal may hold what a dead owner left running, for an engine to recover.

    True when no engine holds it and a row is `pending` or `running`, and
    when whether one holds it cannot be told.
    """
    import sqlite3

    from .actors.journal import on_read_only_filesystem, open_connection
    from .cli_follow import engine_holds

    if on_read_only_filesystem(path):
        return False  # nothing can hold it, nor recover it: it is read as it is
    held = engine_holds(path)
    if held:
        return False
    if held is None:
        return True
    try:
        conn = open_connection(path, readonly=True)
    except sqlite3.Error:
        return True  # an engine says what is wrong with it
    try:
        query = "SELECT 1 FROM entries WHERE status IN ('pending', 'running') LIMIT 1"
        return conn.execute(query).fetchone() is not None
    except sqlite3.Error:
        return True
    finally:
        conn.close()
