"""The check every plan passes before a run: the runtime could execute it as written."""

from __future__ import annotations

from dagkube.dag import DagSpec
from dagkube.errors import InvalidOption
from dagkube.planning.model import Clustering, Plan, Prewarm, output_must_be_stored
from dagkube.planning.optimizations import check_conflicts


def validate_plan(dag: DagSpec, plan: Plan) -> None:
    """Reject a plan the runtime could not execute, naming the task and the problem."""
    classes = set(plan.classes_mib)
    missing = [t for t in dag.tasks if t not in plan.tasks]
    if missing:
        raise InvalidOption(f"Plan has no entry for task {missing[0]!r} ({len(missing)} missing)")
    worker_class: dict[str, tuple[int, str]] = {}
    for task_id, task in plan.tasks.items():
        if task_id not in dag.tasks:
            raise InvalidOption(f"Plan names task {task_id!r}, which the workflow does not have")
        if task.memory_mib not in classes:
            raise InvalidOption(
                f"Task {task_id!r}: class {task.memory_mib} MiB is not one of the configured "
                f"classes {sorted(classes)}"
            )
        hint = dag.tasks[task_id].min_memory_mib
        if hint and task.memory_mib < hint:
            raise InvalidOption(
                f"Task {task_id!r}: class {task.memory_mib} MiB is below its min_memory {hint} MiB"
            )
        if task.worker_id is not None:
            seen = worker_class.setdefault(task.worker_id, (task.memory_mib, task_id))
            if seen[0] != task.memory_mib:
                raise InvalidOption(
                    f"Worker {task.worker_id!r} has two classes: {seen[0]} MiB (task "
                    f"{seen[1]!r}) and {task.memory_mib} MiB (task {task_id!r})"
                )
    _validate_optimizations(dag, plan)


def _validate_optimizations(dag: DagSpec, plan: Plan) -> None:
    """Every mark is switched on and names real tasks; no two conflict. (Its name and
    parameters were checked when the plan was parsed.)"""
    marks = {t: task.optimizations for t, task in plan.tasks.items() if task.optimizations}
    for task_id, entries in marks.items():
        for entry in entries:
            if entry.name not in plan.optimizations:
                raise InvalidOption(
                    f"Task {task_id!r}: optimization {entry.name!r} is not switched on for "
                    f"this plan ({', '.join(plan.optimizations) or 'none are'})"
                )
            for other in entry.params.named_tasks():
                if other not in dag.tasks:
                    raise InvalidOption(
                        f"Task {task_id!r}: {entry.name} names task {other!r}, which the "
                        "workflow does not have"
                    )
            if isinstance(entry, Prewarm) and entry.params.memory_mib not in plan.classes_mib:
                raise InvalidOption(
                    f"Task {task_id!r}: prewarm asks for class {entry.params.memory_mib} "
                    f"MiB, not one of the configured classes {plan.classes_mib}"
                )

    def stored(task_id: str) -> bool:
        clustered = any(isinstance(o, Clustering) for o in marks.get(task_id, ()))
        return output_must_be_stored(dag, task_id, lambda t: plan.tasks[t].worker_id, clustered)

    check_conflicts(dag, marks, stored)
