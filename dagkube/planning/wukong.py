"""The ``wukong`` planner: one resource class, every task on a flexible worker.

A flexible worker continues with one ready downstream task and hands every other ready one
to a new invocation. No predictions are needed, so history is not read.
"""

from __future__ import annotations

from dagkube.dag import DagSpec
from dagkube.planning.model import Plan, TaskPlan
from dagkube.resources import DEFAULT_MAX_CPU, DEFAULT_MEMORY_PER_CPU_MIB


def default_class(classes_mib: list[int]) -> int:
    """The class a single-class planner uses: the middle one (the lower middle for even counts)."""
    ordered = sorted(classes_mib)
    return ordered[(len(ordered) - 1) // 2]


def plan_wukong(
    dag: DagSpec,
    classes_mib: list[int],
    sla: str,
    memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB,
    max_cpu: float = DEFAULT_MAX_CPU,
) -> Plan:
    memory = default_class(classes_mib)
    notes = [f"wukong: every task on a flexible worker of class {memory} MiB"]
    hinted = {t.id: t.min_memory_mib for t in dag.tasks.values() if t.min_memory_mib}
    if hinted and max(hinted.values()) > memory:
        fitting = [c for c in classes_mib if c >= max(hinted.values())]
        memory = min(fitting) if fitting else max(classes_mib)
        notes.append(f"min_memory hints raised the class to {memory} MiB")
    return Plan(
        planner="wukong",
        sla=sla,
        classes_mib=sorted(classes_mib),
        memory_per_cpu_mib=memory_per_cpu_mib,
        max_cpu=max_cpu,
        tasks={task_id: TaskPlan(memory_mib=memory) for task_id in dag.tasks},
        notes=notes,
    )
