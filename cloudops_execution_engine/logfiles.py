"""Where log files live and how their directory is made safe to write in."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from uuid import UUID

from .errors import IoError, describe_os_error

__all__ = ["log_path_for", "prepare_log_dir", "read_log"]


def log_path_for(log_dir: Path, execution_id: UUID) -> Path:
    # The name comes from a parsed UUID, never from caller text, so it cannot
    # climb out of the directory.
    return log_dir / f"{execution_id}.log"


def prepare_log_dir(log_dir: Path) -> None:
    """Create the directory owner-only, and refuse one that someone else controls."""
    try:
        log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(log_dir)
        if not stat.S_ISDIR(info.st_mode):
            raise IoError(f"log directory {log_dir} is not a directory")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise IoError(f"log directory {log_dir} belongs to another user")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(log_dir, 0o700)
    except OSError as exc:
        raise IoError(f"cannot prepare log directory: {describe_os_error(exc)}") from exc


def read_log(path: Path, missing_ok: bool = False) -> str:
    """The log's text; with `missing_ok`, a log that was never written reads as empty."""
    try:
        with path.open("rb") as handle:
            return handle.read().decode("utf-8", "replace")
    except FileNotFoundError as exc:
        if missing_ok:
            return ""
        raise IoError(f"cannot read log file: {describe_os_error(exc)}") from exc
    except OSError as exc:
        raise IoError(f"cannot read log file: {describe_os_error(exc)}") from exc
