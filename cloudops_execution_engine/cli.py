"""`cloudops-exec`: run a command or a plan from a terminal or a script.

    cloudops-exec run [--timeout MS] [--env K=V]... [--cwd DIR] [--shell] -- PROGRAM ARGS...
    cloudops-exec plan FILE            live progress on a terminal, plain lines otherwise
    cloudops-exec validate FILE        a request or a plan; every problem with its path
    cloudops-exec schema {request,plan,result,event}
    cloudops-exec history | show ID | logs [--follow] ID      what the journal recorded

`--events ndjson` makes stdout one JSON event per line (the Rust crate's serde JSON).
SIGINT and SIGTERM cancel everything, kill every process tree, and exit 130 / 143.

The script is installed with the library, but the command line needs the
`[cli]` extra: this module checks for it before loading the commands
(`cli_commands`), so that a plain install says what to install instead of
ending in a traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib.util
import logging
import os
import signal
import sys
from typing import Any, NoReturn

from .cli_output import CannotWrite, guard_stdout, reader_left, say_cannot_write
from .standard_fds import fill_closed_standard_fds

__all__ = ["main"]

_EXTRA_MODULES = ("click", "rich", "yaml")  # what the [cli] extra installs, by import name
_ENGINE_COMMANDS = ("run", "plan")
# Options after which no local worker is wanted (a Ray cluster's), or none at all.
_NO_LOCAL_WORKER = ("--ray", "-h", "--help")


def _missing_extra() -> str | None:
    for name in _EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules: absent
            found = False
        if not found:
            return name
    return None


def main(args: list[str] | None = None, prog_name: str | None = None, **extra: Any) -> None:
    """The `cloudops-exec` entry point."""
    missing = _missing_extra()
    if missing is not None:
        sys.stderr.write(
            f"cloudops-exec: the command line needs the [cli] extra ({missing} is not installed):\n"
            "  pip install 'cloudops-execution-engine[cli]'\n"
        )
        sys.exit(1)
    if args is None:
        guard_stdout()  # before anything opens a file, which could otherwise become descriptor 1
        fill_closed_standard_fds()  # and 0 and 2, for the same reason
        _say_what_the_engine_logs()
        _forget_impossible_sizes()
        signal.signal(signal.SIGINT, _interrupt.caught)
    spare = _wants_local_worker(sys.argv[1:] if args is None else args)
    try:
        if spare:
            # Booted on another core while the models below are imported (`spare_worker`).
            from .actors import spare_worker

            spare_worker.start()
        try:
            # The models' import makes a great many objects that live as long as the
            # process: collections during it find nothing to free, and later ones
            # need not look at them again.
            gc.disable()
            try:
                from .cli_commands import main as commands
            finally:
                gc.freeze()
                gc.enable()
            if _interrupt.imported():
                sys.exit(128 + signal.SIGINT)
            commands.main(args=args, prog_name=prog_name or "cloudops-exec", **extra)
        except CannotWrite as exc:
            say_cannot_write(exc)
            sys.exit(1)
        except KeyboardInterrupt:
            # Ctrl-C before the commands took over SIGINT (while importing): nothing
            # has run, and the spare worker, born blocking SIGINT, goes below.
            sys.exit(130)
        finally:
            if spare:
                spare_worker.discard()
    except SystemExit as leaving:
        if args is not None:
            raise  # called from Python, which goes on: not ours to end
        code = leaving.code
        if code == 1 and _interrupt.seen:
            code = 128 + signal.SIGINT  # click's "Aborted!" for a Ctrl-C before the run took SIGINT over
        elif code == 1 and reader_left():
            # click ends a write to a reader that left with 1; a pipeline's writer ends as SIGPIPE
            # ends it, quietly, as `run` and coreutils do.
            code = 128 + signal.SIGPIPE
        _exit_now(code)


class _EarlyInterrupt:
    """Ctrl-C before a run takes SIGINT over: while the program imports, parses, starts.

    Nothing has started that must be stopped, and the program ends with 130.
    While the models are imported it is only noted, and the program ends
    once they are: an exception raised into a class being made comes out as
    a `RuntimeError` from pydantic, a traceback. After that it is the
    `KeyboardInterrupt` it always was, which click ends as "Aborted!" and 1,
    said as 130 instead.
    """

    def __init__(self) -> None:
        self.seen = False
        self._importing = True

    def caught(self, _sig: int, _frame: object) -> None:
        self.seen = True
        if not self._importing:
            raise KeyboardInterrupt

    def imported(self) -> bool:
        """The models are imported: from now on a Ctrl-C interrupts. Whether one came meanwhile."""
        self._importing = False
        return self.seen


_interrupt = _EarlyInterrupt()


def _forget_impossible_sizes() -> None:
    """Drop a `COLUMNS` or `LINES` that no terminal has (0, -3, junk), which Rich would take as given.

    `COLUMNS=0` made every report and table zero columns wide: `plan` and `history` printed nothing.
    The terminal's own size is asked instead.
    """
    for name in ("COLUMNS", "LINES"):
        value = os.environ.get(name)
        if value is not None and not (value.strip().isdigit() and int(value) > 0):
            del os.environ[name]


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # One line a record, without a traceback: a message for the person at the terminal.
        return f"cloudops-exec: {record.getMessage()}"


def _say_what_the_engine_logs() -> None:
    """The engine's warnings and errors on stderr: a journal it cannot write, a worker that died.

    The library only logs them, to the host's logging; a command line has no
    other host, and without this a run whose records were lost said nothing.
    """
    handler = _Said(logging.WARNING)
    handler.setFormatter(_OneLine())
    logging.getLogger("cloudops_execution_engine").addHandler(handler)


class _Said(logging.Handler):
    """Each record a line on stderr, through the run's pump while one runs (`say_message`)."""

    def emit(self, record: logging.LogRecord) -> None:
        from .cli_output import say_message

        try:
            say_message(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _exit_now(status: object) -> NoReturn:
    """End the program without tearing down the interpreter.

    By now the engine has shut down: workers, commands, journal and log files
    are closed. What remains is freeing every object the models built, about
    50 ms, for a process about to end. Exit handlers still run (Ray's, an
    OpenTelemetry SDK's, logging's), and then the output is flushed.
    """
    if status is None:
        code = 0
    elif isinstance(status, int):
        code = status
    else:
        # As `sys.exit("message")` does.
        sys.stderr.write(f"{status}\n")
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
        except CannotWrite as exc:
            say_cannot_write(exc)
            code = code or 1
        except Exception:
            pass  # a reader that left (SIGPIPE's exit status says so), or no stdout at all
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def _wants_local_worker(words: list[str]) -> bool:
    """Whether the words name a command that will start an engine on this machine's workers."""
    if not words or words[0] not in _ENGINE_COMMANDS:
        return False
    options = words[1 : words.index("--")] if "--" in words else words[1:]
    return not any(word in _NO_LOCAL_WORKER or word.startswith("--ray=") for word in options)
