"""The user-facing decorator: ``@task`` turns a function into a factory of lazy task nodes."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar, overload

from dagkube.errors import InvalidWorkflow
from dagkube.resources import parse_memory

P = ParamSpec("P")
R = TypeVar("R")

_node_counter = itertools.count()
MAX_TASK_TIMEOUT_S = 7 * 24 * 3600.0


def _check_timeout(value: object) -> float:
    """A task's timeout: seconds, more than 0 and at most a week (nan and inf refused)."""
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0 < value <= MAX_TASK_TIMEOUT_S  # False for nan
    ):
        return float(value)
    raise InvalidWorkflow(
        f"timeout={value!r} is invalid: use a number of seconds > 0 and <= "
        f"{MAX_TASK_TIMEOUT_S:g} (a week), e.g. timeout=30"
    )


@dataclass(frozen=True)
class TaskOptions:
    """Per-function options: display name, retries, and planning hints."""

    name: str
    retries: int = 0
    min_memory_mib: int | None = None
    timeout_s: float | None = None


class TaskNode:
    """A lazy call of a task function: nothing runs until the workflow does."""

    __slots__ = ("args", "function", "kwargs", "order")

    def __init__(self, function: TaskFunction[Any, Any], args: tuple, kwargs: dict) -> None:
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.order = next(_node_counter)

    def __repr__(self) -> str:
        return f"<TaskNode {self.function.options.name}(...)>"

    def __reduce__(self):
        # Reached only when a node hides inside a value we do not look into (a set, an object
        # attribute, ...): the graph would silently lose that edge, so refuse loudly.
        raise InvalidWorkflow(
            f"A task node of '{self.function.options.name}' is nested inside an unsupported "
            "container: task nodes may be passed directly or inside lists, tuples and dicts"
        )

    def __bool__(self) -> bool:
        raise InvalidWorkflow(
            f"The truth value of a task node of '{self.function.options.name}' is unknown "
            "while building the workflow: branch inside a task instead"
        )

    def __iter__(self):
        raise InvalidWorkflow(
            f"A task node of '{self.function.options.name}' cannot be iterated or unpacked "
            "while building the workflow: return one value, or split it with another task"
        )


class TaskFunction(Generic[P, R]):
    """A decorated function; calling it returns a :class:`TaskNode`."""

    def __init__(self, fn: Callable[P, R], options: TaskOptions) -> None:
        self.fn = fn
        self.options = options
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return TaskNode(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<dagkube task {self.options.name}>"


@overload
def task(fn: Callable[P, R], /) -> TaskFunction[P, R]: ...


@overload
def task(
    *,
    name: str | None = None,
    retries: int = 0,
    min_memory: str | int | None = None,
    timeout: float | None = None,
) -> Callable[[Callable[P, R]], TaskFunction[P, R]]: ...


def task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    min_memory: str | int | None = None,
    timeout: float | None = None,
) -> Any:
    """Mark a function as a dagkube task.

    ``retries`` re-runs a raising task up to N more times; ``min_memory`` (e.g. ``"1Gi"``)
    is a hint that keeps planners from placing the task on a smaller resource class;
    ``timeout`` (seconds) bounds one execution: past it the worker is stopped, whatever the
    task does, and the task runs again on a fresh worker while retries remain, else the run
    fails with ``TaskTimeout``.
    """
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise InvalidWorkflow(f"retries={retries!r} is invalid: use a whole number >= 0")
    timeout_s = _check_timeout(timeout) if timeout is not None else None
    min_memory_mib = parse_memory(min_memory) if min_memory is not None else None

    def wrap(function: Callable[..., Any]) -> TaskFunction[Any, Any]:
        if not callable(function):
            raise InvalidWorkflow(f"@task needs a function, got {function!r}")
        display = name or getattr(function, "__name__", None) or "task"
        if "#" in display:
            raise InvalidWorkflow(f"Task name {display!r} may not contain '#'")
        return TaskFunction(function, TaskOptions(display, retries, min_memory_mib, timeout_s))

    return wrap(fn) if fn is not None else wrap


def reduce_tree(items: Sequence[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Combine neighbours level by level until one item is left; returns it.

    ``items`` may be plain values or task nodes and ``combine`` a task (or any two-argument
    callable): with a task this builds a tree-shaped reduction DAG. An odd item out is carried
    up a level unchanged, so n items take exactly n - 1 combines in ceil(log2 n) levels.
    """
    level = list(items)
    if not level:
        raise InvalidWorkflow("reduce_tree() needs at least one item")
    while len(level) > 1:
        paired = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]
