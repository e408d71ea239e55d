"""Validating plans and deciding which of their commands may start next.

A `PlanSchedule` knows only indices. The supervisor tells it when a command
ends and asks which commands became ready and which can no longer run. All
of it is linear in commands + edges: the graph keeps an in-degree per command
and a list of dependents, and each edge is looked at once when its source ends.
"""

from __future__ import annotations

from collections import deque

from .errors import InvalidPlan
from .requests import (
    DependencyGraphStrategy,
    ExecutionPlan,
    ParallelStrategy,
    SerialStrategy,
)

__all__ = ["PlanSchedule", "check_plan"]


def check_plan(plan: ExecutionPlan) -> None:
    """Raise `InvalidPlan` for a plan that cannot be run as written."""
    total = len(plan.commands)
    if total == 0:
        raise InvalidPlan("the plan has no commands")
    seen: dict[object, int] = {plan.id: -1}
    for index, request in enumerate(plan.commands):
        first = seen.setdefault(request.id, index)
        if first != index:
            where = "the plan's own id" if first < 0 else f"command {first}"
            raise InvalidPlan(f"command {index} reuses the id {request.id} of {where}")
    strategy = plan.strategy
    if isinstance(strategy, ParallelStrategy):
        if strategy.max_concurrency is not None and strategy.max_concurrency < 1:
            raise InvalidPlan(f"max_concurrency must be at least 1, got {strategy.max_concurrency}")
    elif isinstance(strategy, DependencyGraphStrategy):
        _check_graph(strategy.dependencies, total)


def _check_graph(dependencies: dict[int, list[int]], total: int) -> None:
    for node, deps in dependencies.items():
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


class PlanSchedule:
    """Which commands of a plan may start, given which have ended and how."""

    def __init__(self, plan: ExecutionPlan) -> None:
        self.total = len(plan.commands)
        self.strategy = plan.strategy
        self.limit: int | None = None
        self._next_serial = 0
        self._dependents: list[list[int]] = []
        self._waiting: list[int] = []
        if isinstance(self.strategy, ParallelStrategy):
            self.limit = self.strategy.max_concurrency
        elif isinstance(self.strategy, SerialStrategy):
            self.limit = 1
        elif isinstance(self.strategy, DependencyGraphStrategy):
            self._dependents = [[] for _ in range(self.total)]
            self._waiting = [0] * self.total
            for node, deps in self.strategy.dependencies.items():
                for dep in set(deps):
                    self._dependents[dep].append(node)
                    self._waiting[node] += 1

    def initial(self) -> list[int]:
        if isinstance(self.strategy, SerialStrategy):
            self._next_serial = 1
            return [0]
        if isinstance(self.strategy, DependencyGraphStrategy):
            return [i for i in range(self.total) if self._waiting[i] == 0]
        return list(range(self.total))

    def ended(self, index: int, succeeded: bool) -> tuple[list[int], list[int]]:
        """Command `index` ended; return (now ready, now never to run)."""
        if isinstance(self.strategy, SerialStrategy):
            if self._next_serial >= self.total:
                return [], []
            if not succeeded and self.strategy.stop_on_error:
                rest = list(range(self._next_serial, self.total))
                self._next_serial = self.total
                return [], rest
            nxt = self._next_serial
            self._next_serial += 1
            return [nxt], []
        if isinstance(self.strategy, DependencyGraphStrategy):
            if succeeded:
                ready = []
                for node in self._dependents[index]:
                    self._waiting[node] -= 1
                    if self._waiting[node] == 0:
                        ready.append(node)
                return ready, []
            return [], self._unreachable_from(index)
        return [], []

    def _unreachable_from(self, index: int) -> list[int]:
        """Every transitive dependent of a command that did not complete."""
        out: list[int] = []
        queue = deque(self._dependents[index])
        while queue:
            node = queue.popleft()
            if self._waiting[node] < 0:
                continue
            self._waiting[node] = -1  # marks it as never to run
            out.append(node)
            queue.extend(self._dependents[node])
        return out
