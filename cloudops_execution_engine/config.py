"""`ExecutionConfig`: the seed's five settings and the additions SPEC names."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import Field, model_validator

from ._model import Model

__all__ = ["ExecutionConfig", "default_log_dir"]

MIB = 1024 * 1024


def default_log_dir() -> Path:
    return Path(tempfile.gettempdir()) / "cloudops-execution-engine"


class ExecutionConfig(Model):
    default_timeout_ms: int = Field(default=120_000, gt=0)
    max_timeout_ms: int = Field(default=600_000, gt=0)
    stream_output: bool = True
    log_dir: Path | None = None
    max_concurrent_executions: int = Field(default=10, gt=0)
    kill_grace_ms: int = Field(default=2000, ge=0)
    """Time between SIGTERM and SIGKILL when a tree is killed."""
    max_output_bytes: int = Field(default=16 * MIB, ge=0)
    """Bytes of each stream a result keeps in memory; the log file keeps everything."""
    workers: int | None = Field(default=None, gt=0)
    """Worker processes in the pool; None picks one per core, within the concurrency limit."""
    max_retained_executions: int | None = Field(default=None, gt=0)
    """Finished executions kept for queries; None keeps all. The oldest finished go first."""

    @model_validator(mode="after")
    def _default_within_max(self) -> ExecutionConfig:
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ValueError(
                f"default_timeout_ms ({self.default_timeout_ms}) exceeds "
                f"max_timeout_ms ({self.max_timeout_ms})"
            )
        return self

    def resolved_log_dir(self) -> Path:
        return self.log_dir if self.log_dir is not None else default_log_dir()

    def pool_size(self) -> int:
        if self.workers is not None:
            return self.workers
        cores = os.cpu_count() or 1
        return max(1, min(cores, self.max_concurrent_executions, 8))
