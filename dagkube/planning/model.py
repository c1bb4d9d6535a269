"""The Plan: plain data a planner hands to the runtime, stored beside the run's actual metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from dagkube.dag import DagSpec

AUTO = "auto"  # the planner that picks among the others (planning.choice)
SIMPLICITY = ("wukong", "uniform", "non-uniform")  # the simpler planner first
OPTIMIZATIONS = ("clustering", "delayed-io", "preload", "taskdup", "prewarm")
"""Every optimization, in the order their planning rules are applied and their runtime hooks
decide (docs/architecture.md, "Optimizations")."""

OPT_VARIANTS: dict[str, tuple[str, ...]] = {
    "wukong": ("clustering", "delayed-io", "prewarm"),
    "uniform": ("preload", "taskdup", "prewarm"),
    "non-uniform": ("preload", "taskdup", "prewarm"),
}
"""What a planner's ``-opt`` variant switches on."""


def output_must_be_stored(
    dag: DagSpec,
    task_id: str,
    worker_of: Callable[[str], str | None],
    clustered: bool = False,
) -> bool:
    """The runtime's upload rule, shared with the timing model: store an output in Redis only
    if it is a run output or a consumer may run on another worker. A flexible task's output
    stays local only when its consumers have no other input, are flexible too and all run on
    this worker: one consumer (the worker's continuation), or several under ``clustering``;
    a bound task's when every consumer is on the same logical worker.
    """
    spec = dag.tasks[task_id]
    if not spec.downstream or task_id in dag.output_ids:
        return True
    me = worker_of(task_id)
    if me is None:
        local = all(
            len(dag.tasks[d].deps) == 1 and worker_of(d) is None for d in spec.downstream
        ) and (len(spec.downstream) == 1 or clustered)
        return not local
    return any(worker_of(d) != me for d in spec.downstream)


class _Params(BaseModel):
    """Parameters of one optimization mark: every field required, no unknown ones, so a plan
    with a misspelled or missing parameter is refused when it is parsed."""

    model_config = ConfigDict(extra="forbid")

    def named_tasks(self) -> list[str]:
        """The task ids these parameters name (validation checks the workflow has them)."""
        return []


class ClusteringParams(_Params):
    """``clustering`` on a fan-out: its ``children`` run on its own worker."""

    children: list[str]

    def named_tasks(self) -> list[str]:
        return list(self.children)


class DelayedIoParams(_Params):
    """``delayed-io`` on a fan-in input: wait up to ``wait_s`` for the other inputs of
    ``fan_in`` and run it here instead of uploading."""

    fan_in: str
    wait_s: float

    def named_tasks(self) -> list[str]:
        return [self.fan_in]


class PreloadParams(_Params):
    """``preload`` on a fan-in: ``inputs`` fetched in the background by ``host`` (a logical
    worker id, or ``@<task>`` for the flexible worker that runs that task)."""

    host: str
    inputs: list[str]

    def named_tasks(self) -> list[str]:
        return list(self.inputs)


class TaskdupParams(_Params):
    """``taskdup`` on a consumer: the ``upstream`` it may re-run itself, with the predictions
    the worker decides from: the duplicate's time here (``exec_s``), and the original's
    predicted end and execution time."""

    upstream: str
    exec_s: float
    original_end_s: float
    original_exec_s: float

    def named_tasks(self) -> list[str]:
        return [self.upstream]


class PrewarmParams(_Params):
    """``prewarm`` on the task whose start triggers it: ``count`` workers of ``memory_mib``,
    requested ``delay_s`` after the task's start, for the ``targets`` they are meant for."""

    memory_mib: int
    count: int
    delay_s: float
    targets: list[str]


class _Mark(BaseModel):
    """One mark as stored, ``{"name": ..., "params": {...}}``: one subclass per optimization,
    its name fixed, so the name picks the parameters' model when a plan is parsed."""

    model_config = ConfigDict(extra="forbid")


class Clustering(_Mark):
    name: Literal["clustering"] = "clustering"
    params: ClusteringParams


class DelayedIo(_Mark):
    name: Literal["delayed-io"] = "delayed-io"
    params: DelayedIoParams


class Preload(_Mark):
    name: Literal["preload"] = "preload"
    params: PreloadParams


class Taskdup(_Mark):
    name: Literal["taskdup"] = "taskdup"
    params: TaskdupParams


class Prewarm(_Mark):
    name: Literal["prewarm"] = "prewarm"
    params: PrewarmParams


Optimization = Annotated[
    Clustering | DelayedIo | Preload | Taskdup | Prewarm, Field(discriminator="name")
]
"""An optimization switched on for one task, with its typed parameters (the same JSON the
untyped ``params`` dict of earlier releases had, so stored plans still parse)."""


@dataclass
class OptimizationIndex:
    """A plan's optimization marks, indexed the way the timing model and the worker's hooks
    look them up."""

    clustered: set[str] = field(default_factory=set)
    delayed: dict[str, tuple[str, float]] = field(default_factory=dict)  # input -> fan-in, wait
    preload: dict[str, tuple[str, set[str]]] = field(default_factory=dict)  # fan-in -> host, ins
    preload_host: dict[tuple[str, str], str] = field(default_factory=dict)  # (input, fan-in)
    hosts: set[str] = field(default_factory=set)
    dups: dict[str, list[TaskdupParams]] = field(default_factory=dict)  # consumer -> params
    dup_targets: set[str] = field(default_factory=set)
    prewarm: dict[str, list[PrewarmParams]] = field(default_factory=dict)  # trigger -> params

    @classmethod
    def of(cls, marks: Mapping[str, Iterable[Optimization]]) -> OptimizationIndex:
        found = cls()
        for task_id, entries in marks.items():
            for entry in entries:
                match entry:
                    case Clustering():
                        found.clustered.add(task_id)
                    case DelayedIo(params=delayed):
                        found.delayed[task_id] = (delayed.fan_in, delayed.wait_s)
                    case Preload(params=preload):
                        found.preload[task_id] = (preload.host, set(preload.inputs))
                        found.hosts.add(preload.host)
                        for dep in preload.inputs:
                            found.preload_host[(dep, task_id)] = preload.host
                    case Taskdup(params=dup):
                        found.dups.setdefault(task_id, []).append(dup)
                        found.dup_targets.add(dup.upstream)
                    case Prewarm(params=prewarm):
                        found.prewarm.setdefault(task_id, []).append(prewarm)
        return found


class TaskPlan(BaseModel):
    """What the planner decided for one task."""

    memory_mib: int
    worker_id: str | None = None  # None: a flexible worker runs it (wukong-style)
    optimizations: list[Optimization] = Field(default_factory=list)
    predicted_start_s: float | None = None  # its worker takes it
    predicted_end_s: float | None = None  # its output is stored and its consumers told
    predicted_download_s: float | None = None  # fetching its inputs (not the pre-loaded ones)
    predicted_exec_s: float | None = None
    predicted_upload_s: float | None = None  # 0 when the output stays on its worker
    predicted_output_bytes: int | None = None  # what its output edges carry
    critical_path: bool = False


class WorkerPlan(BaseModel):
    """One predicted worker activation (a flexible worker may serve several invocations)."""

    logical_id: str | None
    memory_mib: int
    cold: bool
    prewarmed: bool = False  # created ahead of demand by a pre-warm request
    predicted_start_s: float
    predicted_end_s: float
    tasks: int
    predicted_startup_s: float | None = None  # invocation queued -> the worker takes it


class Alternative(BaseModel):
    """A candidate plan the planner evaluated with the timing model before choosing: its label
    (planner, then the optimizations applied, e.g. ``uniform+prewarm``), its predictions, and
    why it was not chosen."""

    label: str
    model_makespan_s: float  # the timing model's, before calibration
    predicted_gb_s: float
    chosen: bool = False
    rejected: str | None = None  # why not, when not chosen


class Plan(BaseModel):
    """Per task: class, worker, optimizations, predictions; per run: totals and provenance."""

    planner: str
    sla: str
    classes_mib: list[int]
    memory_per_cpu_mib: int
    max_cpu: float
    tasks: dict[str, TaskPlan]
    workers: list[WorkerPlan] = Field(default_factory=list)
    predicted_makespan_s: float | None = None  # the timing model's, calibrated (see planners)
    model_makespan_s: float | None = None  # the timing model's own, before calibration
    predicted_gb_s: float | None = None
    history_runs: int = 0
    history_samples: int = 0
    optimizations: list[str] = Field(default_factory=list)  # switched on for this plan
    notes: list[str] = Field(default_factory=list)
    objective: str = "makespan"  # what the choices between candidates were made for
    max_gb_s: float | None = None  # the GB-s budget asked for, if any
    alternatives: list[Alternative] = Field(default_factory=list)  # the candidates evaluated
    # The first invocations queued the longest path first (planning.rules.source_order on the
    # tasks' predicted execution times) rather than in the DAG's order.
    longest_first: bool = False

    def chosen_planner(self) -> str | None:
        """The planner of the candidate chosen ("wukong" for ``wukong+prewarm``, "uniform"
        for ``uniform@1024Mi``); None for a plan without candidates (stored before they
        were)."""
        for alternative in self.alternatives:
            if alternative.chosen:
                return alternative.label.split("+")[0].split("@")[0] or None
        return None

    def worker_tasks(self) -> dict[str, list[str]]:
        """Task ids per logical worker id, in plan order (flexible tasks are left out)."""
        workers: dict[str, list[str]] = {}
        for task_id, task in self.tasks.items():
            if task.worker_id is not None:
                workers.setdefault(task.worker_id, []).append(task_id)
        return workers

    def task_optimizations(self, task_id: str, name: str) -> list[Optimization]:
        return [o for o in self.tasks[task_id].optimizations if o.name == name]

    def optimization_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.optimizations, 0)
        for task in self.tasks.values():
            for optimization in task.optimizations:
                counts[optimization.name] = counts.get(optimization.name, 0) + 1
        return counts

    def classes_used(self) -> list[int]:
        return sorted({t.memory_mib for t in self.tasks.values()})
