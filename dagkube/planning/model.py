"""The Plan: plain data a planner hands to the runtime, stored beside the run's actual metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from dagkube.dag import DagSpec


def output_must_be_stored(
    dag: DagSpec, task_id: str, worker_of: Callable[[str], str | None]
) -> bool:
    """The runtime's upload rule, shared with the timing model: store an output in Redis only
    if it is a run output or a consumer may run on another worker. A flexible task's output
    stays local only when its one consumer has no other input and is flexible too (it is the
    worker's continuation); a bound task's when every consumer is on the same logical worker.
    """
    spec = dag.tasks[task_id]
    if not spec.downstream or task_id in dag.output_ids:
        return True
    me = worker_of(task_id)
    if me is None:
        down = dag.tasks[spec.downstream[0]]
        return not (
            len(spec.downstream) == 1 and len(down.deps) == 1 and worker_of(down.id) is None
        )
    return any(worker_of(d) != me for d in spec.downstream)


class Optimization(BaseModel):
    """An optimization switched on for one task, with its parameters (e.g. a pre-warm time)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class TaskPlan(BaseModel):
    """What the planner decided for one task."""

    memory_mib: int
    worker_id: str | None = None  # None: a flexible worker runs it (wukong-style)
    optimizations: list[Optimization] = Field(default_factory=list)
    predicted_start_s: float | None = None
    predicted_end_s: float | None = None
    critical_path: bool = False


class WorkerPlan(BaseModel):
    """One predicted worker activation (a flexible worker may serve several invocations)."""

    logical_id: str | None
    memory_mib: int
    cold: bool
    predicted_start_s: float
    predicted_end_s: float
    tasks: int


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
    notes: list[str] = Field(default_factory=list)

    def worker_tasks(self) -> dict[str, list[str]]:
        """Task ids per logical worker id, in plan order (flexible tasks are left out)."""
        workers: dict[str, list[str]] = {}
        for task_id, task in self.tasks.items():
            if task.worker_id is not None:
                workers.setdefault(task.worker_id, []).append(task_id)
        return workers

    def classes_used(self) -> list[int]:
        return sorted({t.memory_mib for t in self.tasks.values()})
