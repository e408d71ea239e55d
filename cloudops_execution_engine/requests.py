"""What callers submit: single requests, plans and their strategies."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal
from uuid import UUID, uuid4

from pydantic import Field

from ._model import Model
from .commands import Command
from .config import ExecutionConfig
from .errors import InvalidCommand, InvalidWorkingDir, TimeoutTooLarge

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
]

RetryCause = Literal["failed", "timeout", "worker_lost"]


def _default_retry_on() -> list[RetryCause]:
    return ["failed", "timeout"]


class RetryPolicy(Model):
    """Run a command again when an attempt ends in one of `retry_on`.

    The delay before attempt n+1 is `backoff_ms * backoff_multiplier**(n-1)`,
    capped at `max_backoff_ms`; with `jitter`, drawn uniformly from
    [delay/2, delay]. `worker_lost` is opt-in: the command may have partly run.
    """

    max_attempts: int = Field(default=3, ge=1)
    backoff_ms: int = Field(default=1000, ge=0)
    backoff_multiplier: float = Field(default=2.0, ge=1.0)
    max_backoff_ms: int = Field(default=60_000, ge=0)
    jitter: bool = True
    retry_on: list[RetryCause] = Field(default_factory=_default_retry_on)


class ResourceLimits(Model):
    """Kernel limits applied to the command before it runs; what it starts inherits them."""

    memory_bytes: int | None = Field(default=None, gt=0)
    """Address space (RLIMIT_AS)."""
    cpu_seconds: int | None = Field(default=None, gt=0)
    """CPU time (RLIMIT_CPU); SIGXCPU when exceeded."""
    open_files: int | None = Field(default=None, gt=0)
    """File descriptors (RLIMIT_NOFILE)."""
    processes: int | None = Field(default=None, gt=0)
    """Processes of the command's user (RLIMIT_NPROC)."""
    file_size_bytes: int | None = Field(default=None, ge=0)
    """Largest file the command may write (RLIMIT_FSIZE); SIGXFSZ when exceeded."""
    nice: int | None = Field(default=None, ge=-40, le=40)
    """An increment to the scheduling priority, as nice(1)."""
    cpu_affinity: list[int] | None = None
    """CPU numbers the command may run on, as taskset(1)."""


class ExecutionMetadata(Model):
    source: str | None = None
    conversation_id: UUID | None = None
    tags: dict[str, str] = Field(default_factory=dict)


def _is_none(value: object) -> bool:
    return value is None


def _is_empty(value: dict[str, str]) -> bool:
    return not value


class ExecutionRequest(Model):
    id: UUID = Field(default_factory=uuid4)
    command: Command
    env: dict[str, str] = Field(default_factory=dict)
    working_dir: Path | None = None
    timeout_ms: int | None = None
    metadata: ExecutionMetadata = Field(default_factory=ExecutionMetadata)
    # The options below are left out of JSON while unset, so a request that uses
    # none of them is the same document the crate writes.
    retry: RetryPolicy | None = Field(default=None, exclude_if=_is_none)
    success_exit_codes: list[int] = Field(default_factory=lambda: [0], exclude_if=lambda v: v == [0])
    """Exactly the exit codes that count as `completed`."""
    stdin: str | bytes | None = Field(default=None, exclude_if=_is_none)
    """Written to the command's stdin (a `str` as UTF-8), which is then closed."""
    limits: ResourceLimits | None = Field(default=None, exclude_if=_is_none)
    secret_env: dict[str, str] = Field(default_factory=dict, repr=False, exclude_if=_is_empty)
    """Passed like `env`; its values are masked as `***` wherever the engine writes."""
    _positional: ClassVar[tuple[str, ...]] = ("command",)

    def validate(self, config: ExecutionConfig) -> None:  # type: ignore[override]
        """Raise the `ValidationError` that says why this request cannot run under `config`."""
        if self.working_dir is not None:
            _check_text(str(self.working_dir), "working_dir")
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

    def effective_timeout_ms(self, config: ExecutionConfig) -> int:
        return self.timeout_ms if self.timeout_ms is not None else config.default_timeout_ms

    def argv(self) -> list[str]:
        return self.command.argv(self.working_dir)

    def cwd(self) -> str:
        """The absolute directory the command runs in: `working_dir`, or the host's current one."""
        # getcwd() is absolute already; only a given directory needs making so.
        return os.getcwd() if self.working_dir is None else os.path.abspath(self.working_dir)


def _check_text(text: str, what: str) -> None:
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise InvalidCommand(f"{what} is not valid Unicode text: {exc.reason} at {exc.start}") from None


class SerialStrategy(Model):
    type: Literal["serial"] = "serial"
    stop_on_error: bool = True
    _positional: ClassVar[tuple[str, ...]] = ("stop_on_error",)


class ParallelStrategy(Model):
    type: Literal["parallel"] = "parallel"
    max_concurrency: int | None = None
    _positional: ClassVar[tuple[str, ...]] = ("max_concurrency",)


class DependencyGraphStrategy(Model):
    type: Literal["dependency_graph"] = "dependency_graph"
    dependencies: dict[int, list[int]] = Field(default_factory=dict)
    _positional: ClassVar[tuple[str, ...]] = ("dependencies",)


ExecutionStrategy = Annotated[
    SerialStrategy | ParallelStrategy | DependencyGraphStrategy,
    Field(discriminator="type"),
]


class ExecutionPlan(Model):
    id: UUID = Field(default_factory=uuid4)
    description: str = ""
    strategy: ExecutionStrategy
    commands: list[ExecutionRequest]
    metadata: ExecutionMetadata = Field(default_factory=ExecutionMetadata)
    _positional: ClassVar[tuple[str, ...]] = ("commands", "strategy")
