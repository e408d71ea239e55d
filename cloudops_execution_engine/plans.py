"""Validating plans and deciding which of their commands may start next.

A strategy is run by a schedule: one class per strategy behind the small
`Schedule` protocol, made by `schedule_for`. A schedule knows only indices.
The supervisor asks it which commands may start at first and how many may
run at once, tells it when a command ends, and learns which commands became
ready and which can no longer run. A strategy this module does not know is
an error in `check_plan` and `schedule_for`, never run as some other one.

All of it is linear in commands + edges: the graph keeps an in-degree per
command and a list of dependents, and each edge is looked at once when its
source ends.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol, assert_never

from .errors import InvalidCommand, InvalidPlan
from .requests import (
    DependencyGraphStrategy,
    ExecutionPlan,
    ExecutionRequest,
    ParallelStrategy,
    SerialStrategy,
    check_text,
)

__all__ = [
    "GraphSchedule",
    "ParallelSchedule",
    "Schedule",
    "SerialSchedule",
    "check_plan",
    "schedule_for",
]


def check_plan(plan: ExecutionPlan) -> None:
    """Raise `InvalidPlan` for a plan that cannot be run as written."""
    try:
        _check_plan(plan)
    except (TypeError, AttributeError, ValueError, OverflowError) as exc:
        # A plan edited in place after construction (`plan.commands.append("x")`), which no
        # validator saw: said as the constructor would have refused it.
        raise InvalidPlan(f"a field holds a value of the wrong type: {exc}") from None


def _check_plan(plan: ExecutionPlan) -> None:
    total = len(plan.commands)
    if total == 0:
        raise InvalidPlan("the plan has no commands")
    try:
        check_text(plan.description, "description")
        plan.metadata.check_text("metadata")
    except InvalidCommand as exc:
        raise InvalidPlan(exc.reason) from None
    seen: dict[object, int] = {plan.id: -1}
    for index, request in enumerate(plan.commands):
        if not isinstance(request, ExecutionRequest):
            raise InvalidPlan(f"command {index} is a {type(request).__name__}, not an ExecutionRequest")
        first = seen.setdefault(request.id, index)
        if first != index:
            where = "the plan's own id" if first < 0 else f"command {first}"
            raise InvalidPlan(f"command {index} reuses the id {request.id} of {where}")
    strategy = plan.strategy
    if isinstance(strategy, SerialStrategy):
        pass
    elif isinstance(strategy, ParallelStrategy):
        if strategy.max_concurrency is not None and strategy.max_concurrency < 1:
            raise InvalidPlan(f"max_concurrency must be at least 1, got {strategy.max_concurrency}")
    elif isinstance(strategy, DependencyGraphStrategy):
        _check_graph(strategy.dependencies, total)
    else:
        assert_never(strategy)


def _check_graph(dependencies: dict[int, list[int]], total: int) -> None:
    for node, deps in dependencies.items():
        if type(node) is not int or not isinstance(deps, list) or any(type(dep) is not int for dep in deps):
            raise InvalidPlan(
                f"dependencies must map command numbers to lists of them, got {node!r}: {deps!r}"
            )
        if not 0 <= node < total:
            raise InvalidPlan(f"dependencies name command {node}, but the plan has commands 0..{total - 1}")
        for dep in deps:
            if not 0 <= dep < total:
                raise InvalidPlan(
                    f"command {node} depends on command {dep}, but the plan has commands 0..{total - 1}"
                )
            if dep == node:
                raise InvalidPlan(f"command {node} depends on itself")
    cycle = _find_cycle(dependencies, total)
    if cycle:
        raise InvalidPlan("dependency cycle: " + " -> ".join(map(str, cycle)))


def _find_cycle(dependencies: dict[int, list[int]], total: int) -> list[int] | None:
    """One cycle as `[a, b, ..., a]` (a waits for b ...), or None; iterative, O(V + E)."""
    white, grey, black = 0, 1, 2
    colour = [white] * total
    for root in dependencies:
        if colour[root] != white:
            continue
        path: list[int] = [root]
        iters = [iter(dependencies.get(root, ()))]
        colour[root] = grey
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                iters.pop()
                continue
            if colour[nxt] == grey:
                start = path.index(nxt)
                return [*path[start:], nxt]
            if colour[nxt] == white:
                colour[nxt] = grey
                path.append(nxt)
                iters.append(iter(dependencies.get(nxt, ())))
    return None


class Schedule(Protocol):
    """What the supervisor asks of a plan's strategy; it knows commands by their index in the plan."""

    @property
    def limit(self) -> int | None:
        """At most this many of the plan's commands run at once; None when only the engine's limit holds."""

    def initial(self) -> list[int]:
        """The commands that may start at once; asked once, before anything has ended."""

    def ended(self, index: int, succeeded: bool) -> tuple[list[int], list[int]]:
        """Command `index` ended (`succeeded`: it completed); return (now ready, now never to run)."""


def schedule_for(plan: ExecutionPlan) -> Schedule:
    """The schedule that runs `plan`'s strategy; `plan` has passed `check_plan`."""
    strategy = plan.strategy
    total = len(plan.commands)
    if isinstance(strategy, SerialStrategy):
        return SerialSchedule(strategy, total)
    if isinstance(strategy, ParallelStrategy):
        return ParallelSchedule(strategy, total)
    if isinstance(strategy, DependencyGraphStrategy):
        return GraphSchedule(strategy, total)
    assert_never(strategy)


class SerialSchedule:
    """One command at a time, in order; with `stop_on_error`, one that did not complete ends the plan."""

    def __init__(self, strategy: SerialStrategy, total: int) -> None:
        self.limit: int | None = 1
        self._total = total
        self._stop_on_error = strategy.stop_on_error
        self._next = 0
        self._current = -1  # the command whose turn it is
        # Commands that ended before their turn (one cancelled on its own while it waited):
        # their turn is skipped, and their end is no failure of the command whose turn it is.
        self._skipped: set[int] = set()

    def initial(self) -> list[int]:
        self._current, self._next = 0, 1
        return [0]

    def ended(self, index: int, succeeded: bool) -> tuple[list[int], list[int]]:
        if index != self._current:
            self._skipped.add(index)
            return [], []
        skipped = self._skipped
        if not succeeded and self._stop_on_error:
            rest = [i for i in range(self._next, self._total) if i not in skipped]
            self._next = self._total
            return [], rest
        while self._next in skipped:
            self._next += 1
        if self._next >= self._total:
            return [], []
        self._current = self._next
        self._next += 1
        return [self._current], []


class ParallelSchedule:
    """Every command at once, at most `max_concurrency` of them running."""

    def __init__(self, strategy: ParallelStrategy, total: int) -> None:
        self.limit = strategy.max_concurrency
        self._total = total

    def initial(self) -> list[int]:
        return list(range(self._total))

    def ended(self, index: int, succeeded: bool) -> tuple[list[int], list[int]]:
        return [], []


class GraphSchedule:
    """A command starts once every command it depends on completed; if one did not, it never runs."""

    def __init__(self, strategy: DependencyGraphStrategy, total: int) -> None:
        self.limit: int | None = None
        self._total = total
        self._dependents: list[list[int]] = [[] for _ in range(total)]
        # Per command, how many of its dependencies have yet to complete; -1 once it never will run.
        self._waiting = [0] * total
        for node, deps in strategy.dependencies.items():
            for dep in set(deps):
                self._dependents[dep].append(node)
                self._waiting[node] += 1

    def initial(self) -> list[int]:
        return [i for i in range(self._total) if self._waiting[i] == 0]

    def ended(self, index: int, succeeded: bool) -> tuple[list[int], list[int]]:
        if not succeeded:
            return [], self._unreachable_from(index)
        ready = []
        for node in self._dependents[index]:
            self._waiting[node] -= 1
            if self._waiting[node] == 0:
                ready.append(node)
        return ready, []

    def _unreachable_from(self, index: int) -> list[int]:
        """Every transitive dependent of a command that did not complete."""
        out: list[int] = []
        queue = deque(self._dependents[index])
        while queue:
            node = queue.popleft()
            if self._waiting[node] < 0:
                continue
            self._waiting[node] = -1
            out.append(node)
            queue.extend(self._dependents[node])
        return out
