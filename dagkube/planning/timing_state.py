"""The timing model's data (:mod:`dagkube.planning.timing`): what it predicts, per task,
per worker activation and in total, and the simulated workers it tracks on the way."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dagkube.dag import DagSpec
from dagkube.resources import cpu_for_memory


@dataclass(slots=True)
class TaskTiming:
    start_s: float = 0.0  # the worker began the task (inputs not yet local)
    exec_start_s: float = 0.0
    end_s: float = 0.0  # execution ended
    complete_s: float = 0.0  # output uploaded (if needed) and dependencies counted
    download_s: float = 0.0  # fetching inputs in the foreground (pre-loads not counted)
    upload_s: float = 0.0  # storing the output, when it must be stored
    worker: int = -1  # simulated physical worker
    output_bytes: int = 0  # predicted size of its output
    trigger: str | None = None  # the task whose completion let this one start (critical path)


@dataclass(slots=True)
class WorkerActivity:
    """One simulated worker activation: spawn (cold) or take (warm) until it finished."""

    worker: int
    logical_id: str | None
    memory_mib: int
    cold: bool
    start_s: float
    end_s: float = 0.0
    tasks: list[str] = field(default_factory=list)
    prewarmed: bool = False  # spawned ahead of demand by a pre-warm request
    queued_s: float = 0.0  # its invocation was queued
    ready_s: float = 0.0  # the worker began working on it (after start-up)


@dataclass
class Timing:
    tasks: dict[str, TaskTiming]
    activities: list[WorkerActivity]
    makespan_s: float
    gb_s: float
    cpu_s: float
    critical_path: list[str]
    longest_first: bool = False  # the sources were queued the longest path first


@dataclass(slots=True, eq=False)
class SimWorker:
    """A physical worker as the simulation tracks it."""

    number: int
    memory_mib: int
    logical: str | None = None
    activity: WorkerActivity | None = None
    ready: deque = field(default_factory=deque)
    remaining: set = field(default_factory=set)
    running: bool = False
    waiting: bool = False
    idle_since: float | None = None
    spawned_s: float | None = None  # spawned and not used yet (None for warm-pool workers)
    prewarmed: bool = False  # spawned by a pre-warm request
    # Values it holds for the run (the runtime keeps them): outputs it produced or fetched,
    # and constants ("const:<key>"); a later task needs none of them fetched again.
    held: set = field(default_factory=set)


def summarize(
    dag: DagSpec,
    tasks: dict[str, TaskTiming],
    activities: list[WorkerActivity],
    makespan_s: float,
    memory_per_cpu_mib: int,
    max_cpu: float,
) -> Timing:
    """The totals of a simulated run: GB-s and CPU-s of the worker activations, and the
    critical path back from the task that completes last."""
    gb_s = cpu_s = 0.0
    for activity in activities:
        seconds = activity.end_s - activity.start_s
        gb_s += seconds * activity.memory_mib / 1024
        cpu_s += seconds * cpu_for_memory(activity.memory_mib, memory_per_cpu_mib, max_cpu)
    last = max(dag.tasks, key=lambda t: tasks[t].complete_s)
    path = []
    current: str | None = last
    while current is not None:
        path.append(current)
        current = tasks[current].trigger
    return Timing(
        tasks=tasks,
        activities=activities,
        makespan_s=makespan_s,
        gb_s=gb_s,
        cpu_s=cpu_s,
        critical_path=list(reversed(path)),
    )
