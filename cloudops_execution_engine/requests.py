"""What callers submit: single requests, plans and their strategies."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args
from uuid import UUID, uuid4

from pydantic import BeforeValidator, Field, field_serializer

from ._model import I32, U64, FiniteF64, Model, PositiveU32, StrictBool, Usize, UsizeKeyMap
from .actors.secrets import MASK, check_secret, json_masker, mask_error, masker_for
from .commands import Command
from .config import ExecutionConfig
from .errors import InvalidCommand, InvalidWorkingDir, TimeoutTooLarge, ValidationError

__all__ = [
    "DependencyGraphStrategy",
    "ExecutionMetadata",
    "ExecutionPlan",
    "ExecutionRequest",
    "ExecutionStrategy",
    "ParallelStrategy",
    "ResourceLimits",
    "RetryPolicy",
    "SerialStrategy",
    "check_text",
]

RetryCause = Literal["failed", "timeout", "worker_lost"]
_RETRY_CAUSES: tuple[str, ...] = get_args(RetryCause)


def _default_retry_on() -> list[RetryCause]:
    return ["failed", "timeout"]


class RetryPolicy(Model):
    """Run a command again when an attempt ends in one of `retry_on`.

    The delay before attempt n+1 is `backoff_ms * backoff_multiplier**(n-1)`,
    capped at `max_backoff_ms`; with `jitter`, drawn uniformly from
    [delay/2, delay]. `worker_lost` is opt-in: the command may have partly run.
    """

    max_attempts: PositiveU32 = 3
    """Attempts in all, the first one included."""
    backoff_ms: U64 = Field(default=1000, ge=0)
    """Delay before the second attempt, in milliseconds."""
    backoff_multiplier: FiniteF64 = Field(default=2.0, ge=1.0)
    """Each later delay is the one before it times this."""
    max_backoff_ms: U64 = Field(default=60_000, ge=0)
    """The longest delay, in milliseconds."""
    jitter: StrictBool = True
    """Draw each delay uniformly from [delay/2, delay]."""
    retry_on: list[RetryCause] = Field(default_factory=_default_retry_on)
    """Which ends are retried: failed, timeout, worker_lost (its worker or node died; the command may
    have partly run)."""


class ResourceLimits(Model):
    """Kernel limits applied to the command before it runs; what it starts inherits them."""

    memory_bytes: U64 | None = Field(default=None, gt=0)
    """Address space, in bytes (RLIMIT_AS)."""
    cpu_seconds: U64 | None = Field(default=None, gt=0)
    """CPU time, in seconds (RLIMIT_CPU); SIGXCPU when exceeded."""
    open_files: U64 | None = Field(default=None, gt=0)
    """File descriptors (RLIMIT_NOFILE)."""
    processes: U64 | None = Field(default=None, gt=0)
    """Processes of the command's user (RLIMIT_NPROC)."""
    file_size_bytes: U64 | None = Field(default=None, ge=0)
    """Largest file the command may write, in bytes (RLIMIT_FSIZE); SIGXFSZ when exceeded."""
    nice: I32 | None = Field(default=None, ge=-40, le=40)
    """An increment to the scheduling priority, as nice(1)."""
    cpu_affinity: list[Usize] | None = None
    """CPU numbers the command may run on, as taskset(1)."""


class ExecutionMetadata(Model):
    source: str | None = None
    """Who or what submitted it; free text."""
    conversation_id: UUID | None = None
    """A caller's own correlation id."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Free-form labels."""

    def check_text(self, where: str) -> None:
        """`InvalidCommand` for text here that JSON cannot carry (a lone surrogate): it is written whole."""
        if self.source is not None:
            check_text(self.source, f"{where}.source")
        for key, value in self.tags.items():
            check_text(key, f"a tag name of {where}")
            check_text(value, f"{where}.tags[{key!r}]")


def _is_none(value: object) -> bool:
    return value is None


def _is_empty(value: dict[str, str]) -> bool:
    return not value


def _bytes_from_serde(value: Any) -> Any:
    # serde writes a `Vec<u8>` as an array of numbers; a JSON string stays text.
    if isinstance(value, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in value):
        try:
            return bytes(value)
        except ValueError:
            raise ValueError("stdin bytes must each be in 0..255") from None
    return value


Stdin = Annotated[str | bytes | None, BeforeValidator(_bytes_from_serde)]


def _secret_values(requests: list[ExecutionRequest]) -> list[str]:
    return [value for request in requests for value in request.secret_env.values()]


def _repr_forms(secret: str) -> tuple[str, ...]:
    """`secret` as written, and as repr() writes it inside a string: which quote repr() escapes
    depends on the whole string, so both ways (a backslash, a control character escaped too)."""
    return secret, repr(secret)[1:-1], repr("'\"" + secret)[4:-1]


def _masked(written: str, secrets: list[str], *, as_repr: bool = False, **dumped: Any) -> str:
    """`written` (JSON dumped with `dumped`'s options, or with `as_repr` a repr) with `secrets` masked.

    As it was when there are none.
    """
    if not secrets:
        return written
    if as_repr:
        masker = masker_for(tuple({form for secret in secrets for form in _repr_forms(secret)}))
        return masker.mask_text(written) if masker is not None else written
    mask = json_masker(secrets)
    if mask is None:
        return written
    return mask(written, dumped.get("indent"), bool(dumped.get("ensure_ascii", False)))


class ExecutionRequest(Model):
    id: UUID = Field(default_factory=uuid4)
    """The execution's id; a new UUID when not given."""
    command: Command
    """What to run: its type is exec, shell, script or aws_cli."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables for the command, over the engine's own environment."""
    working_dir: Path | None = None
    """The directory the command runs in; None: the host's current directory."""
    timeout_ms: U64 | None = None
    """Kill the command's process tree after this many milliseconds; None: the engine's
    default_timeout_ms (120000, 2 minutes, unless configured)."""
    metadata: ExecutionMetadata = Field(default_factory=ExecutionMetadata)
    """Free-form information about the request."""
    # The options below are left out of JSON while unset, so a request that uses
    # none of them is the same document the crate writes.
    retry: RetryPolicy | None = Field(default=None, exclude_if=_is_none)
    """Run the command again when an attempt fails or times out; None: it runs once."""
    success_exit_codes: list[I32] = Field(default_factory=lambda: [0], exclude_if=lambda v: v == [0])
    """Exactly the exit codes that count as `completed`."""
    stdin: Stdin = Field(default=None, exclude_if=_is_none)
    """Written to the command's stdin (a `str` as UTF-8), which is then closed.

    In JSON a `str` is a string and `bytes` an array of numbers, as serde
    writes a `Vec<u8>`: either reads back as what it was."""
    limits: ResourceLimits | None = Field(default=None, exclude_if=_is_none)
    """Kernel limits (memory, CPU time, open files, processes) applied before the command runs."""
    secret_env: dict[str, str] = Field(default_factory=dict, repr=False, exclude_if=_is_empty)
    """Passed like `env`; its values are masked as `***` wherever the engine writes."""
    _positional: ClassVar[tuple[str, ...]] = ("command",)

    @field_serializer("secret_env")
    def _mask_secret_env(self, value: dict[str, str]) -> dict[str, str]:
        # Written anywhere (JSON, a journal, a log line) the values are masked;
        # only the engine reads them, from the attribute.
        return dict.fromkeys(value, MASK)

    @field_serializer("stdin", when_used="json")
    def _stdin_as_serde(self, value: str | bytes | None) -> str | list[int] | None:
        return list(value) if isinstance(value, bytes) else value

    def __repr_args__(self) -> Any:
        yield from super().__repr_args__()
        if self.secret_env:
            yield "secret_env", dict.fromkeys(self.secret_env, MASK)

    # A secret_env value typed into the command line (or anywhere else in the
    # request) is masked there too, in the text and in the JSON written of it.
    def __repr__(self) -> str:
        return _masked(super().__repr__(), _secret_values([self]), as_repr=True)

    def __str__(self) -> str:  # print() and f-strings: pydantic's own, which repr() does not go through
        return _masked(super().__str__(), _secret_values([self]), as_repr=True)

    def model_dump_json(self, **kwargs: Any) -> str:
        return _masked(super().model_dump_json(**kwargs), _secret_values([self]), **kwargs)

    def validate(self, config: ExecutionConfig) -> None:  # type: ignore[override]
        """Raise the `ValidationError` that says why this request cannot run under `config`.

        Its text names no secret: a path or a reason holding one says `***` there.
        """
        try:
            try:
                self._validate(config)
            except (TypeError, AttributeError, ValueError, OverflowError) as exc:
                # A field edited in place after construction (`request.env["A"] = 1`), which
                # no validator saw: said as the constructor would have refused it.
                raise InvalidCommand(f"a field holds a value of the wrong type: {exc}") from None
        except ValidationError as exc:
            # Only text can be masked: a value edited in place may be anything (and is refused).
            secrets = [value for value in self.secret_env.values() if isinstance(value, str)]
            mask_error(exc, [*config.secrets, *secrets])
            raise

    def _validate(self, config: ExecutionConfig) -> None:
        if self.working_dir is not None:
            check_text(str(self.working_dir), "working_dir")
            if not self.working_dir.is_dir():
                raise InvalidWorkingDir(self.working_dir)
        self.command.validate(self.working_dir)
        if self.timeout_ms is not None:
            if self.timeout_ms <= 0:
                raise InvalidCommand(f"timeout_ms must be positive, got {self.timeout_ms}")
            if self.timeout_ms > config.max_timeout_ms:
                raise TimeoutTooLarge(self.timeout_ms, config.max_timeout_ms)
        for key, value in self.env.items():
            if not key or "=" in key or "\x00" in key:
                raise InvalidCommand(f"environment variable name {key!r} is not valid")
            if "\x00" in value:
                raise InvalidCommand(f"environment variable {key} contains a NUL byte")
        self._validate_options()

    def _validate_options(self) -> None:
        """The per-request options: what pydantic's field types cannot say alone."""
        for key, value in self.secret_env.items():
            if type(key) is not str or type(value) is not str:
                raise InvalidCommand(f"secret_env holds {key!r}: a name and a value must both be text")
            if not key or "=" in key or "\x00" in key:
                raise InvalidCommand(f"secret_env variable name {key!r} is not valid")
            if "\x00" in value:
                raise InvalidCommand(f"secret_env variable {key} contains a NUL byte")
            if value == MASK:
                raise InvalidCommand(
                    f"secret_env variable {key} is {MASK}: a request read back from JSON (a journal, a "
                    "file) has its secrets masked; give their values again"
                )
            try:
                check_secret(value, f"the value of secret_env variable {key}")
            except ValueError as exc:
                raise InvalidCommand(str(exc)) from None
        if not self.success_exit_codes:
            raise InvalidCommand("success_exit_codes must name at least one exit code")
        for code in self.success_exit_codes:
            if type(code) is not int:
                raise InvalidCommand(f"success_exit_codes holds {code!r}, which is not an integer")
            if not _I32_MIN <= code <= _I32_MAX:
                raise InvalidCommand(f"success_exit_codes holds {code}, which is not an i32 exit code")
        if isinstance(self.stdin, str):
            check_text(self.stdin, "stdin")
        self.metadata.check_text("metadata")
        if self.limits is not None:
            _check_limits(self.limits)
        if self.retry is not None:
            for cause in self.retry.retry_on:
                if cause not in _RETRY_CAUSES:
                    raise InvalidCommand(
                        f"retry.retry_on holds {cause!r}; it may name {', '.join(_RETRY_CAUSES)}"
                    )

    def effective_timeout_ms(self, config: ExecutionConfig) -> int:
        return self.timeout_ms if self.timeout_ms is not None else config.default_timeout_ms

    def argv(self) -> list[str]:
        return self.command.argv(self.working_dir)

    def cwd(self) -> str:
        """The absolute directory the command runs in: `working_dir`, or the host's current one.

        `InvalidWorkingDir` when that is the host's and it has been removed.
        """
        try:
            # getcwd() is absolute already; only a given directory needs making so.
            return os.getcwd() if self.working_dir is None else os.path.abspath(self.working_dir)
        except FileNotFoundError:
            raise InvalidWorkingDir(_removed_cwd()) from None


def _removed_cwd() -> str:
    """The host's removed working directory as Linux names it ("... (deleted)"), where it can."""
    try:
        return os.readlink("/proc/self/cwd")
    except OSError:
        return "the host's current directory, which has been removed"


_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_RLIMIT_MAX = 2**63 - 1  # setrlimit takes larger values only as "unlimited"
CPU_SETSIZE = 1024  # the CPUs a Linux affinity mask can name


def _check_limits(limits: ResourceLimits) -> None:
    for name in ("memory_bytes", "cpu_seconds", "open_files", "processes", "file_size_bytes"):
        value = getattr(limits, name)
        if value is not None and type(value) is not int:
            raise InvalidCommand(f"limits.{name} is {value!r}, which is not an integer")
        if value is not None and value > _RLIMIT_MAX:
            raise InvalidCommand(f"limits.{name}={value} is larger than a resource limit can be")
    if limits.cpu_affinity is not None:
        if not limits.cpu_affinity:
            raise InvalidCommand("limits.cpu_affinity must name at least one CPU")
        for cpu in limits.cpu_affinity:
            if type(cpu) is not int:
                raise InvalidCommand(f"limits.cpu_affinity holds {cpu!r}, which is not a CPU number")
            if not 0 <= cpu < CPU_SETSIZE:
                raise InvalidCommand(f"limits.cpu_affinity names CPU {cpu}, outside 0..{CPU_SETSIZE - 1}")


def check_text(text: str, what: str) -> None:
    """`InvalidCommand` naming `what` when `text` cannot be UTF-8 (a lone surrogate)."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise InvalidCommand(f"{what} is not valid Unicode text: {exc.reason} at {exc.start}") from None


class SerialStrategy(Model):
    type: Literal["serial"] = "serial"
    """Always "serial": one command after another, in order."""
    stop_on_error: StrictBool = True
    """On a failure, cancel the commands not yet started."""
    _positional: ClassVar[tuple[str, ...]] = ("stop_on_error",)


class ParallelStrategy(Model):
    type: Literal["parallel"] = "parallel"
    """Always "parallel": every command at once."""
    max_concurrency: Usize | None = None
    """Commands of this plan running at once; None: as many as the engine allows."""
    _positional: ClassVar[tuple[str, ...]] = ("max_concurrency",)


class DependencyGraphStrategy(Model):
    type: Literal["dependency_graph"] = "dependency_graph"
    """Always "dependency_graph": each command when its dependencies have completed."""
    dependencies: UsizeKeyMap = Field(default_factory=dict)
    """For a command's index (a string in JSON), the indices of the commands it waits for."""
    _positional: ClassVar[tuple[str, ...]] = ("dependencies",)


ExecutionStrategy = Annotated[
    SerialStrategy | ParallelStrategy | DependencyGraphStrategy,
    Field(discriminator="type"),
]


class ExecutionPlan(Model):
    id: UUID = Field(default_factory=uuid4)
    """The plan's id; a new UUID when not given."""
    description: str = ""
    """What the plan does, in words; the command line shows it."""
    strategy: ExecutionStrategy
    """How the commands are ordered: serial, parallel or dependency_graph."""
    commands: list[ExecutionRequest]
    """The commands, each a request; a strategy names them by index, from 0."""
    metadata: ExecutionMetadata = Field(default_factory=ExecutionMetadata)
    """Free-form information about the plan."""
    _positional: ClassVar[tuple[str, ...]] = ("commands", "strategy")

    def __repr__(self) -> str:
        return _masked(super().__repr__(), _secret_values(self.commands), as_repr=True)

    def __str__(self) -> str:
        return _masked(super().__str__(), _secret_values(self.commands), as_repr=True)

    def model_dump_json(self, **kwargs: Any) -> str:
        return _masked(super().model_dump_json(**kwargs), _secret_values(self.commands), **kwargs)
