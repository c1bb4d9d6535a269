"""Workflow shapes for ``shapes.py``: the registry, the WfCommons shapes committed under
benchmarks/shapes/, and what a replay of one draws (scaled, noisy durations and output sizes)
and is measured against (the lower bound of those durations on W workers).

A shape is a DAG of typed tasks with a recorded runtime and output size each; any generator
that returns one can be added to :data:`SHAPES` (name -> function of the task count asked)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from wfshapes_generate import RECIPES, SHAPES_DIR

GENERATE_COMMAND = (
    ".tools/uv/bin/uv run --no-project --python python3 --with wfcommons==1.6 "
    "python benchmarks/wfshapes_generate.py --tasks {tasks} --recipes {name}"
)


@dataclass(frozen=True)
class ShapeTask:
    kind: str  # the task's type: its dagkube task name, shared by its siblings of that type
    runtime_s: float  # as recorded
    output_bytes: int  # as recorded: the total of its output files
    parents: tuple[int, ...]  # indices of earlier tasks


@dataclass(frozen=True)
class Shape:
    """A DAG of recorded tasks, in topological order."""

    name: str
    source: str
    tasks: tuple[ShapeTask, ...]

    def __post_init__(self) -> None:
        for index, task in enumerate(self.tasks):
            if task.runtime_s < 0 or task.output_bytes < 0:
                raise ValueError(
                    f"shape {self.name!r}: task {index} ({task.kind}) has runtime "
                    f"{task.runtime_s} s and output {task.output_bytes} bytes: both must be >= 0"
                )
            late = [p for p in task.parents if not 0 <= p < index]
            if late:
                raise ValueError(
                    f"shape {self.name!r}: task {index} ({task.kind}) has parents {late}: "
                    "parents must be earlier tasks (the list is in topological order)"
                )
        if not self.tasks:
            raise ValueError(f"shape {self.name!r} has no task")

    @cached_property
    def sinks(self) -> list[int]:
        """Tasks no other task reads: the workflow's outputs."""
        read = {p for task in self.tasks for p in task.parents}
        return [i for i in range(len(self.tasks)) if i not in read]

    @cached_property
    def depth(self) -> int:
        levels: list[int] = []
        for task in self.tasks:
            levels.append(1 + max((levels[p] for p in task.parents), default=0))
        return max(levels)

    @property
    def edges(self) -> int:
        return sum(len(task.parents) for task in self.tasks)

    def critical_path_s(self, durations: Sequence[float]) -> float:
        """The longest chain of ``durations`` (one per task) through the DAG."""
        finish: list[float] = []
        for task, duration in zip(self.tasks, durations, strict=True):
            finish.append(duration + max((finish[p] for p in task.parents), default=0.0))
        return max(finish)

    def lower_bound_s(self, durations: Sequence[float], workers: int) -> float:
        """No schedule on ``workers`` finishes sooner: max(critical path, work / workers)."""
        return max(self.critical_path_s(durations), sum(durations) / workers)

    def window_bound_s(self, durations: Sequence[float], workers: int) -> float:
        """A lower bound at least :meth:`lower_bound_s`, which it tightens where work waits
        behind a long chain (e.g. bwa: one index task, then a hundred alignments, then one
        merge). A task starts only after its longest chain of ancestors (its ``head``) and
        leaves room for its longest chain of descendants (its ``tail``), so for any set S of
        tasks, all of S's work is done between S's smallest head and the makespan less S's
        smallest tail: makespan >= min head + work(S) / workers + min tail. Maximized over
        the sets whose heads and tails reach a pair of thresholds (every pair: O(n^2)).
        """
        n = len(self.tasks)
        head = [0.0] * n  # longest chain ending just before the task starts
        for index, task in enumerate(self.tasks):
            head[index] = max((head[p] + durations[p] for p in task.parents), default=0.0)
        tail = [0.0] * n  # longest chain starting just after the task ends
        for index in range(n - 1, -1, -1):
            for parent in self.tasks[index].parents:
                tail[parent] = max(tail[parent], durations[index] + tail[index])
        by_tail = sorted(range(n), key=lambda i: -tail[i])
        best = self.lower_bound_s(durations, workers)
        for threshold in sorted(set(head)):
            work = 0.0
            for index in by_tail:  # the tasks of the set, tails falling
                if head[index] >= threshold:
                    work += durations[index]
                    best = max(best, threshold + work / workers + tail[index])
        return best


@dataclass(frozen=True)
class Replay:
    """A shape scaled for this machine: recorded seconds and bytes times a factor each."""

    shape: Shape
    time_scale: float
    byte_scale: float

    @classmethod
    def fitted(
        cls, shape: Shape, target_s: float, workers: int, byte_scale: float | None = None
    ) -> Replay:
        """Scale runtimes so the recorded ones' lower bound on ``workers`` is ``target_s``;
        bytes by the same factor unless ``byte_scale`` is given (the recorded ratio of data to
        computation is kept)."""
        recorded = shape.lower_bound_s([t.runtime_s for t in shape.tasks], workers)
        if recorded <= 0:
            raise ValueError(f"shape {shape.name!r}: every recorded runtime is 0")
        time_scale = target_s / recorded
        return cls(shape, time_scale, time_scale if byte_scale is None else byte_scale)

    def durations(self, seed: str, cv: float) -> list[float]:
        """Scaled runtimes, each times a log-normal factor of mean 1 and coefficient of
        variation ``cv``, drawn from a generator seeded with ``seed``."""
        rng = random.Random(seed)
        sigma = math.sqrt(math.log1p(cv * cv))
        return [
            t.runtime_s * self.time_scale * rng.lognormvariate(-sigma * sigma / 2, sigma)
            for t in self.shape.tasks
        ]

    @cached_property
    def output_sizes(self) -> list[int]:
        return [round(t.output_bytes * self.byte_scale) for t in self.shape.tasks]


def wfcommons_shape(name: str) -> Callable[[int], Shape]:
    """The committed WfCommons shape ``name`` of a task count (generated by
    wfshapes_generate.py)."""

    def load(tasks: int) -> Shape:
        path = SHAPES_DIR / f"{name}-{tasks}.json"
        if not path.exists():
            sizes = sorted(int(p.stem.rsplit("-", 1)[1]) for p in SHAPES_DIR.glob(f"{name}-*.json"))
            raise ValueError(
                f"no {name} shape of {tasks} tasks: sizes available {sizes}; generate it with "
                + GENERATE_COMMAND.format(tasks=tasks, name=name)
            )
        return read_shape(path)

    return load


def read_shape(path: Path) -> Shape:
    document = json.loads(path.read_text())
    try:
        tasks = tuple(
            ShapeTask(str(kind), float(runtime), int(size), tuple(int(p) for p in parents))
            for kind, runtime, size, parents in document["tasks"]
        )
        name, source = document["name"], document["source"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path}: not a shape file ({type(exc).__name__}: {exc}); expected "
            '{"name", "source", "tasks": [[type, runtime_s, output_bytes, [parents]], ...]}'
        ) from exc
    return Shape(name, source, tasks)


# name -> generator of that shape for a task count. Add other shapes here.
SHAPES: dict[str, Callable[[int], Shape]] = {name: wfcommons_shape(name) for name in RECIPES}
