"""Descriptors 0, 1 and 2 of a process started without them (a daemon's, a cron job's, `<&- 2>&-`).

A closed standard descriptor is the first number the next `open()` or `pipe()`
gets: a worker's protocol pipe would become its standard error, and what
anything printed there would be read as frames; a command would get a closed
standard input, or lose its standard error to close-on-exec (`_child.h`).
"""

from __future__ import annotations

import os

__all__ = ["devnull_onto", "fill_closed_standard_fds"]


def fill_closed_standard_fds() -> None:
    """Open `/dev/null` on each of 0, 1 and 2 that is closed; the others are left as they are."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # The lowest free number: this one, since those below it are open by now.
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:  # not closed after all (another thread opened it meanwhile)
                os.close(opened)


def devnull_onto(fd: int) -> None:
    """Make `fd` write to `/dev/null`: a descriptor whose reader left, or that was closed."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)
