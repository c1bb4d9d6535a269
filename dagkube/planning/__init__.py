"""Planning: predictions and planners. Reads a DagSpec (and, later, a History); never does I/O."""

from __future__ import annotations

from dagkube.dag import DagSpec
from dagkube.errors import InvalidOption
from dagkube.planning.model import Optimization, Plan, TaskPlan
from dagkube.planning.sla import parse_sla
from dagkube.planning.wukong import plan_wukong
from dagkube.resources import DEFAULT_MAX_CPU, DEFAULT_MEMORY_PER_CPU_MIB

PLANNERS = ("wukong",)

__all__ = ["PLANNERS", "Optimization", "Plan", "TaskPlan", "check_planner", "plan"]


def check_planner(name: str) -> str:
    """Normalize a planner name, or raise listing the accepted ones."""
    normalized = str(name).strip().lower()
    if normalized not in PLANNERS:
        raise InvalidOption(f"Planner {name!r} is unknown: choose one of {', '.join(PLANNERS)}")
    return normalized


def plan(
    dag: DagSpec,
    planner: str = "wukong",
    sla: str = "avg",
    classes_mib: list[int] | None = None,
    memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB,
    max_cpu: float = DEFAULT_MAX_CPU,
) -> Plan:
    """Plan a DAG with the named planner; validates every option first."""
    from dagkube.resources import parse_classes

    planner = check_planner(planner)
    sla = parse_sla(sla)
    classes = parse_classes(classes_mib)
    if memory_per_cpu_mib <= 0:
        raise InvalidOption(f"memory_per_cpu={memory_per_cpu_mib} MiB must be > 0")
    if max_cpu <= 0:
        raise InvalidOption(f"max_cpu={max_cpu} must be > 0")
    return plan_wukong(dag, classes, sla, memory_per_cpu_mib, max_cpu)
