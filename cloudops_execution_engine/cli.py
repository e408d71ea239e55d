"""`cloudops-exec`: run a command or a plan from a terminal or a script.

    cloudops-exec run [--timeout MS] [--env K=V]... [--cwd DIR] [--shell] -- PROGRAM ARGS...
    cloudops-exec plan FILE            live progress on a terminal, plain lines otherwise
    cloudops-exec validate FILE        a request or a plan; errors name the field
    cloudops-exec schema {request,plan,result,event}

`--events ndjson` makes stdout one JSON event per line (the seed's event shape).
SIGINT and SIGTERM cancel everything, kill every process tree, and exit 130 / 143.

`run` exits as a shell would: with the command's own code, 128+N when signal N
killed it, 127 when it could not be started, and 124 when it timed out (as GNU
timeout); 1 when it failed without an exit status of its own (its worker died,
or its log file could not be opened).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import click
import pydantic

from .config import ExecutionConfig, RayConfig
from .engine import ExecutionEngine
from .errors import CommandFailed, ExecutionError, SpawnFailed
from .events import ExecutionEvent
from .plans import check_plan
from .requests import ExecutionPlan, ExecutionRequest
from .results import ExecutionResult, ExecutionStatus, PlanExecutionResult

__all__ = ["main"]

EXIT_TIMEOUT = 124  # as GNU timeout
EXIT_CANNOT_RUN = 127  # as a shell for a command it cannot find
EXIT_SIGNALLED = 128  # plus the signal number, as a shell
EXIT_FAILED = 1
EXIT_INVALID = 2

# Taken from the errors themselves so that the wording is defined in one place.
_SPAWN_FAILED_PREFIX = str(SpawnFailed(""))


class _Ndjson:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    async def on_event(self, event: ExecutionEvent) -> None:
        self.out.write(event.model_dump_json() + "\n")
        self.out.flush()


class _LiveOutput:
    """The command's own output, on our stdout and stderr, as it comes."""

    async def on_event(self, event: ExecutionEvent) -> None:
        if event.event_type == "stdout":
            sys.stdout.write(event.line + "\n")
            sys.stdout.flush()
        elif event.event_type == "stderr":
            sys.stderr.write(event.line + "\n")
            sys.stderr.flush()


class _Interrupts:
    """SIGINT/SIGTERM on the running loop become a future holding the signal number."""

    def __init__(self) -> None:
        self.signal: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupts]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._caught, sig)
        try:
            yield self
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _caught(self, sig: int) -> None:
        if not self.signal.done():
            self.signal.set_result(sig)


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


def _did_not_start(result: ExecutionResult) -> bool:
    # Not `exit_code == -1`: a command killed by SIGHUP has that code too.
    return result.error is not None and result.error.startswith(_SPAWN_FAILED_PREFIX)


def _exit_code_for(result: ExecutionResult) -> int:
    if result.status is ExecutionStatus.COMPLETED:
        return 0
    if result.status is ExecutionStatus.TIMEOUT:
        return EXIT_TIMEOUT
    if _did_not_start(result):
        return EXIT_CANNOT_RUN
    if result.exit_code > 0:
        return result.exit_code
    # A negative code is a signal only when the command's own end produced it;
    # a result made up for a worker that died or a log that could not be
    # opened carries -1 as well, and naming SIGHUP for those would mislead.
    if result.exit_code < 0 and result.error == str(CommandFailed(result.exit_code)):
        return EXIT_SIGNALLED - result.exit_code
    return EXIT_FAILED


def _config(log_dir: Path | None, ray: str | None, timeout_ms: int | None = None) -> ExecutionConfig:
    values: dict[str, Any] = {"log_dir": log_dir}
    if ray is not None:
        values["ray"] = RayConfig(address=ray)
    if timeout_ms is not None:
        values["max_timeout_ms"] = max(timeout_ms, ExecutionConfig().max_timeout_ms)
    return ExecutionConfig(**values)


def _fail(message: str, code: int = EXIT_INVALID) -> None:
    click.echo(f"cloudops-exec: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="cloudops-exec")
def main() -> None:
    """Run commands and plans of commands with timeouts, cancellation, logs and live output."""


_events_option = click.option(
    "--events", type=click.Choice(["ndjson"]), help="Write every event to stdout as one JSON line."
)
_log_dir_option = click.option(
    "--log-dir", type=click.Path(path_type=Path, file_okay=False), help="Where log files go."
)
_ray_option = click.option(
    "--ray",
    metavar="ADDRESS",
    help="Run on a Ray cluster: auto, HOST:PORT, ray://HOST:PORT, or local. Needs the [ray] extra.",
)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--timeout", "timeout_ms", type=click.IntRange(min=1), help="Timeout in milliseconds.")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Set an environment variable.")
@click.option("--cwd", type=click.Path(path_type=Path), help="Working directory.")
@click.option("--shell", "use_shell", is_flag=True, help="Run the words as one bash command line.")
@_events_option
@_log_dir_option
@_ray_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    timeout_ms: int | None,
    env: tuple[str, ...],
    cwd: Path | None,
    use_shell: bool,
    events: str | None,
    log_dir: Path | None,
    ray: str | None,
    command: tuple[str, ...],
) -> None:
    """Run one command; its output is live and its exit code is ours."""
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
    sys.exit(asyncio.run(_run_one(request, events, _config(log_dir, ray, timeout_ms))))


async def _run_one(request: ExecutionRequest, events: str | None, config: ExecutionConfig) -> int:
    engine = ExecutionEngine(config)
    engine.with_event_handler(_Ndjson(sys.stdout) if events == "ndjson" else _LiveOutput())
    interrupts = _Interrupts()
    with interrupts.installed():
        try:
            async with engine:
                await engine.execute(request)
                result = await _until_done_or_signal(engine, request.id, interrupts)
        except ExecutionError as exc:
            _fail(str(exc))
    if result is None:
        return EXIT_SIGNALLED + interrupts.signal.result()
    assert isinstance(result, ExecutionResult)
    if result.status is not ExecutionStatus.COMPLETED and result.error and events != "ndjson":
        click.echo(f"cloudops-exec: {result.error}", err=True)
    return _exit_code_for(result)


def _load(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            _fail("YAML needs PyYAML: pip install pyyaml")
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            _fail(f"{path} is not valid YAML: {exc}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"{path} is not valid JSON: {exc}")


def _explain(exc: pydantic.ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


def _parse_plan(path: Path) -> ExecutionPlan:
    data = _load(path)
    try:
        return ExecutionPlan.model_validate(data)
    except pydantic.ValidationError as exc:
        _fail(f"{path} is not a valid plan:\n{_explain(exc)}")
    raise AssertionError("unreachable")


@main.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@_events_option
@_log_dir_option
@_ray_option
def plan(file: Path, events: str | None, log_dir: Path | None, ray: str | None) -> None:
    """Run a plan (the seed's JSON shape, or YAML) with live progress and a final table."""
    parsed = _parse_plan(file)
    sys.exit(asyncio.run(_run_plan(parsed, events, _config(log_dir, ray))))


async def _run_plan(parsed: ExecutionPlan, events: str | None, config: ExecutionConfig) -> int:
    from .cli_display import PlainProgress, RichProgress, final_table

    engine = ExecutionEngine(config)
    fancy = events is None and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    display = RichProgress(parsed) if fancy else PlainProgress(parsed, sys.stderr if events else sys.stdout)
    engine.with_event_handler(display)
    if events == "ndjson":
        engine.with_event_handler(_Ndjson(sys.stdout))
    interrupts = _Interrupts()
    with interrupts.installed(), display.shown():
        try:
            async with engine:
                await engine.execute_plan(parsed)
                result = await _until_done_or_signal(engine, parsed.id, interrupts)
                if result is None:
                    await engine.cancel(parsed.id)
                    result = await engine.wait(parsed.id, timeout=60)
        except ExecutionError as exc:
            _fail(str(exc))
    assert isinstance(result, PlanExecutionResult)
    final_table(parsed, result, fancy, sys.stderr if events else sys.stdout)
    if interrupts.signal.done():
        return EXIT_SIGNALLED + interrupts.signal.result()
    return 0 if result.status is ExecutionStatus.COMPLETED else 1


@main.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
def validate(file: Path) -> None:
    """Check a request or a plan without running it."""
    data = _load(file)
    is_plan = isinstance(data, dict) and "commands" in data
    model: type[pydantic.BaseModel] = ExecutionPlan if is_plan else ExecutionRequest
    try:
        parsed = model.model_validate(data)
    except pydantic.ValidationError as exc:
        _fail(f"{file} is not a valid {'plan' if is_plan else 'request'}:\n{_explain(exc)}")
    config = ExecutionConfig()
    try:
        if isinstance(parsed, ExecutionPlan):
            check_plan(parsed)
            for index, request in enumerate(parsed.commands):
                try:
                    request.validate(config)
                except ExecutionError as exc:
                    raise _Located(index, exc) from exc
        else:
            assert isinstance(parsed, ExecutionRequest)
            parsed.validate(config)
    except _Located as exc:
        _fail(f"{file}: commands.{exc.index}: {exc.error}")
    except ExecutionError as exc:
        _fail(f"{file}: {exc}")
    if isinstance(parsed, ExecutionPlan):
        click.echo(f"{file}: valid plan of {len(parsed.commands)} commands ({parsed.strategy.type})")
    else:
        assert isinstance(parsed, ExecutionRequest)
        click.echo(f"{file}: valid request: {shlex.join(parsed.argv())}")


class _Located(Exception):
    def __init__(self, index: int, error: ExecutionError) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


@main.command()
@click.argument("kind", type=click.Choice(["request", "plan", "result", "event"]))
def schema(kind: str) -> None:
    """Print the JSON Schema of a request, plan, result or event."""
    from .events import ExecutionEvent as Event

    models: dict[str, Any] = {
        "request": ExecutionRequest,
        "plan": ExecutionPlan,
        "result": ExecutionResult,
        "event": pydantic.TypeAdapter(Event),
    }
    target = models[kind]
    document = target.model_json_schema() if hasattr(target, "model_json_schema") else target.json_schema()
    click.echo(json.dumps(document, indent=2))
