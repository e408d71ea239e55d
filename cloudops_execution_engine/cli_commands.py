"""The `cloudops-exec` commands (click); `cli.main` loads this once it knows click is installed.

Each command imports what it uses when it runs, so that `run` does not load
Rich or YAML and `--help` does not start an engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

from .cli_journal import history, journal_for, journal_options, logs, show, started_engine
from .cli_output import closed_at_start, route_messages, stdout_guarded
from .cli_pump import AFTER_SIGNAL_S, Pump, Sink
from .cli_text import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_SIGNALLED,
    did_not_start,
    exit_code_for,
    ndjson_line,
    printable,
    printable_lines,
    what_happened,
)

if TYPE_CHECKING:
    from .config import ExecutionConfig
    from .engine import ExecutionEngine
    from .events import EventHandler, ExecutionEvent
    from .requests import ExecutionPlan, ExecutionRequest

__all__ = ["main"]

# The engine's own defaults, spelled out for --help without importing the models.
_DEFAULT_TIMEOUT_MS = 120_000
_DEFAULT_MAX_TIMEOUT_MS = 600_000
_DEFAULT_CONCURRENCY = 10


class _Output:
    """Our stdout or stderr, for a handler: written by the run's `Pump`; a reader that closes it ends the run.

    A pipeline's writer dies of SIGPIPE when its reader is gone (`... | head`);
    Python ignores SIGPIPE, so each write would fail again, once per line of a
    command that never stops. The first failure is told instead (`closed`), and
    what follows is dropped: the descriptor then points at /dev/null, so that
    nothing written later fails either.
    """

    def __init__(
        self, fd: int, pump: Pump, closed: Callable[[], None], failed: Callable[[OSError], None]
    ) -> None:
        self._sink = Sink(fd, closed, failed)
        self._pump = pump
        # Descriptor 1 closed as we started (`>&-`) is /dev/null now, where writes would pass.
        self._refused = closed_at_start() if fd == 1 else None
        # What the program wrote to it as text comes first (`write`).
        self._text: TextIO | None = sys.stdout if fd == 1 else sys.stderr
        # Run from Python (click's test runner, `main(args=...)`), the streams are the caller's,
        # perhaps not descriptors at all: written as they are, in turn.
        self._direct = not stdout_guarded()

    def write(self, text: str) -> None:
        if not self._sink.open:
            return
        if self._refused is not None:
            self._sink.open = False
            self._sink.failed(self._refused)
            return
        if self._direct:
            self._write_directly(text)
            return
        if self._text is not None:
            with contextlib.suppress(OSError, ValueError):  # nothing of ours is ever left in it
                self._text.flush()
        # As UTF-8 bytes: a command's output was bytes, and an ASCII-only
        # locale must neither drop what it cannot encode nor transcode the rest.
        self._pump.write(self._sink, text.encode("utf-8", "surrogateescape"))

    def _write_directly(self, text: str) -> None:
        stream = self._text
        if stream is None:
            return
        try:
            stream.write(text)
            stream.flush()
        except BrokenPipeError:
            self._sink.open = False
            self._sink.closed()
        except OSError as exc:
            self._sink.open = False
            self._sink.failed(exc)

    async def room(self) -> None:
        """Return once the reader has taken enough of what is queued (`Pump.room`)."""
        if not self._direct:
            await self._pump.room()

    def flush(self) -> None:
        """Each write is queued for the pump already."""


class _Ndjson:
    def __init__(self, out: _Output) -> None:
        self.out = out

    async def on_event(self, event: ExecutionEvent) -> None:
        self.out.write(ndjson_line(event.model_dump(mode="json")) + "\n")
        await self.out.room()


class _LiveOutput:
    """The command's own output, on our stdout and stderr, as it comes."""

    def __init__(self, stdout: _Output, stderr: _Output) -> None:
        self._stdout = stdout
        self._stderr = stderr

    async def on_event(self, event: ExecutionEvent) -> None:
        if event.event_type == "stdout":
            self._stdout.write(event.line + "\n")
            await self._stdout.room()
        elif event.event_type == "stderr":
            self._stderr.write(event.line + "\n")
            await self._stderr.room()


# Signals that end a run: its commands are cancelled, and it exits 128 + the signal. SIGHUP (the
# terminal went away) and SIGQUIT (Ctrl-\) too, which would otherwise end it before its commands.
_STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class _Interrupts:
    """An ending signal (`_STOPPING`) on the running loop becomes a future holding the signal number."""

    def __init__(self) -> None:
        self.signal: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.cannot_write: OSError | None = None
        self.pump = Pump()
        # Asked now: once a terminal has hung up, even asking whether it is one fails.
        self._terminal = _is_terminal(1)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupts]:
        loop = asyncio.get_running_loop()
        for sig in _STOPPING:
            loop.add_signal_handler(sig, self._caught, sig)
        route_messages(self._message_writer(loop))
        try:
            yield self
        finally:
            route_messages(None)
            for sig in _STOPPING:
                loop.remove_signal_handler(sig)

    def _message_writer(self, loop: asyncio.AbstractEventLoop) -> Callable[[str], None]:
        """The engine's messages onto stderr through the pump, from the loop's thread or another."""
        stderr = self.output(2)
        own = threading.get_ident()

        def write(text: str) -> None:
            if threading.get_ident() == own:
                stderr.write(text)
            else:
                with contextlib.suppress(RuntimeError):  # the loop has closed: the run is over
                    loop.call_soon_threadsafe(stderr.write, text)

        return write

    def _caught(self, sig: int) -> None:
        # A reader that stopped reading must not keep the run, or its handlers, from ending:
        # it has AFTER_SIGNAL_S to take what is written, and none after a second signal.
        self.pump.give_up_after(AFTER_SIGNAL_S)
        if not self.signal.done():
            self.signal.set_result(sig)

    def output_closed(self) -> None:
        """Our reader is gone: the run ends as SIGPIPE would end it."""
        self._caught(signal.SIGPIPE)

    def output_failed(self, exc: OSError) -> None:
        """Our stdout cannot be written: the run ends, and fails, as a coreutil's would.

        Unless it is a terminal that hung up (EIO), which ends the run as the
        hangup's signal does, whichever of the two the loop hears of first.
        """
        from .cli_output import say_cannot_write

        if exc.errno == errno.EIO and self._terminal:
            self._caught(signal.SIGHUP)
            return
        if self.cannot_write is None:
            self.cannot_write = exc
            say_cannot_write(exc)
        self._caught(0)

    def output(self, fd: int) -> _Output:
        """Descriptor 1 or 2, written through the run's pump."""
        if fd == 1:
            return _Output(fd, self.pump, self.output_closed, self.output_failed)
        # Nothing can be said when stderr fails: the command's output to it is dropped.
        return _Output(fd, self.pump, self.output_closed, lambda _exc: None)

    async def written(self) -> None:
        """Wait until what the run's handlers wrote is written; after a signal, `AFTER_SIGNAL_S` at most."""
        await self.pump.drained()
        self.pump.close()

    def early_exit_code(self) -> int:
        """The exit status of a run that a signal, or our output, ended early: whichever came first.

        A hangup, then the terminal's writes failing: 129, not the failure's 1.
        """
        sig = self.signal.result()
        return EXIT_SIGNALLED + sig if sig else EXIT_FAILED


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


async def _until_done_or_signal(engine: ExecutionEngine, entry: Any, interrupts: _Interrupts) -> Any:
    waiter: asyncio.Future[Any] = asyncio.ensure_future(engine.wait(entry))
    watched: list[asyncio.Future[Any]] = [waiter, interrupts.signal]
    await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    if interrupts.signal.done():
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        return None
    return waiter.result()


def _config(
    log_dir: Path | None,
    ray: str | None,
    *,
    timeout_ms: int | None = None,
    max_timeout_ms: int | None = None,
    allow_ms: int | None = None,
    concurrency: int | None = None,
    workers: int | None = None,
    journal: Path | None = None,
) -> ExecutionConfig:
    """The engine's settings from the options.

    A timeout given on the command line (`timeout_ms`, the default, or
    `allow_ms`, one request's own) is what the user asked for: the maximum
    rises to admit it.
    """
    from pydantic import ValidationError

    from .config import ExecutionConfig, RayConfig

    values: dict[str, Any] = {
        "log_dir": log_dir,
        "journal": journal,
        "max_timeout_ms": max(max_timeout_ms or _DEFAULT_MAX_TIMEOUT_MS, timeout_ms or 0, allow_ms or 0),
    }
    if ray is not None:
        values["ray"] = RayConfig(address=ray)
    elif workers is not None:
        values["workers"] = workers
    if timeout_ms is not None:
        values["default_timeout_ms"] = timeout_ms
    if concurrency is not None:
        values["max_concurrent_executions"] = concurrency
    try:
        return ExecutionConfig(**values)
    except ValidationError as exc:  # `--journal ''`, say, which names no file
        from .cli_validate import parse_problems

        _problems("invalid settings", parse_problems(exc, values))


def _fail(message: str, code: int = EXIT_INVALID) -> NoReturn:
    # What the message quotes (a file's fields, an error's text) may hold escape sequences.
    click.echo(f"cloudops-exec: {printable_lines(message)}", err=True)
    sys.exit(code)


def _problems(what: str, problems: list[str]) -> NoReturn:
    count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
    _fail(f"{what} ({count}):\n" + "\n".join(f"  {problem}" for problem in problems))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option("0.1.0", prog_name="cloudops-exec")
def main() -> None:
    """Run commands and plans of commands with timeouts, cancellation, logs and live output."""


_events_option = click.option(
    "--events",
    type=click.Choice(["ndjson"]),
    help="Write every event to stdout as one JSON line (the Rust crate's serde JSON).",
)
_log_dir_option = click.option(
    "--log-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where log files go.  [default: $TMPDIR/cloudops-execution-engine]",
)
_ray_option = click.option(
    "--ray",
    metavar="ADDRESS",
    help="Run on a Ray cluster: auto, HOST:PORT, ray://HOST:PORT, or local. Needs the [ray] extra.",
)
_max_timeout_option = click.option(
    "--max-timeout",
    "max_timeout_ms",
    type=click.IntRange(min=1),
    metavar="MS",
    help=(
        "The longest timeout_ms a command may ask for, in milliseconds; raise it for long steps "
        f"(3600000 is an hour).  [default: {_DEFAULT_MAX_TIMEOUT_MS}, 10 minutes]"
    ),
)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    short_help="Run one command.",
)
@click.option(
    "--timeout",
    "timeout_ms",
    type=click.IntRange(min=1),
    metavar="MS",
    help=f"Kill the command after this many milliseconds.  [default: {_DEFAULT_TIMEOUT_MS}, 2 minutes]",
)
@click.option("--env", "env", multiple=True, metavar="K=V", help="Set an environment variable.")
@click.option("--cwd", type=click.Path(path_type=Path), help="Working directory.")
@click.option("--shell", "use_shell", is_flag=True, help="Run the words as one bash command line.")
@_events_option
@_log_dir_option
@_ray_option
@journal_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    timeout_ms: int | None,
    env: tuple[str, ...],
    cwd: Path | None,
    use_shell: bool,
    events: str | None,
    log_dir: Path | None,
    ray: str | None,
    journal: Path | None,
    no_journal: bool,
    command: tuple[str, ...],
) -> None:
    """Run one command; its output is live and its exit code is ours.

    Exits as a shell would: the command's own code, 128+N when signal N killed
    it, 127 when it could not start, 124 when it timed out, and 1 when it
    failed without an exit status of its own. A reader that closes our output
    early, as head does, ends the run with 141, as SIGPIPE would.
    """
    import pydantic

    from .requests import ExecutionRequest

    variables: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--env takes KEY=VALUE, got {item!r}")
        variables[key] = value
    spec: dict[str, Any]
    if use_shell:
        spec = {"type": "shell", "command": " ".join(command)}
    else:
        spec = {"type": "exec", "program": command[0], "args": list(command[1:])}
    try:
        request = ExecutionRequest.model_validate(
            {"command": spec, "env": variables, "working_dir": cwd, "timeout_ms": timeout_ms}
        )
    except pydantic.ValidationError as exc:
        _fail(str(exc))
    # One command needs one worker; starting more only delays it.
    config = _config(log_dir, ray, allow_ms=timeout_ms, workers=1, journal=journal_for(journal, no_journal))
    sys.exit(asyncio.run(_run_one(request, events, config)))


async def _run_one(request: ExecutionRequest, events: str | None, config: ExecutionConfig) -> int:
    from .errors import ExecutionError
    from .results import ExecutionResult, ExecutionStatus

    interrupts = _Interrupts()
    handler: EventHandler
    if events == "ndjson":
        handler = _Ndjson(interrupts.output(1))
    else:
        handler = _LiveOutput(interrupts.output(1), interrupts.output(2))
    with interrupts.installed():
        try:
            engine = await started_engine(config, [handler])
            async with engine:
                await engine.execute(request)
                result = await _until_done_or_signal(engine, request.id, interrupts)
        except ExecutionError as exc:
            _fail(str(exc))
        await interrupts.written()
    # Our output may have failed, or a signal come, after the command ended, while it was written.
    if result is None or interrupts.signal.done():
        return interrupts.early_exit_code()
    assert isinstance(result, ExecutionResult)
    if result.status is not ExecutionStatus.COMPLETED and events != "ndjson":
        click.echo(f"cloudops-exec: {what_happened(result)}", err=True)
        program = request.argv()[0]
        if did_not_start(result) and " " in program:
            words = shlex.join(program.split())
            click.echo(
                f"cloudops-exec: hint: {program!r} is one word here; give each argument as its own word "
                f"(cloudops-exec run -- {words}) or use --shell",
                err=True,
            )
        click.echo(f"cloudops-exec: log: {result.log_path}", err=True)
    return exit_code_for(result)


# The most of a request or plan file read: a file past it (or an endless one, `/dev/zero`, a pipe
# that never ends) is refused rather than read into memory for ever.
MAX_FILE_BYTES = 64 * 1024 * 1024


def _load(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            _fail(f"{path} is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB, more than a request or plan")
        # JSON is UTF-8 whatever the locale says, and so are the YAML files one writes.
        text = data.decode("utf-8")
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")
    except UnicodeDecodeError as exc:
        _fail(f"{path} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}")
    try:
        return _parse(path, text)
    except RecursionError:
        _fail(f"{path} nests too deeply to be a request or a plan")


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            _fail("YAML needs PyYAML: pip install 'cloudops-execution-engine[cli]'")
        try:
            return yaml.safe_load(text)
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer of more than 4300 digits
            _fail(f"{path} is not valid YAML: {exc}")
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        _fail(f"{path} is not valid JSON: {exc}")


@main.command(short_help="Run a plan of commands (JSON or YAML).")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--timeout",
    "timeout_ms",
    type=click.IntRange(min=1),
    metavar="MS",
    help=(
        "Timeout of each command that sets no timeout_ms, in milliseconds.  "
        f"[default: {_DEFAULT_TIMEOUT_MS}, 2 minutes]"
    ),
)
@_max_timeout_option
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    metavar="N",
    help=f"Commands running at once.  [default: {_DEFAULT_CONCURRENCY}]",
)
@_events_option
@_log_dir_option
@_ray_option
@journal_options
def plan(
    file: Path,
    timeout_ms: int | None,
    max_timeout_ms: int | None,
    max_concurrency: int | None,
    events: str | None,
    log_dir: Path | None,
    ray: str | None,
    journal: Path | None,
    no_journal: bool,
) -> None:
    """Run a plan: a JSON or YAML file of commands and how to order them.

    `cloudops-exec schema plan` describes the file; `examples/` has several.
    On a terminal it shows live progress, elsewhere a line per event; both end
    with a table and, for each command that failed, its last lines of stderr
    and its log file. Exits 0 only if every command completed.
    """
    import pydantic

    from .cli_validate import parse_problems, plan_problems
    from .requests import ExecutionPlan

    data = _load(file)
    try:
        parsed = ExecutionPlan.model_validate(data)
    except pydantic.ValidationError as exc:
        _problems(f"{file} is not a valid plan", parse_problems(exc, data))
    config = _config(
        log_dir,
        ray,
        timeout_ms=timeout_ms,
        max_timeout_ms=max_timeout_ms,
        concurrency=max_concurrency,
        journal=journal_for(journal, no_journal),
    )
    # Checked before anything is drawn, so that a terminal shows the reason.
    problems = plan_problems(parsed, config, lint=False)
    if problems:
        _problems(f"{file} cannot run", problems)
    sys.exit(asyncio.run(_run_plan(parsed, events, config)))


async def _run_plan(parsed: ExecutionPlan, events: str | None, config: ExecutionConfig) -> int:
    from .cli_display import PlainProgress, PlanDisplay, final_report, secrets_masked
    from .errors import ExecutionError
    from .results import ExecutionStatus, PlanExecutionResult

    on_terminal = events is None and sys.stdout.isatty()
    interrupts = _Interrupts()
    display: PlanDisplay
    if on_terminal:
        from .cli_live import LiveProgress

        description = secrets_masked(parsed.description or "", parsed.commands, config.secrets)
        display = LiveProgress(parsed, description, interrupts.output(1).write, interrupts.pump.backlog)
    else:
        display = PlainProgress(parsed, interrupts.output(2 if events else 1))
    handlers: list[EventHandler] = [display]
    if events == "ndjson":
        handlers.append(_Ndjson(interrupts.output(1)))
    error: ExecutionError | None = None
    result: Any = None
    with interrupts.installed():
        # Started before the live view is drawn, so that what it says on the
        # way (a journal it cannot have) stays on the screen.
        try:
            engine = await started_engine(config, handlers)
        except ExecutionError as exc:
            _fail(str(exc))
        try:
            # Nothing is written while the live view is on screen but through
            # it: an error is kept and said once the view has stopped.
            with display.shown():
                try:
                    display.begin()
                    await engine.execute_plan(parsed)
                    result = await _until_done_or_signal(engine, parsed.id, interrupts)
                    if result is None:
                        await engine.cancel(parsed.id)
                        result = await engine.wait(parsed.id, timeout=60)
                    display.end()
                except ExecutionError as exc:
                    error = exc
        finally:
            await engine.shutdown()
        recorded = engine.config.journal is not None
        footer = f"details: cloudops-exec show {parsed.id}" if recorded else ""
        secrets = config.secrets
        commands = [secrets_masked(each.command.display(), [each], secrets) for each in parsed.commands]
        if error is None:
            # After the events, through the pump: a reader that stopped reading (a terminal
            # too) holds it no longer than it holds them, once a signal has come.
            report = io.StringIO()
            final_report(commands, result, report, console=on_terminal, footer=footer)
            interrupts.output(2 if events else 1).write(report.getvalue())
        await interrupts.written()
    if error is not None:
        _fail(str(error))
    assert isinstance(result, PlanExecutionResult)
    if interrupts.signal.done():
        return interrupts.early_exit_code()
    return 0 if result.status is ExecutionStatus.COMPLETED else EXIT_FAILED


@main.command(short_help="Check a request or a plan without running it.")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@_max_timeout_option
def validate(file: Path, max_timeout_ms: int | None) -> None:
    """Check a request or a plan without running it; every problem is named with its path."""
    from .cli_validate import check_document
    from .requests import ExecutionPlan

    data = _load(file)
    parsed, problems = check_document(data, _config(None, None, max_timeout_ms=max_timeout_ms))
    if problems:
        what = "plan" if isinstance(data, dict) and "commands" in data else "request"
        _problems(f"{file} is not a valid {what}", problems)
    if isinstance(parsed, ExecutionPlan):
        click.echo(f"{file}: valid plan of {len(parsed.commands)} commands ({parsed.strategy.type})")
    else:
        assert parsed is not None
        from .cli_display import secrets_masked

        shown = secrets_masked(shlex.join(parsed.argv()), [parsed], [])
        click.echo(f"{file}: valid request: {printable(shown)}")


@main.command(short_help="Print the JSON Schema of a request, plan, result or event.")
@click.argument("kind", type=click.Choice(["request", "plan", "result", "event"]))
def schema(kind: str) -> None:
    """Print the JSON Schema of a request, plan, result or event, every field described."""
    from .cli_schema import json_schema

    click.echo(json.dumps(json_schema(kind), indent=2))


main.add_command(history)
main.add_command(show)
main.add_command(logs)
