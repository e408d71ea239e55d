"""`ExecutionConfig`: the seed's five settings and the additions SPEC names."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationInfo, field_serializer, field_validator, model_validator

from ._model import F64, U64, Model, StrictBool, Usize
from .errors import IoError

__all__ = ["ExecutionConfig", "RayConfig", "RetentionPolicy", "default_journal_path", "default_log_dir"]

MIB = 1024 * 1024
U64_MAX = 2**64 - 1  # the Rust fields are u64: a larger value cannot cross to the crate or the wire


def default_log_dir() -> Path:
    return Path(tempfile.gettempdir()) / "cloudops-execution-engine"


def default_journal_path() -> Path:
    """`$XDG_STATE_HOME/cloudops-execution-engine/journal.sqlite3`; `~/.local/state/...` when unset."""
    state = os.environ.get("XDG_STATE_HOME")
    # The XDG spec: a relative path in the variable is invalid and is ignored.
    base = Path(state) if state and os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "cloudops-execution-engine" / "journal.sqlite3"


class RayConfig(Model):
    """Run commands on the worker actors of a Ray cluster instead of local worker processes."""

    address: str = "auto"
    """`auto` (the cluster this machine belongs to), a cluster address such as `10.0.0.5:6379` or
    `ray://head:10001`, or `local` to start a cluster inside this process. If Ray is already
    initialised in this process, that connection is used and this is ignored."""
    workers: Usize | None = Field(default=None, gt=0)
    """Worker actors; None places one on each alive node. More than the nodes are spread round-robin."""
    num_cpus: F64 = Field(default=0.0, ge=0)
    """CPUs each worker actor reserves. The default, none, never holds back other Ray work."""
    namespace: str | None = None
    """The Ray namespace to connect in; None: Ray's own."""
    runtime_env: dict[str, Any] | None = None
    """Passed to `ray.init` when this engine connects; e.g. `{"py_modules": [...]}` on nodes
    that do not have this package installed."""


class RetentionPolicy(Model):
    """What the engine deletes, oldest first, from the journal and from `log_dir` (`<uuid>.log` only).

    Age counts from an execution's end (a log file's modification time where
    nothing else is known); `max_log_bytes` is the total size of those files;
    `max_executions` counts finished executions. A running or pending
    execution's log is never deleted.
    """

    max_age_s: F64 | None = Field(default=None, gt=0)
    max_executions: Usize | None = Field(default=None, ge=0)
    max_log_bytes: U64 | None = Field(default=None, ge=0)


class ExecutionConfig(Model):
    # A refused setting's error would quote the input, secrets and all. Fields are set one at a
    # time unchecked, as a host may pass through states that are not valid (the default raised
    # before the maximum); an engine checks the whole config when made (`engine._own_copy`).
    model_config = ConfigDict(
        **{**Model.model_config, "validate_assignment": False}, hide_input_in_errors=True
    )

    default_timeout_ms: U64 = Field(default=120_000, gt=0, le=U64_MAX)
    """Timeout of a request that sets none, in milliseconds."""
    max_timeout_ms: U64 = Field(default=600_000, gt=0, le=U64_MAX)
    """The largest timeout_ms a request may set, in milliseconds."""
    stream_output: StrictBool = True
    """Emit each line of output as a stdout or stderr event."""
    log_dir: Path | None = None
    """Where log files go; None: $TMPDIR/cloudops-execution-engine."""
    max_concurrent_executions: Usize = Field(default=10, gt=0)
    """Commands running at once, across all plans."""
    kill_grace_ms: U64 = Field(default=2000, ge=0)
    """Time between SIGTERM and SIGKILL when a tree is killed."""
    max_output_bytes: Usize = Field(default=16 * MIB, ge=0)
    """Bytes of each stream a result keeps in memory; the log file keeps everything."""
    max_log_read_bytes: Usize = Field(default=64 * MIB, ge=0)
    """The most `read_logs` reads into memory (a plan: all its logs together); more is `IoError`."""
    workers: Usize | None = Field(default=None, gt=0)
    """Worker processes in the pool; None picks one per core, within the concurrency limit."""
    max_retained_executions: Usize | None = Field(default=None, gt=0)
    """Finished executions kept for queries; None keeps all. The oldest finished go first."""
    ray: RayConfig | None = None
    """None runs commands on this machine's worker processes; a `RayConfig` runs them on a Ray cluster."""
    journal: Path | None = None
    """A SQLite file recording every execution and plan, so that history survives the host."""
    retention: RetentionPolicy | None = None
    """What to delete from the journal and `log_dir`, at start and at least once a minute."""
    secrets: list[str] = Field(default_factory=list, repr=False)
    """Values masked as `***` wherever the engine writes or emits output."""

    @field_validator("journal", "log_dir", mode="before")
    @classmethod
    def _not_empty(cls, value: Any, info: ValidationInfo) -> Any:
        # "" would become Path("."): the working directory, wherever the host happens to be.
        if isinstance(value, str | bytes) and not value.strip():
            raise ValueError(f"{info.field_name} must not be empty (None means the default)")
        if isinstance(value, str | bytes | os.PathLike) and "\0" in os.fsdecode(value):
            # No system call takes such a name: every use would fail with a bare ValueError.
            raise ValueError(f"{info.field_name} must not contain a NUL character")
        return value

    @field_validator("journal")
    @classmethod
    def _a_file(cls, journal: Path | None) -> Path | None:
        if journal is not None and journal.name in ("", ".."):
            raise ValueError(f"journal must name a file, not {str(journal)!r}")
        return journal

    @field_validator("secrets")
    @classmethod
    def _maskable(cls, secrets: list[str]) -> list[str]:
        from .actors.secrets import check_secret  # the engine's parts import this module

        for index, value in enumerate(secrets):
            check_secret(value, f"secrets[{index}]")
        return secrets

    @field_serializer("secrets")
    def _masked(self, secrets: list[str]) -> list[str]:
        # A dumped config (a log line, a saved setting) must not carry them in clear.
        return ["***"] * len(secrets)

    @model_validator(mode="after")
    def _default_within_max(self) -> ExecutionConfig:
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ValueError(
                f"default_timeout_ms ({self.default_timeout_ms}) exceeds "
                f"max_timeout_ms ({self.max_timeout_ms})"
            )
        return self

    def resolved_log_dir(self) -> Path:
        """`log_dir` (or the default), `~` expanded, absolute: a relative one is the host's directory's, now.

        Resolved in the host, once per engine: a worker (or a Ray node) has a
        working directory of its own, and the host may change its own later.
        """
        log_dir = self.log_dir if self.log_dir is not None else default_log_dir()
        # As the journal's path: "~/logs" is in the home directory, not a directory named "~".
        log_dir = Path(os.path.expanduser(log_dir))
        if log_dir.is_absolute():
            return log_dir
        try:
            return Path(os.path.abspath(log_dir))
        except FileNotFoundError:
            raise IoError(
                f"log_dir {str(log_dir)!r} is relative, and the working directory it would be "
                "relative to has been removed"
            ) from None

    def pool_size(self) -> int:
        if self.workers is not None:
            return self.workers
        cores = os.cpu_count() or 1
        return max(1, min(cores, self.max_concurrent_executions, 8))
