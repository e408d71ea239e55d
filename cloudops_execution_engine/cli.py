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

import importlib.util
import sys
from typing import Any

__all__ = ["main"]

_EXTRA_MODULES = ("click", "rich", "yaml")  # what the [cli] extra installs, by import name


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
    try:
        from .cli_commands import main as commands

        commands.main(args=args, prog_name=prog_name or "cloudops-exec", **extra)
    except KeyboardInterrupt:
        # Ctrl-C before the commands took over SIGINT (while importing): nothing has started.
        sys.exit(130)
