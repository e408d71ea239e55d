"""What a process forked from a host does with the engines it inherited: nothing, and nothing to the parent's.

A pre-forking server (or any host calling `os.fork()`) gives its child a
copy of every engine object, and with it copies of what the parent's engine
holds open. Left alone, those copies act on the parent:

- multiprocessing's exit handler, in the child, terminates and joins every
  daemon child it has a record of, and the record is the parent's: the
  child's exit would SIGTERM the parent's workers;
- the child's copies of the pipes to the workers would keep a worker from
  seeing its host die (the end of its input), so a SIGKILLed host would leave
  its workers and their commands running as long as the child lives;
- the child's copy of the journal's lock (an `flock`, which belongs to the
  open file, not the process) would keep the journal locked after the parent
  died;
- and a call on the copy would write to the parent's workers, or wait forever
  for the parent's event loop thread, which does not exist in the child.

So each part that holds such a thing is tracked here, and in the child
`forked()` lets go of the child's copies (closing descriptors, never asking
the event loop, whose epoll instance the child shares with the parent) and
leaves the engine closed to the child. A child that wants an engine starts
one of its own.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Protocol

__all__ = ["ForkedCopy", "refusal", "track"]

logger = logging.getLogger("cloudops_execution_engine")


class ForkedCopy(Protocol):
    def forked(self) -> None:
        """In a forked child: let go of the child's copies of what the parent holds open."""


_tracked: weakref.WeakSet[ForkedCopy] = weakref.WeakSet()


def track(part: ForkedCopy) -> None:
    """Have `part.forked()` called in every process forked from this one while `part` lives."""
    _tracked.add(part)


def refusal(owner_pid: int) -> str:
    """The reason a forked child's call on an inherited engine is refused (`EngineClosed`)."""
    return f"it belongs to process {owner_pid}; a forked process starts an engine of its own"


def _in_child() -> None:
    for part in list(_tracked):
        try:
            part.forked()
        except Exception:
            # The child must live on: at worst it holds a copy a little longer.
            logger.warning("letting go of an inherited %s failed", type(part).__name__, exc_info=True)


os.register_at_fork(after_in_child=_in_child)
